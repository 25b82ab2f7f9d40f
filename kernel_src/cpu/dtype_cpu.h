// Owns: the CPU backend's storage types for fp16/bf16, their exact conversions to and from fp32
// (round-to-nearest-even, subnormals, inf and NaN handled), and the per-dtype traits the
// templated kernels use (storage type -> accumulation type: fp32 for fp16/bf16, fp64 for fp32
// and fp64).
//
// Why our own conversions: kernel_src/ is framework-agnostic (no torch/c10 headers) and the
// baseline x86-64 target has no F16C, so we cannot rely on _Float16 or intrinsics being there.
// The fp16 rounding follows the classic bit-level formulation (IEEE 754-2008 binary16; the same
// idea as Maratyszcza's FP16 library, re-derived here): the addition of a magic constant lets the
// FPU do the rounding of subnormals, and a bias of 0xfff + lsb rounds normals to nearest-even.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../common/params.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline uint32_t f32_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24 is exact in fp32.
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return f32_from_bits(sign | f32_bits(mag));
  }
  return f32_from_bits(sign | ((exp + (127 - 15)) << 23) | (mant << 13));
}

inline uint16_t float_to_half(float x) {
  const uint32_t f = f32_bits(x);
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  uint32_t a = f & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);  // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (halfway past 65504): +-inf
  if (a < 0x38800000u) {
    // Below the smallest normal (2^-14): adding 0.5 puts the 2^-24 ulp of binary16 subnormals
    // at the last mantissa bit of the fp32 sum, so the FPU's own round-to-nearest-even does the
    // rounding; the result may round up into the smallest normal, whose encoding follows on.
    const float r = f32_from_bits(a) + 0.5f;
    return sign | static_cast<uint16_t>(f32_bits(r) - f32_bits(0.5f));
  }
  // Normal: rebias the exponent and round the 13 dropped bits to nearest-even.
  const uint32_t lsb = (a >> 13) & 1u;
  a += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + lsb;
  return sign | static_cast<uint16_t>(a >> 13);
}

inline float bf16_to_float(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float x) {
  const uint32_t f = f32_bits(x);
  if ((f & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((f >> 16) | 0x40u);  // NaN stays NaN (quiet)
  }
  const uint32_t lsb = (f >> 16) & 1u;
  return static_cast<uint16_t>((f + 0x7fffu + lsb) >> 16);  // overflow rounds to inf correctly
}

// Per storage type: the accumulation type and the scalar conversions.
template <typename T>
struct Traits;
template <>
struct Traits<Half> {
  using Acc = float;
  static constexpr bool kExpF32 = false;
  static float load(Half x) { return half_to_float(x.bits); }
  static Half store(float x) { return Half{float_to_half(x)}; }
};
template <>
struct Traits<BFloat16> {
  using Acc = float;
  static constexpr bool kExpF32 = false;
  static float load(BFloat16 x) { return bf16_to_float(x.bits); }
  static BFloat16 store(float x) { return BFloat16{float_to_bf16(x)}; }
};
// fp32 inputs accumulate in fp64. With fp32 accumulation our max error was of the same size as
// PyTorch's own fp32 attention (oneDNN/MKL GEMMs with FMA), so the project's tolerance rule
// max|ours - ref| <= 2 max|torch_fp32 - ref| + 1 ulp failed on a few percent of random small
// cases; with fp64 accumulation the error is essentially the final rounding, far inside the rule
// (docs/cpu_backend.md). The cost is the fp64 GEMM rate, about half the fp32 one.
template <>
struct Traits<float> {
  using Acc = double;
  // The softmax exponentials of its fp64 logits are evaluated in fp32 (exp_cols_f32): the
  // probabilities' fp32 rounding measurably changes no error ratio, while every product and
  // every sum stays fp64 (an fp32 product or row sum, even over 16 terms, did: see
  // docs/cpu_backend.md, "Numerics").
  static constexpr bool kExpF32 = true;
  static double load(float x) { return x; }
  static float store(double x) { return static_cast<float>(x); }
};
template <>
struct Traits<double> {
  using Acc = double;
  static constexpr bool kExpF32 = false;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};

template <typename T>
using acc_t = typename Traits<T>::Acc;

// Runtime dtype -> storage type, the one switch of the CPU backend. The default branch throws:
// an unknown dtype must never fall through to some other instantiation.
template <typename F>
void dispatch_dtype(DType dtype, const char* arg_name, F&& f) {
  switch (dtype) {
    case DType::kFloat16: f(Half{}); break;
    case DType::kBFloat16: f(BFloat16{}); break;
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    default:
      throw std::runtime_error(std::string("flash_attn (CPU): unsupported ") + arg_name +
                               " dtype code " + std::to_string(static_cast<int>(dtype)));
  }
}

}  // namespace cpu
FLASH_NAMESPACE_END
