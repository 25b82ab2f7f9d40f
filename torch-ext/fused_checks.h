// Owns: the argument checks the fused training ops (ops_layer_norm.cpp, ops_cross_entropy.cpp)
// share on top of checks.h: the device gate (CPU and CUDA; fp64 and some dtype mixes are CPU
// only), the dtype of each float tensor, rank-1 vectors and the dropout seed of the norm ops.
// Messages start with "flash_attn: " and name the argument, as everywhere in the binding.
#pragma once
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../kernel_src/common/fused_params.h"
#include "../kernel_src/common/philox.h"
#include "checks.h"

FLASH_NAMESPACE_BEGIN
namespace __attribute__((visibility("hidden"))) binding {

// The fused ops run on CPU and CUDA tensors (docs/fused_ops.md).
inline void check_fused_device(const Tensor& t, const char* name, const char* what) {
  FLASH_CHECK(t.is_cpu() || t.is_cuda(), name, " is on ", device_str(t), "; ", what,
              " supports CPU and CUDA tensors");
}

// On CUDA the fused ops compute in fp32 and serve fp16/bf16/fp32 (docs/fused_ops.md): fp64 is
// CPU only.
inline void check_fused_cuda_dtype(const Tensor& t, const char* name) {
  FLASH_CHECK(!t.is_cuda() || t.scalar_type() != ScalarType::Double, name,
              " has dtype torch.float64, which the fused ops support on CPU tensors only; on "
              "CUDA use torch.float16, torch.bfloat16 or torch.float32");
}

// On CUDA a companion tensor of the norm (the residual stream, the weights) has the input's
// dtype or fp32 (the kernels are compiled for those pairs).
inline void check_fused_cuda_pair(const Tensor& t, const char* name, const Tensor& ref,
                                  const char* ref_name) {
  FLASH_CHECK(!t.is_cuda() || t.scalar_type() == ref.scalar_type() ||
                  t.scalar_type() == ScalarType::Float,
              name, " has dtype ", dtype_name(t.scalar_type()), " but on CUDA it must have ",
              ref_name, "'s dtype (", dtype_name(ref.scalar_type()), ") or torch.float32");
}

inline void check_same_device(const Tensor& t, const char* name, const Tensor& ref,
                              const char* ref_name) {
  FLASH_CHECK(same_device(t, ref), name, " is on ", device_str(t), " but ", ref_name, " is on ",
              device_str(ref), "; all tensors must be on the same device");
}

// torch.float16, bfloat16, float32 or float64 -> the backend's dtype code.
inline DType float_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Double: return DType::kFloat64;
    default:
      fail(name, " has dtype ", dtype_name(t.scalar_type()),
           "; supported are torch.float16, torch.bfloat16, torch.float32 and torch.float64");
  }
}

inline void check_dtype_is(const Tensor& t, const char* name, ScalarType want, const char* why) {
  FLASH_CHECK(t.scalar_type() == want, name, " has dtype ", dtype_name(t.scalar_type()),
              " but must have ", dtype_name(want), " (", why, ")");
}

// A rank-1 tensor of n entries; returned contiguous.
inline Tensor check_vector(const Tensor& t, const char* name, int64_t n, const char* what) {
  FLASH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",) ", what,
              ", got ", shape_str(t));
  return torch::stable::contiguous(t);
}

// A 2-D tensor of the given shape with a contiguous last dimension (any row stride).
inline void check_matrix(const Tensor& t, const char* name, int64_t rows, int64_t cols,
                         const char* what) {
  FLASH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name,
              " must have shape (", rows, ", ", cols, ") ", what, ", got ", shape_str(t));
  check_last_dim_contiguous(t, name);
}

// The per-row statistics dtype: fp64 for an fp32/fp64 tensor (the CPU backend's accumulation
// type for them), else fp32.
inline ScalarType stats_dtype_for(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double ? ScalarType::Double
                                                           : ScalarType::Float;
}

// dropout_p and rng_state of the norm ops -> FusedDropout (the Philox stream of philox.h).
inline FusedDropout fused_dropout(const Dropout& d, int64_t rows, int64_t cols) {
  FusedDropout f;
  if (d.p <= 0.0) return f;
  FLASH_CHECK(rows <= std::numeric_limits<uint32_t>::max() &&
                  cols <= std::numeric_limits<uint32_t>::max(),
              "dropout needs rows and hidden size below 2^32, got (", rows, ", ", cols, ")");
  f.p_dropout = d.p;
  f.keep_scale = 1.0 / (1.0 - d.p);
  f.dropout_threshold = dropout_threshold(static_cast<float>(d.p));
  f.seed = d.seed;
  f.offset = d.offset;
  return f;
}

inline Tensor alloc_vec(const Tensor& like, std::vector<int64_t> sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, sizes, dtype);
}

}  // namespace binding
FLASH_NAMESPACE_END
