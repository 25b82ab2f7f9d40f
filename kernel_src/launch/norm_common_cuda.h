// Owns: what the norm forward (norm_fwd_cuda.cu) and backward (norm_bwd_cuda.cu) kernels share:
// packed groups of 8 elements held in registers (Vec8), the Philox keep bits of a group, the
// per-row statistics' storage, the row shapes of the register-resident kernels and their row
// reduction, the dtype dispatch and the cached launch queries. docs/fused_ops.md has the design.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common/cuda_primitives.h"  // cuda_check, current_device, device_sms
#include "../common/fused_params.h"
#include "../common/philox.h"
#include "fused_io_cuda.h"

FLASH_NAMESPACE_BEGIN
namespace fused {

// Eight consecutive elements of a row in their storage type, packed in 32-bit registers (four
// words for fp16/bf16, eight for fp32): how the register-resident kernels keep the weights and
// hold a group between its load and its use.
template <typename T>
struct Vec8 {
  static constexpr int kWords = 2 * static_cast<int>(sizeof(T));
  uint32_t w[kWords];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
  }

  // p[0:n] (zeros beyond n; n <= 0 loads nothing): 16-byte loads when vec and the group is
  // whole, else element by element. Read-only data (ld.global.nc).
  __device__ __forceinline__ void load(const T* p, int n, bool vec) {
    if (vec && n == kGroup) {
      const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
      for (int j = 0; j < kWords / 4; ++j) {
        const uint4 v = __ldg(q + j);
        w[4 * j] = v.x;
        w[4 * j + 1] = v.y;
        w[4 * j + 2] = v.z;
        w[4 * j + 3] = v.w;
      }
      return;
    }
    if constexpr (sizeof(T) == 2) {
      const unsigned short* e = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
      for (int j = 0; j < kWords; ++j) {
        const uint32_t lo = 2 * j < n ? __ldg(e + 2 * j) : 0u;
        const uint32_t hi = 2 * j + 1 < n ? __ldg(e + 2 * j + 1) : 0u;
        w[j] = lo | (hi << 16);
      }
    } else {
      const unsigned int* e = reinterpret_cast<const unsigned int*>(p);
#pragma unroll
      for (int j = 0; j < kWords; ++j) w[j] = j < n ? __ldg(e + j) : 0u;
    }
  }

