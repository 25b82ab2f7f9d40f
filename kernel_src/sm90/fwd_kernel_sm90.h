// Owns: the Hopper forward kernel (sm90a): one CTA computes O and the LSE of kBlockM query rows of
// one (sequence, head). Warp specialisation: warpgroup 0 is the producer (one thread issues TMA
// loads of Q once and of K/V tiles into a kStages-deep shared-memory ring, each stage guarded by
// full/empty mbarriers); warpgroups 1..kConsumers each own 64 query rows and run
//   S = Q K^T (wgmma, both operands in shared memory) -> online softmax in registers ->
//   O += P V (wgmma, P from registers, V from shared memory, MN-major).
// The producer gives registers away (setmaxnreg) to the consumers. FA3's design (Shah et al.,
// 2024), with its intra-warpgroup overlap of softmax and MMAs and the ping-pong of the two
// consumer warpgroups (consumer(), docs/cuda_fwd_sm90.md).
//
// Serves (sm90::serves in launch/fwd_dispatch_sm90.h checks): fp16/bf16, head dim 64, 128 or 256, batched or varlen (with
// seqused_k; no paging or cache indirection), no mask or causal (bottom-right), no
// dropout/softcap/ALiBi/S_dmask.
//
// Numerics shared with the other backends (kernel_src/common/): each row's online-softmax state
// is a SoftmaxState (base 2, eager rescale, partial row sums per thread), its LSE and 1/sum come
// from it; the K/V tile range of a row block is Mask::kv_range, the tiles that need no
// element-wise mask Mask::full_tiles, the element-wise mask Mask::col_limits. The mask is built
// from the window like every backend's, so a local window only needs dispatching here.
//
// Invariants:
// * K/V tiles are visited from the last to the first, so the only tiles that need a mask (the
//   causal diagonal and the partial last tile) come first; rows and keys past the tensor ends
//   are zero-filled by TMA and masked here, so no load is ever out of bounds. Varlen tiles may
//   read rows of the neighbouring sequences: their keys are masked, their V rows zeroed
//   (zero_v_tail), their query rows never written.
// * Rows without a visible key get O = 0 and LSE = +inf (the CPU backend's convention).
#pragma once
#include <cuda.h>  // CUtensorMap (type only: no driver call in device code)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../common/mask.h"
#include "../common/params.h"
#include "../common/seq_info_cuda.h"
#include "../common/softmax_state.h"
#include "primitives_sm90.h"
#include "wgmma_sm90.h"

