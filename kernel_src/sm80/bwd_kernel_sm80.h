// Owns: the sm80 backward (FA2's algorithm, Dao 2023): three kernels per call.
//   bwd_dot_do_o_kernel   D_i = sum_d dO_i O_i per query row (fp32, laid out like the LSE)
//   bwd_kernel_sm80       per (key block, K/V head): dK, dV in registers over every query block
//                         of every query head of the group; dQ accumulated in fp32 (atomics)
//   bwd_convert_dq_kernel dQ = softmax_scale * accumulator, in the input dtype
//
// Math (params.h conventions; s = the logits after softcap/ALiBi, P = exp(s - lse)):
//   dV = (P o Z)^T dO            Z = keep * keep_scale with dropout, else 1
//   dP = (dO V^T) o Z
//   dS = P o (dP - D),           D_i = sum_j P_ij dP_ij = dO_i . O_i (the dropout factors cancel)
//   dS' = dS * (1 - tanh^2)      with softcap (common/score_mod.h); ALiBi adds no gradient term
//   dQ = scale dS' K,  dK = scale dS'^T Q
//
// GQA/MQA: a CTA owns its K/V head's key block and loops over the query heads of the group, so
// dK/dV are summed in registers, without expanded K/V or per-head copies, and written once.
// Determinism: dK/dV always are (one writer per element, fixed order). dQ adds the key blocks'
// contributions with atomics; with params.deterministic they add in descending key-block order,
// each CTA waiting for the next key block of its (query head, query block) on a counter in
// params.dq_semaphore. Descending, because a CTA walks its query blocks in ascending order: under
// a causal mask key block j first meets query block i where the block nearest the diagonal has
// just added, so no CTA waits (ascending order made key block j wait about 2j steps, half the
// causal grid idle). The grid runs the key blocks in reverse (bwd_kernel_sm80), so the CTA waited
// for started earlier (CTAs start in blockIdx order) and already runs or is done.
//
// Invariants: rows past seqlen_q are zero-filled in Q, dO, LSE and D, so their P is finite and
// their dP, dS and every product with dO are zero; keys past seqlen_k and masked pairs get
// s = -inf (P = 0), so padding contributes nothing and needs no other predicate;
// fully masked (query block, key block) pairs are never visited (Mask::q_range).
#pragma once
#include <cstdint>
#include <type_traits>

#include "../common/mask.h"
#include "../common/params.h"
#include "../common/philox.h"
#include "../common/score_mod.h"
#include "../common/seq_info_cuda.h"
#include "bwd_dq_sm80.h"
#include "bwd_gemm_sm80.h"
#include "bwd_traits_sm80.h"
#include "copy_sm80.h"
#include "primitives.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

using cuda::SeqInfo;  // (common/seq_info_cuda.h)

