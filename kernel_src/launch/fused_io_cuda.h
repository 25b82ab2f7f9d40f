// Owns: the device helpers of the fused training ops' CUDA kernels (norm_cuda.cu,
// cross_entropy_cuda.cu): storage <-> fp32 conversion, groups of 8 elements loaded and stored
// with 16-byte vector accesses when the row is aligned (scalar otherwise and for the tail), and
// block-wide reductions. fp32 is the accumulation type on CUDA (docs/fused_ops.md).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/cuda_primitives.h"  // cuda::to_float
#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace fused {

constexpr int kGroup = 8;  // elements per group: 16 bytes of fp16/bf16, 32 of fp32

using cuda::from_float;
using cuda::to_float;

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// x rounded to T and back (the value a stored T holds).
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return to_float<T>(from_float<T>(x));
}

// Whether p is 16-byte aligned (a row start; groups then stay aligned since 8 * sizeof(T) is a
// multiple of 16 for 2- and 4-byte types).
__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// f[0:n] = p[0:n] as fp32 (f[n:] = 0): one or two 16-byte loads when vec and the group is
// whole, else element by element. kReadOnly loads through the read-only cache (__ldg); plain
// loads are for data this kernel wrote earlier (stored x) or may overwrite (in-place logits).
template <typename T, bool kReadOnly = true>
__device__ __forceinline__ void load_group(const T* p, int n, bool vec, float (&f)[kGroup]) {
  if (vec && n == kGroup) {
    if constexpr (sizeof(T) == 2) {
      const uint4* q = reinterpret_cast<const uint4*>(p);
      const uint4 v = kReadOnly ? __ldg(q) : *q;
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) f[i] = to_float<T>(e[i]);
    } else {
      const float4* q = reinterpret_cast<const float4*>(p);
      const float4 a = kReadOnly ? __ldg(q) : q[0];
      const float4 b = kReadOnly ? __ldg(q + 1) : q[1];
      f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
      f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kGroup; ++i) f[i] = i < n ? to_float<T>(p[i]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void load_group_rw(const T* p, int n, bool vec, float (&f)[kGroup]) {
  load_group<T, false>(p, n, vec, f);
}

// p[0:n] = f[0:n], rounded once to T.
template <typename T>
__device__ __forceinline__ void store_group(T* p, int n, bool vec, const float (&f)[kGroup]) {
  if (vec && n == kGroup) {
    if constexpr (sizeof(T) == 2) {
      uint4 v;
      T* e = reinterpret_cast<T*>(&v);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) e[i] = from_float<T>(f[i]);
      *reinterpret_cast<uint4*>(p) = v;
    } else {
      reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
      reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kGroup; ++i) {
    if (i < n) p[i] = from_float<T>(f[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums v[0:N] over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// totals. red: __shared__ float[32 * N]. The summation order is fixed by the block shape.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) red[warp * N + i] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float t = lane < nwarps ? red[lane * N + i] : 0.0f;
    v[i] = warp_sum(t);
  }
  __syncthreads();  // red may be reused right away
}

// Threads per block for a row of `groups` groups: a multiple of 32 in [32, max_threads].
inline int threads_for_groups(int64_t groups, int max_threads) {
  int64_t t = (groups + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > max_threads) t = max_threads;
  return static_cast<int>(t);
}

}  // namespace fused
FLASH_NAMESPACE_END
