// Owns: the sm80 forward kernel: one CTA computes O and the LSE of kBlockM query rows of one
// (sequence, head), streaming K/V tiles through shared memory (FA2's algorithm, Dao 2023,
// "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning").
//
// Structure: fwd_row_block is the row-block function with labelled phases; the loop
// body is made of the named device functions of gemm_sm80.h and softmax_sm80.h.
//
// Template flags (the launch code, kernel_src/launch/, turns runtime values into them):
//   Is_masked   a causal/local window is set (otherwise only the ragged end of the keys masks)
//   Is_general  softcap, ALiBi, paged K/V, left padding, cache_batch_idx, S_dmask output,
//               unaligned tensors or a non-positive scale may be present (runtime checks); the
//               fast kernel (false) assumes none of them and is the one tuned in docs/tuning.md
//   Is_dropout  dropout (only with Is_general)
// Split-KV (common/split_kv.h, general kernel only): with params.o_accum_ptr set, the grid also
// runs over the key partitions, and each CTA writes an fp32 partial (O normalised over its keys,
// lse with -inf for "no key") instead of O; the combine kernel (combine_sm80.h) merges them.
//
// Invariants:
// * Tiles are visited in descending key order: the masked boundary tiles of a causal block come
//   first, fully masked tiles are never visited (the KV range comes from common/mask.h).
// * The grid may be smaller than the work (varlen without max_seqlen): CTAs loop over row blocks
//   and batch entries, so correctness never depends on max_seqlen or on gridDim.
// * Shared memory: Q tile, then kStages K tiles, then kStages V tiles (kernel_traits_sm80.h).
#pragma once
#include <cstdint>

#include "../common/mask.h"
#include "../common/params.h"
#include "../common/seq_info_cuda.h"
#include "../common/split_kv.h"
#include "copy_sm80.h"
#include "gemm_sm80.h"
#include "kernel_traits_sm80.h"
#include "primitives.h"
#include "softmax_sm80.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

using cuda::kv_bound;  // (common/seq_info_cuda.h)
using cuda::SeqInfo;

// Whether every tensor allows 16-byte cp.async / stores: base pointers 16-byte aligned, strides
// and head_dim multiples of 8 elements. Shared by the launch code (fast path only when true) and
// the general kernel (scalar fallback when false).
FLASH_HOST_DEVICE bool tensors_aligned(const FwdParams& p) {
  return qkv_aligned16(p) &&
         tensor_aligned16(p.o_ptr, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
}

// S_dmask (params.p_ptr, general kernel only): P normalised with the final LSE, negated where
// dropped, zero where masked and outside the sequence. Needs the LSE, so it runs after the
// main loop as a second pass over the key tiles (a debugging/testing output: its cost is not
// tuned). Every element of the block's rows of S_dmask is written, padding included.
template <typename Traits, bool Is_dropout, typename LoadK>
__device__ void write_softmax_probs(const FwdParams& params, const SeqInfo& seq, int bidb,
                                    int bidh, int m0, const Mask& mask,
                                    const float (&lse)[2 * Traits::kMmaM],
                                    int n_block_min, int n_block_max, float alibi_slope,
                                    uint32_t smem_q, typename Traits::Element* smem_k_tile,
                                    const LoadK& load_k, const warp::LdsmLanes<Traits>& lanes) {
  using Element = typename Traits::Element;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_row0 = warp * Traits::kRowsPerWarp;
  const int p_rows = params.seqlen_q, p_cols = params.seqlen_k;
  Element* p_base = static_cast<Element*>(params.p_ptr) +
                    (static_cast<int64_t>(bidb) * params.nheads + bidh) * p_rows * p_cols;
  const uint64_t subsequence =
      params.offset + static_cast<uint64_t>(bidb) * params.nheads + bidh;
  constexpr float kLog2e = 1.4426950408889634f;
  float lse2[2 * Traits::kMmaM];
#pragma unroll
  for (int r = 0; r < 2 * Traits::kMmaM; ++r) lse2[r] = lse[r] * kLog2e;
  const int n_tiles = (p_cols + Traits::kBlockN - 1) / Traits::kBlockN;
  for (int n = 0; n < n_tiles; ++n) {
    const int n0 = n * Traits::kBlockN;
    float acc_s[Traits::kMmaM][Traits::kMmaNS][4];
    const bool computed = n >= n_block_min && n < n_block_max && m0 < seq.seqlen_q;
    if (computed) {
      load_k(n, smem_k_tile);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      warp::gemm_qk<Traits>(acc_s, smem_q, smem_u32(smem_k_tile), lanes);
      apply_score_mods<Traits>(acc_s, static_cast<float>(params.softmax_scale),
                               static_cast<float>(params.softcap), alibi_slope,
                               m0 + warp_row0, n0, seq.seqlen_k - seq.seqlen_q, lane);
      apply_mask<Traits>(acc_s, mask, m0 + warp_row0, n0);
#pragma unroll
      for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
        for (int nj = 0; nj < Traits::kMmaNS; ++nj)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            acc_s[mi][nj][e] = exp2_approx(fmaf(acc_s[mi][nj][e], kLog2e, -lse2[2 * mi + e / 2]));
      if constexpr (Is_dropout) {
        apply_dropout<Traits, /*kNegate=*/true>(acc_s, params.seed, subsequence, m0 + warp_row0,
                                                n0, params.dropout_threshold, lane);
      }
    }
#pragma unroll
    for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
      for (int nj = 0; nj < Traits::kMmaNS; ++nj)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row_of(m0 + warp_row0, 2 * mi + e / 2, lane);
          const int col = n0 + 8 * nj + 2 * (lane & 3) + (e & 1);
          if (row < p_rows && col < p_cols) {
            const bool inside = computed && row < seq.seqlen_q && col < seq.seqlen_k;
            p_base[static_cast<int64_t>(row) * p_cols + col] =
                Element(inside ? acc_s[mi][nj][e] : 0.f);
          }
        }
    if (computed) __syncthreads();  // the next tile's copy overwrites smem_k_tile
  }
  cp_async_wait<0>();  // the Q reload is in flight when no tile was computed
}

