// Owns: run_norm_fwd_cuda and run_norm_bwd_cuda, the CUDA kernels of dropout + residual add +
// LayerNorm/RMSNorm (common/fused_params.h states the math, docs/fused_ops.md the design).
//
// Forward: a CTA per row (grid-stride over rows). Each thread owns groups of 8 columns
// (fused_io_cuda.h: 16-byte vector accesses when the row is aligned, a scalar tail). Pass 1
// reads x0 / residual / colscale once, forms x, draws the Philox keep bits of common/philox.h
// (two draws per group: columns 8k..8k+3 and 8k+4..8k+7), writes x (and the mask) and keeps the
// rounded x in shared memory; the mean and then the variance are block sums in fp32 over that
// copy; pass 3 writes z. A row too long for the shared-memory copy re-reads the x it wrote (each
// thread reads back only its own columns: no fence needed).
//
// Backward: a fixed grid of G CTAs (G = CTAs resident on the device, at most rows), CTA b taking
// rows b, b + G, ... Pass 1 reads x, dz and gamma for the two row means; pass 2 re-reads them
// (from L2: the row was just read) with dx, x0 and colscale and writes dx0 / dresidual. The
// column sums dgamma, dbeta, dcolscale accumulate per CTA in fp32 (shared memory when they fit,
// else the CTA's slice of the workspace; each column has one owning thread, so no atomics), and
// a second kernel adds the G partials of each column in CTA order: deterministic for a given
// device and shape. (Partials in global memory are capped at 128 MB by using fewer CTAs.)
//
// Dtypes: x0 (and z, dz, dx0, rowscale) fp16/bf16/fp32; x (residual, dx, dresidual) x0's dtype
// or fp32; weights x0's dtype or fp32. fp64 and other mixes are rejected by the binding
// (docs/fused_ops.md).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../common/fused_params.h"
#include "../common/philox.h"
#include "flash_api_cuda.h"
#include "fused_io_cuda.h"

FLASH_NAMESPACE_BEGIN