FLASH_NAMESPACE_BEGIN
namespace sm90 {

template <int kHeadDim_, typename Element_, bool kCausal_>
struct FwdTraits {
  using Element = Element_;
  static constexpr bool kBf16 = std::is_same_v<Element, __nv_bfloat16>;
  static constexpr bool kCausal = kCausal_;
  static constexpr bool kLocal = false;  // a left window bound (not served yet: sm90::serves)
  static constexpr int kHeadDim = kHeadDim_;
  // Consumer warpgroups (64 rows each). Head dim 64 takes three (FA3's 192-row tile): each K/V
  // tile then feeds 192 rows, and the softmax of one warpgroup hides under the MMAs of two.
  static constexpr int kConsumers = kHeadDim_ == 64 ? 3 : 2;
  static constexpr int kBlockM = 64 * kConsumers;
  // Keys per K/V tile: 128, or 64 at head dim 256, where Q (64 KB) and two K/V stages of 128
  // keys would not fit in shared memory and O already takes 128 registers per thread.
  static constexpr int kBlockN = kHeadDim_ == 256 ? 64 : 128;
  static constexpr int kStages = 2;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kChunks = kHeadDim / 64;      // 64-column (128-byte) swizzle blocks
  // Register split of the 64K-entry file (setmaxnreg): producer 24 per thread, consumers the rest
  // rounded down to a multiple of 8 (2 consumers: 240, 3 consumers: 160).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs =
      std::min(240, (65536 - 128 * kProducerRegs) / (128 * kConsumers) / 8 * 8);
  static_assert(kHeadDim % 64 == 0, "tiles are whole 128-byte swizzle atoms");

  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  struct alignas(1024) Shared {
    Element q[kBlockM * kHeadDim];             // kChunks blocks of [kBlockM rows x 64]
    Element k[kStages][kBlockN * kHeadDim];    // each: kChunks blocks of [kBlockN rows x 64]
    Element v[kStages][kBlockN * kHeadDim];
    uint64_t q_full, q_empty;
    uint64_t k_full[kStages], k_empty[kStages];
    uint64_t v_full[kStages], v_empty[kStages];
  };
  // Dynamic shared memory is only 16-byte aligned: one extra KB to align the tiles to 1024.
  static constexpr int kSmemBytes = static_cast<int>(sizeof(Shared)) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than one Hopper CTA may have");
};

// Everything the kernel reads, passed by value as a __grid_constant__ parameter (the tensor maps
// must live in parameter, constant or global memory).
struct FwdArgs {
  CUtensorMap tm_q, tm_k, tm_v;  // 4-d (d, seqlen, heads, batch) or varlen (d, total, heads, 1),
                                 // box (64, rows, 1, 1)
  FwdParams p;
  int num_m_blocks;  // row blocks per (sequence, head): of max_seqlen_q rows when varlen
  int num_tiles;     // num_m_blocks x nheads x batch; the grid is persistent and strides over them
  int l2_section;    // causal: (sequence, head) pairs per L2 section of the grid order (make_tile)
  bool varlen;       // cu_seqlens_q/k given
  bool v_tail_zero;  // K/V rows past a sequence's keys may exist (varlen, seqused_k): zero_v_tail
};

// The mask of one sequence (common/mask.h): causal is window (-1, 0), bottom-right aligned.
template <typename Traits>
__device__ __forceinline__ Mask tile_mask(const cuda::SeqInfo& seq) {
  return Mask(seq.seqlen_q, seq.seqlen_k, -1, Traits::kCausal ? 0 : -1);
}

// One row block of one (sequence, head): where its sequence lives (common/seq_info_cuda.h), its
// first query row and the K/V tiles it sees, n_begin .. n_begin + n_blocks - 1 (Mask::kv_range;
// visited from the last to the first).
//
// Grid order: causal walks the (sequence, head) pairs in sections of l2_section pairs, whose K/V
// fit in L2 together (FA3's L2 swizzle of its LPT scheduler); inside a section the row-block
// index is slowest, counted from the last row of every sequence (longest first). Without the
// sections the longest blocks of every head run first and the K/V of ~132 heads compete for L2:
// at 1k causal, head dim 128, the H100 (3.35 TB/s) ran at 243 TFLOP/s against the H200's 311
// (h100-fwd-c3c5d02.json). Otherwise the row blocks of one head are adjacent, so their shared
// K/V stream hits in L2. Causal row blocks are anchored at the end
// of the sequence: the last one ends at row seqlen_q and the first may start above row 0 (TMA
// zero-fills those rows, or they belong to the previous sequence, and the epilogue skips them).
// The partial block is then the one that sees the fewest keys rather than the one that sees them
// all (at 4k rows and 192-row blocks: 363 instead of 384 K/V tile visits per head). Varlen row
// blocks past a sequence's end are skipped (n_blocks = 0, no rows).
struct Tile {
  cuda::SeqInfo seq;
  int bidh, bidb;
  int row0;      // first query row of the block inside its sequence (causal: may be < 0)
  int n_begin;   // first K/V tile it sees
  int n_blocks;  // K/V tiles it sees
  bool rows;     // the block holds rows of its sequence (else nothing is computed or written)
};
template <typename Traits>
__device__ __forceinline__ Tile make_tile(const FwdArgs& a, int idx) {
  constexpr int kBlockM = Traits::kBlockM;
  const int hb = a.p.nheads * a.p.batch;
  int m, bidh, bidb;
  if constexpr (Traits::kCausal) {
    const int section_tiles = a.l2_section * a.num_m_blocks;
    const int section = idx / section_tiles, r = idx % section_tiles;
    const int pairs = min(a.l2_section, hb - section * a.l2_section);  // the last may be short
    m = r / pairs;  // 0: the last row block of every sequence
    const int pair = section * a.l2_section + r % pairs;
    bidh = pair % a.p.nheads;
    bidb = pair / a.p.nheads;
  } else {
    m = idx % a.num_m_blocks;
    bidh = (idx / a.num_m_blocks) % a.p.nheads;
    bidb = idx / a.num_m_blocks / a.p.nheads;
  }
  Tile t{cuda::SeqInfo(a.p, bidb), bidh, bidb, 0, 0, 0, false};
  const int sq = t.seq.seqlen_q;
  t.row0 = Traits::kCausal ? sq - (m + 1) * kBlockM : m * kBlockM;
  t.rows = t.row0 < sq && t.row0 + kBlockM > 0;
  int col_begin, col_end;
  tile_mask<Traits>(t.seq).kv_range(max(t.row0, 0), t.row0 + kBlockM, &col_begin, &col_end);
  t.n_begin = col_begin / Traits::kBlockN;
  t.n_blocks = col_end > col_begin ? (col_end + Traits::kBlockN - 1) / Traits::kBlockN - t.n_begin
                                   : 0;
  return t;
}

// Position in the K/V ring and in the sequence of Q loads, carried across the tiles of a
// persistent CTA (the producer and every consumer count the same way).
struct Pipe {
  int kv = 0;  // K/V tiles consumed so far: stage kv % kStages, phase (kv / kStages) & 1
  int q = 0;   // row blocks with at least one K/V tile so far: Q phase q & 1
};

template <typename Traits>
__device__ __forceinline__ void producer(const FwdArgs& a, typename Traits::Shared& sh,
                                         const Tile& t, Pipe& pipe) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kStages = Traits::kStages;
  const int n_blocks = t.n_blocks;
  const int bidh_k = t.bidh / (a.p.nheads / a.p.nheads_k);
  // Tensor coordinates: varlen maps are (d, total, heads, 1) and batched (d, seqlen, heads, batch).
  const int q_row = t.seq.q_first_row + t.row0, q_batch = a.varlen ? 0 : t.bidb;
  const int k_row = t.seq.k_first_row, kv_batch = static_cast<int>(t.seq.kv_batch);
  mbar_wait(&sh.q_empty, (pipe.q & 1) ^ 1);  // the previous row block's last S has run
  mbar_arrive_expect_tx(&sh.q_full, Traits::kQBytes);
#pragma unroll
  for (int ch = 0; ch < Traits::kChunks; ++ch) {
    tma_load_4d(sh.q + ch * kBlockM * 64, &a.tm_q, &sh.q_full, ch * 64, q_row, t.bidh, q_batch);
  }
  // Key tile n of K or V into its stage buffer, once the consumers have released it.
  auto load_tile = [&](auto* dst, const CUtensorMap* map, uint64_t* full, uint64_t* empty,
                       uint32_t phase, int n) {
    mbar_wait(empty, phase ^ 1);
    mbar_arrive_expect_tx(full, Traits::kKVBytes);
#pragma unroll
    for (int ch = 0; ch < Traits::kChunks; ++ch) {
      tma_load_4d(dst + ch * kBlockN * 64, map, full, ch * 64, k_row + n * kBlockN, bidh_k,
                  kv_batch);
    }
  };
  for (int i = 0; i < n_blocks; ++i) {
    const int n = t.n_begin + n_blocks - 1 - i, s = (pipe.kv + i) % kStages;
    const uint32_t phase = ((pipe.kv + i) / kStages) & 1;
    load_tile(sh.k[s], &a.tm_k, &sh.k_full[s], &sh.k_empty[s], phase, n);
    load_tile(sh.v[s], &a.tm_v, &sh.v_full[s], &sh.v_empty[s], phase, n);
  }
  pipe.kv += n_blocks;
  pipe.q += 1;
}

