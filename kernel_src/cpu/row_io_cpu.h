// Owns: row loads and stores with a runtime dtype, for the fused ops of the CPU backend
// (norm_fwd_cpu.cpp, norm_bwd_cpu.cpp, cross_entropy_cpu.cpp). Their tensors may each have
// another dtype (bf16 activations with fp32 weights, an fp32 residual stream), so a row is
// converted to and from fp64, the accumulation type of these ops on the CPU: the one switch is per
// row, not per element, and the conversions are dtype_cpu.h's exact ones.
#pragma once
#include <cstdint>
#include <vector>

#include "dtype_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// dst[0:n] = src[offset : offset + n] as fp64.
inline void load_row(const void* src, DType dtype, int64_t offset, int64_t n, double* dst) {
  dispatch_dtype(dtype, "tensor", [&](auto tag) {
    using T = decltype(tag);
    const T* s = static_cast<const T*>(src) + offset;
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<double>(Traits<T>::load(s[i]));
  });
}

// dst[offset : offset + n] = src[0:n], rounded once to the storage dtype. For fp16/bf16 the value
// goes through fp32 first; fp64 -> fp32 -> fp16 can differ from a direct rounding only when the
// fp32 value is exactly halfway between two fp16 values, which an fp64 value rounded to fp32
// almost never is (the suite's tolerance allows one rounding step).
inline void store_row(void* dst, DType dtype, int64_t offset, int64_t n, const double* src) {
  dispatch_dtype(dtype, "tensor", [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    T* d = static_cast<T*>(dst) + offset;
    for (int64_t i = 0; i < n; ++i) d[i] = Traits<T>::store(static_cast<Acc>(src[i]));
  });
}

// One element of a per-row (statistics) vector: fp32, or fp64 when f64.
inline double load_stat(const void* p, bool f64, int64_t i) {
  return f64 ? static_cast<const double*>(p)[i] : static_cast<double>(static_cast<const float*>(p)[i]);
}

inline void store_stat(void* p, bool f64, int64_t i, double v) {
  if (f64) {
    static_cast<double*>(p)[i] = v;
  } else {
    static_cast<float*>(p)[i] = static_cast<float>(v);
  }
}

// An element of a rank-1 tensor of a runtime dtype (rowscale), as fp64.
inline double load_one(const void* p, DType dtype, int64_t i) {
  double v = 0.0;
  load_row(p, dtype, i, 1, &v);
  return v;
}

// A rank-1 tensor (weights) as fp64; all zeros when src is null (an absent beta).
inline void load_vector(const void* src, DType dtype, int64_t n, std::vector<double>& dst) {
  dst.assign(n, 0.0);
  if (src != nullptr) load_row(src, dtype, 0, n, dst.data());
}

}  // namespace cpu
FLASH_NAMESPACE_END
