// Owns: what the sm80 forward does to the S = Q K^T accumulators of one warp between the two
// GEMMs, at register level: score modifiers (softcap, ALiBi), the element-wise mask of boundary
// tiles, the online softmax (rescale of O, exponentials, row sums) and dropout.
//
// Reuse of kernel_src/common/: the per-row state and its lazy rescale are common/softmax_state.h's
// SoftmaxState (in base 2), the visible key range of a row comes from common/mask.h's
// Mask::col_limits and the score modifiers from common/score_mod.h, so the mask semantics, the
// modifier order and the empty-row conventions are the CPU backend's by construction. What is
// specific here is only the fragment layout: a thread holds, for each 16-row MMA tile, rows
// g and g + 8 (g = lane / 4) and columns 8 j + 2 t, +1 (t = lane % 4) of every 8-column tile j;
// the four threads of a quad share a row, so row reductions are 2 shuffles.
#pragma once
#include <cmath>
#include <cstdint>

#include "../common/mask.h"
#include "../common/philox.h"
#include "../common/score_mod.h"
#include "../common/softmax_state.h"
#include "kernel_traits_sm80.h"
#include "primitives.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

// Per-thread view of the rows it owns: row r = 2 * mi + h is query row
// m0_warp + 16 mi + g + 8 h (row_of), with its online-softmax state.
__device__ __forceinline__ int row_of(int m0_warp, int r, int lane) {
  return m0_warp + 16 * (r / 2) + (lane >> 2) + 8 * (r % 2);
}

// Row sums by MMA (kSumByMma, every kernel without dropout; SoftmaxState's RowSum::kBesideO):
// instead of adding the probabilities with FADDs and quad shuffles, P times a column of ones is
// accumulated by the tensor cores next to O += P V (sum_frag, a C fragment whose 8 columns all
// hold the row sum); it is rescaled with O. That trades 2 * kMmaNS FADDs per row and tile for
// kKStepsPV MMAs per row tile, and the sums are those of the rounded P that O uses. With dropout
// the sums must be of the undropped P while P V uses the dropped one, so the FADD path stays.
template <typename Traits, bool kSumByMma>
struct RowState {
  static constexpr int kRows = 2 * Traits::kMmaM;
  using State = SoftmaxState<float, /*kBase2=*/true,
                             kSumByMma ? RowSum::kBesideO : RowSum::kInState>;
  State softmax[kRows];
  float sum_frag[Traits::kMmaM][4];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) softmax[r] = State::empty();
#pragma unroll
    for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
      for (int e = 0; e < 4; ++e) sum_frag[mi][e] = 0.f;
  }
};

// How a key tile [n0, n0 + kBlockN) relates to one warp's query rows [rows_begin, rows_end).
enum class WarpTile : int { kEmpty = 0, kFull = 1, kPartial = 2 };

// Per warp and tile (warp-uniform): kEmpty when none of the rows sees any key of the tile (or the
// warp has no valid row), kFull when every row sees every key (no element-wise mask needed),
// kPartial otherwise. Without a window (!Is_masked) only the ragged end of the keys is partial.
template <bool Is_masked>
__device__ __forceinline__ WarpTile classify_warp_tile(const Mask& mask, int rows_begin,
                                                       int rows_end, int n0, int block_n) {
  if (rows_end <= rows_begin) return WarpTile::kEmpty;
  const bool ragged = n0 + block_n > mask.seqlen_k;
  if constexpr (!Is_masked) {
    return ragged ? WarpTile::kPartial : WarpTile::kFull;
  } else {
    int col_begin, col_end;
    mask.kv_range(rows_begin, rows_end, &col_begin, &col_end);
    if (n0 >= col_end || n0 + block_n <= col_begin) return WarpTile::kEmpty;
    return !ragged && mask.tile_is_full(rows_begin, rows_end, n0, n0 + block_n)
               ? WarpTile::kFull
               : WarpTile::kPartial;
  }
}

// Element-wise mask of a boundary tile starting at key n0: invisible scores become -inf. The
// visible range of each row comes from the shared Mask. The lane index is re-read here
// (thread_index_in_block) so that the per-row ranges, which do not depend on the tile, are not
// hoisted out of the main loop into registers held through every tile (measured: spills).
template <typename Traits>
__device__ __forceinline__ void apply_mask(float (&acc_s)[Traits::kMmaM][Traits::kMmaNS][4],
                                           const Mask& mask, int m0_warp, int n0) {
  const int lane = thread_index_in_block() & 31;
  const int col0 = n0 + 2 * (lane & 3);
#pragma unroll
  for (int r = 0; r < 2 * Traits::kMmaM; ++r) {
    int col_begin, col_end;
    mask.col_limits(row_of(m0_warp, r, lane), &col_begin, &col_end);
    const int mi = r / 2, h = r % 2;
#pragma unroll
    for (int nj = 0; nj < Traits::kMmaNS; ++nj)
#pragma unroll
      for (int e = 2 * h; e < 2 * h + 2; ++e) {
        const int col = col0 + 8 * nj + (e & 1);
        if (col < col_begin || col >= col_end) acc_s[mi][nj][e] = -INFINITY;
      }
  }
}

