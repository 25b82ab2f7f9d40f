// Owns: run_fwd_cpu, the CPU forward. Tiled online softmax (FA2 algorithm): one task per
// (sequence, K/V head, query tile of kBlockM packed rows), OpenMP over tasks. Each task walks only
// the key tiles of its KV range (Mask::kv_range), keeps O unnormalised in an fp32/fp64 scratch
// tile and divides once at the end. Per-thread scratch is O(kBlockM x d + kBlockN x d); nothing
// of size seqlen_q x seqlen_k exists except S_dmask, which the caller asked for, filled in a
// second pass once each row's lse is known.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/softmax_state.h"
#include "attn_tile_cpu.h"
#include "flash_api_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

// Query tiles per task at most: a task loads and converts each K/V tile once for all of them.
constexpr int kMaxSpan = 4;

template <typename T>
struct FwdScratch {
  using Tile = tile_t<T>;
  using Acc = acc_t<T>;
  std::vector<Tile> kt, v, s, pv;
  std::vector<Tile> q[kMaxSpan];
  std::vector<Acc> o[kMaxSpan];
  std::vector<uint8_t> keep;
  TileRows<Tile> rows[kMaxSpan];
  KvTileRows kv;
  SoftmaxState<Acc> state[kMaxSpan][kBlockM];

  void ensure(int dpad) {
    grow_to(kt, dpad * kBlockN);
    grow_to(v, kBlockN * dpad);
    grow_to(s, kBlockM * kBlockN);
    grow_to(pv, kBlockM * dpad);
    grow_to(keep, kBlockM * kBlockN);
    for (int u = 0; u < kMaxSpan; ++u) {
      grow_to(q[u], kBlockM * dpad);
      grow_to(o[u], kBlockM * dpad);
    }
  }
};

// S_dmask for one query tile, given each row's final lse: P = exp(s - lse), negated where
// dropped. Masked and out-of-range entries keep the zeros written before the parallel loop.
template <typename T>
void write_dmask_tile(const AttnCtx<T>& c, const SeqInfo& s, const Mask& mask, int b, int hk,
                      int nb, int ne, int u, FwdScratch<T>& sc, const acc_t<T>* lse) {
  using Tile = tile_t<T>;
  T* p_out = static_cast<T*>(c.p.p_ptr);
  const TileRows<Tile>& rows = sc.rows[u];
  for (int n0 = nb; n0 < ne; n0 += kBlockN) {
    const int n = ne - n0 < kBlockN ? ne - n0 : kBlockN;
    kv_row_offsets(c.p, s, n0, n, sc.kv.k, sc.kv.v);
    load_k_transposed(c, sc.kv, hk, n, sc.kt.data());
    compute_scores(c, mask, rows, sc.q[u].data(), sc.kt.data(), n0, n, sc.s.data(),
                   static_cast<Tile*>(nullptr));
    if (c.has_dropout) dropout_keep_tile(c, rows, n0, n, sc.keep.data());
    for (int r = 0; r < rows.n; ++r) {
      Tile* srow = sc.s.data() + r * kBlockN;
      for (int j = n; j < pad_up(n); ++j) srow[j] = -static_cast<Tile>(INFINITY);
      exp_row(srow, pad_up(n), static_cast<Tile>(lse[r]));  // P = exp(S - lse); masked: 0
      T* prow = p_out + ((static_cast<int64_t>(b) * c.pr.nheads + rows.h[r]) * c.p.seqlen_q +
                         rows.i[r]) * static_cast<int64_t>(c.p.seqlen_k) + n0;
      for (int j = 0; j < n; ++j) {
        if (srow[j] == Tile(0)) continue;  // masked (or underflowed): keep the zero already there
        const Tile prob = c.has_dropout && !sc.keep[r * kBlockN + j] ? -srow[j] : srow[j];
        prow[j] = Traits<T>::store(prob);
      }
    }
  }
}

