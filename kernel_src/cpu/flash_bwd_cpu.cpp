// Owns: run_bwd_cpu, the CPU backward. Exact gradients by recomputation (FA2 algorithm 2):
// P = exp(S - lse) is rebuilt from the lse and out it is given, never from an lse recomputed
// from K/V (a caller may hand the out/lse of a longer key sequence, as ring attention does for
// each K/V block), the dropout mask is regenerated from the same Philox stream,
// D = rowsum(dO * O) (also returned, softmax_d), dS = P * (dP - D), softcap's chain rule
// dS *= 1 - tanh^2. fp64 inputs get an fp64 lse from the autograd path (params.h), so gradcheck
// sees the exact gradient of the fp64 forward. dQ/dK/dV are written through their own strides
// (views of one packed gradient work).
//
// Three parallel phases (run_bwd_typed): D and lse per query tile; dK/dV per (sequence, K/V
// head, key split), each task owning its keys' dK/dV and writing its share of dQ (the query
// heads of its group) into its own fp32/fp64 buffer of (seqlen_q x group) x d, linear in the
// sequence length like FA2's dq_accum; dQ per query tile, the splits summed in split order. No
// two threads write the same element, no atomics are needed, and the result is bitwise
// repeatable (deterministic=true costs nothing here); keys are split only when the (sequence,
// K/V head) pairs cannot occupy the threads, so only then does the dQ rounding depend on the
// thread count. Inside a task the loop is key tile outer (dK, dV accumulate in a kBlockN x d
// tile), query tile inner over Mask::q_range.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "attn_tile_cpu.h"
#include "bwd_tile_cpu.h"
#include "flash_amx_cpu.h"
#include "flash_api_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

// The storage type whose tile math computes the backward's logits: fp32 inputs on the fp32-tile
// path compute S = Q K^T in fp64 (FloatF64's math: the same bits, read as fp32, products and
// chains in fp64) and everything after P in fp32; other types in their own Acc. Why: P =
// exp(s - lse) carries the logit's error as its relative error, and a decode's dK/dV rows (sums
// over one query's heads) average nothing; with fp32 logits (an FMA chain over the head dim,
// where the oracle's GEMM sums in shorter pieces) that stress exceeded the rule on some draws.
template <typename T>
using logit_t = std::conditional_t<std::is_same_v<T, float>, FloatF64, T>;

template <typename T>
struct BwdScratch {
  using Acc = acc_t<T>;
  using Sum = sum_t<T>;
  using Lg = acc_t<logit_t<T>>;
  static constexpr bool kWideLogits = !std::is_same_v<Lg, Acc>;
  // Tiles (thread-local, reused across calls). dk/dv run across query tiles (Sum).
  Scratch<Acc> kt, kr, s, tanh_s, dp, pz, vt;
  Scratch<Sum> dk, dv;
  // Per task, for all its query tiles (converted once, not once per key tile): Q scaled, dO, Q
  // scaled in Lg (only when kWideLogits), and each tile's rows.
  Scratch<Acc> qs_all, dout_all;
  Scratch<Lg> qs_lg_all;
  std::vector<TileRows<Acc>> rows_all;
  std::vector<TileRows<Lg>> rows_lg_all;
  Scratch<Lg> kt_lg, s_lg, tanh_lg;  // the logits' operands (only when kWideLogits)
  Scratch<uint8_t> keep;
  Scratch<Sum> dq_own;  // the task's dQ rows when keys are not split
  KvTileRows kv;

  void ensure(int dpad) {
    grow_to(kr, kBlockN * dpad);
    for (auto* x : {&dk, &dv}) grow_to(*x, std::max(kBlockM, kBlockN) * dpad);
    if constexpr (kWideLogits) {
      grow_to(kt_lg, dpad * kBlockN);
      for (auto* x : {&s_lg, &tanh_lg}) grow_to(*x, kBlockM * kBlockN);
    }
    for (auto* x : {&kt, &vt}) grow_to(*x, dpad * std::max(kBlockM, kBlockN));
    for (auto* x : {&s, &tanh_s, &dp, &pz}) grow_to(*x, kBlockM * kBlockN);
    grow_to(keep, kBlockM * kBlockN);
  }
};