// Split-KV epilogue: this warp's rows of the partial (acc_o already normalised over the split's
// keys) as fp32 column pairs, and its lse with -inf for a row that saw no key of the split.
template <typename Traits>
__device__ void store_partial(const FwdParams& params, const SeqInfo& seq, int bidb, int bidh,
                              int m0, int split, const float (&acc_o)[Traits::kMmaM][Traits::kMmaNO][4],
                              const float (&lse)[2 * Traits::kMmaM], int valid_q, int warp,
                              int lane) {
  const PartialLayout layout(params);
  const int64_t row0 =
      (params.cu_seqlens_q != nullptr ? int64_t(seq.q_first_row)
                                      : int64_t(bidb) * params.seqlen_q) + m0;
  const int warp_row0 = warp * Traits::kRowsPerWarp;
#pragma unroll
  for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row_of(warp_row0, 2 * mi + half, lane);
      if (row >= valid_q) continue;
      float* dst = params.o_accum_ptr + layout.o_offset(split, row0 + row, bidh, params.nheads);
#pragma unroll
      for (int dj = 0; dj < Traits::kMmaNO; ++dj) {
        const int col = 8 * dj + 2 * (lane & 3);
        if (col < layout.width) {
          *reinterpret_cast<float2*>(dst + col) =
              make_float2(acc_o[mi][dj][2 * half], acc_o[mi][dj][2 * half + 1]);
        }
      }
      if ((lane & 3) == 0) {
        const int64_t idx = seq.lse_row0 + int64_t(bidh) * seq.lse_head_stride + m0 + row;
        const float l = lse[2 * mi + half];
        params.lse_accum_ptr[split * layout.lse_numel + idx] = l == INFINITY ? -INFINITY : l;
      }
    }
}

