// Owns: run_norm_fwd_cuda, the CUDA forward of dropout + residual add + LayerNorm/RMSNorm
// (common/fused_params.h states the math, docs/fused_ops.md the design).
//
// Rows of up to 16384 columns: register-resident kernels (norm_fwd_rows_kernel). A row is read
// from global memory once, into registers: W warps per row, each thread K groups of 8 columns
// (16-byte loads when the row is aligned; a scalar tail otherwise), so a width is served by the
// smallest compile-time shape that holds it (fwd_shape below), any width >= 1. x is formed in
// fp32 in 2.8's order (x0 * rowscale, the dropout factor from common/philox.h, * colscale,
// + residual), written (with the mask) and rounded to its storage dtype in the registers; the
// mean, then the variance about it (two passes over the registers: no cancellation), are row
// sums (warp shuffles, and one shared-memory exchange when W > 1); z is written from the same
// registers. The grid is sized to the CTAs resident on the device and loops over the rows (a
// CTA holds several narrow rows at a time), so gamma and beta are loaded once per thread
// (kept packed in registers for fp16/bf16 weights; fp32 weights are re-read per row from L1).
//
// Longer rows: the general kernel (norm_fwd_general_kernel), a CTA per row, the rounded x kept
// in shared memory (up to 96 KB: hidden <= 24576; a longer row re-reads the x it wrote).
//
// Dtypes: x0 (and z, rowscale) fp16/bf16/fp32; x (residual) x0's dtype or fp32; weights x0's
// dtype or fp32 (the binding rejects other mixes).
#include <algorithm>
#include <cstdint>

#include "flash_api_cuda.h"
#include "norm_common_cuda.h"

FLASH_NAMESPACE_BEGIN

namespace {

using namespace fused;

// The dmask row's group of 8 bytes: one 8-byte store when aligned and whole.
__device__ __forceinline__ void store_mask(uint8_t* m, int n, bool vec,
                                           const bool (&keep)[kGroup]) {
  if (vec && n == kGroup) {
    uint2 v;
    v.x = uint32_t(keep[0]) | uint32_t(keep[1]) << 8 | uint32_t(keep[2]) << 16 |
          uint32_t(keep[3]) << 24;
    v.y = uint32_t(keep[4]) | uint32_t(keep[5]) << 8 | uint32_t(keep[6]) << 16 |
          uint32_t(keep[7]) << 24;
    *reinterpret_cast<uint2*>(m) = v;
    return;
  }
#pragma unroll
  for (int i = 0; i < kGroup; ++i) {
    if (i < n) m[i] = keep[i] ? 1 : 0;
  }
}

// ---- register-resident rows -------------------------------------------------------------------

template <typename Tin, typename Tx, typename Tw, typename S>
__global__ void __launch_bounds__(S::kCtaThreads, S::kMinCtasPerSm)
norm_fwd_rows_kernel(const NormFwdParams p) {
  constexpr int K = S::K, T = S::kThreadsPerRow, RPC = S::kRowsPerCta;
  // fp16/bf16 weights stay packed in registers for the whole kernel; fp32 ones (twice the
  // registers), and any with an fp32 x (the registers go to the residual), are re-read per
  // row, from L1.
  constexpr bool kCacheW = sizeof(Tw) == 2 && sizeof(Tx) == 2;
  constexpr int KW = kCacheW ? K : 1;
  __shared__ float red[S::template kRedFloats<1>];
  const int tid = threadIdx.x % T, group = threadIdx.x / T;
  RowReducer<S::W, 1> reducer{red, group, tid / 32, tid % 32, RPC};
  const int cols = static_cast<int>(p.cols);
  const float fcols = static_cast<float>(cols);
  const FusedDropout& d = p.dropout;
  const bool dropout = d.p_dropout > 0.0;
  const float keep_scale = static_cast<float>(d.keep_scale);
  const Tw* gamma = static_cast<const Tw*>(p.gamma);
  const Tw* beta = static_cast<const Tw*>(p.beta);
  const Tw* colscale = static_cast<const Tw*>(p.colscale);
  const bool w_vec = aligned16(gamma) && (beta == nullptr || aligned16(beta)) &&
                     (colscale == nullptr || aligned16(colscale));
  const bool mask_vec = (cols % kGroup) == 0 && (reinterpret_cast<uintptr_t>(p.dmask) & 7u) == 0;

  int n[K];
#pragma unroll
  for (int k = 0; k < K; ++k) n[k] = group_len(cols, group_col<T>(k, tid));
  Vec8<Tw> gam[KW], bet[KW];
  auto load_weights = [&](int k, Vec8<Tw>& g, Vec8<Tw>& b) {
    const int c0 = group_col<T>(k, tid);
    g.load(gamma + c0, n[k], w_vec);
    if (beta != nullptr) {
      b.load(beta + c0, n[k], w_vec);
    } else {
      b.zero();
    }
  };
  if constexpr (kCacheW) {
#pragma unroll
    for (int k = 0; k < K; ++k) load_weights(k, gam[k], bet[k]);
  }

  for (int64_t base = int64_t(blockIdx.x) * RPC; base < p.rows;
       base += int64_t(gridDim.x) * RPC) {
    const int64_t r = base + group;
    const bool active = r < p.rows;  // the loop is CTA-uniform: the row sums sync the CTA
    const int64_t rr = active ? r : 0;
    if constexpr (kCacheW) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        gam[k].pin();
        bet[k].pin();
      }
    }
    const Tin* x0 = static_cast<const Tin*>(p.x0) + rr * p.x0_row_stride;
    const Tx* res = p.residual != nullptr
                        ? static_cast<const Tx*>(p.residual) + rr * p.residual_row_stride
                        : nullptr;
    Tx* xout = p.x != nullptr ? static_cast<Tx*>(p.x) + rr * cols : nullptr;
    Tin* z = static_cast<Tin*>(p.z) + rr * cols;
    uint8_t* dmask = p.dmask != nullptr ? p.dmask + rr * cols : nullptr;
    const bool vec = w_vec && aligned16(x0) && (res == nullptr || aligned16(res)) &&
                     (xout == nullptr || aligned16(xout)) && aligned16(z);

