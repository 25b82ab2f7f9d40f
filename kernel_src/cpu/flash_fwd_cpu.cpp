// Owns: run_fwd_cpu, the CPU forward. Tiled online softmax (FA2 algorithm): one task per
// (sequence, K/V head, query tile of kBlockM packed rows), OpenMP over tasks. Each task walks only
// the key tiles of its KV range (Mask::kv_range), keeps O unnormalised in an fp32/fp64 scratch
// tile and divides once at the end. Per-thread scratch is O(kBlockM x d + kBlockN x d); nothing
// of size seqlen_q x seqlen_k exists except S_dmask, which the caller asked for, filled in a
// second pass once each row's lse is known.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "attn_tile_cpu.h"
#include "flash_api_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

template <typename T>
struct FwdScratch {
  using Acc = acc_t<T>;
  using Prob = prob_t<T>;
  std::vector<Acc> qt, k, st, o;
  // Per query column of the tile: running max (row_max of SoftmaxState), the reference point the
  // tile's exponentials use, the rescale factor (Acc, and as Prob).
  std::vector<Acc> m, off, factor, l;
  std::vector<Prob> v, p, lt;  // p: only when Prob != Acc
  std::vector<uint8_t> keep;
  TileRows<Acc> rows;
  KvTileRows kv, kv_next;

  void ensure(int dpad) {
    grow_to(qt, dpad * kBlockM);
    grow_to(k, kBlockN * dpad);
    grow_to(v, kBlockN * dpad);
    grow_to(st, kBlockN * kBlockM);
    grow_to(o, kBlockM * dpad);
    for (auto* x : {&m, &off, &factor, &l}) grow_to(*x, kBlockM);
    grow_to(lt, kBlockM);
    if (!std::is_same<Acc, Prob>::value) grow_to(p, kBlockN * kBlockM);
    grow_to(keep, kBlockM * kBlockN);
  }
};

// S_dmask for one query tile, given each row's final lse: P = exp(s - lse), negated where
// dropped. Masked and out-of-range entries keep the zeros written before the parallel loop.
template <typename T>
void write_dmask_tile(const AttnCtx<T>& c, const SeqInfo& s, const Mask& mask, int b, int hk,
                      int nb, int ne, int mt, FwdScratch<T>& sc) {
  using Acc = acc_t<T>;
  T* p_out = static_cast<T*>(c.p.p_ptr);
  const TileRows<Acc>& rows = sc.rows;
  const T* kbase = c.k() + hk * c.p.k_head_stride;
  for (int n0 = nb; n0 < ne; n0 += kBlockN) {
    const int n = ne - n0 < kBlockN ? ne - n0 : kBlockN;
    kv_row_offsets(c.p, s, n0, n, sc.kv.k, sc.kv.v);
    load_kv_rows(kbase, sc.kv.k, n, c.pr.d, c.pr.dpad, sc.k.data());
    compute_scores_t(c, mask, rows, sc.qt.data(), mt, sc.k.data(), n0, n, sc.st.data());
    if (c.has_dropout) dropout_keep_tile(c, rows, n0, n, sc.keep.data());
    for (int r = 0; r < mt; ++r) sc.factor[r] = Acc(0);  // the sums are not needed
    // off holds the lse; factor receives the sums, which are not needed
    exp_cols(sc.st.data(), mt, sc.st.data(), mt, n, mt, sc.off.data(), sc.factor.data());
    for (int r = 0; r < rows.n; ++r) {
      T* prow = p_out + ((static_cast<int64_t>(b) * c.pr.nheads + rows.h[r]) * c.p.seqlen_q +
                         rows.i[r]) * static_cast<int64_t>(c.p.seqlen_k) + n0;
      for (int j = 0; j < n; ++j) {
        const Acc prob = sc.st[j * mt + r];
        if (prob == Acc(0)) continue;  // masked (or underflowed): keep the zero already there
        prow[j] = Traits<T>::store(c.has_dropout && !sc.keep[r * kBlockN + j] ? -prob : prob);
      }
    }
  }
}

