// Owns: run_cross_entropy_fwd_cuda and run_cross_entropy_bwd_cuda, the CUDA kernels of the
// chunked cross-entropy (common/fused_params.h states the math, docs/fused_ops.md the design).
//
// Forward: a CTA per row (grid-stride over rows). Each thread walks its groups of 8 logits
// (16-byte loads when the row is aligned) once, keeping an online max and sum of exp in fp32
// and the plain sum (label smoothing); the block merges the (max, sum) pairs. Memory beyond the
// inputs: the three per-row outputs. With precomputed_lse the logits are not read (but for the
// label's).
// Backward: a grid of (row, chunk of kBwdChunk columns); each element is read, turned into its
// gradient from the row's lse and written (in place when dlogits is the logits: each thread
// reads its elements before writing them). No rows x vocab fp32 buffer exists.
//
// Labels are read on the device only: an out-of-range label gets FlashAttention-2's treatment
// (no label term, as for a label in another shard).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../common/fused_params.h"
#include "flash_api_cuda.h"
#include "fused_io_cuda.h"

FLASH_NAMESPACE_BEGIN

namespace {

using namespace fused;

constexpr int kThreads = 256;
constexpr int kBwdGroupsPerThread = 4;
constexpr int64_t kBwdChunk = int64_t(kThreads) * kGroup * kBwdGroupsPerThread;  // 8192

__device__ __forceinline__ int64_t label_of(const CrossEntropyParams& p, int64_t r) {
  return p.labels_int64 ? static_cast<const int64_t*>(p.labels)[r]
                        : static_cast<int64_t>(static_cast<const int32_t*>(p.labels)[r]);
}

__device__ __forceinline__ double load_row_value(const void* ptr, bool f64, int64_t i) {
  return f64 ? static_cast<const double*>(ptr)[i]
             : static_cast<double>(static_cast<const float*>(ptr)[i]);
}

__device__ __forceinline__ void store_row_value(void* ptr, bool f64, int64_t i, double v) {
  if (f64) {
    static_cast<double*>(ptr)[i] = v;
  } else {
    static_cast<float*>(ptr)[i] = static_cast<float>(v);
  }
}

// (m, s) <- the merge of (m, s) and (m2, s2): sum exp(l - m) over both parts.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty / all -inf so far
  s = (m == -INFINITY ? 0.0f : s * expf(m - mn)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mn));
  m = mn;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(const CrossEntropyParams p) {
  __shared__ float red_m[32], red_s[32], red_t[32];
  const int64_t cols = p.cols;
  const int64_t groups = (cols + kGroup - 1) / kGroup;
  const float scale = static_cast<float>(p.logit_scale);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* logits = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
    double lse;
    float total = 0.0f;
    if (p.precomputed_lse != nullptr) {
      lse = load_row_value(p.precomputed_lse, p.lse_f64, r);
    } else {
      const bool vec = aligned16(logits);
      float m = -INFINITY, s = 0.0f;
      for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
        const int64_t c0 = g * kGroup;
        const int n = static_cast<int>(min64(kGroup, cols - c0));
        float v[kGroup];
        load_group(logits + c0, n, vec, v);
        float gm = -INFINITY;
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          if (i < n) {
            v[i] *= scale;
            gm = fmaxf(gm, v[i]);
            total += v[i];
          }
        }
        const float mn = fmaxf(m, gm);
        if (mn == -INFINITY) continue;
        float gs = 0.0f;
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          if (i < n) gs += expf(v[i] - mn);
        }
        s = (m == -INFINITY ? 0.0f : s * expf(m - mn)) + gs;
        m = mn;
      }
      // Block merge: warps by shuffles, then warp 0 over the warps.
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
        total += __shfl_xor_sync(0xffffffffu, total, o);
      }
      if (lane == 0) {
        red_m[warp] = m;
        red_s[warp] = s;
        red_t[warp] = total;
      }
      __syncthreads();
      m = lane < nwarps ? red_m[lane] : -INFINITY;
      s = lane < nwarps ? red_s[lane] : 0.0f;
      total = lane < nwarps ? red_t[lane] : 0.0f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
        total += __shfl_xor_sync(0xffffffffu, total, o);
      }
      __syncthreads();  // red_* are reused by the next row
      lse = m == -INFINITY ? -static_cast<double>(INFINITY)
                           : static_cast<double>(m) + log(static_cast<double>(s));
    }
    if (threadIdx.x != 0) continue;
    store_row_value(p.lse, p.lse_f64, r, lse);
    const int64_t label = label_of(p, r);
    const int64_t y = label - p.class_start_idx;
    const bool here = label != p.ignore_index && y >= 0 && y < cols;
    // The label's scaled logit rounded as the LSE's terms were (v[i] *= scale in fp32), so that
    // lse - logit_y cancels exactly where it should (one class, or one dominant logit).
    const double logit_y = here ? static_cast<double>(to_float<T>(logits[y]) * scale) : 0.0;
    const CrossEntropyRowLoss l =
        cross_entropy_row_loss(p, label, lse, static_cast<double>(total), here, logit_y);
    store_row_value(p.losses, p.stats_f64, r, l.loss);
    store_row_value(p.z_losses, p.stats_f64, r, l.z_loss);
  }
}

