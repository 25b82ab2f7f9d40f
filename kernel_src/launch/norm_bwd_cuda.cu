// Owns: run_norm_bwd_cuda and norm_bwd_cuda_workspace_floats, the CUDA backward of dropout +
// residual add + LayerNorm/RMSNorm (common/fused_params.h states the math, docs/fused_ops.md
// the design).
//
// Rows of up to 8192 columns: register-resident kernels (norm_bwd_rows_kernel). W warps per
// row, each thread K groups of 8 columns; the grid is the CTAs resident on the device and loops
// over the rows, a CTA holding several narrow rows at a time. Per row, x, dz (and the gradient
// of the returned x) are read once into registers; x_hat and g = dz * gamma are formed there,
// the two row means (mean(g), mean(g * x_hat)) are one row sum, and dx / dresidual / dx0 are
// written from the registers (x0 and colscale are read only with a colscale). dgamma and dbeta
// accumulate in fp32 registers of the thread that owns the columns, over all the rows its row
// slot handles, dcolscale in that thread's slots of dynamic shared memory; at the end each row
// slot (CTA, row within the CTA) writes its partial column sums to the workspace.
//
// Longer rows: the general kernel (norm_bwd_general_kernel), a fixed grid of CTAs, one row at a
// time per CTA in two passes (the second re-reads x and dz, normally from L2), the column sums
// per CTA in shared memory when they fit, else in the CTA's slice of the workspace.
//
// Either way a second kernel (norm_bwd_reduce_kernel) adds the slots' partials of each column in
// a fixed order and rounds once to the weight dtype: deterministic for a given device and
// shape. Workspace: slots * (2 or 3) * hidden fp32, allocated by the binding.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "flash_api_cuda.h"
#include "norm_common_cuda.h"

FLASH_NAMESPACE_BEGIN