// General path: turns raw q.k into natural-unit logits with the score modifiers of
// common/score_mod.h (params.h order: scale, softcap, then the ALiBi bias), so the softmax below
// runs with scale log2(e). With softcap the scale is folded into softcap_apply's inv_cap.
template <typename Traits>
__device__ __forceinline__ void apply_score_mods(float (&acc_s)[Traits::kMmaM][Traits::kMmaNS][4],
                                                 float softmax_scale, float softcap,
                                                 float alibi_slope, int m0_warp, int n0,
                                                 int shift, int lane) {
  const float inv_cap_scale = softcap > 0.f ? softmax_scale / softcap : 0.f;
  const int col0 = n0 + 2 * (lane & 3);
#pragma unroll
  for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
    for (int nj = 0; nj < Traits::kMmaNS; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float s = acc_s[mi][nj][e];
        s = softcap > 0.f ? softcap_apply(s, softcap, inv_cap_scale) : s * softmax_scale;
        if (alibi_slope != 0.f) {
          s += alibi_bias(alibi_slope, row_of(m0_warp, 2 * mi + e / 2, lane),
                          col0 + 8 * nj + (e & 1), shift);
        }
        acc_s[mi][nj][e] = s;
      }
}

// Max / sum of a thread's kN values of one row with kAcc independent partial results (chains
// of kN / kAcc dependent steps instead of kN), so the scheduler has independent work inside a row
// (the serial chains were the top stall, "fixed-latency dependency", in Nsight Compute). kAcc
// stays small: a full tree keeps too many temporaries live and spills at head dim 128.
template <int kAcc, int kN, typename Op>
__device__ __forceinline__ float chunked_reduce(const float (&v)[kN], Op op) {
  static_assert(kN % kAcc == 0, "");
  float acc[kAcc];
#pragma unroll
  for (int a = 0; a < kAcc; ++a) acc[a] = v[a];
#pragma unroll
  for (int i = kAcc; i < kN; ++i) acc[i % kAcc] = op(acc[i % kAcc], v[i]);
#pragma unroll
  for (int w = kAcc / 2; w >= 1; w /= 2)
#pragma unroll
    for (int a = 0; a < w; ++a) acc[a] = op(acc[a], acc[a + w]);
  return acc[0];
}

// Online softmax for one tile: moves each row's reference max when needed, rescales its O
// accumulator row, replaces the scores by exp2(s * scale_log2 - reference) and adds them to the
// (per-thread partial) row sums.
// scale_log2 > 0 (the launch routes other scales to the general path, which pre-scales S and
// passes log2(e)). The O rescale is skipped when no row max of the warp moved (common once a row
// has seen its largest logits); a warp-uniform branch, so no divergence.
template <typename Traits, bool kSumByMma>
__device__ __forceinline__ void online_softmax(float (&acc_s)[Traits::kMmaM][Traits::kMmaNS][4],
                                               float (&acc_o)[Traits::kMmaM][Traits::kMmaNO][4],
                                               RowState<Traits, kSumByMma>& rows,
                                               float scale_log2) {
  constexpr int kRows = 2 * Traits::kMmaM, kCols = 2 * Traits::kMmaNS;
  constexpr int kReduceAcc = 4;  // measured: +1% over one serial chain at head dim 128
  // Lazy rescale threshold in log2 units (FA4; docs/tuning.md row 7, tune3: 8 against 0).
  constexpr float kThreshold = 8.f;
  auto fmax_op = [](float a, float b) { return fmaxf(a, b); };
  auto add_op = [](float a, float b) { return a + b; };
  float factor[kRows];
  bool moved = false;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int mi = r / 2, h = r % 2;
    float v[kCols];
#pragma unroll
    for (int nj = 0; nj < Traits::kMmaNS; ++nj) {
      v[2 * nj] = acc_s[mi][nj][2 * h];
      v[2 * nj + 1] = acc_s[mi][nj][2 * h + 1];
    }
    const float block_max = warp::quad_max(chunked_reduce<kReduceAcc>(v, fmax_op)) * scale_log2;
    // Lazy rescale (SoftmaxState::rescale_lazy): the reference point moves only when the block
    // max exceeds it by more than kThreshold, so the O rescale, 2 kMmaNO multiplies per row,
    // becomes rare instead of happening on most tiles of short rows.
    moved |= rows.softmax[r].rescale_lazy(block_max, kThreshold, &factor[r], Exp2Approx{});
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int mi = r / 2, h = r % 2;
    const float offset = rows.softmax[r].offset();
    float p[kCols];
#pragma unroll
    for (int nj = 0; nj < Traits::kMmaNS; ++nj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        p[2 * nj + e] = exp2_approx(fmaf(acc_s[mi][nj][2 * h + e], scale_log2, -offset));
        acc_s[mi][nj][2 * h + e] = p[2 * nj + e];
      }
    }
    if constexpr (!kSumByMma) rows.softmax[r].add(chunked_reduce<kReduceAcc>(p, add_op));
  }
  if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
    for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
      for (int dj = 0; dj < Traits::kMmaNO; ++dj)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[mi][dj][e] *= factor[2 * mi + e / 2];
    if constexpr (kSumByMma) {
#pragma unroll
      for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
        for (int e = 0; e < 4; ++e) rows.sum_frag[mi][e] *= factor[2 * mi + e / 2];
    }
  }
}