  // Makes the words opaque to the optimiser at this point: called on the weights kept in
  // registers at the top of each row, it stops their conversions to fp32 (get) from being
  // hoisted out of the row loop, which would keep them unpacked (twice the registers).
  __device__ __forceinline__ void pin() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) asm volatile("" : "+r"(w[i]));
  }

  // Element i (a compile-time index after unrolling) as fp32: exact.
  __device__ __forceinline__ float get(int i) const {
    if constexpr (std::is_same_v<T, float>) {
      return __uint_as_float(w[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      const uint32_t word = w[i / 2];
      return __uint_as_float(i % 2 ? (word & 0xFFFF0000u) : (word << 16));
    } else {
      const uint32_t word = w[i / 2];
      return __half2float(__ushort_as_half(static_cast<unsigned short>(i % 2 ? word >> 16
                                                                             : word)));
    }
  }
};

// The keep bits of columns c0..c0+7 of row r (c0 a multiple of 8): two Philox draws, words
// c % 4, exactly dropout_keep's indexing (common/philox.h), so the mask is the CPU's.
__device__ __forceinline__ void keep_group(const FusedDropout& d, uint32_t r, uint32_t c0, int n,
                                           bool (&keep)[kGroup]) {
  const Philox4 a = dropout_draws(d.seed, d.offset, r, c0);
  keep[0] = a.x >= d.dropout_threshold;
  keep[1] = a.y >= d.dropout_threshold;
  keep[2] = a.z >= d.dropout_threshold;
  keep[3] = a.w >= d.dropout_threshold;
  if (n > 4) {
    const Philox4 b = dropout_draws(d.seed, d.offset, r, c0 + 4);
    keep[4] = b.x >= d.dropout_threshold;
    keep[5] = b.y >= d.dropout_threshold;
    keep[6] = b.z >= d.dropout_threshold;
    keep[7] = b.w >= d.dropout_threshold;
  } else {
    keep[4] = keep[5] = keep[6] = keep[7] = false;
  }
}

// The keep bits of a thread's K groups (group k at column group_col(k), bit 8 k + i for its
// column i): one group's draws at a time (a loop that is not unrolled, so that the Philox rounds
// of several groups do not compete for registers).
template <int K, int T>
__device__ __forceinline__ uint32_t keep_bits(const FusedDropout& d, uint32_t r, int cols,
                                              int tid) {
  static_assert(K * kGroup <= 32, "keep bits of at most 4 groups");
  uint32_t bits = 0u;
#pragma unroll 1
  for (int k = 0; k < K; ++k) {
    const int c0 = (k * T + tid) * kGroup;
    const int n = cols - c0;
    if (n <= 0) break;
    bool keep[kGroup];
    keep_group(d, r, static_cast<uint32_t>(c0), n, keep);
#pragma unroll
    for (int i = 0; i < kGroup; ++i) bits |= uint32_t(keep[i]) << (k * kGroup + i);
  }
  return bits;
}

__device__ __forceinline__ void store_stat(void* p, bool f64, int64_t i, float v) {
  if (f64) {
    static_cast<double*>(p)[i] = static_cast<double>(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

__device__ __forceinline__ float load_stat(const void* p, bool f64, int64_t i) {
  return f64 ? static_cast<float>(static_cast<const double*>(p)[i])
             : static_cast<const float*>(p)[i];
}

// Elements of group k (of K) of a thread at index tid among the T threads of a row: group k
// covers columns [8 (k T + tid), +8), so a warp's 16-byte accesses are consecutive.
template <int T>
__device__ __forceinline__ int group_col(int k, int tid) {
  return (k * T + tid) * kGroup;
}
__device__ __forceinline__ int group_len(int cols, int c0) {
  const int n = cols - c0;
  return n < 0 ? 0 : (n > kGroup ? kGroup : n);
}

// The shape of a register-resident kernel: W warps per row, each thread holding K groups of 8
// columns of it (rows of up to 256 K W columns), several rows per CTA when a row is narrow.
template <int K_, int W_>
struct RowShape {
  static constexpr int K = K_;
  static constexpr int W = W_;
  static constexpr int kThreadsPerRow = 32 * W;
  static constexpr int kCtaThreads = kThreadsPerRow < 128 ? 128 : kThreadsPerRow;
  static constexpr int kRowsPerCta = kCtaThreads / kThreadsPerRow;
  static constexpr int64_t kMaxCols = int64_t(kThreadsPerRow) * K * kGroup;
  // __launch_bounds__'s minimum CTAs per SM: at most 128 registers per thread, so that 512
  // threads (16 warps) per SM stay resident, enough loads in flight to cover DRAM latency.
  static constexpr int kMinCtasPerSm = 512 / kCtaThreads;
  // Shared floats of the row reduction of N values (double-buffered; none for one warp).
  template <int N>
  static constexpr int kRedFloats = W > 1 ? 2 * kRowsPerCta * W * N : 1;
};

// Sums N values over the threads of one row: warp shuffles, and with W > 1 warps one exchange
// through shared memory (one __syncthreads, so every thread of the CTA must call it: the row
// loops are CTA-uniform). Two buffers alternate, so a reduction never overwrites the one before
// it while a slow warp may still read it. The order is fixed by the shape: deterministic.
template <int W, int N>
struct RowReducer {
  float* red;  // RowShape::kRedFloats<N> shared floats
  int group, warp, lane, rows_per_cta;
  int buf = 0;

  __device__ __forceinline__ void sum(float (&v)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
    if constexpr (W > 1) {
      float* r = red + (buf * rows_per_cta + group) * W * N;
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) r[warp * N + i] = v[i];
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < W ? r[lane * N + i] : 0.0f);
      buf ^= 1;
    }
  }
};

[[noreturn]] inline void unsupported(const char* what, DType a, DType b) {
  throw std::runtime_error(std::string("flash_attn: ") + what + " (dtype codes " +
                           std::to_string(static_cast<int>(a)) + ", " +
                           std::to_string(static_cast<int>(b)) + ") on CUDA");
}

// f(Tin{}, Tx{}, Tw{}) for the runtime dtypes: x and w are Tin or fp32.
template <typename F>
void dispatch_norm(DType in, DType x, DType w, F&& f) {
  auto with_in = [&](auto in_tag) {
    using Tin = decltype(in_tag);
    const DType in_code = in;
    auto with_x = [&](auto x_tag) {
      using Tx = decltype(x_tag);
      if (w == in_code) return f(Tin{}, Tx{}, Tin{});
      if (w == DType::kFloat32) return f(Tin{}, Tx{}, float{});
      unsupported("the weight dtype must be the input's or float32", in, w);
    };
    if (x == in_code) return with_x(Tin{});
    if (x == DType::kFloat32) return with_x(float{});
    unsupported("the residual dtype must be the input's or float32", in, x);
  };
  switch (in) {
    case DType::kFloat16: return with_in(__half{});
    case DType::kBFloat16: return with_in(__nv_bfloat16{});
    case DType::kFloat32: return with_in(float{});
    default: unsupported("the norm supports float16, bfloat16 and float32 inputs", in, in);
  }
}

constexpr int kMaxDevices = 64;

// CTAs of Kernel resident per SM times the SMs of the current device, for `threads` threads and
// `smem` dynamic shared bytes; queried once per (kernel, device, variant) and cached (variant:
// the caller's index for its few smem sizes, < kVariants).
template <auto Kernel, int kVariants = 1>
int resident_ctas(int threads, size_t smem, int variant = 0) {
  static std::atomic<int> cache[kMaxDevices][kVariants];
  const int dev = current_device();
  if (dev < kMaxDevices) {
    const int v = cache[dev][variant].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int per_sm = 0;
  cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int ctas = (per_sm > 0 ? per_sm : 1) * device_sms();
  if (dev < kMaxDevices) cache[dev][variant].store(ctas, std::memory_order_relaxed);
  return ctas;
}

// The grid of a register-resident kernel for `rows` rows: the CTAs resident on the device (each
// then loops over several rows, loading the weights once), or fewer when the rows need fewer.
// FLASH_NORM_GRID_SCALE (a tuning knob for benchmarks, read once; default 1) scales the
// resident count: a large value gives one CTA per row group and no row loop. The backward's
// workspace grows with the grid (a partial per row slot).
inline int64_t rows_grid(int64_t rows, int rows_per_cta, int resident) {
  static const double scale = [] {
    const char* e = std::getenv("FLASH_NORM_GRID_SCALE");
    const double v = e != nullptr ? std::atof(e) : 1.0;
    return v > 0.0 ? v : 1.0;
  }();
  const int64_t row_ctas = (rows + rows_per_cta - 1) / rows_per_cta;
  const double want = scale * static_cast<double>(resident);
  const int64_t ctas = want >= static_cast<double>(row_ctas) ? row_ctas
                                                             : static_cast<int64_t>(want);
  return ctas < 1 ? 1 : ctas;
}

// Dynamic shared memory the general (long-row) kernels may use: opted in above the 48 KB
// default; two CTAs per SM fit on sm80/sm90.
constexpr int kMaxSmemBytes = 96 * 1024;

// Lets Kernel use kMaxSmemBytes of dynamic shared memory on the current device (set once per
// kernel and device).
template <auto Kernel>
void allow_smem() {
  static std::atomic<bool> done[kMaxDevices];
  const int dev = current_device();
  if (dev < kMaxDevices && done[dev].load(std::memory_order_relaxed)) return;
  cuda_check(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  kMaxSmemBytes),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  if (dev < kMaxDevices) done[dev].store(true, std::memory_order_relaxed);
}

}  // namespace fused
FLASH_NAMESPACE_END