namespace {

using namespace fused;

// Column-sum slots: dgamma, dbeta, then dcolscale when there is a colscale.
__host__ __device__ inline int norm_bwd_sums(const NormBwdParams& p) {
  return p.colscale != nullptr ? 3 : 2;
}

// ---- register-resident rows -------------------------------------------------------------------

// kAccSmem: dgamma / dbeta accumulate in the thread's own slots of shared memory instead of
// registers (frees the registers for K = 4; see bwd_shape).
template <typename Tin, typename Tx, typename Tw, typename S, bool kAccSmem>
__global__ void __launch_bounds__(S::kCtaThreads, S::kMinCtasPerSm)
norm_bwd_rows_kernel(const NormBwdParams p, float* partial) {
  constexpr int K = S::K, T = S::kThreadsPerRow, RPC = S::kRowsPerCta;
  constexpr int C = S::kCtaThreads;
  constexpr bool kCacheW = sizeof(Tw) == 2;  // fp32 gamma is re-read per row (L1)
  constexpr int KW = kCacheW ? K : 1;
  // The gradient of x is loaded with x and dz when it is fp16/bf16; fp32 (twice the registers)
  // is loaded after the row sums.
  constexpr bool kPrefetchDx = sizeof(Tx) == 2;
  // Column-sum accumulators in shared memory, thread-private slots (no conflicts, no syncs):
  // acc(s, k, i) for sum s of column i of group k; sums dgamma, dbeta (kAccSmem only) and
  // dcolscale (only with a colscale).
  extern __shared__ float acc_smem[];
  auto acc = [&](int s, int k, int i) -> float& {
    return acc_smem[((s * K + k) * kGroup + i) * C + threadIdx.x];
  };
  constexpr int kCsSlot = kAccSmem ? 2 : 0;
  constexpr int KR = kAccSmem ? 1 : K;  // register accumulators
  __shared__ float red[S::template kRedFloats<2>];
  const int tid = threadIdx.x % T, group = threadIdx.x / T;
  RowReducer<S::W, 2> reducer{red, group, tid / 32, tid % 32, RPC};
  const int cols = static_cast<int>(p.cols);
  const float inv_cols = 1.0f / static_cast<float>(cols);
  const FusedDropout& d = p.dropout;
  const bool dropout = d.p_dropout > 0.0;
  const float keep_scale = static_cast<float>(d.keep_scale);
  const Tw* gamma = static_cast<const Tw*>(p.gamma);
  const Tw* colscale = static_cast<const Tw*>(p.colscale);
  const bool w_vec = aligned16(gamma) && (colscale == nullptr || aligned16(colscale));

  int n[K];
#pragma unroll
  for (int k = 0; k < K; ++k) n[k] = group_len(cols, group_col<T>(k, tid));
  Vec8<Tw> gam[KW];
  if constexpr (kCacheW) {
#pragma unroll
    for (int k = 0; k < K; ++k) gam[k].load(gamma + group_col<T>(k, tid), n[k], w_vec);
  }
  float dgamma[KR][kGroup], dbeta[KR][kGroup];
#pragma unroll
  for (int k = 0; k < KR; ++k) {
#pragma unroll
    for (int i = 0; i < kGroup; ++i) dgamma[k][i] = dbeta[k][i] = 0.0f;
  }
  const int smem_sums = (kAccSmem ? 2 : 0) + (colscale != nullptr ? 1 : 0);
  for (int s = 0; s < smem_sums; ++s) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int i = 0; i < kGroup; ++i) acc(s, k, i) = 0.0f;
    }
  }

  for (int64_t base = int64_t(blockIdx.x) * RPC; base < p.rows;
       base += int64_t(gridDim.x) * RPC) {
    const int64_t r = base + group;
    const bool active = r < p.rows;  // the loop is CTA-uniform: the row sums sync the CTA
    const int64_t rr = active ? r : 0;
    if constexpr (kCacheW) {
#pragma unroll
      for (int k = 0; k < K; ++k) gam[k].pin();
    }
    const Tx* x = static_cast<const Tx*>(p.x) + rr * p.x_row_stride;
    const Tin* dz = static_cast<const Tin*>(p.dz) + rr * p.dz_row_stride;
    const Tx* dxin = p.dx != nullptr ? static_cast<const Tx*>(p.dx) + rr * p.dx_row_stride
                                     : nullptr;
    const Tin* x0 = p.x0 != nullptr ? static_cast<const Tin*>(p.x0) + rr * p.x0_row_stride
                                    : nullptr;
    Tin* dx0 = static_cast<Tin*>(p.dx0) + rr * cols;
    Tx* dres = p.dresidual != nullptr ? static_cast<Tx*>(p.dresidual) + rr * cols : nullptr;
    const bool vec = w_vec && aligned16(x) && aligned16(dz) && aligned16(dx0) &&
                     (dxin == nullptr || aligned16(dxin)) && (x0 == nullptr || aligned16(x0)) &&
                     (dres == nullptr || aligned16(dres));

    // x, dz (and the gradient of x) packed in registers; x_hat and g = dz * gamma are formed
    // from them twice (the same operations: the same values), which takes fewer registers than
    // keeping them in fp32. The row sums of g and g * x_hat; dgamma, dbeta.
    Vec8<Tx> xv[K], dxv[K];
    Vec8<Tin> dzv[K];
    float sums[2] = {0.0f, 0.0f};
    float mu = 0.0f, rsigma = 0.0f;
    uint32_t keep_mask = 0u;  // the dropout mask, redrawn while the loads are in flight
    auto weights = [&](int k) {
      Vec8<Tw> w;
      if constexpr (kCacheW) {
        w = gam[k];
      } else {
        w.load(gamma + group_col<T>(k, tid), n[k], w_vec);
      }
      return w;
    };
    if (active) {
#pragma unroll
      for (int k = 0; k < K; ++k) xv[k].load(x + group_col<T>(k, tid), n[k], vec);
#pragma unroll
      for (int k = 0; k < K; ++k) dzv[k].load(dz + group_col<T>(k, tid), n[k], vec);
      if (kPrefetchDx && dxin != nullptr) {
#pragma unroll
        for (int k = 0; k < K; ++k) dxv[k].load(dxin + group_col<T>(k, tid), n[k], vec);
      }
      mu = p.is_rms_norm ? 0.0f : load_stat(p.mu, p.stats_f64, r);
      rsigma = load_stat(p.rsigma, p.stats_f64, r);
      if (dropout) keep_mask = keep_bits<K, T>(d, static_cast<uint32_t>(r), cols, tid);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const Vec8<Tw> w = weights(k);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          if (i < n[k]) {
            const float dzi = dzv[k].get(i);
            const float xh = (xv[k].get(i) - mu) * rsigma;
            const float gi = __fmul_rn(dzi, w.get(i));  // rounded as below (see there)
            sums[0] += gi;
            sums[1] += gi * xh;
            if constexpr (kAccSmem) {
              acc(0, k, i) += dzi * xh;
              acc(1, k, i) += dzi;
            } else {
              dgamma[k][i] += dzi * xh;
              dbeta[k][i] += dzi;
            }
          }
        }
      }
    }
    reducer.sum(sums);
    if (!active) continue;
    const float mean_g = p.is_rms_norm ? 0.0f : sums[0] * inv_cols;
    const float mean_gx = sums[1] * inv_cols;
    const float rowscale =
        p.rowscale != nullptr ? to_float<Tin>(static_cast<const Tin*>(p.rowscale)[r]) : 1.0f;

    // dx, dresidual, dx0, dcolscale from the registers.
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (n[k] == 0) continue;
      const int c0 = group_col<T>(k, tid);
      const Vec8<Tw> w = weights(k);
      float dx[kGroup];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const float xh = (xv[k].get(i) - mu) * rsigma;
        // g = dz * w rounded, never fused into g - mean_g: with one column (or a constant row)
        // g - mean(g) must cancel exactly, as it does in unfused arithmetic.
        dx[i] = rsigma * (__fmul_rn(dzv[k].get(i), w.get(i)) - mean_g - xh * mean_gx);
      }
      if (dxin != nullptr) {
        if (!kPrefetchDx) dxv[k].load(dxin + c0, n[k], vec);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) dx[i] += dxv[k].get(i);
      }
      if (dres != nullptr) store_group(dres + c0, n[k], vec, dx);
      float factor[kGroup];
      if (dropout) {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          factor[i] = (keep_mask >> (k * kGroup + i)) & 1u ? rowscale * keep_scale : 0.0f;
        }
      } else {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) factor[i] = rowscale;
      }
      if (colscale != nullptr) {
        Vec8<Tw> cs;
        Vec8<Tin> x0v;
        cs.load(colscale + c0, n[k], w_vec);
        x0v.load(x0 + c0, n[k], vec);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          if (i < n[k]) acc(kCsSlot, k, i) += dx[i] * (x0v.get(i) * factor[i]);
          dx[i] *= cs.get(i);
        }
      }