// One row block of one (sequence, head); split >= 0 (split-KV, general kernel only) restricts it
// to that partition of the keys and writes a partial.
template <typename Traits, bool Is_masked, bool Is_general, bool Is_dropout>
__device__ __forceinline__ void fwd_row_block(const FwdParams& params, const SeqInfo& seq,
                                              int bidb, int bidh, int m_block, bool aligned,
                                              typename Traits::Element* smem, int split = -1) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  const int tid = thread_index_in_block(), warp = tid / 32, lane = tid % 32;
  const int m0 = m_block * kBlockM;
  const int warp_row0 = warp * Traits::kRowsPerWarp;
  const int bidh_kv = bidh / (params.nheads / params.nheads_k);
  const int head_dim = params.head_dim;

  Element* smem_q = smem + Traits::kSmemQOffset;
  Element* smem_k = smem + Traits::kSmemKOffset;
  Element* smem_v = smem + Traits::kSmemVOffset;
  const uint32_t smem_q_u32 = smem_u32(smem_q);
  const uint32_t smem_q_warp = smem_q_u32 + 2 * warp_row0 * Traits::kSwizzleCols;
  const uint32_t smem_k_u32 = smem_u32(smem_k), smem_v_u32 = smem_u32(smem_v);

  const Element* q_gmem = static_cast<const Element*>(params.q_ptr) + seq.q_row0 +
                          bidh * params.q_head_stride + m0 * params.q_row_stride;
  Element* o_gmem = static_cast<Element*>(params.o_ptr) + seq.o_row0 +
                    bidh * params.o_head_stride + m0 * params.o_row_stride;
  float* lse_rows = params.softmax_lse_ptr + seq.lse_row0 + bidh * seq.lse_head_stride + m0;
  const int valid_q = seq.seqlen_q - m0;  // may be <= 0 for S_dmask padding blocks

  // ---- KV range of this row block (common/mask.h) ------------------------------------------
  const Mask mask(seq.seqlen_q, seq.seqlen_k, Is_masked ? params.window_left : -1,
                  Is_masked ? params.window_right : -1);
  int col_begin = 0, col_end = 0;
  if (Is_general && split >= 0) {
    int split_begin, split_end;
    split_key_range(params.num_splits, split, seq.seqlen_k, kBlockN, &split_begin, &split_end);
    mask.kv_range(m0, m0 + kBlockM, &col_begin, &col_end, split_begin, split_end);
  } else {
    mask.kv_range(m0, m0 + kBlockM, &col_begin, &col_end);
  }
  const int n_block_min = col_begin / kBlockN;
  const int n_block_max = col_end > col_begin ? (col_end + kBlockN - 1) / kBlockN : n_block_min;
  // Tiles [n_full_begin, n_full_last] are fully visible from every row of the block
  // (Mask::full_tiles), so the per-warp classification runs on boundary tiles only. (The
  // inclusive last index measured one spill reload fewer in the sm_90 build of the fast kernel
  // at head dim 128 than comparing against the end: nvcc shares its `- 1` with the copies of
  // tile n - 1.)
  int n_full_begin = 0, n_full_last = -1;
  if (Is_masked && col_end > col_begin) {
    int n_full_end;
    mask.full_tiles(m0, m0 + kBlockM, kBlockN, &n_full_begin, &n_full_end);
    n_full_last = n_full_end - 1;
  }

  // ---- tile loaders ------------------------------------------------------------------------
  const CopyThread<Traits> ct(tid);
  const bool paged = Is_general && params.block_table != nullptr;
  // This thread's first element of key tile 0 (non-paged); tile n is n * kBlockN rows further.
  const Element* k_thread = static_cast<const Element*>(params.k_ptr) + seq.k_row0 +
                            bidh_kv * params.k_head_stride + ct.row0 * params.k_row_stride + ct.col0;
  const Element* v_thread = static_cast<const Element*>(params.v_ptr) + seq.v_row0 +
                            bidh_kv * params.v_head_stride + ct.row0 * params.v_row_stride + ct.col0;
  auto load_kv = [&](const Element* thread0, const void* pool, int64_t head_stride,
                     int64_t page_stride, int64_t row_stride, int n, Element* dst) {
    const int valid = seq.seqlen_k - n * kBlockN;
    if (paged) {
      const PagedRows<Element> rows{static_cast<const Element*>(pool) + bidh_kv * head_stride,
                                    params.block_table + bidb * params.block_table_batch_stride,
                                    page_stride, row_stride, seq.kv_pos0 + n * kBlockN,
                                    params.page_block_size, kv_bound(params)};
      if (aligned) {
        load_tile_paged<Traits, kBlockN, true>(dst, ct, rows, valid, head_dim);
      } else {
        load_tile_paged<Traits, kBlockN, false>(dst, ct, rows, valid, head_dim);
      }
      return;
    }
    const Element* src = thread0 + static_cast<int64_t>(n) * kBlockN * row_stride;
    if (!Is_general || aligned) {
      load_tile<Traits, kBlockN, true>(dst, ct, src, row_stride, valid, head_dim);
    } else {
      load_tile<Traits, kBlockN, false>(dst, ct, src, row_stride, valid, head_dim);
    }
  };
  auto load_k = [&](int n, Element* dst) {
    load_kv(k_thread, params.k_ptr, params.k_head_stride, params.k_batch_stride,
            params.k_row_stride, n, dst);
  };
  auto load_v = [&](int n, Element* dst) {
    load_kv(v_thread, params.v_ptr, params.v_head_stride, params.v_batch_stride,
            params.v_row_stride, n, dst);
  };
  auto load_q = [&]() {
    const Element* src = q_gmem + ct.row0 * params.q_row_stride + ct.col0;
    if (!Is_general || aligned) {
      load_tile<Traits, kBlockM, true>(smem_q, ct, src, params.q_row_stride, valid_q, head_dim);
    } else {
      load_tile<Traits, kBlockM, false>(smem_q, ct, src, params.q_row_stride, valid_q, head_dim);
    }
  };

  // Row sums on the tensor cores (RowState) unless dropout needs the undropped sums.
  constexpr bool kSumByMma = !Is_dropout;
  const warp::LdsmLanes<Traits> lanes(lane);
  RowState<Traits, kSumByMma> rows;
  rows.init();
  float alibi_slope = 0.f;
  if (Is_general && params.alibi_slopes != nullptr) {
    alibi_slope = params.alibi_slopes[bidb * params.alibi_batch_stride + bidh];
  }
  // The general kernel feeds the softmax natural-unit logits (apply_score_mods scales them).
  const float scale_log2 = Is_general ? 1.4426950408889634f : params.scale_log2;
  const uint64_t subsequence = params.offset + static_cast<uint64_t>(bidb) * params.nheads + bidh;

  float acc_o[Traits::kMmaM][Traits::kMmaNO][4];
