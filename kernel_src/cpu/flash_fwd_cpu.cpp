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

template <typename T>
struct FwdScratch {
  using Acc = acc_t<T>;
  std::vector<Acc> q, kt, v, s, o;
  std::vector<uint8_t> keep;
  TileRows<Acc> rows;
  KvTileRows kv;
  SoftmaxState<Acc> state[kBlockM];

  void ensure(int dpad) {
    grow_to(q, kBlockM * dpad);
    grow_to(kt, dpad * kBlockN);
    grow_to(v, kBlockN * dpad);
    grow_to(s, kBlockM * kBlockN);
    grow_to(o, kBlockM * dpad);
    grow_to(keep, kBlockM * kBlockN);
  }
};

// S_dmask for one query tile, given each row's final lse: P = exp(s - lse), negated where
// dropped. Masked and out-of-range entries keep the zeros written before the parallel loop.
template <typename T>
void write_dmask_tile(const AttnCtx<T>& c, const SeqInfo& s, const Mask& mask, int b, int hk,
                      int nb, int ne, FwdScratch<T>& sc, const acc_t<T>* lse) {
  using Acc = acc_t<T>;
  T* p_out = static_cast<T*>(c.p.p_ptr);
  const TileRows<Acc>& rows = sc.rows;
  for (int n0 = nb; n0 < ne; n0 += kBlockN) {
    const int n = ne - n0 < kBlockN ? ne - n0 : kBlockN;
    kv_row_offsets(c.p, s, n0, n, sc.kv.k, sc.kv.v);
    load_k_transposed(c, sc.kv, hk, n, sc.kt.data());
    compute_scores(c, mask, rows, sc.q.data(), sc.kt.data(), n0, n, sc.s.data(),
                   static_cast<Acc*>(nullptr));
    if (c.has_dropout) dropout_keep_tile(c, rows, n0, n, sc.keep.data());
    for (int r = 0; r < rows.n; ++r) {
      Acc* srow = sc.s.data() + r * kBlockN;
      for (int j = n; j < pad_up(n); ++j) srow[j] = -static_cast<Acc>(INFINITY);
      exp_row(srow, pad_up(n), lse[r]);  // P = exp(S - lse); masked entries become 0
      T* prow = p_out + ((static_cast<int64_t>(b) * c.pr.nheads + rows.h[r]) * c.p.seqlen_q +
                         rows.i[r]) * static_cast<int64_t>(c.p.seqlen_k) + n0;
      for (int j = 0; j < n; ++j) {
        if (srow[j] == Acc(0)) continue;  // masked (or underflowed): keep the zero already there
        const Acc prob = c.has_dropout && !sc.keep[r * kBlockN + j] ? -srow[j] : srow[j];
        prow[j] = Traits<T>::store(prob);
      }
    }
  }
}

template <typename T>
void fwd_tile(const AttnCtx<T>& c, int b, int hk, int m_block, FwdScratch<T>& sc) {
  using Acc = acc_t<T>;
  const FwdParams& p = c.p;
  const SeqInfo& s = c.pr.seqs[b];
  const int d = c.pr.d, dpad = c.pr.dpad;
  const int pr0 = m_block * kBlockM;
  const int packed = s.seqlen_q * c.pr.group;
  const int nrows = packed - pr0 < kBlockM ? packed - pr0 : kBlockM;
  TileRows<Acc>& rows = sc.rows;
  make_tile_rows(c, b, hk, pr0, nrows, &rows);
  load_rows(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, rows, d, dpad, c.scale,
            sc.q.data());

  const Mask mask(s.seqlen_q, s.seqlen_k, p.window_left, p.window_right);
  int nb, ne;
  mask.kv_range(rows.i_first, rows.i_last + 1, &nb, &ne);

  Acc* o = sc.o.data();
  for (int e = 0; e < nrows * dpad; ++e) o[e] = Acc(0);
  for (int r = 0; r < nrows; ++r) sc.state[r] = SoftmaxState<Acc>::empty();

  const T* vbase = c.v() + hk * p.v_head_stride;
  for (int n0 = nb; n0 < ne; n0 += kBlockN) {
    const int n = ne - n0 < kBlockN ? ne - n0 : kBlockN;
    kv_row_offsets(p, s, n0, n, sc.kv.k, sc.kv.v);
    load_k_transposed(c, sc.kv, hk, n, sc.kt.data());
    load_kv_rows(vbase, sc.kv.v, n, d, dpad, sc.v.data());
    // S = Q K^T (scaled, softcapped, ALiBi, masked)
    compute_scores(c, mask, rows, sc.q.data(), sc.kt.data(), n0, n, sc.s.data(),
                   static_cast<Acc*>(nullptr));
    // online softmax: P = exp(S - row_max), rescale O where row_max moved
    for (int r = 0; r < nrows; ++r) {
      Acc* srow = sc.s.data() + r * kBlockN;
      Acc block_max = -static_cast<Acc>(INFINITY);
      for (int j = 0; j < n; ++j) block_max = srow[j] > block_max ? srow[j] : block_max;
      SoftmaxState<Acc>& st = sc.state[r];
      const Acc factor = st.rescale(block_max);
      if (factor != Acc(1)) {
        Acc* orow = o + r * dpad;
        for (int col = 0; col < dpad; ++col) orow[col] *= factor;
      }
      for (int j = n; j < pad_up(n); ++j) srow[j] = -static_cast<Acc>(INFINITY);
      st.add(exp_row(srow, pad_up(n), st.offset()));  // the normaliser counts dropped ones too
    }
    // dropout: zero the dropped probabilities (keep_scale is folded into the final division)
    if (c.has_dropout) {
      dropout_keep_tile(c, rows, n0, n, sc.keep.data());
      for (int e = 0; e < nrows * kBlockN; ++e)
        if (!sc.keep[e]) sc.s[e] = Acc(0);
    }
    // O += P V
    gemm(sc.s.data(), kBlockN, sc.v.data(), dpad, o, dpad, nrows, n, dpad, /*accumulate=*/true);
  }

  // epilogue: O /= row_sum (x keep_scale), lse; rows that saw no key get O = 0, lse = +inf
  Acc lse[kBlockM];
  T* out = static_cast<T*>(p.o_ptr) + s.o_off;
  for (int r = 0; r < nrows; ++r) {
    const SoftmaxState<Acc>& st = sc.state[r];
    const Acc inv = st.inv_sum() * (c.has_dropout ? c.keep_scale : Acc(1));
    const Acc* orow = o + r * dpad;
    T* dst = out + rows.i[r] * p.o_row_stride + rows.h[r] * p.o_head_stride;
    for (int col = 0; col < d; ++col) dst[col] = Traits<T>::store(orow[col] * inv);
    lse[r] = st.lse();
    const int64_t lse_idx = s.lse_off + rows.h[r] * c.pr.lse_head_stride + rows.i[r];
    if (p.softmax_lse_f64_ptr != nullptr) {
      p.softmax_lse_f64_ptr[lse_idx] = static_cast<double>(lse[r]);
    } else {
      p.softmax_lse_ptr[lse_idx] = static_cast<float>(lse[r]);
    }
  }
  if (p.p_ptr != nullptr) write_dmask_tile(c, s, mask, b, hk, nb, ne, sc, lse);
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
    fwd_tile<T>(c, b, static_cast<int>(local % pr.nheads_k),
                static_cast<int>(local / pr.nheads_k), sc);
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