#pragma unroll
      for (int i = 0; i < kGroup; ++i) dx[i] *= factor[i];
      store_group(dx0 + c0, n[k], vec, dx);
    }
  }

  // This row slot's partial column sums.
  const int sums_per_slot = norm_bwd_sums(p);
  float* out = partial + (int64_t(blockIdx.x) * RPC + group) * sums_per_slot * cols;
  const bool pvec = cols % kGroup == 0 && aligned16(partial);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (n[k] == 0) continue;
    const int c0 = group_col<T>(k, tid);
    float t[kGroup];
    if constexpr (kAccSmem) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) t[i] = acc(s, k, i);
        store_group(out + s * cols + c0, n[k], pvec, t);
      }
    } else {
      store_group(out + c0, n[k], pvec, dgamma[k]);
      store_group(out + cols + c0, n[k], pvec, dbeta[k]);
    }
    if (colscale != nullptr) {
#pragma unroll
      for (int i = 0; i < kGroup; ++i) t[i] = acc(kCsSlot, k, i);
      store_group(out + 2 * cols + c0, n[k], pvec, t);
    }
  }
}

// ---- general rows (longer than the register-resident shapes) ----------------------------------

constexpr int kGeneralThreads = 256;

template <typename Tin, typename Tx, typename Tw>
__global__ void __launch_bounds__(kGeneralThreads)
norm_bwd_general_kernel(const NormBwdParams p, float* partial, bool acc_in_smem) {
  extern __shared__ float acc_smem[];
  __shared__ float red[64];
  const int64_t cols = p.cols;
  const int64_t groups = (cols + kGroup - 1) / kGroup;
  const int sums_per_slot = norm_bwd_sums(p);
  float* acc = acc_in_smem ? acc_smem : partial + blockIdx.x * sums_per_slot * cols;
  float* dgamma = acc;
  float* dbeta = acc + cols;
  float* dcolscale = acc + 2 * cols;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    for (int64_t c = g * kGroup; c < min64(cols, (g + 1) * kGroup); ++c) {
      for (int s = 0; s < sums_per_slot; ++s) acc[s * cols + c] = 0.0f;
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
    float* out = partial + blockIdx.x * sums_per_slot * cols;
    for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
      for (int64_t c = g * kGroup; c < min64(cols, (g + 1) * kGroup); ++c) {
        for (int s = 0; s < sums_per_slot; ++s) out[s * cols + c] = acc[s * cols + c];
      }
    }
  }
}

// ---- the column sums --------------------------------------------------------------------------

// dgamma / dbeta / dcolscale[c] = the sum of the slots' partials. A CTA takes 32 columns with
// 32 lanes each: lane j adds slots j, j + 32, ... in order (a warp reads 32 consecutive
// columns of one slot), then warp w adds the 32 lane sums of column w with a fixed shuffle
// tree. Deterministic; many loads in flight per column even for a few thousand columns.
constexpr int kReduceCols = 32, kReduceLanes = 32;