#pragma unroll
  for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
    for (int dj = 0; dj < Traits::kMmaNO; ++dj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mi][dj][e] = 0.f;

  if (valid_q > 0 && n_block_max > n_block_min) {
    // This warp's rows of the block (padding rows past seqlen_q are never stored: a warp with
    // only such rows skips the math).
    const int warp_rows_begin = m0 + warp_row0;
    const int warp_rows_end = min(warp_rows_begin + Traits::kRowsPerWarp, seq.seqlen_q);

    // The math of one key tile n for this warp, S(n) = Q K(n)^T given in acc_s: score
    // modifiers, the element-wise mask when the warp's rows see the tile only partly (the
    // causal diagonal, the ragged end of the keys, a local window's edge), online softmax,
    // dropout, O += P V(n). A warp whose rows see nothing of the tile skips it.
    auto softmax_pv = [&](float (&acc_s)[Traits::kMmaM][Traits::kMmaNS][4], int n,
                          uint32_t v_tile, WarpTile cls) {
      const int n0 = n * kBlockN;
      if constexpr (Is_general) {
        apply_score_mods<Traits>(acc_s, static_cast<float>(params.softmax_scale),
                                 static_cast<float>(params.softcap), alibi_slope,
                                 warp_rows_begin, n0, seq.seqlen_k - seq.seqlen_q, lane);
      }
      // masked blocks
      if (cls == WarpTile::kPartial) apply_mask<Traits>(acc_s, mask, warp_rows_begin, n0);
      // online softmax
      online_softmax<Traits, kSumByMma>(acc_s, acc_o, rows, scale_log2);
      if constexpr (Is_dropout) {
        apply_dropout<Traits, /*kNegate=*/false>(acc_s, params.seed, subsequence,
                                                 warp_rows_begin, n0, params.dropout_threshold,
                                                 lane);
      }
      // O += P V
      uint32_t p[Traits::kMmaM][Traits::kKStepsPV][4];
      warp::convert_p<Traits>(acc_s, p);
      warp::gemm_pv<Traits, kSumByMma>(acc_o, p, v_tile, lanes, rows.sum_frag);
    };

    // ---- prologue: Q and the first K/V tile in flight --------------------------------------
    load_q();
    load_k(n_block_max - 1, smem_k);
    if constexpr (Traits::kStages == 2) load_v(n_block_max - 1, smem_v);
    cp_async_commit();

    // One main-loop iteration for key tile n (stage: its shared-memory buffer). Copies and
    // barriers are the CTA's; the math is the warp's, for its own rows only (split-Q), so each
    // warp classifies the tile for its rows (classify_warp_tile).
    auto step = [&](int n, int stage) {
      const int n0 = n * kBlockN;
      const uint32_t k_tile = smem_k_u32 + stage * Traits::kTileKVElems * 2;
      const uint32_t v_tile = smem_v_u32 + stage * Traits::kTileKVElems * 2;
      const WarpTile cls =
          Is_masked && n >= n_full_begin && n <= n_full_last && warp_rows_end > warp_rows_begin
              ? WarpTile::kFull
              : classify_warp_tile<Is_masked>(mask, warp_rows_begin, warp_rows_end, n0, kBlockN);
      // Tile n landed (this thread's copies, then everyone's), and every warp is done with the
      // buffers of tile n + 1, which the next copies overwrite.
      // (cta_barrier: an empty warp reaches these barriers from its own call site below.)
      auto tile_landed = [&] {
        cp_async_wait<0>();
        cta_barrier();
        if constexpr (Traits::kStages == 2) {
          if (n > n_block_min) {
            load_k(n - 1, smem_k + (stage ^ 1) * Traits::kTileKVElems);
            load_v(n - 1, smem_v + (stage ^ 1) * Traits::kTileKVElems);
          }
        } else {
          load_v(n, smem_v);
        }
        cp_async_commit();
      };
      // kStages == 1: V(n) landed; every warp is done reading K(n), so K(n - 1) may replace it.
      auto v_landed = [&] {
        if constexpr (Traits::kStages == 1) {
          cp_async_wait<0>();
          cta_barrier();
          if (n > n_block_min) load_k(n - 1, smem_k);
          cp_async_commit();
        }
      };
      if (cls == WarpTile::kEmpty) {  // the warp only takes part in the copies and barriers
        tile_landed();
        v_landed();
        return;
      }
      tile_landed();

      // S = Q K^T
      float acc_s[Traits::kMmaM][Traits::kMmaNS][4];
      warp::gemm_qk<Traits>(acc_s, smem_q_warp, k_tile, lanes);
      v_landed();
      softmax_pv(acc_s, n, v_tile, cls);
    };

    // ---- main loop over the key tiles of the block's KV range, descending -----------------
    // (fully masked tiles are outside the range and never visited; unmasked blocks skip the
    // element-wise mask, per warp, inside step)
    int stage = 0;
    for (int n = n_block_max - 1; n >= n_block_min; --n) {
      step(n, stage);
      if constexpr (Traits::kStages == 2) stage ^= 1;
    }
  }

  // ---- epilogue: normalise, store O (16-byte stores through shared memory) and the LSE ----
  float o_scale[2 * Traits::kMmaM], lse[2 * Traits::kMmaM];
  finalize_rows<Traits, kSumByMma>(
      rows, Is_dropout ? static_cast<float>(params.keep_scale) : 1.f, o_scale, lse);