// Whether the tensors the main kernel copies allow 16-byte cp.async.
FLASH_HOST_DEVICE bool bwd_tensors_aligned(const BwdParams& p) {
  return qkv_aligned16(p) &&
         tensor_aligned16(p.do_ptr, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
}

// Query row `row` (a packed varlen row, or batch * seqlen_q + position) of head h: the element
// offset of its first column in a tensor with the given strides.
FLASH_HOST_DEVICE int64_t q_like_offset(const BwdParams& p, int64_t row, int h, int64_t b_stride,
                                        int64_t r_stride, int64_t h_stride) {
  if (p.cu_seqlens_q != nullptr) return row * r_stride + h * h_stride;
  const int64_t b = row / p.seqlen_q, s = row % p.seqlen_q;
  return b * b_stride + s * r_stride + h * h_stride;
}

// Rows of q: total_q (varlen) or batch * seqlen_q.
FLASH_HOST_DEVICE int64_t q_rows(const BwdParams& p) {
  return p.cu_seqlens_q != nullptr ? int64_t(p.total_q) : int64_t(p.batch) * p.seqlen_q;
}

// Index of (row, head h) in the LSE layout: (batch, nheads, seqlen_q) or (nheads, total_q).
FLASH_HOST_DEVICE int64_t lse_index(const BwdParams& p, int64_t row, int h) {
  if (p.cu_seqlens_q != nullptr) return int64_t(h) * p.total_q + row;
  const int64_t b = row / p.seqlen_q, s = row % p.seqlen_q;
  return (b * p.nheads + h) * p.seqlen_q + s;
}

// D = rowsum(dO o O): one warp per (row, head).
template <typename Element, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) bwd_dot_do_o_kernel(const __grid_constant__ BwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t pair = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (pair >= q_rows(p) * p.nheads) return;
  const int64_t row = pair / p.nheads;
  const int h = static_cast<int>(pair % p.nheads);
  const Element* o = static_cast<const Element*>(p.o_ptr) +
                     q_like_offset(p, row, h, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  const Element* d_o =
      static_cast<const Element*>(p.do_ptr) +
      q_like_offset(p, row, h, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  float acc = 0.f;
  for (int c = lane; c < p.head_dim; c += 32) acc += to_float(o[c]) * to_float(d_o[c]);
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.dsoftmax_sum_ptr[lse_index(p, row, h)] = acc;
}

// Per-sequence places the main kernel needs beyond SeqInfo.
struct BwdSeq {
  SeqInfo seq;
  int64_t q_row_global;  // this sequence's row 0 as a row of q (varlen: packed row)
  int64_t do_row0;       // element offset of dO's row 0, head 0
  int64_t dk_row0, dv_row0;
  int64_t sem_base;      // this sequence's first query-block counter (deterministic dQ)

  __device__ __forceinline__ BwdSeq(const BwdParams& p, int bidb, int block_m) : seq(p, bidb) {
    if (p.cu_seqlens_q != nullptr) {
      q_row_global = seq.q_first_row;
      do_row0 = q_row_global * p.do_row_stride;
      // Blocks of sequence b start at floor(start / kBlockM) + b: disjoint across sequences
      // since a sequence of n rows spans at most floor(n / kBlockM) + 1 blocks.
      sem_base = q_row_global / block_m + bidb;
    } else {
      q_row_global = int64_t(bidb) * p.seqlen_q;
      do_row0 = int64_t(bidb) * p.do_batch_stride;
      sem_base = int64_t(bidb) * ((p.seqlen_q + block_m - 1) / block_m);
    }
    dk_row0 = seq.kv_batch * p.dk_batch_stride + int64_t(seq.k_first_row) * p.dk_row_stride;
    dv_row0 = seq.kv_batch * p.dv_batch_stride + int64_t(seq.k_first_row) * p.dv_row_stride;
  }
};

// dQ = softmax_scale * accumulator (bwd_dq_sm80.h's chunks): one CTA per (query block, query
// head, sequence), looping where the grid has fewer blocks than the sequence (varlen grids sized
// from an estimate). Each thread reads 16-byte fragment pieces in chunk order and writes their
// four (row, column) elements through dQ's strides.
template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads)
    bwd_convert_dq_kernel(const __grid_constant__ BwdParams p) {
  using Element = typename Traits::Element;
  using Chunk = DqChunk<Traits>;
  constexpr int kBlockM = Traits::kBlockM;
  const int h = blockIdx.y;
  const int64_t per_head = bwd_semaphores_per_head(p, kBlockM);
  const float scale = static_cast<float>(p.softmax_scale);
  for (int bidb = blockIdx.z; bidb < p.batch; bidb += gridDim.z) {
    const BwdSeq bs(p, bidb, kBlockM);
    for (int m_block = blockIdx.x; m_block * kBlockM < bs.seq.seqlen_q; m_block += gridDim.x) {
      const float* chunk = dq_chunk<Traits>(p, per_head, h, bs.sem_base, m_block);
      const int valid = bs.seq.seqlen_q - m_block * kBlockM;
      for (int f = threadIdx.x; f < Chunk::kElems / 4; f += Traits::kNThreads) {
        const int lane = f % 32, q = f / 32;
        const int nj = q % Chunk::kQ8, mi = (q / Chunk::kQ8) % Chunk::kQ16;
        const int warp = q / (Chunk::kQ8 * Chunk::kQ16);
        const int r = (warp % Traits::kC.kWarpsQ_M) * Traits::kQRows + 16 * mi + lane / 4;
        const int c = (warp / Traits::kC.kWarpsQ_M) * Traits::kQCols + 8 * nj + 2 * (lane % 4);
        const float4 v = *reinterpret_cast<const float4*>(chunk + 4 * f);
        const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = r + 8 * (e / 2), col = c + (e & 1);
          if (row < valid && col < p.head_dim) {
            Element* dq = static_cast<Element*>(p.dq_ptr) +
                          q_like_offset(p, bs.q_row_global + m_block * kBlockM + row, h,
                                        p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
            dq[col] = Element(vals[e] * scale);
          }
        }
      }
    }
  }
}

// The S-phase of one (query block, key block): dS'^T into shared memory, and P^T o Z there too or,
// with Traits::kPInRegs, both as the warp's A fragments of the dKV-phase. kFull: every
// key of the block exists and every (query, key) pair is visible, so no element is masked (a
// compile-time split: a run-time test per element cost a branch per element).
template <typename Traits, bool Is_masked, bool Is_general, bool kFull>
__device__ __forceinline__ void bwd_scores(const BwdParams& params, const SeqInfo& seq,
                                           const Mask& mask, int m0, int n0,
                                           uint64_t subsequence, float alibi_slope,
                                           typename Traits::Element* smem, int stage, int warp,
                                           int lane,
                                           uint32_t (&p_frag)[Traits::kSRows / 16][Traits::kSCols / 16][4],
                                           uint32_t (&ds_frag)[Traits::kSRows / 16][Traits::kSCols / 16][4]) {
  using Element = typename Traits::Element;
  constexpr int kM16 = Traits::kSRows / 16, kN8 = Traits::kSCols / 8;
  constexpr float kLog2e = 1.4426950408889634f;
  const int stage_off = stage * Traits::kStageElems;
  const SmemTile<Traits::kSwizzleCols> tq{smem_u32(smem + Traits::kSmemQ + stage_off),
                                          Traits::kBlockM};
  const SmemTile<Traits::kSwizzleCols> tdo{smem_u32(smem + Traits::kSmemDO + stage_off),
                                           Traits::kBlockM};
  const SmemTile<Traits::kSwizzleCols> tk{smem_u32(smem + Traits::kSmemK), Traits::kBlockN};
  const SmemTile<Traits::kSwizzleCols> tv{smem_u32(smem + Traits::kSmemV), Traits::kBlockN};
  const SmemTile<Traits::kSwizzleColsP> tpt{smem_u32(smem + Traits::kSmemPt), Traits::kBlockN};
  // The stage's LSE (natural log; 0 for rows past seqlen_q, whose zero Q and dO rows make P
  // finite and every product with dO or (dP - D) zero) and D rows.
  const float* lse = reinterpret_cast<const float*>(smem + Traits::kSmemStats) +
                     stage * 2 * Traits::kBlockM;
  const float* dsum = lse + Traits::kBlockM;
  const int key0 = (warp % Traits::kC.kWarpsS_N) * Traits::kSRows;
  const int q0 = (warp / Traits::kC.kWarpsS_N) * Traits::kSCols;

  // S^T = K Q^T, dP^T = V dO^T
  float acc_s[kM16][kN8][4], acc_dp[kM16][kN8][4];
  warp::zero(acc_s);
  warp::zero(acc_dp);
  warp::gemm_ss<Element, kM16, kN8, Traits::kHeadDim / 16, false, false>(acc_s, tk, key0, tq, q0);
  warp::gemm_ss<Element, kM16, kN8, Traits::kHeadDim / 16, false, false>(acc_dp, tv, key0, tdo,
                                                                         q0);

  // P, dropout, dS, element by element (row = key, column = query)
  const float scale = static_cast<float>(params.softmax_scale);
  const float softcap = Is_general ? static_cast<float>(params.softcap) : 0.f;
  const float inv_cap = softcap > 0.f ? 1.f / softcap : 0.f;
  const float keep_scale = static_cast<float>(params.keep_scale);
  const bool dropout = Is_general && params.p_dropout > 0.0;
  const int shift = seq.seqlen_k - seq.seqlen_q;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < kM16; ++mi)
#pragma unroll
    for (int nj = 0; nj < kN8; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int kr = key0 + 16 * mi + g + 8 * (e / 2), qc = q0 + 8 * nj + 2 * t + (e & 1);
        const int j = n0 + kr, i = m0 + qc;
        float s = acc_s[mi][nj][e], tanh_s = 0.f, p;
        if constexpr (Is_general) {
          s *= scale;
          if (softcap > 0.f) s = softcap_apply(s, softcap, inv_cap, &tanh_s);
          if (alibi_slope != 0.f) s += alibi_bias(alibi_slope, i, j, shift);
          if (!kFull && !mask.visible(i, j)) s = -INFINITY;
          p = exp2_approx((s - lse[qc]) * kLog2e);
        } else {
          if (!kFull && !mask.visible(i, j)) s = -INFINITY;
          p = exp2_approx(fmaf(s, params.scale_log2, -lse[qc] * kLog2e));
        }
        float dp = acc_dp[mi][nj][e], pz = p;
        if (dropout) {
          const bool keep = dropout_keep(params.seed, subsequence, static_cast<uint32_t>(i),
                                         static_cast<uint32_t>(j), params.dropout_threshold);
          pz = keep ? p * keep_scale : 0.f;
          dp = keep ? dp * keep_scale : 0.f;
        }
        float ds = p * (dp - dsum[qc]);
        if (Is_general && softcap > 0.f) ds *= 1.f - tanh_s * tanh_s;
        acc_s[mi][nj][e] = pz;
        acc_dp[mi][nj][e] = ds;
      }
  if constexpr (Traits::kPInRegs) {
    warp::to_a_fragments<Element>(acc_s, p_frag);
    warp::to_a_fragments<Element>(acc_dp, ds_frag);
  } else {
    warp::store_c<Element>(acc_s, tpt, smem + Traits::kSmemPt, key0, q0);
  }
  warp::store_c<Element>(acc_dp, tpt, smem + Traits::kSmemDSt, key0, q0);
}