    // x in registers, written once; its sum.
    float v[K][kGroup];
    float sum[1] = {0.0f};
    if (active) {
      Vec8<Tin> a[K];
      Vec8<Tx> b[K];
#pragma unroll
      for (int k = 0; k < K; ++k) a[k].load(x0 + group_col<T>(k, tid), n[k], vec);
      if (res != nullptr) {
#pragma unroll
        for (int k = 0; k < K; ++k) b[k].load(res + group_col<T>(k, tid), n[k], vec);
      }
      const float rowscale =
          p.rowscale != nullptr ? to_float<Tin>(static_cast<const Tin*>(p.rowscale)[r]) : 1.0f;
      const uint32_t keep_mask =
          dropout ? keep_bits<K, T>(d, static_cast<uint32_t>(r), cols, tid) : 0u;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c0 = group_col<T>(k, tid);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) v[k][i] = a[k].get(i);
        if (dropout) {
          bool keep[kGroup];
#pragma unroll
          for (int i = 0; i < kGroup; ++i) {
            keep[i] = (keep_mask >> (k * kGroup + i)) & 1u;
            v[k][i] = keep[i] ? v[k][i] * rowscale * keep_scale : 0.0f;
          }
          if (dmask != nullptr && n[k] > 0) store_mask(dmask + c0, n[k], mask_vec, keep);
        } else if (p.rowscale != nullptr) {
#pragma unroll
          for (int i = 0; i < kGroup; ++i) v[k][i] *= rowscale;
        }
        if (colscale != nullptr) {
          Vec8<Tw> cs;
          cs.load(colscale + c0, n[k], w_vec);
#pragma unroll
          for (int i = 0; i < kGroup; ++i) v[k][i] *= cs.get(i);
        }
        if (res != nullptr) {
#pragma unroll
          for (int i = 0; i < kGroup; ++i) v[k][i] += b[k].get(i);
        }
        if (xout != nullptr) {
          if (n[k] > 0) store_group(xout + c0, n[k], vec, v[k]);
#pragma unroll
          for (int i = 0; i < kGroup; ++i) v[k][i] = round_to<Tx>(v[k][i]);
        }
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          if (i < n[k]) sum[0] += v[k][i];
        }
      }
    }
    float mu = 0.0f;
    if (!p.is_rms_norm) {
      reducer.sum(sum);
      mu = sum[0] / fcols;
    }

    // The variance about mu, from the registers.
    float m2[1] = {0.0f};
    if (active) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          const float t = i < n[k] ? v[k][i] - mu : 0.0f;
          m2[0] += t * t;
        }
      }
    }
    reducer.sum(m2);
    const float rsigma = 1.0f / sqrtf(m2[0] / fcols + static_cast<float>(p.epsilon));
    if (!active) continue;
    if (tid == 0) {
      if (p.mu != nullptr) store_stat(p.mu, p.stats_f64, r, mu);
      store_stat(p.rsigma, p.stats_f64, r, rsigma);
    }

    // z from the registers.
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (n[k] == 0) continue;
      Vec8<Tw> g, b;
      if constexpr (kCacheW) {
        g = gam[k];
        b = bet[k];
      } else {
        load_weights(k, g, b);
      }
      float o[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) o[i] = g.get(i) * ((v[k][i] - mu) * rsigma) + b.get(i);
      store_group(z + group_col<T>(k, tid), n[k], vec, o);
    }
  }
}