namespace {

using namespace fused;

constexpr int kMaxThreads = 256;
// Dynamic shared memory a CTA may use (opted in above the 48 KB default; two CTAs per SM fit
// on sm80/sm90).
constexpr int kMaxSmemBytes = 96 * 1024;

// The keep bits of columns c0..c0+7 of row r (c0 a multiple of 8), and the dropout factor.
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

// ---- forward ----------------------------------------------------------------------------------

template <typename Tin, typename Tx, typename Tw>
__global__ void __launch_bounds__(kMaxThreads)
norm_fwd_kernel(const NormFwdParams p, bool cache_in_smem) {
  extern __shared__ float xcache[];
  __shared__ float red[32];
  const int64_t cols = p.cols;
  const int64_t groups = (cols + kGroup - 1) / kGroup;
  const FusedDropout& d = p.dropout;
  const bool dropout = d.p_dropout > 0.0;
  const float keep_scale = static_cast<float>(d.keep_scale);
  const Tw* gamma = static_cast<const Tw*>(p.gamma);
  const Tw* beta = static_cast<const Tw*>(p.beta);
  const Tw* colscale = static_cast<const Tw*>(p.colscale);
  const bool w_vec = aligned16(gamma) && (beta == nullptr || aligned16(beta)) &&
                     (colscale == nullptr || aligned16(colscale));

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const Tin* x0 = static_cast<const Tin*>(p.x0) + r * p.x0_row_stride;
    const Tx* res = p.residual != nullptr
                        ? static_cast<const Tx*>(p.residual) + r * p.residual_row_stride
                        : nullptr;
    Tx* xout = p.x != nullptr ? static_cast<Tx*>(p.x) + r * cols : nullptr;
    Tin* z = static_cast<Tin*>(p.z) + r * cols;
    uint8_t* dmask = p.dmask != nullptr ? p.dmask + r * cols : nullptr;
    const bool vec = w_vec && aligned16(x0) && (res == nullptr || aligned16(res)) &&
                     (xout == nullptr || aligned16(xout)) && aligned16(z);
    const float rowscale =
        p.rowscale != nullptr ? to_float<Tin>(static_cast<const Tin*>(p.rowscale)[r]) : 1.0f;

    // Pass 1: x, written once; its sum.
    float sum[1] = {0.0f};
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      const int64_t c0 = g * kGroup;
      const int n = static_cast<int>(min64(kGroup, cols - c0));
      float v[kGroup];
      load_group(x0 + c0, n, vec, v);
      if (dropout) {
        bool keep[kGroup];
        keep_group(d, static_cast<uint32_t>(r), static_cast<uint32_t>(c0), n, keep);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) v[i] = keep[i] ? v[i] * rowscale * keep_scale : 0.0f;
        if (dmask != nullptr) {
#pragma unroll
          for (int i = 0; i < kGroup; ++i) {
            if (i < n) dmask[c0 + i] = keep[i] ? 1 : 0;
          }
        }
      } else if (p.rowscale != nullptr) {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) v[i] *= rowscale;
      }
      if (colscale != nullptr) {
        float cs[kGroup];
        load_group(colscale + c0, n, vec, cs);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) v[i] *= cs[i];
      }
      if (res != nullptr) {
        float rv[kGroup];
        load_group(res + c0, n, vec, rv);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) v[i] += rv[i];
      }
      if (xout != nullptr) {
        store_group(xout + c0, n, vec, v);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) v[i] = round_to<Tx>(v[i]);
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        if (i < n) {
          sum[0] += v[i];
          if (cache_in_smem) xcache[c0 + i] = v[i];
        }
      }
    }
    block_sum(sum, red);
    const float mu = p.is_rms_norm ? 0.0f : sum[0] / static_cast<float>(cols);

    // The row's x again (the cached copy or what this thread wrote).
    auto reload = [&](int64_t c0, int n, float (&v)[kGroup]) {
      if (cache_in_smem) {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) v[i] = i < n ? xcache[c0 + i] : 0.0f;
      } else if (xout != nullptr) {
        load_group_rw(xout + c0, n, vec, v);
      } else {
        load_group(x0 + c0, n, vec, v);  // x is x0 (same dtype: Tx == Tin)
      }
    };

    // Pass 2: the variance about mu (two-pass: no cancellation).
    float m2[1] = {0.0f};
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      const int64_t c0 = g * kGroup;
      const int n = static_cast<int>(min64(kGroup, cols - c0));
      float v[kGroup];
      reload(c0, n, v);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const float t = i < n ? v[i] - mu : 0.0f;
        m2[0] += t * t;
      }
    }
    block_sum(m2, red);
    const float rsigma =
        1.0f / sqrtf(m2[0] / static_cast<float>(cols) + static_cast<float>(p.epsilon));
    if (threadIdx.x == 0) {
      if (p.mu != nullptr) store_stat(p.mu, p.stats_f64, r, mu);
      store_stat(p.rsigma, p.stats_f64, r, rsigma);
    }

    // Pass 3: z.
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      const int64_t c0 = g * kGroup;
      const int n = static_cast<int>(min64(kGroup, cols - c0));
      float v[kGroup], w[kGroup], b[kGroup];
      reload(c0, n, v);
      load_group(gamma + c0, n, vec, w);
      if (beta != nullptr) {
        load_group(beta + c0, n, vec, b);
      } else {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) b[i] = 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) v[i] = w[i] * ((v[i] - mu) * rsigma) + b[i];
      store_group(z + c0, n, vec, v);
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------

// Column-sum slots: dgamma, dbeta, then dcolscale when there is a colscale.
__host__ __device__ inline int norm_bwd_slots(const NormBwdParams& p) {
  return p.colscale != nullptr ? 3 : 2;
}