#pragma unroll
  for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
    for (int dj = 0; dj < Traits::kMmaNO; ++dj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mi][dj][e] *= o_scale[2 * mi + e / 2];
  if constexpr (Is_general) {
    if (split >= 0) {
      if (valid_q > 0) {
        store_partial<Traits>(params, seq, bidb, bidh, m0, split, acc_o, lse, valid_q, warp, lane);
      }
      return;
    }
  }
  if (valid_q > 0) {
    if (!Is_general || aligned) {
      store_o<Traits, true>(smem_q, acc_o, o_gmem, params.o_row_stride, valid_q, head_dim, warp,
                            lane);
    } else {
      store_o<Traits, false>(smem_q, acc_o, o_gmem, params.o_row_stride, valid_q, head_dim,
                             warp, lane);
    }
    if ((lane & 3) == 0) {
#pragma unroll
      for (int r = 0; r < 2 * Traits::kMmaM; ++r) {
        const int row = row_of(warp_row0, r, lane);
        if (row < valid_q) lse_rows[row] = lse[r];
      }
    }
  }

  if constexpr (Is_general) {
    if (params.p_ptr != nullptr) {
      __syncthreads();  // store_o staged O in smem_q: reload Q for the second pass
      if (valid_q > 0) {
        load_q();
        cp_async_commit();
      }
      write_softmax_probs<Traits, Is_dropout>(params, seq, bidb, bidh, m0, mask, lse,
                                              n_block_min, n_block_max, alibi_slope, smem_q_warp,
                                              smem_k, load_k, lanes);
    }
  }
}