template <typename Tw>
__global__ void __launch_bounds__(kReduceCols * kReduceLanes)
norm_bwd_reduce_kernel(const NormBwdParams p, const float* partial, int slots) {
  __shared__ float red[3][kReduceLanes][kReduceCols + 1];
  const int64_t cols = p.cols;
  const int sums_per_slot = norm_bwd_sums(p);
  const int lane = threadIdx.x % kReduceCols, j = threadIdx.x / kReduceCols;
  const int64_t c = int64_t(blockIdx.x) * kReduceCols + lane;
  float s[3] = {0.0f, 0.0f, 0.0f};
  if (c < cols) {
#pragma unroll 4
    for (int b = j; b < slots; b += kReduceLanes) {
      const float* base = partial + int64_t(b) * sums_per_slot * cols + c;
      s[0] += base[0];
      s[1] += base[cols];
      if (sums_per_slot > 2) s[2] += base[2 * cols];
    }
  }
#pragma unroll
  for (int i = 0; i < 3; ++i) red[i][j][lane] = s[i];
  __syncthreads();
  // Warp j now owns column blockIdx.x * 32 + j; its lane t holds lane t's sum of it.
  const int64_t cw = int64_t(blockIdx.x) * kReduceCols + j;
#pragma unroll
  for (int i = 0; i < 3; ++i) s[i] = warp_sum(red[i][lane][j]);
  if (lane != 0 || cw >= cols) return;
  static_cast<Tw*>(p.dgamma)[cw] = from_float<Tw>(s[0]);
  if (p.dbeta != nullptr) static_cast<Tw*>(p.dbeta)[cw] = from_float<Tw>(s[1]);
  if (p.dcolscale != nullptr) static_cast<Tw*>(p.dcolscale)[cw] = from_float<Tw>(s[2]);
}

// ---- dispatch ---------------------------------------------------------------------------------

// Whether the backward of 1025-8192 columns keeps dgamma / dbeta in shared memory with four
// groups per thread (half the threads per row, twice the loads in flight per thread, and two
// or more CTAs per SM where the register version fits one 512-thread CTA at 8192 columns)
// instead of in registers with two: FLASH_NORM_BWD_ACC=smem (a tuning knob for benchmarks, read
// once; default: registers).
inline bool bwd_acc_smem() {
  static const bool smem = [] {
    const char* e = std::getenv("FLASH_NORM_BWD_ACC");
    return e != nullptr && std::string(e) == "smem";
  }();
  return smem;
}

// f(RowShape<K, W>{}, std::bool_constant<kAccSmem>{}) for the smallest shape that holds `cols`
// columns; false when none does. Registers: two groups per thread (x_hat, g and the dgamma /
// dbeta sums are four fp32 values per column); shared memory: four, for fp16/bf16 inputs only
// (fp32 ones would spill).
template <bool kSmemShapes, typename F>
bool bwd_shape(int64_t cols, F&& f) {
  using Reg = std::false_type;
  using Smem = std::true_type;
  if (cols <= RowShape<1, 1>::kMaxCols) return f(RowShape<1, 1>{}, Reg{}), true;
  if (cols <= RowShape<2, 1>::kMaxCols) return f(RowShape<2, 1>{}, Reg{}), true;
  if (cols <= RowShape<2, 2>::kMaxCols) return f(RowShape<2, 2>{}, Reg{}), true;
  if constexpr (kSmemShapes) {
    if (cols <= RowShape<2, 16>::kMaxCols && bwd_acc_smem()) {
      if (cols <= RowShape<4, 2>::kMaxCols) return f(RowShape<4, 2>{}, Smem{}), true;
      if (cols <= RowShape<4, 4>::kMaxCols) return f(RowShape<4, 4>{}, Smem{}), true;
      return f(RowShape<4, 8>{}, Smem{}), true;
    }
  }
  if (cols <= RowShape<2, 4>::kMaxCols) return f(RowShape<2, 4>{}, Reg{}), true;
  if (cols <= RowShape<2, 8>::kMaxCols) return f(RowShape<2, 8>{}, Reg{}), true;
  if (cols <= RowShape<2, 16>::kMaxCols) return f(RowShape<2, 16>{}, Reg{}), true;
  return false;
}

// The general kernel's partials in global memory (hidden too long for shared memory) are capped
// at this many floats (128 MB) by using fewer CTAs.
constexpr int64_t kMaxGlobalPartialFloats = int64_t(1) << 25;