// C += A B (gemm's operand strides; C in Sum, cols a multiple of kPad). When Sum is wider than
// Acc (fp32 inputs), the product of this one tile (a chain of at most kBlockM or kBlockN terms)
// is computed in Acc and added to C in Sum (gemm_fold), so no Acc chain runs across tiles: dK/dV
// over the query tiles, dQ over the key tiles.
template <typename Acc, typename Sum>
void gemm_add(const Acc* A, long ars, long aks, const Acc* B, int ldb, Sum* C, int ldc, int rows,
              int depth, int cols) {
  if constexpr (std::is_same_v<Acc, Sum>)
    gemm(A, ars, aks, B, ldb, C, ldc, rows, depth, cols, /*accumulate=*/true);
  else
    gemm_fold(A, ars, aks, B, ldb, C, ldc, rows, depth, cols, static_cast<const float*>(nullptr));
}


// Phase 2, keys [k_begin, k_end) of (b, hk): dK and dV of those keys, and their share of dQ
// (unscaled) added into dq, (seqlen_q * group) x dpad rows that this task alone writes.
template <typename T>
void bwd_task(const AttnCtx<T>& c, const AttnCtx<logit_t<T>>& cl, const BwdParams& p, int b,
              int hk, int k_begin, int k_end, const acc_t<T>* lse, const acc_t<T>* dsum,
              sum_t<T>* dq, BwdScratch<T>& sc) {
  using Acc = acc_t<T>;
  using Sum = sum_t<T>;
  using Lg = acc_t<logit_t<T>>;
  constexpr bool kWideLogits = BwdScratch<T>::kWideLogits;
  const SeqInfo& s = c.pr.seqs[b];
  const BwdOffsets off = bwd_offsets(p, b);
  const int d = c.pr.d, dpad = c.pr.dpad, group = c.pr.group;
  const int packed = s.seqlen_q * group;
  const Mask mask(s.seqlen_q, s.seqlen_k, p.window_left, p.window_right);
  const T* dout = static_cast<const T*>(p.do_ptr) + off.dout;
  for (int64_t e = 0; e < static_cast<int64_t>(packed) * dpad; ++e) dq[e] = Sum(0);

  T* dk_out = static_cast<T*>(p.dk_ptr) + off.dk + hk * p.dk_head_stride;
  T* dv_out = static_cast<T*>(p.dv_ptr) + off.dv + hk * p.dv_head_stride;
  const T* kbase = c.k() + off.k + hk * p.k_head_stride;
  const T* vbase = c.v() + off.v + hk * p.v_head_stride;
  const Lg ninf = -static_cast<Lg>(INFINITY);

  // The query tiles any key of the task sees, loaded and converted once.
  int qb, qe;
  mask.q_range(k_begin, k_end, &qb, &qe);
  const int t_first = qb * group / kBlockM;
  const int t_end = (qe * group + kBlockM - 1) / kBlockM;
  if (t_first < t_end) {
    const size_t tiles = static_cast<size_t>(t_end - t_first);
    grow_to(sc.qs_all, tiles * kBlockM * dpad);
    grow_to(sc.dout_all, tiles * kBlockM * dpad);
    grow_to(sc.rows_all, tiles);
    if constexpr (kWideLogits) {
      grow_to(sc.qs_lg_all, tiles * kBlockM * dpad);
      grow_to(sc.rows_lg_all, tiles);
    }
  }
  for (int t = t_first; t < t_end; ++t) {
    const int pr0 = t * kBlockM;
    const int nrows = packed - pr0 < kBlockM ? packed - pr0 : kBlockM;
    const int64_t at = static_cast<int64_t>(t - t_first) * kBlockM * dpad;
    TileRows<Acc>& rows = sc.rows_all[t - t_first];
    make_tile_rows(c, b, hk, pr0, nrows, &rows);
    load_rows(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, rows, d, dpad, c.scale,
              sc.qs_all.data() + at);
    load_rows(dout, p.do_row_stride, p.do_head_stride, rows, d, dpad, Acc(1),
              sc.dout_all.data() + at);
    if constexpr (kWideLogits) {
      TileRows<Lg>& rows_lg = sc.rows_lg_all[t - t_first];
      make_tile_rows(cl, b, hk, pr0, nrows, &rows_lg);
      load_rows(cl.q() + s.q_off, p.q_row_stride, p.q_head_stride, rows_lg, d, dpad, cl.scale,
                sc.qs_lg_all.data() + at);
    }
  }

  for (int n0 = k_begin; n0 < k_end; n0 += kBlockN) {
    const int n = k_end - n0 < kBlockN ? k_end - n0 : kBlockN;
    for (int e = 0; e < n * dpad; ++e) sc.dk[e] = sc.dv[e] = Sum(0);
    int ib, ie;
    mask.q_range(n0, n0 + n, &ib, &ie);
    if (ib < ie) {
      // K tile row-major (for dQ) and transposed (for S), V transposed (for dP).
      for (int j = 0; j < n; ++j) {
        sc.kv.k[j] = static_cast<int64_t>(n0 + j) * p.k_row_stride;
        sc.kv.v[j] = static_cast<int64_t>(n0 + j) * p.v_row_stride;
      }
      load_kv_rows(kbase, sc.kv.k, n, d, dpad, sc.kr.data());
      if constexpr (kWideLogits) {
        transpose(sc.kr.data(), dpad, sc.kt_lg.data(), kBlockN, n, d);
      } else {
        transpose(sc.kr.data(), dpad, sc.kt.data(), kBlockN, n, d);
      }
      for (int j = 0; j < n; ++j) {
        const T* src = vbase + sc.kv.v[j];
        for (int col = 0; col < d; ++col) sc.vt[col * kBlockN + j] = Traits<T>::load(src[col]);
      }
    }
    // The next key tile's rows, prefetched in shares between this tile's query tiles.
    const int n_next = n0 + kBlockN < k_end ? std::min(kBlockN, k_end - n0 - kBlockN) : 0;
    const int pr_first = ib * group / kBlockM * kBlockM;
    const int nq = ie * group > pr_first ? (ie * group - pr_first + kBlockM - 1) / kBlockM : 0;
    // Query tiles aligned to kBlockM packed rows (rows of the first and last tile that see no
    // key of this tile are masked: P = 0, they add exact zeros).
    for (int pr0 = pr_first; pr0 < ie * group; pr0 += kBlockM) {
      prefetch_kv_share(kbase, vbase, p.k_row_stride, p.v_row_stride, n0 + kBlockN, n_next, nq,
                        (pr0 - pr_first) / kBlockM, d);
      const int nrows = packed - pr0 < kBlockM ? packed - pr0 : kBlockM;
      const int tile = pr0 / kBlockM - t_first;
      const TileRows<Acc>& rows = sc.rows_all[tile];
      const Acc* qs = sc.qs_all.data() + static_cast<int64_t>(tile) * kBlockM * dpad;
      const Acc* dot = sc.dout_all.data() + static_cast<int64_t>(tile) * kBlockM * dpad;
      // S = Q K^T (in Lg), then P = exp(S - lse) (rows with lse = +inf and masked entries
      // give 0)
      Lg* s_lg;
      if constexpr (kWideLogits) {
        s_lg = sc.s_lg.data();
        compute_scores(cl, mask, sc.rows_lg_all[tile],
                       sc.qs_lg_all.data() + static_cast<int64_t>(tile) * kBlockM * dpad,
                       sc.kt_lg.data(), n0, n, s_lg,
                       c.has_softcap ? sc.tanh_lg.data() : static_cast<Lg*>(nullptr));
        if (c.has_softcap)
          for (int e = 0; e < nrows * kBlockN; ++e) sc.tanh_s[e] = static_cast<Acc>(sc.tanh_lg[e]);
      } else {
        s_lg = sc.s.data();
        compute_scores(c, mask, rows, qs, sc.kt.data(), n0, n, s_lg,
                       c.has_softcap ? sc.tanh_s.data() : static_cast<Acc*>(nullptr));
      }
      for (int r = 0; r < nrows; ++r) {
        Lg* srow = s_lg + r * kBlockN;
        for (int j = n; j < pad_up(n); ++j) srow[j] = ninf;
        if constexpr (kWideLogits)
          exp_row(srow, sc.s.data() + r * kBlockN, pad_up(n), static_cast<Lg>(lse[pr0 + r]));
        else if constexpr (Traits<T>::kExpF32)
          exp_row_f32(srow, srow, pad_up(n), lse[pr0 + r]);
        else
          exp_row(srow, pad_up(n), lse[pr0 + r]);
      }
      if (c.has_dropout) dropout_keep_tile(c, rows, n0, n, sc.keep.data());
      // dV += (P o Z)^T dO, with Z = keep * keep_scale; the transpose is read in place (element
      // (j, r) of the product's A at pz[r * kBlockN + j])
      const Acc* pz = sc.s.data();
      if (c.has_dropout) {
        for (int r = 0; r < nrows; ++r)
          for (int j = 0; j < n; ++j)
            sc.pz[r * kBlockN + j] =
                sc.keep[r * kBlockN + j] ? sc.s[r * kBlockN + j] * c.keep_scale : Acc(0);
        pz = sc.pz.data();
      }
      gemm_add(pz, 1, kBlockN, dot, dpad, sc.dv.data(), dpad, n, nrows, dpad);
      // dP = (dO V^T) o Z
      gemm(dot, dpad, sc.vt.data(), kBlockN, sc.dp.data(), kBlockN, nrows, d,
           pad_up(n), /*accumulate=*/false);
      // dS = P o (dP - D), o (1 - tanh^2) under softcap; kept in dp (columns past n are not
      // read by the products below)
      if (!c.has_dropout && !c.has_softcap) {
        ds_rows(sc.s.data(), sc.dp.data(), kBlockN, nrows, pad_up(n), dsum + pr0);
      } else {
        for (int r = 0; r < nrows; ++r) {
          const Acc drow = dsum[pr0 + r];
          const Acc* prow = sc.s.data() + r * kBlockN;
          Acc* dprow = sc.dp.data() + r * kBlockN;
          for (int j = 0; j < n; ++j) {
            Acc dpz = dprow[j];
            if (c.has_dropout) dpz = sc.keep[r * kBlockN + j] ? dpz * c.keep_scale : Acc(0);
            Acc ds = prow[j] * (dpz - drow);
            if (c.has_softcap) {
              const Acc t = sc.tanh_s[r * kBlockN + j];
              ds *= Acc(1) - t * t;
            }
            dprow[j] = ds;
          }
        }
      }
      // dQ += dS K (softmax_scale applied once when dQ is written)
      gemm_add(sc.dp.data(), kBlockN, 1, sc.kr.data(), dpad,
               dq + static_cast<int64_t>(pr0) * dpad, dpad, nrows, n, dpad);
      // dK += dS^T (scale Q), dS^T read in place
      gemm_add(sc.dp.data(), 1, kBlockN, qs, dpad, sc.dk.data(), dpad, n, nrows, dpad);
    }
    for (int j = 0; j < n; ++j) {
      T* dkrow = dk_out + static_cast<int64_t>(n0 + j) * p.dk_row_stride;
      T* dvrow = dv_out + static_cast<int64_t>(n0 + j) * p.dv_row_stride;
      for (int col = 0; col < d; ++col) {
        dkrow[col] = Traits<T>::store(sc.dk[j * dpad + col]);
        dvrow[col] = Traits<T>::store(sc.dv[j * dpad + col]);
      }
    }
  }
  // Keys the sequence owns but does not use (seqused_k) get zero gradients (the last split).
  if (k_end == s.seqlen_k) {
    for (int j = s.seqlen_k; j < s.seqlen_k_rows; ++j) {
      T* dkrow = dk_out + static_cast<int64_t>(j) * p.dk_row_stride;
      T* dvrow = dv_out + static_cast<int64_t>(j) * p.dv_row_stride;
      for (int col = 0; col < d; ++col) dkrow[col] = dvrow[col] = Traits<T>::store(Acc(0));
    }
  }
}


