// Owns: run_fwd_cpu, the CPU forward. Tiled online softmax (FA2 algorithm): one task per
// (sequence, K/V head, group of kTileGroup query tiles of kBlockM packed rows), OpenMP over tasks.
// Each task walks only the key tiles of its tiles' KV ranges (Mask::kv_range), loads and converts
// each K/V tile once for the group, keeps O unnormalised in an fp32/fp64 scratch tile and divides
// once at the end (fp32 inputs: fp32 tile math, O and the row sums carried across key tiles in
// fp64, see Traits<float>). Per-thread scratch is O(kTileGroup x kBlockM x d + kBlockN x d); nothing of
// size seqlen_q x seqlen_k exists except S_dmask, which the caller asked for, filled in a second
// pass once each row's lse is known.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "attn_tile_cpu.h"
#include "flash_amx_cpu.h"
#include "flash_api_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

// Query tiles per task: they share each K/V tile, loaded and converted once for all of them.
// 8 (512 packed rows): 3-5% faster than 4 on fp32 at 2k (AVX-512, 2 threads), 16 no faster.
constexpr int kTileGroup = 8;

// One query tile's state: its rows, Q transposed and scaled (qt[c][r], ld mt), the output
// accumulator O (row-major, ld dpad), and per query column: running max m (row_max of
// SoftmaxState), the reference point off the tile's exponentials use, the rescale factor and
// the running sum l. O and l are carried across key tiles in Sum.
template <typename T>
struct QueryTile {
  using Acc = acc_t<T>;
  using Sum = sum_t<T>;
  Scratch<Acc> qt, m, off, factor;
  Scratch<Sum> o, l;
  TileRows<Acc> rows;
  int nrows = 0, mt = 0, nb = 0, ne = 0;  // rows, padded rows, visible key range

  void ensure(int dpad) {
    grow_to(qt, dpad * kBlockM);
    grow_to(o, kBlockM * dpad);
    for (auto* x : {&m, &off, &factor}) grow_to(*x, kBlockM);
    grow_to(l, kBlockM);
  }
};

template <typename T>
struct FwdScratch {
  using Acc = acc_t<T>;
  QueryTile<T> tiles[kTileGroup];
  Scratch<Acc> k, v, st;
  Scratch<Acc> tsum;  // one key tile's row sums (only when Sum is not Acc)
  Scratch<uint8_t> keep;
  KvTileRows kv, kv_next;

  void ensure(int dpad) {
    for (auto& t : tiles) t.ensure(dpad);
    grow_to(k, kBlockN * dpad);
    grow_to(v, kBlockN * dpad);
    grow_to(st, kBlockN * kBlockM);
    if constexpr (!std::is_same_v<Acc, sum_t<T>>) {
      grow_to(tsum, kBlockM);
    }
    grow_to(keep, kBlockM * kBlockN);
  }
};