// One query tile: the scores are kept transposed (St[j][r], one query per column), so that the
// K and V tiles are used row-major as loaded (no transposition per tile) and the online softmax
// runs on vectors across queries (col_max, exp_cols). SoftmaxState's rules, in columns: m is the
// running max (-inf while empty), off the reference (m, or 0 while empty), factor =
// exp(m_old - off) rescales l and O (0 for a row still empty, exactly 1 when m did not move).
template <typename T>
void fwd_tile(const AttnCtx<T>& c, int b, int hk, int m_block, FwdScratch<T>& sc) {
  using Acc = acc_t<T>;
  using Prob = prob_t<T>;
  const FwdParams& p = c.p;
  const SeqInfo& s = c.pr.seqs[b];
  const int d = c.pr.d, dpad = c.pr.dpad;
  const int pr0 = m_block * kBlockM;
  const int packed = s.seqlen_q * c.pr.group;
  const int nrows = packed - pr0 < kBlockM ? packed - pr0 : kBlockM;
  const int mt = pad_up(nrows);
  TileRows<Acc>& rows = sc.rows;
  make_tile_rows(c, b, hk, pr0, nrows, &rows);
  load_rows_t(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, rows, d, mt, c.scale,
              sc.qt.data());

  const Mask mask(s.seqlen_q, s.seqlen_k, p.window_left, p.window_right);
  int nb, ne;
  mask.kv_range(rows.i_first, rows.i_last + 1, &nb, &ne);

  Acc* o = sc.o.data();
  Acc* m = sc.m.data();
  Acc* off = sc.off.data();
  Acc* factor = sc.factor.data();
  Acc* l = sc.l.data();
  Prob* lt = sc.lt.data();
  constexpr bool same = std::is_same<Acc, Prob>::value;
  const Acc ninf = -static_cast<Acc>(INFINITY);
  for (int e = 0; e < nrows * dpad; ++e) o[e] = Acc(0);
  for (int r = 0; r < mt; ++r) {
    m[r] = ninf;
    l[r] = Acc(0);
  }

  const T* kbase = c.k() + hk * p.k_head_stride;
  const T* vbase = c.v() + hk * p.v_head_stride;
  for (int n0 = nb; n0 < ne; n0 += kBlockN) {
    const int n = ne - n0 < kBlockN ? ne - n0 : kBlockN;
    kv_row_offsets(p, s, n0, n, sc.kv.k, sc.kv.v);
    load_kv_rows(kbase, sc.kv.k, n, d, dpad, sc.k.data());
    load_kv_rows<T, Prob>(vbase, sc.kv.v, n, d, dpad, sc.v.data());
    if (n0 + kBlockN < ne) {  // the next tile's rows, fetched while this one computes
      const int n1 = ne - n0 - kBlockN < kBlockN ? ne - n0 - kBlockN : kBlockN;
      kv_row_offsets(p, s, n0 + kBlockN, n1, sc.kv_next.k, sc.kv_next.v);
      prefetch_rows(kbase, sc.kv_next.k, n1, d);
      prefetch_rows(vbase, sc.kv_next.v, n1, d);
    }
    // S^T = K Q^T (scaled, softcapped, ALiBi, masked)
    compute_scores_t(c, mask, rows, sc.qt.data(), mt, sc.k.data(), n0, n, sc.st.data());
    // online softmax: new max, factor = exp(old max - new reference), P = exp(S - reference)
    for (int r = 0; r < mt; ++r) off[r] = m[r];
    col_max(sc.st.data(), mt, n, mt, off);
    for (int r = 0; r < mt; ++r) {
      factor[r] = m[r];
      m[r] = off[r];
      if (off[r] == ninf) off[r] = Acc(0);
    }
    exp_diff(factor, off, factor, mt);  // an old max of -inf (empty so far) gives 0
    Prob* pt;
    if constexpr (same) pt = sc.st.data(); else pt = sc.p.data();
    // the tile's row sums in Prob, added to l in Acc (the normaliser counts dropped ones too)
    for (int r = 0; r < mt; ++r) lt[r] = Prob(0);
    exp_cols(sc.st.data(), mt, pt, mt, n, mt, off, lt);
    for (int r = 0; r < mt; ++r) l[r] = l[r] * factor[r] + static_cast<Acc>(lt[r]);
    // dropout: zero the dropped probabilities (keep_scale is folded into the final division)
    if (c.has_dropout) {
      dropout_keep_tile(c, rows, n0, n, sc.keep.data());
      for (int r = 0; r < nrows; ++r)
        for (int j = 0; j < n; ++j)
          if (!sc.keep[r * kBlockN + j]) pt[j * mt + r] = Prob(0);
    }
    // O = factor * O + P V, P read through the transposed tile (element (r, j) at pt[j * mt + r]);
    // with fp32 inputs P V is summed in fp32 over chains of kChain keys, each added to O in fp64
    for (int r = 0; r < nrows; ++r) {
      if (factor[r] == Acc(1)) continue;
      Acc* orow = o + r * dpad;
      for (int col = 0; col < dpad; ++col) orow[col] *= factor[r];
    }
    if constexpr (same)
      gemm(pt, 1, mt, sc.v.data(), dpad, o, dpad, nrows, n, dpad, /*accumulate=*/true);
    else
      gemm_widen(pt, 1, mt, sc.v.data(), dpad, o, dpad, nrows, n, dpad, kChain);
  }

  // epilogue: O /= row_sum (x keep_scale), lse; rows that saw no key get O = 0, lse = +inf
  T* out = static_cast<T*>(p.o_ptr) + s.o_off;
  for (int r = 0; r < nrows; ++r) {
    const bool empty = !(l[r] > Acc(0));
    const Acc sum = l[r];
    const Acc inv = empty ? Acc(0) : Acc(1) / sum * (c.has_dropout ? c.keep_scale : Acc(1));
    const Acc* orow = o + r * dpad;
    T* dst = out + rows.i[r] * p.o_row_stride + rows.h[r] * p.o_head_stride;
    for (int col = 0; col < d; ++col) dst[col] = Traits<T>::store(orow[col] * inv);
    const Acc lse = empty ? static_cast<Acc>(INFINITY) : off[r] + std::log(sum);
    p.softmax_lse_ptr[s.lse_off + rows.h[r] * c.pr.lse_head_stride + rows.i[r]] =
        static_cast<float>(lse);
    off[r] = lse;
  }
  if (p.p_ptr != nullptr) write_dmask_tile(c, s, mask, b, hk, nb, ne, mt, sc);
}