template <typename Tin, typename Tx, typename Tw>
__global__ void __launch_bounds__(kMaxThreads)
norm_bwd_kernel(const NormBwdParams p, float* partial, bool acc_in_smem) {
  extern __shared__ float acc_smem[];
  __shared__ float red[64];
  const int64_t cols = p.cols;
  const int64_t groups = (cols + kGroup - 1) / kGroup;
  const int slots = norm_bwd_slots(p);
  float* acc = acc_in_smem ? acc_smem : partial + blockIdx.x * slots * cols;
  float* dgamma = acc;
  float* dbeta = acc + cols;
  float* dcolscale = acc + 2 * cols;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    for (int64_t c = g * kGroup; c < min64(cols, (g + 1) * kGroup); ++c) {
      for (int s = 0; s < slots; ++s) acc[s * cols + c] = 0.0f;
    }
  }
  const FusedDropout& d = p.dropout;
  const bool dropout = d.p_dropout > 0.0;
  const float keep_scale = static_cast<float>(d.keep_scale);
  const Tw* gamma = static_cast<const Tw*>(p.gamma);
  const Tw* colscale = static_cast<const Tw*>(p.colscale);
  const bool w_vec = aligned16(gamma) && (colscale == nullptr || aligned16(colscale));
  const float inv_cols = 1.0f / static_cast<float>(cols);

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const Tx* x = static_cast<const Tx*>(p.x) + r * p.x_row_stride;
    const Tin* dz = static_cast<const Tin*>(p.dz) + r * p.dz_row_stride;
    const Tx* dxin = p.dx != nullptr ? static_cast<const Tx*>(p.dx) + r * p.dx_row_stride
                                     : nullptr;
    const Tin* x0 = p.x0 != nullptr ? static_cast<const Tin*>(p.x0) + r * p.x0_row_stride
                                    : nullptr;
    Tin* dx0 = static_cast<Tin*>(p.dx0) + r * cols;
    Tx* dres = p.dresidual != nullptr ? static_cast<Tx*>(p.dresidual) + r * cols : nullptr;
    const bool vec = w_vec && aligned16(x) && aligned16(dz) && aligned16(dx0) &&
                     (dxin == nullptr || aligned16(dxin)) && (x0 == nullptr || aligned16(x0)) &&
                     (dres == nullptr || aligned16(dres));
    const float mu = p.is_rms_norm ? 0.0f : load_stat(p.mu, p.stats_f64, r);
    const float rsigma = load_stat(p.rsigma, p.stats_f64, r);
    const float rowscale =
        p.rowscale != nullptr ? to_float<Tin>(static_cast<const Tin*>(p.rowscale)[r]) : 1.0f;

    // Pass 1: mean(g), mean(g * x_hat); dgamma, dbeta.
    float sums[2] = {0.0f, 0.0f};
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      const int64_t c0 = g * kGroup;
      const int n = static_cast<int>(min64(kGroup, cols - c0));
      float xv[kGroup], dzv[kGroup], w[kGroup];
      load_group(x + c0, n, vec, xv);
      load_group(dz + c0, n, vec, dzv);
      load_group(gamma + c0, n, vec, w);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        if (i < n) {
          const float xh = (xv[i] - mu) * rsigma;
          const float gi = __fmul_rn(dzv[i], w[i]);  // rounded as in pass 2 (see there)
          sums[0] += gi;
          sums[1] += gi * xh;
          dgamma[c0 + i] += dzv[i] * xh;
          dbeta[c0 + i] += dzv[i];
        }
      }
    }
    block_sum(sums, red);
    const float mean_g = p.is_rms_norm ? 0.0f : sums[0] * inv_cols;
    const float mean_gx = sums[1] * inv_cols;

    // Pass 2: dx, dresidual, dx0, dcolscale.
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      const int64_t c0 = g * kGroup;
      const int n = static_cast<int>(min64(kGroup, cols - c0));
      float xv[kGroup], dzv[kGroup], w[kGroup], dx[kGroup];
      load_group(x + c0, n, vec, xv);
      load_group(dz + c0, n, vec, dzv);
      load_group(gamma + c0, n, vec, w);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const float xh = (xv[i] - mu) * rsigma;
        // g = dz * w rounded, never fused into g - mean_g: with one column (or a constant row)
        // g - mean(g) must cancel exactly, as it does in unfused arithmetic.
        dx[i] = rsigma * (__fmul_rn(dzv[i], w[i]) - mean_g - xh * mean_gx);
      }
      if (dxin != nullptr) {
        float t[kGroup];
        load_group(dxin + c0, n, vec, t);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) dx[i] += t[i];
      }
      if (dres != nullptr) store_group(dres + c0, n, vec, dx);
      float factor[kGroup];
      if (dropout) {
        bool keep[kGroup];
        keep_group(d, static_cast<uint32_t>(r), static_cast<uint32_t>(c0), n, keep);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) factor[i] = keep[i] ? rowscale * keep_scale : 0.0f;
      } else {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) factor[i] = rowscale;
      }
      if (colscale != nullptr) {
        float cs[kGroup], x0v[kGroup];
        load_group(colscale + c0, n, vec, cs);
        load_group(x0 + c0, n, vec, x0v);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          if (i < n) dcolscale[c0 + i] += dx[i] * (x0v[i] * factor[i]);
          dx[i] *= cs[i];
        }
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) dx[i] *= factor[i];
      store_group(dx0 + c0, n, vec, dx);
    }
  }
  if (acc_in_smem) {
    float* out = partial + blockIdx.x * slots * cols;
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      for (int64_t c = g * kGroup; c < min64(cols, (g + 1) * kGroup); ++c) {
        for (int s = 0; s < slots; ++s) out[s * cols + c] = acc[s * cols + c];
      }
    }
  }
}