// How the backward runs: which kernel, its grid, and the row slots (partials) it leaves.
struct BwdLaunch {
  int64_t ctas = 0, slots = 0;
  int threads = 0;
  size_t smem = 0;
  bool acc_in_smem = false;  // general kernel
  void (*launch)(const NormBwdParams&, const BwdLaunch&, cudaStream_t) = nullptr;
};

// A function of the shape and the device only (the column sums' order).
template <typename Tin, typename Tx, typename Tw>
BwdLaunch bwd_launch(const NormBwdParams& p) {
  BwdLaunch l;
  const bool found = bwd_shape<sizeof(Tin) == 2>(p.cols, [&](auto shape, auto acc_smem) {
    using S = decltype(shape);
    constexpr bool kAccSmem = decltype(acc_smem)::value;
    constexpr auto kernel = norm_bwd_rows_kernel<Tin, Tx, Tw, S, kAccSmem>;
    const bool cs = p.colscale != nullptr;
    l.threads = S::kCtaThreads;
    const int smem_sums = (kAccSmem ? 2 : 0) + (cs ? 1 : 0);
    l.smem = sizeof(float) * smem_sums * S::kCtaThreads * S::K * kGroup;
    if (p.rows == 0) return;
    static_assert(sizeof(float) * 3 * S::kCtaThreads * S::K * kGroup <= kMaxSmemBytes,
                  "the accumulators fit the shared memory the kernel opts in to");
    if (l.smem > 48 * 1024) allow_smem<kernel>();
    l.ctas = rows_grid(p.rows, S::kRowsPerCta, resident_ctas<kernel, 2>(l.threads, l.smem, cs));
    l.slots = l.ctas * S::kRowsPerCta;
    l.launch = [](const NormBwdParams& p, const BwdLaunch& l, cudaStream_t stream) {
      norm_bwd_rows_kernel<Tin, Tx, Tw, S, kAccSmem>
          <<<static_cast<unsigned>(l.ctas), l.threads, l.smem, stream>>>(p, p.workspace);
      cuda_check(cudaGetLastError(), "norm_bwd_rows_kernel launch");
    };
  });
  if (found) return l;
  constexpr auto kernel = norm_bwd_general_kernel<Tin, Tx, Tw>;
  l.threads = kGeneralThreads;
  const size_t acc_bytes = sizeof(float) * norm_bwd_sums(p) * static_cast<size_t>(p.cols);
  l.acc_in_smem = acc_bytes <= static_cast<size_t>(kMaxSmemBytes);
  l.smem = l.acc_in_smem ? acc_bytes : 0;
  if (p.rows == 0) return l;
  allow_smem<kernel>();
  int per_sm = 0;
  cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, l.threads, l.smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  int64_t ctas = std::min<int64_t>(p.rows, int64_t(std::max(per_sm, 1)) * device_sms());
  if (!l.acc_in_smem) {
    const int64_t per_cta = int64_t(norm_bwd_sums(p)) * p.cols;
    ctas = std::max<int64_t>(1, std::min<int64_t>(ctas, kMaxGlobalPartialFloats / per_cta));
  }
  l.ctas = l.slots = ctas;
  l.launch = [](const NormBwdParams& p, const BwdLaunch& l, cudaStream_t stream) {
    norm_bwd_general_kernel<Tin, Tx, Tw>
        <<<static_cast<unsigned>(l.ctas), l.threads, l.smem, stream>>>(p, p.workspace,
                                                                       l.acc_in_smem);
    cuda_check(cudaGetLastError(), "norm_bwd_general_kernel launch");
  };
  return l;
}

}  // namespace

int64_t norm_bwd_cuda_workspace_floats(const NormBwdParams& p) {
  int64_t floats = 0;
  dispatch_norm(p.dz_dtype, p.x_dtype, p.w_dtype, [&](auto in_tag, auto x_tag, auto w_tag) {
    using Tin = decltype(in_tag);
    using Tx = decltype(x_tag);
    using Tw = decltype(w_tag);
    floats = bwd_launch<Tin, Tx, Tw>(p).slots * norm_bwd_sums(p) * p.cols;
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
      if (p.workspace == nullptr) {
        throw std::runtime_error("flash_attn: norm backward workspace is null");
      }
      l.launch(p, l, stream);
    }
    const int64_t blocks = (p.cols + kReduceCols - 1) / kReduceCols;
    norm_bwd_reduce_kernel<Tw><<<static_cast<unsigned>(blocks), kReduceCols * kReduceLanes, 0,
                                 stream>>>(p, p.workspace, static_cast<int>(l.slots));
    cuda_check(cudaGetLastError(), "norm_bwd_reduce_kernel launch");
  });
}

FLASH_NAMESPACE_END