// Three parallel phases: (1) per query tile, D and lse; (2) per (sequence, K/V head, key
// split), dK/dV of its keys and its share of dQ in its own buffer; (3) per query tile, dQ = the
// splits' sum. Keys are split only when (sequence, K/V head) pairs are too few to occupy the
// threads (nsplit = 1 otherwise, and the result does not depend on the thread count).
template <typename T>
void run_bwd_typed(const BwdParams& p, const Problem& pr) {
  using Acc = acc_t<T>;
  const AttnCtx<T> c(p, pr);
  const AttnCtx<logit_t<T>> cl(p, pr);
  const int64_t pairs = static_cast<int64_t>(pr.batch) * pr.nheads_k;
  // Per sequence: first packed row (of K/V head 0) in the row buffers, and first query-tile task.
  std::vector<int64_t> row0(pr.batch + 1, 0), tile0(pr.batch + 1, 0);
  int max_key_tiles = 1;
  for (int b = 0; b < pr.batch; ++b) {
    const int64_t packed = static_cast<int64_t>(pr.seqs[b].seqlen_q) * pr.group;
    row0[b + 1] = row0[b] + packed * pr.nheads_k;
    tile0[b + 1] = tile0[b] + (packed + kBlockM - 1) / kBlockM * pr.nheads_k;
    max_key_tiles = std::max(max_key_tiles, (pr.seqs[b].seqlen_k + kBlockN - 1) / kBlockN);
  }
  const int64_t rows = row0[pr.batch];
  const int nsplit = bwd_key_splits(pr, pairs, max_key_tiles);
  Scratch<Acc> stats(2 * static_cast<size_t>(rows));
  // The dQ buffer: shared by the splits (and summed in phase 3) when keys are split; otherwise
  // each task's own, thread-local and grow-only (a fresh call-sized buffer costs page faults and
  // zeroing on every call: 32 MiB at fp32, 2k, 16 heads), and the task writes dQ itself.
  Scratch<sum_t<T>> dq(nsplit > 1 ? static_cast<size_t>(nsplit) * rows * pr.dpad : 0);
  Acc* lse = stats.data();
  Acc* dsum = stats.data() + rows;
  const int64_t split_stride = rows * pr.dpad;

  // (b, hk, query tile) of a flattened query-tile task, and the first row of (b, hk).
  auto tile_task = [&](int64_t t, int* b, int* hk, int* m_block, int64_t* first_row) {
    *b = static_cast<int>(std::upper_bound(tile0.begin(), tile0.end(), t) - tile0.begin() - 1);
    const int64_t nblocks = (tile0[*b + 1] - tile0[*b]) / pr.nheads_k;
    const int64_t local = t - tile0[*b];
    *hk = static_cast<int>(local / nblocks);
    *m_block = static_cast<int>(local % nblocks);
    *first_row = row0[*b] + static_cast<int64_t>(*hk) * pr.seqs[*b].seqlen_q * pr.group;
  };
  parallel_tasks(tile0[pr.batch], pr.work, [&](int64_t t) {
    int b, hk, m_block;
    int64_t r0;
    tile_task(t, &b, &hk, &m_block, &r0);
    bwd_stats_tile<T>(c, p, b, hk, m_block, lse + r0, dsum + r0);
  });
  parallel_tasks(pairs * nsplit, pr.work, [&](int64_t t) {
    BwdScratch<T>& sc = thread_scratch<BwdScratch<T>>();
    sc.ensure(pr.dpad);
    const int split = static_cast<int>(t % nsplit);
    const int b = static_cast<int>(t / nsplit / pr.nheads_k);
    const int hk = static_cast<int>(t / nsplit % pr.nheads_k);
    const int seqlen_k = pr.seqs[b].seqlen_k;
    const int chunk = ((seqlen_k + nsplit - 1) / nsplit + kBlockN - 1) / kBlockN * kBlockN;
    const int k_begin = std::min(seqlen_k, split * chunk);
    const int k_end = split == nsplit - 1 ? seqlen_k : std::min(seqlen_k, k_begin + chunk);
    const int64_t r0 = row0[b] + static_cast<int64_t>(hk) * pr.seqs[b].seqlen_q * pr.group;
    if (nsplit == 1) {
      const int packed = pr.seqs[b].seqlen_q * pr.group;
      grow_to(sc.dq_own, static_cast<size_t>(packed) * pr.dpad);
      bwd_task<T>(c, cl, p, b, hk, k_begin, k_end, lse + r0, dsum + r0, sc.dq_own.data(), sc);
      for (int m_block = 0; m_block * kBlockM < packed; ++m_block)
        bwd_write_dq<T>(c, p, b, hk, m_block, sc.dq_own.data(), 0, 1);
      return;
    }
    bwd_task<T>(c, cl, p, b, hk, k_begin, k_end, lse + r0, dsum + r0,
                dq.data() + split * split_stride + r0 * pr.dpad, sc);
  });
  if (nsplit == 1) return;
  parallel_tasks(tile0[pr.batch], pr.work, [&](int64_t t) {
    int b, hk, m_block;
    int64_t r0;
    tile_task(t, &b, &hk, &m_block, &r0);
    bwd_write_dq<T>(c, p, b, hk, m_block, dq.data() + r0 * pr.dpad, split_stride, nsplit);
  });
}