// The grid (the launch builds it with GridOrder):
// * masked (causal/local): (pairs per section, row blocks, sections). A "pair" is one (sequence,
//   head), pair = bidb * nheads + bidh. The hardware starts CTAs in x-fastest order, so the pairs
//   of one L2 section run together, longest row block first: the row-block index (y) counts back
//   from the last block of every sequence, and the short blocks of the section's tail overlap
//   the long blocks of the next section (longest-processing-time first, as FA3). A section's K/V
//   fit in L2 together (l2_section_pairs, fwd_launch_sm80.h), so the K/V tiles that the section's
//   row blocks all read hit in L2 instead of competing with the K/V of every head.
// * unmasked: (row blocks, heads, batch). All blocks are equal, and the row blocks of a head are
//   adjacent, so the CTAs in flight share their head's K/V in L2.
// * split-KV: (row blocks x splits, heads, batch), the splits of a row block adjacent.
// CTAs loop over the row blocks (and, unmasked, the batch entries) beyond the grid.
struct GridOrder {
  static dim3 masked(int row_blocks, int64_t pairs, int section_pairs) {
    return dim3(section_pairs, row_blocks,
                static_cast<unsigned>((pairs + section_pairs - 1) / section_pairs));
  }
  static dim3 unmasked(int row_blocks, int heads, int batch) {
    return dim3(row_blocks, heads, batch);
  }
  static dim3 split(int row_blocks, int splits, int heads, int batch) {
    return dim3(row_blocks * splits, heads, batch);
  }
};

template <typename Traits, bool Is_masked, bool Is_general, bool Is_dropout>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    fwd_kernel_sm80(const __grid_constant__ FwdParams params) {
  using Element = typename Traits::Element;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  const bool aligned = !Is_general || tensors_aligned(params);
  // The row blocks first_block + k * stride of one (sequence, head), counted from the last block
  // of the sequence (GridOrder).
  auto row_blocks = [&](int bidb, int bidh, int first_block, int stride) {
    const SeqInfo seq(params, bidb);
    int rows = seq.seqlen_q;
    // S_dmask has (max) seqlen_q rows per sequence; padding rows past the sequence get zeros.
    if (Is_general && params.p_ptr != nullptr) rows = max(rows, params.seqlen_q);
    const int n_m_blocks = (rows + Traits::kBlockM - 1) / Traits::kBlockM;
    for (int x = first_block; x < n_m_blocks; x += stride) {
      fwd_row_block<Traits, Is_masked, Is_general, Is_dropout>(
          params, seq, bidb, bidh, n_m_blocks - 1 - x, aligned, smem);
      __syncthreads();  // the next row block's copies overwrite this one's shared memory
    }
  };
  if constexpr (Is_general) {
    if (params.o_accum_ptr != nullptr) {
      const int splits = params.num_splits;
      const int split = blockIdx.x % splits;
      for (int bidb = blockIdx.z; bidb < params.batch; bidb += gridDim.z) {
        const SeqInfo seq(params, bidb);
        const int n_m_blocks = (seq.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
        for (int m = blockIdx.x / splits; m < n_m_blocks; m += gridDim.x / splits) {
          fwd_row_block<Traits, Is_masked, true, Is_dropout>(params, seq, bidb, blockIdx.y, m,
                                                             aligned, smem, split);
          __syncthreads();
        }
      }
      return;
    }
  }
  if constexpr (Is_masked) {
    const int64_t pair = int64_t(blockIdx.z) * gridDim.x + blockIdx.x;
    if (pair >= int64_t(params.nheads) * params.batch) return;  // the last section's spare CTAs
    row_blocks(static_cast<int>(pair / params.nheads), static_cast<int>(pair % params.nheads),
               blockIdx.y, gridDim.y);
  } else {
    for (int bidb = blockIdx.z; bidb < params.batch; bidb += gridDim.z) {
      row_blocks(bidb, blockIdx.y, blockIdx.x, gridDim.x);
    }
  }
}

}  // namespace sm80
FLASH_NAMESPACE_END