// One task: `span` consecutive query tiles from m_block of (sequence b, K/V head hk). Each K/V
// tile any of them sees is loaded once; the tiles are visited on the grid of multiples of
// kBlockN, so the rounding of a row never depends on the span (nor on the thread count).
template <typename T>
void fwd_task(const AttnCtx<T>& c, int b, int hk, int m_block, int span, FwdScratch<T>& sc) {
  using Tile = tile_t<T>;
  using Acc = acc_t<T>;
  const FwdParams& p = c.p;
  const SeqInfo& s = c.pr.seqs[b];
  const int d = c.pr.d, dpad = c.pr.dpad;
  const int packed = s.seqlen_q * c.pr.group;
  const Mask mask(s.seqlen_q, s.seqlen_k, p.window_left, p.window_right);
  int nb[kMaxSpan], ne[kMaxSpan], nb_all = s.seqlen_k, ne_all = 0;
  for (int u = 0; u < span; ++u) {
    const int pr0 = (m_block + u) * kBlockM;
    const int nrows = packed - pr0 < kBlockM ? packed - pr0 : kBlockM;
    make_tile_rows(c, b, hk, pr0, nrows, &sc.rows[u]);
    load_rows(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, sc.rows[u], d, dpad, c.scale,
              sc.q[u].data());
    mask.kv_range(sc.rows[u].i_first, sc.rows[u].i_last + 1, &nb[u], &ne[u]);
    if (nb[u] < ne[u]) {
      nb_all = nb[u] < nb_all ? nb[u] : nb_all;
      ne_all = ne[u] > ne_all ? ne[u] : ne_all;
    }
    for (int e = 0; e < nrows * dpad; ++e) sc.o[u][e] = Acc(0);
    for (int r = 0; r < nrows; ++r) sc.state[u][r] = SoftmaxState<Acc>::empty();
  }

  const T* vbase = c.v() + hk * p.v_head_stride;
  for (int n0 = nb_all / kBlockN * kBlockN; n0 < ne_all; n0 += kBlockN) {
    const int n = s.seqlen_k - n0 < kBlockN ? s.seqlen_k - n0 : kBlockN;
    kv_row_offsets(p, s, n0, n, sc.kv.k, sc.kv.v);
    load_k_transposed(c, sc.kv, hk, n, sc.kt.data());
    load_kv_rows(vbase, sc.kv.v, n, d, dpad, sc.v.data());
    for (int u = 0; u < span; ++u) {
      if (n0 >= ne[u] || n0 + n <= nb[u]) continue;  // no key of this tile is visible to u
      const TileRows<Tile>& rows = sc.rows[u];
      const int nrows = rows.n;
      // S = Q K^T (scaled, softcapped, ALiBi, masked)
      compute_scores(c, mask, rows, sc.q[u].data(), sc.kt.data(), n0, n, sc.s.data(),
                     static_cast<Tile*>(nullptr));
      // online softmax: P = exp(S - row_max), rescale O where row_max moved
      Acc* o = sc.o[u].data();
      for (int r = 0; r < nrows; ++r) {
        Tile* srow = sc.s.data() + r * kBlockN;
        for (int j = n; j < pad_up(n); ++j) srow[j] = -static_cast<Tile>(INFINITY);
        SoftmaxState<Acc>& st = sc.state[u][r];
        const Acc factor = st.rescale(row_max(srow, pad_up(n)));
        if (factor != Acc(1)) {
          Acc* orow = o + r * dpad;
          for (int col = 0; col < dpad; ++col) orow[col] *= factor;
        }
        // (the offset is a tile value or 0, so exact in Tile)
        st.add(exp_row(srow, pad_up(n), static_cast<Tile>(st.offset())));  // counts dropped too
      }
      // dropout: zero the dropped probabilities (keep_scale is folded into the final division)
      if (c.has_dropout) {
        dropout_keep_tile(c, rows, n0, n, sc.keep.data());
        for (int e = 0; e < nrows * kBlockN; ++e)
          if (!sc.keep[e]) sc.s[e] = Tile(0);
      }
      // O += P V
      gemm_add(sc.s.data(), kBlockN, sc.v.data(), dpad, o, dpad, sc.pv.data(), nrows, n, dpad);
    }
  }

  // epilogue: O /= row_sum (x keep_scale), lse; rows that saw no key get O = 0, lse = +inf
  T* out = static_cast<T*>(p.o_ptr) + s.o_off;
  for (int u = 0; u < span; ++u) {
    const TileRows<Tile>& rows = sc.rows[u];
    Acc lse[kBlockM];
    for (int r = 0; r < rows.n; ++r) {
      const SoftmaxState<Acc>& st = sc.state[u][r];
      const Acc inv = st.inv_sum() * (c.has_dropout ? c.keep_scale : Acc(1));
      const Acc* orow = sc.o[u].data() + r * dpad;
      T* dst = out + rows.i[r] * p.o_row_stride + rows.h[r] * p.o_head_stride;
      for (int col = 0; col < d; ++col) dst[col] = Traits<T>::store(orow[col] * inv);
      lse[r] = st.lse();
      p.softmax_lse_ptr[s.lse_off + rows.h[r] * c.pr.lse_head_stride + rows.i[r]] =
          static_cast<float>(lse[r]);
    }
    if (p.p_ptr != nullptr) write_dmask_tile(c, s, mask, b, hk, nb[u], ne[u], u, sc, lse);
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
  // Tasks: (sequence, K/V head, span of query tiles), flattened through per-sequence counts.
  // The span shrinks until every thread has ~8 tasks (dynamic scheduling balances causal rows).
  int64_t tiles = 0;
  for (int b = 0; b < pr.batch; ++b)
    tiles += (static_cast<int64_t>(pr.seqs[b].seqlen_q) * pr.group + kBlockM - 1) / kBlockM;
  tiles *= pr.nheads_k;
  int64_t span = tiles / (8 * static_cast<int64_t>(max_threads()));
  span = span < 1 ? 1 : (span > kMaxSpan ? kMaxSpan : span);
  std::vector<int64_t> first_task(pr.batch + 1, 0);
  for (int b = 0; b < pr.batch; ++b) {
    const int64_t packed = static_cast<int64_t>(pr.seqs[b].seqlen_q) * pr.group;
    const int64_t chunks = ((packed + kBlockM - 1) / kBlockM + span - 1) / span;
    first_task[b + 1] = first_task[b] + chunks * pr.nheads_k;
  }
  const int64_t ntasks = first_task[pr.batch];
  parallel_tasks(ntasks, pr.work, [&](int64_t t) {
    FwdScratch<T>& sc = thread_scratch<FwdScratch<T>>();
    sc.ensure(pr.dpad);
    const int b = static_cast<int>(
        std::upper_bound(first_task.begin(), first_task.end(), t) - first_task.begin() - 1);
    const int64_t local = t - first_task[b];
    const int64_t chunks = (first_task[b + 1] - first_task[b]) / pr.nheads_k;
    // Last query rows first: under a causal mask they see the most keys (longest task first).
    const int64_t chunk = chunks - 1 - local / pr.nheads_k;
    const int m_block = static_cast<int>(chunk * span);
    const int ntiles =
        static_cast<int>((static_cast<int64_t>(pr.seqs[b].seqlen_q) * pr.group + kBlockM - 1) /
                         kBlockM);
    const int n = ntiles - m_block < span ? ntiles - m_block : static_cast<int>(span);
    fwd_task<T>(c, b, static_cast<int>(local % pr.nheads_k), m_block, n, sc);
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