// dgamma / dbeta / dcolscale[c] = the sum over the CTAs' partials, in CTA order.
template <typename Tw>
__global__ void norm_bwd_reduce_kernel(const NormBwdParams p, const float* partial, int ctas) {
  const int64_t cols = p.cols;
  const int slots = norm_bwd_slots(p);
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < cols;
       c += int64_t(gridDim.x) * blockDim.x) {
    float s[3] = {0.0f, 0.0f, 0.0f};
    for (int b = 0; b < ctas; ++b) {
      const float* base = partial + int64_t(b) * slots * cols + c;
      s[0] += base[0];
      s[1] += base[cols];
      if (slots > 2) s[2] += base[2 * cols];
    }
    static_cast<Tw*>(p.dgamma)[c] = from_float<Tw>(s[0]);
    if (p.dbeta != nullptr) static_cast<Tw*>(p.dbeta)[c] = from_float<Tw>(s[1]);
    if (p.dcolscale != nullptr) static_cast<Tw*>(p.dcolscale)[c] = from_float<Tw>(s[2]);
  }
}

// ---- dispatch ---------------------------------------------------------------------------------

[[noreturn]] void unsupported(const char* what, DType a, DType b) {
  throw std::runtime_error(std::string("flash_attn: ") + what + " (dtype codes " +
                           std::to_string(static_cast<int>(a)) + ", " +
                           std::to_string(static_cast<int>(b)) + ") on CUDA");
}

// f.template operator()<Tin, Tx, Tw>() for the runtime dtypes: x and w are Tin or fp32.
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

// Lets Kernel use kMaxSmemBytes of dynamic shared memory on the current device (set once per
// kernel and device: one instantiation, so one flag array, per kernel; a launch with less is
// unaffected).
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

// The backward's partials in global memory (hidden too long for shared memory) are capped at
// this many floats (128 MB) by using fewer CTAs.
constexpr int64_t kMaxGlobalPartialFloats = int64_t(1) << 25;

struct BwdLaunch {
  int threads = 32, ctas = 0;
  size_t smem = 0;
  bool acc_in_smem = false;
};