// S_dmask for one query tile, given each row's final lse (in qt.off): P = exp(s - lse), negated
// where dropped. Masked and out-of-range entries keep the zeros written before the parallel loop.
template <typename T>
void write_dmask_tile(const AttnCtx<T>& c, const SeqInfo& s, const Mask& mask, int b, int hk,
                      QueryTile<T>& q, FwdScratch<T>& sc) {
  using Acc = acc_t<T>;
  T* p_out = static_cast<T*>(c.p.p_ptr);
  const TileRows<Acc>& rows = q.rows;
  const int mt = q.mt;
  const T* kbase = c.k() + hk * c.p.k_head_stride;
  for (int n0 = q.nb; n0 < q.ne; n0 += kBlockN) {
    const int n = q.ne - n0 < kBlockN ? q.ne - n0 : kBlockN;
    kv_row_offsets(c.p, s, n0, n, sc.kv.k, sc.kv.v);
    load_kv_rows(kbase, sc.kv.k, n, c.pr.d, c.pr.dpad, sc.k.data());
    compute_scores_t(c, mask, rows, q.qt.data(), mt, sc.k.data(), n0, n, sc.st.data());
    if (c.has_dropout) dropout_keep_tile(c, rows, n0, n, sc.keep.data());
    // factor receives the sums, which are not needed
    exp_cols(sc.st.data(), mt, sc.st.data(), mt, n, mt, q.off.data(), q.factor.data());
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

// One key tile (scores in sc.st, K/V tiles in sc.k/sc.v) applied to one query tile.
//
// The scores are kept transposed (St[j][r], one query per column), so that the K and V tiles are
// used row-major as loaded (no transposition per tile) and the online softmax runs on vectors
// across queries (col_max, exp_cols). SoftmaxState's rules, in columns: m is the running max
// (-inf while empty), off the reference (m, or 0 while empty), factor = exp(m_old - off)
// rescales l and O (0 for a row still empty, exactly 1 when m did not move).
// When Sum is wider than Acc (fp32 inputs), the tile's row sums and P V are computed in Acc from
// zero and then added to the rescaled l and O in Sum, so no Acc chain is longer than one tile.
template <typename T>
void fwd_key_tile(const AttnCtx<T>& c, const Mask& mask, int n0, int n, QueryTile<T>& q,
                  FwdScratch<T>& sc) {
  using Acc = acc_t<T>;
  using Sum = sum_t<T>;
  constexpr bool kSplit = !std::is_same_v<Acc, Sum>;
  const int dpad = c.pr.dpad, mt = q.mt, nrows = q.nrows;
  Acc *m = q.m.data(), *off = q.off.data(), *factor = q.factor.data();
  Sum *o = q.o.data(), *l = q.l.data();
  Acc* st = sc.st.data();
  const Acc ninf = -static_cast<Acc>(INFINITY);
  // S^T = K Q^T (scaled, softcapped, ALiBi, masked)
  compute_scores_t(c, mask, q.rows, q.qt.data(), mt, sc.k.data(), n0, n, st);
  // online softmax: new max, factor = exp(old max - new reference), P = exp(S - reference)
  for (int r = 0; r < mt; ++r) off[r] = m[r];
  col_max(st, mt, n, mt, off);
  for (int r = 0; r < mt; ++r) {
    factor[r] = m[r];
    m[r] = off[r];
    if (off[r] == ninf) off[r] = Acc(0);
  }
  exp_diff(factor, off, factor, mt);  // an old max of -inf (empty so far) gives 0
  // P in place; the normaliser counts dropped ones too
  if constexpr (kSplit) {
    Acc* ts = sc.tsum.data();
    for (int r = 0; r < mt; ++r) ts[r] = Acc(0);
    exp_cols(st, mt, st, mt, n, mt, off, ts);
    for (int r = 0; r < mt; ++r) l[r] = l[r] * factor[r] + ts[r];
  } else {
    for (int r = 0; r < mt; ++r) l[r] *= factor[r];
    if constexpr (Traits<T>::kExpF32)
      exp_cols_f32(st, mt, st, mt, n, mt, off, l);
    else
      exp_cols(st, mt, st, mt, n, mt, off, l);
  }
  // dropout: zero the dropped probabilities (keep_scale is folded into the final division)
  if (c.has_dropout) {
    dropout_keep_tile(c, q.rows, n0, n, sc.keep.data());
    for (int r = 0; r < nrows; ++r)
      for (int j = 0; j < n; ++j)
        if (!sc.keep[r * kBlockN + j]) st[j * mt + r] = Acc(0);
  }
  // O = factor * O + P V, P read through the transposed tile (element (r, j) at st[j * mt + r])
  if constexpr (kSplit) {
    gemm_fold(st, 1, mt, sc.v.data(), dpad, o, dpad, nrows, n, dpad, factor);
  } else {
    for (int r = 0; r < nrows; ++r) {
      if (factor[r] == Acc(1)) continue;
      Acc* orow = o + r * dpad;
      for (int col = 0; col < dpad; ++col) orow[col] *= factor[r];
    }
    gemm(st, 1, mt, sc.v.data(), dpad, o, dpad, nrows, n, dpad, /*accumulate=*/true);
  }
}

// One task: up to kTileGroup query tiles (packed rows [pr0, pr0 + kTileGroup * kBlockM)) of
// (sequence b, K/V head hk). Each K/V tile of the union of their key ranges is loaded once and
// applied to every query tile whose range it meets.
template <typename T>
void fwd_task(const AttnCtx<T>& c, int b, int hk, int pr0, FwdScratch<T>& sc) {
  using Acc = acc_t<T>;
  using Sum = sum_t<T>;
  const FwdParams& p = c.p;
  const SeqInfo& s = c.pr.seqs[b];
  const int d = c.pr.d, dpad = c.pr.dpad;
  const int packed = s.seqlen_q * c.pr.group;
  const Mask mask(s.seqlen_q, s.seqlen_k, p.window_left, p.window_right);
  const Acc ninf = -static_cast<Acc>(INFINITY);
  int ntiles = 0, nb = s.seqlen_k, ne = 0;
  for (int r0 = pr0; r0 < packed && ntiles < kTileGroup; r0 += kBlockM, ++ntiles) {
    QueryTile<T>& q = sc.tiles[ntiles];
    q.nrows = packed - r0 < kBlockM ? packed - r0 : kBlockM;
    q.mt = pad_up(q.nrows);
    make_tile_rows(c, b, hk, r0, q.nrows, &q.rows);
    load_rows_t(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, q.rows, d, q.mt, c.scale,
                q.qt.data());
    mask.kv_range(q.rows.i_first, q.rows.i_last + 1, &q.nb, &q.ne);
    if (q.nb < q.ne) {
      nb = std::min(nb, q.nb);
      ne = std::max(ne, q.ne);
    }
    for (int e = 0; e < q.nrows * dpad; ++e) q.o[e] = Sum(0);
    for (int r = 0; r < q.mt; ++r) {
      q.m[r] = ninf;
      q.l[r] = Sum(0);
      q.off[r] = Acc(0);
    }
  }

  const T* kbase = c.k() + hk * p.k_head_stride;
  const T* vbase = c.v() + hk * p.v_head_stride;
  for (int n0 = nb; n0 < ne; n0 += kBlockN) {
    const int n = ne - n0 < kBlockN ? ne - n0 : kBlockN;
    kv_row_offsets(p, s, n0, n, sc.kv.k, sc.kv.v);
    load_kv_rows(kbase, sc.kv.k, n, d, dpad, sc.k.data());
    load_kv_rows(vbase, sc.kv.v, n, d, dpad, sc.v.data());
    // The next tile's rows, fetched while this one computes, in shares between the query tiles
    // (issued all at once, the prefetches stall on the line fill buffers).
    const int n1 = n0 + kBlockN < ne ? std::min(kBlockN, ne - n0 - kBlockN) : 0;
    if (n1 > 0) kv_row_offsets(p, s, n0 + kBlockN, n1, sc.kv_next.k, sc.kv_next.v);
    const int share = (n1 + ntiles - 1) / ntiles;
    for (int g = 0; g < ntiles; ++g) {
      const int j0 = std::min(n1, g * share), j1 = std::min(n1, (g + 1) * share);
      prefetch_rows(kbase, sc.kv_next.k + j0, j1 - j0, d);
      prefetch_rows(vbase, sc.kv_next.v + j0, j1 - j0, d);
      QueryTile<T>& q = sc.tiles[g];
      if (n0 < q.ne && n0 + n > q.nb) fwd_key_tile(c, mask, n0, n, q, sc);
    }
  }

  // epilogue: O /= row_sum (x keep_scale), lse; rows that saw no key get O = 0, lse = +inf
  T* out = static_cast<T*>(p.o_ptr) + s.o_off;
  for (int g = 0; g < ntiles; ++g) {
    QueryTile<T>& q = sc.tiles[g];
    for (int r = 0; r < q.nrows; ++r) {
      const Sum sum = q.l[r];
      const bool empty = !(sum > Sum(0));
      const Sum inv = empty ? Sum(0) : Sum(1) / sum * (c.has_dropout ? c.keep_scale : Sum(1));
      const Sum* orow = q.o.data() + r * dpad;
      T* dst = out + q.rows.i[r] * p.o_row_stride + q.rows.h[r] * p.o_head_stride;
      for (int col = 0; col < d; ++col) dst[col] = Traits<T>::store(orow[col] * inv);
      const Sum lse = empty ? static_cast<Sum>(INFINITY) : q.off[r] + std::log(sum);
      const int64_t lse_idx = s.lse_off + q.rows.h[r] * c.pr.lse_head_stride + q.rows.i[r];
      if (p.softmax_lse_f64_ptr != nullptr) {
        p.softmax_lse_f64_ptr[lse_idx] = static_cast<double>(lse);
      } else {
        p.softmax_lse_ptr[lse_idx] = static_cast<float>(lse);
      }
      q.off[r] = static_cast<Acc>(lse);
    }
    if (p.p_ptr != nullptr) write_dmask_tile(c, s, mask, b, hk, q, sc);
  }
}

template <typename T>
void run_fwd_typed(const FwdParams& p, const Problem& pr) {
  const AttnCtx<T> c(p, pr);
  if (p.p_ptr != nullptr) {
    // S_dmask is zero wherever the tiles below do not write (masked, outside a sequence).
    const int64_t total = static_cast<int64_t>(pr.batch) * pr.nheads * p.seqlen_q * p.seqlen_k;
    std::memset(p.p_ptr, 0, static_cast<size_t>(total) * sizeof(T));
  }
  // Tasks: (sequence, K/V head, group of query tiles), flattened through per-sequence tile counts.
  std::vector<int64_t> first_task(pr.batch + 1, 0);
  for (int b = 0; b < pr.batch; ++b) {
    const int64_t packed = static_cast<int64_t>(pr.seqs[b].seqlen_q) * pr.group;
    constexpr int rows = kTileGroup * kBlockM;
    first_task[b + 1] = first_task[b] + (packed + rows - 1) / rows * pr.nheads_k;
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
    fwd_task<T>(c, b, static_cast<int>(local / nblocks),
                static_cast<int>(nblocks - 1 - local % nblocks) * kTileGroup * kBlockM, sc);
  });
}

}  // namespace
}  // namespace cpu

void run_fwd_cpu(const FwdParams& params) {
  const cpu::Problem pr = cpu::make_problem(params, /*is_bwd=*/false);
  if (cpu::amx_fwd_applies(params)) {  // bf16 on AMX tiles (flash_fwd_amx_cpu.cpp)
    cpu::run_fwd_amx(params, pr);
    return;
  }
  cpu::dispatch_attn_dtype(params.dtype, pr.work, "q", [&](auto tag) {
    using T = decltype(tag);
    cpu::run_fwd_typed<T>(params, pr);
  });
}

FLASH_NAMESPACE_END