using cuda::exp2_approx;  // (common/cuda_primitives.h)
using cuda::Exp2Approx;
using cuda::pack2;
using cuda::warp::quad_max;
using cuda::warp::quad_sum;

// One consumer warpgroup's view of its 64 rows: the accumulators and the running softmax state.
// Thread (warp w, lane l) owns rows row0 = 16w + l / 4 and row0 + 8 (wgmma_sm90.h's layout).
// The softmax states are in base 2 (logits times scale_log2) and their row sums are this
// thread's partial sums, quad-reduced in the epilogue.
template <typename Traits>
struct ConsumerState {
  float o[Traits::kHeadDim / 2];
  SoftmaxState<float, /*kBase2=*/true> row[2] = {SoftmaxState<float, true>::empty(),
                                                 SoftmaxState<float, true>::empty()};
};

// S = Q K^T for one K stage, issued (not waited for).
template <typename Traits>
__device__ __forceinline__ void issue_qk(float (&sacc)[Traits::kBlockN / 2], uint32_t q_base,
                                         uint32_t k_base) {
#pragma unroll
  for (int kk = 0; kk < Traits::kHeadDim / 16; ++kk) {
    const uint32_t off = (kk % 4) * 32;  // 16 elements = 32 B inside the 128-byte swizzle row
    const uint64_t da = smem_desc(q_base + (kk / 4) * Traits::kBlockM * 128 + off, 16, 1024);
    const uint64_t db = smem_desc(k_base + (kk / 4) * Traits::kBlockN * 128 + off, 16, 1024);
    Wgmma<Traits::kBlockN, Traits::kBf16, false>::ss(sacc, da, db, kk > 0 ? 1 : 0);
  }
}