// exp(s * logit - lse); for fp32 logits the difference is taken in fp64 (an fp32 one would carry
// a relative error of |lse| * 2^-24 into the gradient: docs/fused_ops.md), else in fp32. The
// product s * logit is the fp32 one the forward's LSE summed, so that the largest logit's
// exp(v - lse) is what the forward saw (exactly 1 with one class).
template <typename T>
__device__ __forceinline__ float softmax_of(float logit, float scale, double lse, float lse_f) {
  if constexpr (sizeof(T) == 4) {
    return expf(static_cast<float>(static_cast<double>(logit * scale) - lse));
  } else {
    return expf(scale * logit - lse_f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) ce_bwd_kernel(const CrossEntropyParams p) {
  const int64_t cols = p.cols;
  const int64_t r = blockIdx.x;
  const int64_t chunk0 = static_cast<int64_t>(blockIdx.y) * kBwdChunk;
  const T* logits = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  T* dlogits = static_cast<T*>(p.dlogits) + r * p.dlogits_row_stride;
  const bool vec = aligned16(logits) && aligned16(dlogits);
  const int64_t label = label_of(p, r);
  const bool ignored = label == p.ignore_index;
  const float dloss =
      ignored ? 0.0f : static_cast<float>(load_row_value(p.dlosses, p.stats_f64, r * p.dlosses_stride));
  const double lse = load_row_value(p.lse_in, p.lse_f64, r);
  const float lse_f = static_cast<float>(lse);
  const int64_t y = label - p.class_start_idx;
  const float eps = static_cast<float>(p.smoothing);
  const float neg = static_cast<float>(p.smoothing / static_cast<double>(p.total_classes));
  const float zfactor = static_cast<float>(1.0 + 2.0 * p.lse_square_scale * lse);
  const float scale = static_cast<float>(p.logit_scale);
  const float gscale = dloss * scale;
#pragma unroll
  for (int k = 0; k < kBwdGroupsPerThread; ++k) {
    const int64_t c0 = chunk0 + (int64_t(k) * blockDim.x + threadIdx.x) * kGroup;
    if (c0 >= cols) break;
    const int n = static_cast<int>(min64(kGroup, cols - c0));
    float v[kGroup];
    if (ignored) {
#pragma unroll
      for (int i = 0; i < kGroup; ++i) v[i] = 0.0f;
    } else {
      load_group_rw(logits + c0, n, vec, v);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        float g = softmax_of<T>(v[i], scale, lse, lse_f) * zfactor - neg;
        if (c0 + i == y) g -= 1.0f - eps;
        v[i] = gscale * g;
      }
    }
    store_group(dlogits + c0, n, vec, v);
  }
}

template <typename F>
void dispatch_ce(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat32: return f(float{});
    default:
      throw std::runtime_error(
          "flash_attn: the CUDA cross-entropy supports float16, bfloat16 and float32 logits");
  }
}

}  // namespace

void run_cross_entropy_fwd_cuda(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  dispatch_ce(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t grid = std::min<int64_t>(p.rows, int64_t(device_sms()) * 32);
    ce_fwd_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
    cuda_check(cudaGetLastError(), "ce_fwd_kernel launch");
  });
}

void run_cross_entropy_bwd_cuda(const CrossEntropyParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  const int64_t chunks = (p.cols + kBwdChunk - 1) / kBwdChunk;
  if (p.rows > std::numeric_limits<int32_t>::max() || chunks > 65535) {
    throw std::runtime_error("flash_attn: cross-entropy backward on CUDA supports up to 2^31 - 1 "
                             "rows and 65535 * 8192 classes");
  }
  dispatch_ce(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(chunks));
    ce_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    cuda_check(cudaGetLastError(), "ce_bwd_kernel launch");
  });
}

FLASH_NAMESPACE_END