// One key block of one (sequence, K/V head).
template <typename Traits, bool Is_masked, bool Is_general>
__device__ __forceinline__ void bwd_col_block(const BwdParams& params, const BwdSeq& bs, int bidb,
                                              int bidh_kv, int n_block, bool aligned,
                                              typename Traits::Element* smem) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  const SeqInfo& seq = bs.seq;
  const int tid = thread_index_in_block();
  // The range lets the compiler fold the warp-grid coordinates (e.g. warp / kWarpsKV_N == 0 for
  // a one-column grid) and use unsigned shifts for them.
  __builtin_assume(tid >= 0 && tid < Traits::kNThreads);
  const int warp = tid / 32, lane = tid % 32;
  const int n0 = n_block * kBlockN;
  const int head_dim = params.head_dim;
  const CopyThread<Traits> ct(tid);

  // ---- the key block's K and V, and the query blocks that see it (common/mask.h) -----------
  const Mask mask(seq.seqlen_q, seq.seqlen_k, Is_masked ? params.window_left : -1,
                  Is_masked ? params.window_right : -1);
  int row_begin = 0, row_end = 0;
  mask.q_range(n0, n0 + kBlockN, &row_begin, &row_end);
  const int m_block_min = row_begin / kBlockM;
  const int m_block_max = row_end > row_begin ? (row_end + kBlockM - 1) / kBlockM : m_block_min;
  {
    const int valid_k = seq.seqlen_k - n0;
    const Element* k_src = static_cast<const Element*>(params.k_ptr) + seq.k_row0 +
                           bidh_kv * params.k_head_stride +
                           (int64_t(n0) + ct.row0) * params.k_row_stride + ct.col0;
    const Element* v_src = static_cast<const Element*>(params.v_ptr) + seq.v_row0 +
                           bidh_kv * params.v_head_stride +
                           (int64_t(n0) + ct.row0) * params.v_row_stride + ct.col0;
    if (!Is_general || aligned) {
      load_tile<Traits, kBlockN, true>(smem + Traits::kSmemK, ct, k_src, params.k_row_stride,
                                       valid_k, head_dim);
      load_tile<Traits, kBlockN, true>(smem + Traits::kSmemV, ct, v_src, params.v_row_stride,
                                       valid_k, head_dim);
    } else {
      load_tile<Traits, kBlockN, false>(smem + Traits::kSmemK, ct, k_src, params.k_row_stride,
                                        valid_k, head_dim);
      load_tile<Traits, kBlockN, false>(smem + Traits::kSmemV, ct, v_src, params.v_row_stride,
                                        valid_k, head_dim);
    }
    cp_async_commit();
  }

  constexpr int kKV16 = Traits::kKVRows / 16, kKV8 = Traits::kKVCols / 8;
  constexpr int kQ16 = Traits::kQRows / 16, kQ8 = Traits::kQCols / 8;
  const int kv_key0 = (warp % Traits::kC.kWarpsKV_N) * Traits::kKVRows;
  const int kv_d0 = (warp / Traits::kC.kWarpsKV_N) * Traits::kKVCols;
  const int dq_row0 = (warp % Traits::kC.kWarpsQ_M) * Traits::kQRows;
  const int dq_d0 = (warp / Traits::kC.kWarpsQ_M) * Traits::kQCols;
  const SmemTile<Traits::kSwizzleCols> tk{smem_u32(smem + Traits::kSmemK), kBlockN};
  const SmemTile<Traits::kSwizzleColsP> tpt{smem_u32(smem + Traits::kSmemPt), kBlockN};
  const SmemTile<Traits::kSwizzleColsP> tdst{smem_u32(smem + Traits::kSmemDSt), kBlockN};

  float acc_dk[kKV16][kKV8][4], acc_dv[kKV16][kKV8][4];
  warp::zero(acc_dk);
  warp::zero(acc_dv);

  // The work items of this key block: (query head of the group, query block), head-major.
  const int group = params.nheads / params.nheads_k;
  const int m_blocks = m_block_max - m_block_min;
  const int n_items = group * m_blocks;
  const int64_t sems_per_head = bwd_semaphores_per_head(params, kBlockM);  // = dQ chunks
  // dQ by bulk reductions from a shared chunk (bwd_dq_sm80.h), where the launch reserved it.
  const bool bulk_dq = FLASH_BWD_BULK_DQ && params.dq_bulk_reduce && !params.deterministic;
  float* smem_dq = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(smem) +
                                            Traits::kSmemBytes);
  // The item after (bidh, m_block), by counting (no integer division per item).
  auto advance = [&](int& bidh, int& m_block) {
    if (++m_block == m_block_max) {
      m_block = m_block_min;
      ++bidh;
    }
  };

  // Issues the copies of the item's Q and dO rows, LSE and D into `stage` (one group).
  auto load_item = [&](int bidh, int m0, int stage) {
    const int valid_q = seq.seqlen_q - m0;
    const Element* q_src = static_cast<const Element*>(params.q_ptr) + seq.q_row0 +
                           bidh * params.q_head_stride +
                           (int64_t(m0) + ct.row0) * params.q_row_stride + ct.col0;
    const Element* do_src = static_cast<const Element*>(params.do_ptr) + bs.do_row0 +
                            bidh * params.do_head_stride +
                            (int64_t(m0) + ct.row0) * params.do_row_stride + ct.col0;
    Element* q_dst = smem + Traits::kSmemQ + stage * Traits::kStageElems;
    Element* do_dst = smem + Traits::kSmemDO + stage * Traits::kStageElems;
    if (!Is_general || aligned) {
      load_tile<Traits, kBlockM, true>(q_dst, ct, q_src, params.q_row_stride, valid_q, head_dim);
      load_tile<Traits, kBlockM, true>(do_dst, ct, do_src, params.do_row_stride, valid_q,
                                       head_dim);
    } else {
      load_tile<Traits, kBlockM, false>(q_dst, ct, q_src, params.q_row_stride, valid_q, head_dim);
      load_tile<Traits, kBlockM, false>(do_dst, ct, do_src, params.do_row_stride, valid_q,
                                        head_dim);
    }
    // LSE and D rows by 4-byte copies in the same group (a synchronous load here stalled its
    // warps for a global round trip every item); rows past seqlen_q are zero-filled.
    if (tid < kBlockM) {
      const int64_t idx = seq.lse_row0 + bidh * seq.lse_head_stride + m0 + tid;
      const bool ok = tid < valid_q;
      float* stats = reinterpret_cast<float*>(smem + Traits::kSmemStats) + stage * 2 * kBlockM;
      cp_async_4(smem_u32(stats + tid), params.softmax_lse_ptr + (ok ? idx : 0), ok);
      cp_async_4(smem_u32(stats + kBlockM + tid), params.dsoftmax_sum_ptr + (ok ? idx : 0), ok);
    }
    cp_async_commit();
  };

  // One barrier per item, at its top: after it this item's copies are visible to every thread,
  // and every warp is done with the previous item, whose Q/dO stage, P^T and dS^T may now be
  // overwritten: the next item's copies are issued right behind it, into the other stage.
  int bidh = bidh_kv * group, m_block = m_block_min;  // the current item
  int next_h = bidh, next_m = m_block;                 // the item after it
  advance(next_h, next_m);
  if (n_items > 0) load_item(bidh, m_block * kBlockM, 0);
  for (int item = 0; item < n_items; ++item, advance(bidh, m_block)) {
    const int stage = item % Traits::kStages;
    const int m0 = m_block * kBlockM;
    cp_async_wait<0>();
    __syncthreads();
    // ---- copies of the next item in flight while this one computes -----------------------
    if (item + 1 < n_items) {
      load_item(next_h, next_m * kBlockM, stage ^ 1);
      advance(next_h, next_m);
    }

    // ---- S-phase: P^T and dS^T --------------------------------------------------------
    float alibi_slope = 0.f;
    if (Is_general && params.alibi_slopes != nullptr) {
      alibi_slope = params.alibi_slopes[bidb * params.alibi_batch_stride + bidh];
    }
    const uint64_t subsequence =
        params.offset + static_cast<uint64_t>(bidb) * params.nheads + bidh;
    const int m_end = min(m0 + kBlockM, seq.seqlen_q);
    const bool full_tile = n0 + kBlockN <= seq.seqlen_k &&
                           (!Is_masked || mask.tile_is_full(m0, m_end, n0, n0 + kBlockN));
    uint32_t p_frag[Traits::kSRows / 16][Traits::kSCols / 16][4];
    uint32_t ds_frag[Traits::kSRows / 16][Traits::kSCols / 16][4];
    if (full_tile) {
      bwd_scores<Traits, Is_masked, Is_general, true>(params, seq, mask, m0, n0, subsequence,
                                                      alibi_slope, smem, stage, warp, lane,
                                                      p_frag, ds_frag);
    } else {
      bwd_scores<Traits, Is_masked, Is_general, false>(params, seq, mask, m0, n0, subsequence,
                                                       alibi_slope, smem, stage, warp, lane,
                                                       p_frag, ds_frag);
    }
    // The previous item's bulk reduction has read the shared dQ chunk (long done: it had the
    // dK/dV GEMMs and this S-phase); the barrier then lets every warp rewrite it.
    if (bulk_dq && tid == 0) bulk_wait_read_all();
    __syncthreads();  // dS^T (and P^T) of every warp in place

    // ---- dQ-phase: dQ += dS K, first, so that its global reductions drain during the dK/dV
    // GEMMs (issued last, they queued behind each other and held the item's end) ------------
    float acc_dq[kQ16][kQ8][4];
    warp::zero(acc_dq);
    warp::gemm_ss<Element, kQ16, kQ8, kBlockN / 16, true, true>(acc_dq, tdst, dq_row0, tk,
                                                                dq_d0);
    float* chunk = dq_chunk<Traits>(params, sems_per_head, bidh, bs.sem_base, m_block);
    if (bulk_dq) {
      DqChunk<Traits>::store(smem_dq, acc_dq, warp, lane);
      cuda::fence_proxy_async_shared();  // the stores, visible to the copy engine's reads
      __syncthreads();
      if (tid == 0) {
        bulk_reduce_add_f32(chunk, smem_u32(smem_dq), DqChunk<Traits>::kBytes);
        bulk_commit();
      }
    } else if (params.deterministic) {
      // Key blocks add into this query block in descending order: wait for our turn.
      int col_begin, col_end;
      mask.kv_range(m0, m_end, &col_begin, &col_end);
      const int turn = (col_end - 1) / kBlockN - n_block;
      int* sem = params.dq_semaphore + bidh * sems_per_head + bs.sem_base + m_block;
      if (tid == 0) {
        while (atomicAdd(sem, 0) != turn) __nanosleep(32);
      }
      __syncthreads();
      __threadfence();
      DqChunk<Traits>::add(chunk, acc_dq, warp, lane);
      __threadfence();
      __syncthreads();
      if (tid == 0) atomicExch(sem, turn + 1);
    } else {
      DqChunk<Traits>::add(chunk, acc_dq, warp, lane);
    }

    // ---- dKV-phase: dV += (P o Z)^T dO, dK += dS^T Q --------------------------------------
    const int stage_off = stage * Traits::kStageElems;
    const SmemTile<Traits::kSwizzleCols> tq{smem_u32(smem + Traits::kSmemQ + stage_off), kBlockM};
    const SmemTile<Traits::kSwizzleCols> tdo{smem_u32(smem + Traits::kSmemDO + stage_off),
                                             kBlockM};
    if constexpr (Traits::kPInRegs) {
      // The warp's own keys: its S-phase fragments are the A operand (kv_key0 == its key0).
      warp::gemm_rs<Element, kKV16, kKV8, kBlockM / 16, true>(acc_dv, p_frag, tdo, kv_d0);
      warp::gemm_rs<Element, kKV16, kKV8, kBlockM / 16, true>(acc_dk, ds_frag, tq, kv_d0);
    } else {
      warp::gemm_ss<Element, kKV16, kKV8, kBlockM / 16, false, true>(acc_dv, tpt, kv_key0, tdo,
                                                                     kv_d0);
      warp::gemm_ss<Element, kKV16, kKV8, kBlockM / 16, false, true>(acc_dk, tdst, kv_key0, tq,
                                                                     kv_d0);
    }
  }
  if (bulk_dq && tid == 0) bulk_wait_all();  // before the CTA's shared memory goes
  cp_async_wait<0>();  // K/V were never waited for when no query block sees this key block

  // ---- epilogue: dK = scale dS'^T Q, dV, straight from the fragments ---------------------
  const float scale = static_cast<float>(params.softmax_scale);
  Element* dk = static_cast<Element*>(params.dk_ptr) + bs.dk_row0 + bidh_kv * params.dk_head_stride;
  Element* dv = static_cast<Element*>(params.dv_ptr) + bs.dv_row0 + bidh_kv * params.dv_head_stride;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < kKV16; ++mi)