// O += P V for one V stage (V is MN-major: keys x head dim, 64-column blocks kBlockN rows apart).
template <typename Traits>
__device__ __forceinline__ void issue_pv(float (&o)[Traits::kHeadDim / 2],
                                         const uint32_t (&pa)[Traits::kBlockN / 16][4],
                                         uint32_t v_base) {
#pragma unroll
  for (int kc = 0; kc < Traits::kBlockN / 16; ++kc) {
    const uint64_t db = smem_desc(v_base + kc * 16 * 128, Traits::kBlockN * 128, 1024);
    Wgmma<Traits::kHeadDim, Traits::kBf16, true>::rs(o, pa[kc], db, 1);
  }
}

// The visible keys [begin[h], end[h]) of the thread's two rows (Mask::col_limits), and the key
// tiles every row of its warpgroup sees whole, [full_begin, full_end) (Mask::full_tiles):
// computed once per row block. Without a left window bound (Traits::kLocal) the lower limits
// are 0 for every stored row and are not applied; without any window every stored row sees
// [0, seqlen_k), so both rows take row0's limits and the compiler shares their compares.
struct RowMask {
  int begin[2], end[2];
  int full_begin, full_end;
};

template <typename Traits>
__device__ __forceinline__ RowMask row_mask(const Mask& mask, int wg_row0, int row0) {
  RowMask m;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    constexpr bool kSameRows = !Traits::kCausal && !Traits::kLocal;
    mask.col_limits(row0 + (kSameRows ? 0 : 8 * h), &m.begin[h], &m.end[h]);
  }
  mask.full_tiles(wg_row0, wg_row0 + 64, Traits::kBlockN, &m.full_begin, &m.full_end);
  return m;
}

// The element-wise mask of key tile n, for the tiles outside the warpgroup's fully visible
// range: the ragged end of the keys and, when causal, the diagonal; they are the first tiles
// visited. Invisible scores become -inf.
template <typename Traits>
__device__ __forceinline__ void mask_tile(float (&sacc)[Traits::kBlockN / 2], const RowMask& m,
                                          int n) {
  if (n >= m.full_begin && n < m.full_end) return;
  const int col0 = n * Traits::kBlockN + 2 * (threadIdx.x % 4);
#pragma unroll
  for (int j = 0; j < Traits::kBlockN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = col0 + 8 * j + (e & 1), h = e >> 1;
      if (col >= m.end[h] || (Traits::kLocal && col < m.begin[h])) sacc[4 * j + e] = -INFINITY;
    }
  }
}

// Keys past the sequence's end in its last K/V tile hold whatever the tensor has there (the next
// sequence's keys, or unused rows under seqused_k): their P is 0, but 0 * inf or NaN is NaN, so
// their V rows (rows valid.. of every 64-column block; the 128-byte swizzle keeps a row inside
// its 128 bytes) are zeroed before P V reads them. Each consumer warpgroup zeroes all of them
// itself (the warpgroups write the same zeros) and makes its writes visible to its wgmma.
// Named barriers: 0 is __syncthreads, 1..kConsumers the ping-pong turns, then one per consumer
// warpgroup for zero_v_tail.
constexpr int kZeroBarrier0 = 4;