// The backward's grid (a function of the shape and the device only: the column sums' order).
template <typename Tin, typename Tx, typename Tw>
BwdLaunch bwd_launch(const NormBwdParams& p) {
  BwdLaunch l;
  const int64_t groups = (p.cols + kGroup - 1) / kGroup;
  l.threads = threads_for_groups(groups, kMaxThreads);
  const size_t acc_bytes = sizeof(float) * norm_bwd_slots(p) * static_cast<size_t>(p.cols);
  l.acc_in_smem = acc_bytes <= static_cast<size_t>(kMaxSmemBytes);
  l.smem = l.acc_in_smem ? acc_bytes : 0;
  if (p.rows == 0) return l;
  auto kernel = norm_bwd_kernel<Tin, Tx, Tw>;
  allow_smem<norm_bwd_kernel<Tin, Tx, Tw>>();
  int per_sm = 0;
  cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, l.threads, l.smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int64_t resident = static_cast<int64_t>(std::max(per_sm, 1)) * device_sms();
  int64_t ctas = std::min<int64_t>(p.rows, resident);
  if (!l.acc_in_smem) {
    const int64_t per_cta = int64_t(norm_bwd_slots(p)) * p.cols;
    ctas = std::max<int64_t>(1, std::min<int64_t>(ctas, kMaxGlobalPartialFloats / per_cta));
  }
  l.ctas = static_cast<int>(ctas);
  return l;
}

}  // namespace

void run_norm_fwd_cuda(const NormFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  dispatch_norm(p.x0_dtype, p.x_dtype, p.w_dtype, [&](auto in_tag, auto x_tag, auto w_tag) {
    using Tin = decltype(in_tag);
    using Tx = decltype(x_tag);
    using Tw = decltype(w_tag);
    const int64_t groups = (p.cols + kGroup - 1) / kGroup;
    const int threads = threads_for_groups(groups, kMaxThreads);
    const size_t cache_bytes = sizeof(float) * static_cast<size_t>(p.cols);
    const bool cache = cache_bytes <= static_cast<size_t>(kMaxSmemBytes);
    const size_t smem = cache ? cache_bytes : 0;
    auto kernel = norm_fwd_kernel<Tin, Tx, Tw>;
    allow_smem<norm_fwd_kernel<Tin, Tx, Tw>>();
    const int64_t grid = std::min<int64_t>(p.rows, int64_t(device_sms()) * 64);
    kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(p, cache);
    cuda_check(cudaGetLastError(), "norm_fwd_kernel launch");
  });
}

int64_t norm_bwd_cuda_workspace_floats(const NormBwdParams& p) {
  int64_t floats = 0;
  dispatch_norm(p.dz_dtype, p.x_dtype, p.w_dtype, [&](auto in_tag, auto x_tag, auto w_tag) {
    using Tin = decltype(in_tag);
    using Tx = decltype(x_tag);
    using Tw = decltype(w_tag);
    const BwdLaunch l = bwd_launch<Tin, Tx, Tw>(p);
    floats = int64_t(l.ctas) * norm_bwd_slots(p) * p.cols;
  });
  return floats;
}

void run_norm_bwd_cuda(const NormBwdParams& p, cudaStream_t stream) {
  dispatch_norm(p.dz_dtype, p.x_dtype, p.w_dtype, [&](auto in_tag, auto x_tag, auto w_tag) {
    using Tin = decltype(in_tag);
    using Tx = decltype(x_tag);
    using Tw = decltype(w_tag);
    const BwdLaunch l = bwd_launch<Tin, Tx, Tw>(p);
    if (l.ctas > 0) {
      if (p.workspace == nullptr) throw std::runtime_error("flash_attn: norm backward workspace is null");
      norm_bwd_kernel<Tin, Tx, Tw><<<l.ctas, l.threads, l.smem, stream>>>(p, p.workspace,
                                                                          l.acc_in_smem);
      cuda_check(cudaGetLastError(), "norm_bwd_kernel launch");
    }
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((p.cols + threads - 1) / threads, 65535);
    norm_bwd_reduce_kernel<Tw><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        p, p.workspace, l.ctas);
    cuda_check(cudaGetLastError(), "norm_bwd_reduce_kernel launch");
  });
}

FLASH_NAMESPACE_END