// ---- general rows (longer than the register-resident shapes) ----------------------------------

constexpr int kGeneralThreads = 256;

template <typename Tin, typename Tx, typename Tw>
__global__ void __launch_bounds__(kGeneralThreads)
norm_fwd_general_kernel(const NormFwdParams p, bool cache_in_smem) {
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
        if (dmask != nullptr) store_mask(dmask + c0, n, false, keep);
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

// ---- dispatch ---------------------------------------------------------------------------------

// f(RowShape<K, W>{}) for the smallest shape that holds `cols` columns; false when none does.
template <typename F>
bool fwd_shape(int64_t cols, F&& f) {
  if (cols <= RowShape<1, 1>::kMaxCols) return f(RowShape<1, 1>{}), true;
  if (cols <= RowShape<4, 1>::kMaxCols) return f(RowShape<4, 1>{}), true;
  if (cols <= RowShape<4, 2>::kMaxCols) return f(RowShape<4, 2>{}), true;
  if (cols <= RowShape<4, 4>::kMaxCols) return f(RowShape<4, 4>{}), true;
  if (cols <= RowShape<4, 8>::kMaxCols) return f(RowShape<4, 8>{}), true;
  if (cols <= RowShape<4, 16>::kMaxCols) return f(RowShape<4, 16>{}), true;
  return false;
}

}  // namespace

void run_norm_fwd_cuda(const NormFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  dispatch_norm(p.x0_dtype, p.x_dtype, p.w_dtype, [&](auto in_tag, auto x_tag, auto w_tag) {
    using Tin = decltype(in_tag);
    using Tx = decltype(x_tag);
    using Tw = decltype(w_tag);
    const bool rows_kernel = fwd_shape(p.cols, [&](auto shape) {
      using S = decltype(shape);
      constexpr auto kernel = norm_fwd_rows_kernel<Tin, Tx, Tw, S>;
      const int64_t grid =
          rows_grid(p.rows, S::kRowsPerCta, resident_ctas<kernel>(S::kCtaThreads, 0));
      kernel<<<static_cast<unsigned>(grid), S::kCtaThreads, 0, stream>>>(p);
      cuda_check(cudaGetLastError(), "norm_fwd_rows_kernel launch");
    });
    if (rows_kernel) return;
    const size_t cache_bytes = sizeof(float) * static_cast<size_t>(p.cols);
    const bool cache = cache_bytes <= static_cast<size_t>(kMaxSmemBytes);
    constexpr auto kernel = norm_fwd_general_kernel<Tin, Tx, Tw>;
    allow_smem<kernel>();
    const int64_t grid = std::min<int64_t>(p.rows, int64_t(device_sms()) * 64);
    kernel<<<static_cast<unsigned>(grid), kGeneralThreads, cache ? cache_bytes : 0, stream>>>(
        p, cache);
    cuda_check(cudaGetLastError(), "norm_fwd_general_kernel launch");
  });
}

FLASH_NAMESPACE_END
