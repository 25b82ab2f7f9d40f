// Owns: the CPU backend's storage types for fp16/bf16, their exact conversions to and from fp32
// (round-to-nearest-even, subnormals, inf and NaN handled), and the per-dtype traits the
// templated kernels use (storage type -> tile accumulation type Acc: fp32 for fp16/bf16/fp32,
// fp64 for fp64; and the type Sum of the sums that run across tiles: fp64 for fp32 and fp64).
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
#include <utility>

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

// Per storage type: Acc, the type of the tile math (products, exponentials, the sums within one
// tile of kBlockN keys or kBlockM queries); Sum, the type of the sums that run across tiles (the
// forward's running O and row sum, the backward's dK/dV over query tiles and dQ over key tiles);
// and the scalar conversions.
template <typename T>
struct Traits;
template <>
struct Traits<Half> {
  using Acc = float;
  using Sum = float;
  static constexpr bool kExpF32 = false;
  static float load(Half x) { return half_to_float(x.bits); }
  static Half store(float x) { return Half{float_to_half(x)}; }
};
template <>
struct Traits<BFloat16> {
  using Acc = float;
  using Sum = float;
  static constexpr bool kExpF32 = false;
  static float load(BFloat16 x) { return bf16_to_float(x.bits); }
  static BFloat16 store(float x) { return BFloat16{float_to_bf16(x)}; }
};
// fp32 inputs, attention calls of at least kF32TileMinWork multiply-adds: fp32 tile math, fp64
// sums across tiles (fp32 sums across tiles too failed the rule on the long chains: an output
// row's P V over ~1000 keys, ratio 1.05); the backward computes its logits in fp64 (logit_t in
// flash_bwd_cpu.cpp). Smaller calls run as FloatF64 below. Why: docs/cpu_backend.md, "Numerics".
template <>
struct Traits<float> {
  using Acc = float;
  using Sum = double;
  static constexpr bool kExpF32 = false;
  static float load(float x) { return x; }
  static float store(double x) { return static_cast<float>(x); }
};
// fp32 storage with fp64 arithmetic (tiles and sums): the attention path of small fp32 calls.
// The same bits as float; only the attention dispatch (dispatch_attn_dtype) produces it.
struct FloatF64 {
  float v;
};
static_assert(sizeof(FloatF64) == sizeof(float), "FloatF64 must alias fp32 storage");
template <>
struct Traits<FloatF64> {
  using Acc = double;
  using Sum = double;
  // Its exponentials are evaluated in fp32 (exp_cols_f32 / exp_row_f32: the fp64 difference
  // split into an fp32 head and tail, the result widened), every product and sum stays fp64.
  static constexpr bool kExpF32 = true;
  static double load(FloatF64 x) { return x.v; }
  static FloatF64 store(double x) { return FloatF64{static_cast<float>(x)}; }
};
template <>
struct Traits<double> {
  using Acc = double;
  using Sum = double;
  static constexpr bool kExpF32 = false;
  static double load(double x) { return x; }
  static double store(double x) { return x; }
};

template <typename T>
using acc_t = typename Traits<T>::Acc;
template <typename T>
using sum_t = typename Traits<T>::Sum;

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

// Multiply-adds (Problem::work) from which an fp32 attention call computes its tiles in fp32.
// Below, the rule's statistic is a maximum over few elements: an fp32 kernel's maximum error
// is then as likely as the fp32 oracle's to land anywhere in its spread, so only fp64 tiles
// pass every draw; above, the maxima concentrate and the fp64 sums across tiles keep ours
// below the oracle's (docs/cpu_backend.md, "Numerics"). fp64 costs little at this size.
constexpr int64_t kF32TileMinWork = int64_t(1) << 26;

// dispatch_dtype for the attention forward and backward: fp32 calls below kF32TileMinWork get
// FloatF64 instead of float.
template <typename F>
void dispatch_attn_dtype(DType dtype, int64_t work, const char* arg_name, F&& f) {
  if (dtype == DType::kFloat32 && work < kF32TileMinWork) {
    f(FloatF64{});
    return;
  }
  dispatch_dtype(dtype, arg_name, std::forward<F>(f));
}

}  // namespace cpu
FLASH_NAMESPACE_END