template <typename Traits>
__device__ __forceinline__ void zero_v_tail(typename Traits::Element* v, int valid, int cwg) {
  constexpr int kBlockN = Traits::kBlockN;
  const int units = (kBlockN - valid) * 8;  // 16-byte units per 64-column block
  for (int ch = 0; ch < Traits::kChunks; ++ch) {
    uint4* base = reinterpret_cast<uint4*>(v + ch * kBlockN * 64 + valid * 64);
    for (int u = threadIdx.x % 128; u < units; u += 128) base[u] = make_uint4(0, 0, 0, 0);
  }
  fence_proxy_async_shared();
  named_barrier_sync(kZeroBarrier0 + cwg, 128);
}

// Online softmax of one S tile in place (SoftmaxState::rescale, FA2's eager form): S becomes
// exp2(S * scale_log2 - m) with the new row max m, the row sums take the tile, and alpha[r] is
// the factor the caller applies to O (after any MMA still accumulating into O has completed).
template <typename Traits>
__device__ __forceinline__ void softmax_tile(float (&sacc)[Traits::kBlockN / 2],
                                             ConsumerState<Traits>& st, float scale_log2,
                                             float (&alpha)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = fmaxf(sacc[2 * r], sacc[2 * r + 1]);
#pragma unroll
    for (int j = 1; j < Traits::kBlockN / 8; ++j) {
      mx = fmaxf(mx, fmaxf(sacc[4 * j + 2 * r], sacc[4 * j + 2 * r + 1]));
    }
    alpha[r] = st.row[r].rescale(quad_max(mx) * scale_log2, Exp2Approx{});
    const float offset = st.row[r].offset();
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < Traits::kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = sacc[4 * j + 2 * r + e];
        x = exp2_approx(fmaf(x, scale_log2, -offset));
        sum += x;
      }
    }
    st.row[r].add(sum);
  }
}

template <typename Traits>
__device__ __forceinline__ void rescale_o(ConsumerState<Traits>& st, const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < Traits::kHeadDim / 8; ++j) {
    st.o[4 * j + 0] *= alpha[0];
    st.o[4 * j + 1] *= alpha[0];
    st.o[4 * j + 2] *= alpha[1];
    st.o[4 * j + 3] *= alpha[1];
  }
}

// P (fp32 in the S accumulator layout) -> the A fragments of O += P V: keys [16c, 16c + 16) are
// accumulator chunks 2c (registers 0/1) and 2c + 1 (registers 2/3).
template <typename Traits>
__device__ __forceinline__ void pack_p(const float (&sacc)[Traits::kBlockN / 2],
                                       uint32_t (&pa)[Traits::kBlockN / 16][4]) {
  using Element = typename Traits::Element;
#pragma unroll
  for (int j = 0; j < Traits::kBlockN / 8; ++j) {
    pa[j / 2][2 * (j % 2) + 0] = pack2<Element>(sacc[4 * j + 0], sacc[4 * j + 1]);
    pa[j / 2][2 * (j % 2) + 1] = pack2<Element>(sacc[4 * j + 2], sacc[4 * j + 3]);
  }
}