#pragma unroll
    for (int nj = 0; nj < kKV8; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + kv_key0 + 16 * mi + g + 8 * (e / 2);
        const int c = kv_d0 + 8 * nj + 2 * t + (e & 1);
        if (j < seq.seqlen_k && c < head_dim) {
          dk[int64_t(j) * params.dk_row_stride + c] = Element(acc_dk[mi][nj][e] * scale);
          dv[int64_t(j) * params.dv_row_stride + c] = Element(acc_dv[mi][nj][e]);
        }
      }
}

// Grid (key blocks, K/V heads, batch); CTAs loop over the key blocks and batch entries beyond it
// (varlen without max_seqlen_k sizes x from the average length).
template <typename Traits, bool Is_masked, bool Is_general>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocksPerSm)
    bwd_kernel_sm80(const __grid_constant__ BwdParams params) {
  using Element = typename Traits::Element;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* smem = reinterpret_cast<Element*>(smem_raw);
  const bool aligned = !Is_general || bwd_tensors_aligned(params);
  for (int bidb = blockIdx.z; bidb < params.batch; bidb += gridDim.z) {
    const BwdSeq bs(params, bidb, Traits::kBlockM);
    const int n_blocks = (bs.seq.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
    // Deterministic mode (one CTA per key block) starts the last key block first: see the dQ
    // order at the top of this file.
    const int first = params.deterministic ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    for (int n_block = first; n_block < n_blocks; n_block += gridDim.x) {
      bwd_col_block<Traits, Is_masked, Is_general>(params, bs, bidb, blockIdx.y, n_block, aligned,
                                                   smem);
      __syncthreads();  // the next key block overwrites K and V
    }
  }
}

}  // namespace sm80
FLASH_NAMESPACE_END