// Dropout on P (after the row sums took the undropped values): the Philox stream of
// common/philox.h, counter (col / 4, row, subsequence), word col % 4, dropped iff word <
// threshold. The two threads of a lane pair (t, t ^ 1) need the same 4-word draws for rows g and
// g + 8 (their columns 2t, 2t+1 share col / 4): the even thread computes row g, the odd one row
// g + 8, and they swap the two words the other needs, halving the Philox work.
// Dropped elements become 0 (for P V) or, with kNegate, -p (the S_dmask convention).
template <typename Traits, bool kNegate>
__device__ __forceinline__ void apply_dropout(float (&acc_s)[Traits::kMmaM][Traits::kMmaNS][4],
                                              uint64_t seed, uint64_t subsequence, int m0_warp,
                                              int n0, uint32_t threshold, int lane) {
  const int t = lane & 3;
  const bool odd = (t & 1) != 0;
#pragma unroll
  for (int mi = 0; mi < Traits::kMmaM; ++mi) {
    const int row_g = row_of(m0_warp, 2 * mi, lane);
    const uint32_t my_row = static_cast<uint32_t>(row_g + (odd ? 8 : 0));
#pragma unroll
    for (int nj = 0; nj < Traits::kMmaNS; ++nj) {
      const uint32_t col = static_cast<uint32_t>(n0 + 8 * nj + 2 * t);
      const Philox4 r = dropout_draws(seed, subsequence, my_row, col);
      const uint32_t send0 = odd ? r.x : r.z, send1 = odd ? r.y : r.w;
      const uint32_t recv0 = __shfl_xor_sync(0xffffffffu, send0, 1);
      const uint32_t recv1 = __shfl_xor_sync(0xffffffffu, send1, 1);
      // Words of (row g: cols 2t, 2t+1) and (row g + 8: cols 2t, 2t+1).
      const uint32_t w[4] = {odd ? recv0 : r.x, odd ? recv1 : r.y, odd ? r.z : recv0,
                             odd ? r.w : recv1};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (w[e] < threshold) acc_s[mi][nj][e] = kNegate ? -acc_s[mi][nj][e] : 0.f;
      }
    }
  }
}

// End of the row block: completes the row sums (across the quad, or from the MMA row-sum
// fragment) and returns, per owned row, the
// factor that normalises O (times keep_scale for dropout; 0 for a row that saw no key) and the
// natural-log LSE (+inf for such a row).
template <typename Traits, bool kSumByMma>
__device__ __forceinline__ void finalize_rows(RowState<Traits, kSumByMma>& rows, float keep_scale,
                                              float (&o_scale)[2 * Traits::kMmaM],
                                              float (&lse)[2 * Traits::kMmaM]) {
#pragma unroll
  for (int r = 0; r < 2 * Traits::kMmaM; ++r) {
    rows.softmax[r].set_row_sum(kSumByMma ? rows.sum_frag[r / 2][2 * (r % 2)]
                                          : warp::quad_sum(rows.softmax[r].row_sum));
    o_scale[r] = rows.softmax[r].inv_sum() * keep_scale;
    lse[r] = rows.softmax[r].lse();
  }
}

}  // namespace sm80
FLASH_NAMESPACE_END