// Software pipeline of one consumer warpgroup (FA3's intra-warpgroup overlap): iteration i issues
// S(i) = Q K(i)^T and O += P(i-1) V(i-1) back to back, then runs the softmax of S(i) while the
// tensor cores work on P(i-1) V(i-1); O is rescaled once that MMA has completed. The consumer
// warpgroups take turns issuing their MMAs (named barriers 1.., FA3's ping-pong), so one's
// softmax runs under the others' MMAs.
template <typename Traits>
__device__ __forceinline__ void consumer(const FwdArgs& a, typename Traits::Shared& sh,
                                         const Tile& t, int cwg, Pipe& pipe) {
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockN, kStages = Traits::kStages;
  constexpr int kHeadDim = Traits::kHeadDim;
  const FwdParams& p = a.p;
  const int lane = threadIdx.x % 32, warp = (threadIdx.x / 32) % 4;
  const int n_blocks = t.n_blocks, n_last = t.n_begin + n_blocks - 1;
  const int wg_row0 = t.row0 + cwg * 64;            // first row of this warpgroup
  const int row0 = wg_row0 + warp * 16 + lane / 4;  // this thread's rows: row0, row0 + 8
  const RowMask mask = row_mask<Traits>(tile_mask<Traits>(t.seq), wg_row0, row0);
  // Keys of the first tile visited that lie past the sequence (varlen, seqused_k): their V rows
  // are zeroed before P V (zero_v_tail); 0 when TMA already zero-filled them.
  const int v_tail =
      a.v_tail_zero && n_blocks > 0 ? t.seq.seqlen_k - n_last * kBlockN : kBlockN;
  const float scale_log2 = p.scale_log2;
  const uint32_t q_base = smem_u32(sh.q) + cwg * 64 * 128;
  // Round robin over the consumer warpgroups: cwg waits on barrier 1 + cwg, then passes the turn
  // to the next one; the last warpgroup hands warpgroup 0 its first turn and skips its final
  // hand-off (no arrival may stay pending at exit).
  constexpr int kConsumers = Traits::kConsumers;
  constexpr int kPingPongThreads = 2 * 128;
  const int my_turn = 1 + cwg, other_turn = 1 + (cwg + 1) % kConsumers;
  const bool is_last = cwg == kConsumers - 1;

  ConsumerState<Traits> st;
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) st.o[i] = 0.f;
  float sacc[kBlockN / 2];
  uint32_t pa[kBlockN / 16][4];
  float alpha[2];

  if (n_blocks > 0) {
    if (is_last) named_barrier_arrive(1, kPingPongThreads);  // warpgroup 0 issues first
    mbar_wait(&sh.q_full, pipe.q & 1);
    // Prologue: S(0) and its softmax (O is still zero: nothing to rescale).
    const int s0 = pipe.kv % kStages;
    mbar_wait(&sh.k_full[s0], (pipe.kv / kStages) & 1);
    named_barrier_sync(my_turn, kPingPongThreads);
    wgmma_fence();
    issue_qk<Traits>(sacc, q_base, smem_u32(sh.k[s0]));
    wgmma_commit();
    if (!is_last || n_blocks > 1) named_barrier_arrive(other_turn, kPingPongThreads);
    wgmma_wait<0>();
    fence_operands(sacc);
    __syncwarp();
    if (lane == 0) {
      mbar_arrive(&sh.k_empty[s0]);
      if (n_blocks == 1) mbar_arrive(&sh.q_empty);  // Q is read by S tiles only
    }
    mask_tile<Traits>(sacc, mask, n_last);
    softmax_tile<Traits>(sacc, st, scale_log2, alpha);
    pack_p<Traits>(sacc, pa);
  }
  for (int i = 1; i < n_blocks; ++i) {
    const int it = pipe.kv + i, n = n_last - i;
    const int s = it % kStages, sp = (it - 1) % kStages;
    const uint32_t phase = (it / kStages) & 1, phase_p = ((it - 1) / kStages) & 1;
    mbar_wait(&sh.k_full[s], phase);
    mbar_wait(&sh.v_full[sp], phase_p);
    if (i == 1 && v_tail < kBlockN) zero_v_tail<Traits>(sh.v[sp], v_tail, cwg);
    named_barrier_sync(my_turn, kPingPongThreads);
    fence_operands(st.o);
    wgmma_fence();
    issue_qk<Traits>(sacc, q_base, smem_u32(sh.k[s]));
    wgmma_commit();
    issue_pv<Traits>(st.o, pa, smem_u32(sh.v[sp]));
    wgmma_commit();
    if (!is_last || i < n_blocks - 1) named_barrier_arrive(other_turn, kPingPongThreads);
    wgmma_wait<1>();  // S(i) done, P(i-1) V(i-1) may still run
    fence_operands(sacc);
    __syncwarp();
    if (lane == 0) {
      mbar_arrive(&sh.k_empty[s]);
      if (i == n_blocks - 1) mbar_arrive(&sh.q_empty);
    }
    mask_tile<Traits>(sacc, mask, n);
    softmax_tile<Traits>(sacc, st, scale_log2, alpha);
    wgmma_wait<0>();
    fence_operands(st.o);
    __syncwarp();
    if (lane == 0) mbar_arrive(&sh.v_empty[sp]);
    rescale_o<Traits>(st, alpha);
    pack_p<Traits>(sacc, pa);
  }
  if (n_blocks > 0) {  // O += P V of the last tile
    const int it = pipe.kv + n_blocks - 1, sp = it % kStages;
    mbar_wait(&sh.v_full[sp], (it / kStages) & 1);
    if (n_blocks == 1 && v_tail < kBlockN) zero_v_tail<Traits>(sh.v[sp], v_tail, cwg);
    fence_operands(st.o);
    wgmma_fence();
    issue_pv<Traits>(st.o, pa, smem_u32(sh.v[sp]));
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(st.o);
    __syncwarp();
    if (lane == 0) mbar_arrive(&sh.v_empty[sp]);
    pipe.kv += n_blocks;
    pipe.q += 1;
  }

  // ---- epilogue: O / l and the natural-log LSE; rows outside the sequence are not written ----
  Element* o_head = static_cast<Element*>(p.o_ptr) + t.seq.o_row0 +
                    static_cast<int64_t>(t.bidh) * p.o_head_stride;
  float* lse_head = p.softmax_lse_ptr + t.seq.lse_row0 + t.bidh * t.seq.lse_head_stride;
  const int quad = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.row[r].set_row_sum(quad_sum(st.row[r].row_sum));
    const float inv = st.row[r].inv_sum();
    const int row = row0 + 8 * r;
    if (row >= 0 && row < t.seq.seqlen_q) {
      Element* dst = o_head + static_cast<int64_t>(row) * p.o_row_stride + 2 * quad;
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        *reinterpret_cast<uint32_t*>(dst + 8 * j) =
            pack2<Element>(st.o[4 * j + 2 * r] * inv, st.o[4 * j + 2 * r + 1] * inv);
      }
      if (quad == 0) lse_head[row] = st.row[r].lse();
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    fwd_kernel_sm90(const __grid_constant__ FwdArgs args) {
  extern __shared__ uint8_t smem_raw[];
  const uint32_t pad = (1024 - (smem_u32(smem_raw) & 1023)) & 1023;
  auto& sh = *reinterpret_cast<typename Traits::Shared*>(smem_raw + pad);
  const int wg = threadIdx.x / 128;

  if (threadIdx.x == 0) {
    mbar_init(&sh.q_full, 1);
    mbar_init(&sh.q_empty, 4 * Traits::kConsumers);
#pragma unroll
    for (int s = 0; s < Traits::kStages; ++s) {
      mbar_init(&sh.k_full[s], 1);
      mbar_init(&sh.v_full[s], 1);
      mbar_init(&sh.k_empty[s], 4 * Traits::kConsumers);  // one arrival per consumer warp
      mbar_init(&sh.v_empty[s], 4 * Traits::kConsumers);
    }
    mbar_fence_init();
  }
  __syncthreads();

  // Persistent: CTA b takes row blocks b, b + gridDim.x, ... in the grid order of make_tile
  // (longest first when causal); the producer runs ahead into the next row block while the
  // consumers finish the current one.
  Pipe pipe;
  if (wg == 0) {
    regs_decrease<Traits::kProducerRegs>();
    if (threadIdx.x == 0) {
      tma_prefetch_descriptor(&args.tm_q);
      tma_prefetch_descriptor(&args.tm_k);
      tma_prefetch_descriptor(&args.tm_v);
      for (int tile = blockIdx.x; tile < args.num_tiles; tile += gridDim.x) {
        const Tile t = make_tile<Traits>(args, tile);
        if (t.n_blocks > 0) producer<Traits>(args, sh, t, pipe);
      }
    }
  } else {
    regs_increase<Traits::kConsumerRegs>();
    for (int tile = blockIdx.x; tile < args.num_tiles; tile += gridDim.x) {
      const Tile t = make_tile<Traits>(args, tile);
      if (t.rows) consumer<Traits>(args, sh, t, wg - 1, pipe);
    }
  }
}

}  // namespace sm90
FLASH_NAMESPACE_END