void check_bwd_pointers(const BwdParams& p) {
  if (p.batch == 0) return;
  if (p.do_ptr == nullptr) fail("dout is null");
  if (p.dq_ptr == nullptr) fail("dq is null");
  if (p.dk_ptr == nullptr) fail("dk is null");
  if (p.dv_ptr == nullptr) fail("dv is null");
  if (p.p_ptr != nullptr) fail("S_dmask (p_ptr) must be null in the backward pass");
}

}  // namespace
}  // namespace cpu

void run_bwd_cpu(const BwdParams& params) {
  const cpu::Problem pr = cpu::make_problem(params, /*is_bwd=*/true);
  cpu::check_bwd_pointers(params);
  if (cpu::amx_bwd_applies(params)) {  // bf16 on AMX tiles (flash_bwd_amx_cpu.cpp)
    cpu::run_bwd_amx(params, pr);
    return;
  }
  // fp32 inputs: fp32 tiles from kF32TileMinWork multiply-adds, like the forward (the same
  // threshold on the same work, so a call's forward and backward take the same path).
  cpu::dispatch_attn_dtype(params.dtype, pr.work, "q", [&](auto tag) {
    using T = decltype(tag);
    cpu::run_bwd_typed<T>(params, pr);
  });
}

FLASH_NAMESPACE_END