template <typename T>
void run_fwd_typed(const FwdParams& p, const Problem& pr) {
  const AttnCtx<T> c(p, pr);
  if (p.p_ptr != nullptr) {
    // S_dmask is zero wherever the tiles below do not write (masked, outside a sequence).
    const int64_t total = static_cast<int64_t>(pr.batch) * pr.nheads * p.seqlen_q * p.seqlen_k;
    std::memset(p.p_ptr, 0, static_cast<size_t>(total) * sizeof(T));
  }
  // Tasks: (sequence, K/V head, query tile), flattened through per-sequence tile counts.
  std::vector<int64_t> first_task(pr.batch + 1, 0);
  for (int b = 0; b < pr.batch; ++b) {
    const int64_t packed = static_cast<int64_t>(pr.seqs[b].seqlen_q) * pr.group;
    first_task[b + 1] = first_task[b] + (packed + kBlockM - 1) / kBlockM * pr.nheads_k;
  }
  const int64_t ntasks = first_task[pr.batch];
  parallel_tasks(ntasks, pr.work, [&](int64_t t) {
    FwdScratch<T>& sc = thread_scratch<FwdScratch<T>>();
    sc.ensure(pr.dpad);
    const int b = static_cast<int>(
        std::upper_bound(first_task.begin(), first_task.end(), t) - first_task.begin() - 1);
    const int64_t local = t - first_task[b];
    // The query tiles of one K/V head are consecutive tasks (they read the same K/V, which then
    // stays in the shared cache), last tile first: under a causal mask the last tiles see the
    // most keys, and dynamic scheduling balances best when the longest tasks start first.
    const int64_t nblocks = (first_task[b + 1] - first_task[b]) / pr.nheads_k;
    fwd_tile<T>(c, b, static_cast<int>(local / nblocks),
                static_cast<int>(nblocks - 1 - local % nblocks), sc);
  });
}

}  // namespace
}  // namespace cpu

void run_fwd_cpu(const FwdParams& params) {
  const cpu::Problem pr = cpu::make_problem(params, /*is_bwd=*/false);
  cpu::dispatch_dtype(params.dtype, "q", [&](auto tag) {
    using T = decltype(tag);
    cpu::run_fwd_typed<T>(params, pr);
  });
}

FLASH_NAMESPACE_END
