// Owns: run_bwd_cpu, the CPU backward. Exact gradients by recomputation (FA2 algorithm 2):
// P is rebuilt from the saved lse (fp32/fp64 inputs recompute lse in fp64, so that e.g. gradcheck
// sees the exact gradient of the fp64 forward), the dropout mask is regenerated from the same
// Philox stream, D = rowsum(dO * O), dS = P * (dP - D), softcap's chain rule dS *= 1 - tanh^2.
//
// Parallel over (sequence, K/V head): one task owns dK/dV of its K/V head and dQ of the query
// heads of its group, so nothing is shared between threads and the result is deterministic and
// independent of the thread count (deterministic=true costs nothing here). Inside a task the
// loop is key tile outer (dK, dV accumulate in a kBlockN x d tile), query tile inner over
// Mask::q_range; dQ accumulates in an fp32/fp64 buffer of (seqlen_q x group) x d: linear in the
// sequence length, like FA2's dq_accum.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../common/softmax_state.h"
#include "attn_tile_cpu.h"
#include "flash_api_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

template <typename T>
struct BwdScratch {
  using Acc = acc_t<T>;
  using Prob = prob_t<T>;
  // Tiles (thread-local, reused across calls). Acc: the logits and the gradient accumulators;
  // Prob: the operands of the four products after S (the same buffers as Acc's when the types
  // agree, see bwd_task).
  std::vector<Acc> qs, qt, kt, kr, s, tanh_s, dp, dk, dv, m, off, l, do_a, vt_a;
  std::vector<Prob> q_p, do_p, k_p, p_p, ds_p;
  std::vector<uint8_t> keep;
  TileRows<Acc> rows;
  KvTileRows kv;
  // Per task, (seqlen_q * group) rows: pointers into the task's own buffers (not kept across
  // calls, since their size follows the sequence length).
  Acc* dq = nullptr;
  Acc* lse = nullptr;
  Acc* dsum = nullptr;

  void ensure(int dpad) {
    for (auto* x : {&qs, &dk, &dv, &kr, &do_a}) grow_to(*x, std::max(kBlockM, kBlockN) * dpad);
    for (auto* x : {&qt, &kt, &vt_a}) grow_to(*x, dpad * std::max(kBlockM, kBlockN));
    for (auto* x : {&s, &tanh_s, &dp}) grow_to(*x, kBlockM * kBlockN);
    for (auto* x : {&m, &off, &l}) grow_to(*x, kBlockM);
    for (auto* x : {&q_p, &do_p, &k_p}) grow_to(*x, std::max(kBlockM, kBlockN) * dpad);
    for (auto* x : {&p_p, &ds_p}) grow_to(*x, kBlockM * kBlockN);
    grow_to(keep, kBlockM * kBlockN);
  }
};

// C (Acc) += A B with operands in Prob. When Prob is narrower (fp32 inputs), the product runs in
// Prob over chains of kChain depth steps, each chain added to C in Acc (the forward's rule,
// docs/cpu_backend.md "Numerics").
template <typename Acc, typename Prob>
void gemm_acc(const Prob* A, long ars, long aks, const Prob* B, int ldb, Acc* C, int ldc, int rows,
              int depth, int cols) {
  if constexpr (std::is_same<Acc, Prob>::value)
    gemm(A, ars, aks, B, ldb, C, ldc, rows, depth, cols, /*accumulate=*/true);
  else
    gemm_widen(A, ars, aks, B, ldb, C, ldc, rows, depth, cols, kChain);
}

// Per-sequence offsets of the gradient-side tensors (the backward has no paging or left padding).
struct BwdOffsets {
  int64_t dout, dq, k, v, dk, dv;
};

BwdOffsets bwd_offsets(const BwdParams& p, int b) {
  BwdOffsets o;
  if (p.cu_seqlens_q != nullptr) {
    const int64_t q0 = p.cu_seqlens_q[b];
    o.dout = q0 * p.do_row_stride;
    o.dq = q0 * p.dq_row_stride;
  } else {
    o.dout = static_cast<int64_t>(b) * p.do_batch_stride;
    o.dq = static_cast<int64_t>(b) * p.dq_batch_stride;
  }
  if (p.cu_seqlens_k != nullptr) {
    const int64_t k0 = p.cu_seqlens_k[b];
    o.k = k0 * p.k_row_stride;
    o.v = k0 * p.v_row_stride;
    o.dk = k0 * p.dk_row_stride;
    o.dv = k0 * p.dv_row_stride;
  } else {
    o.k = static_cast<int64_t>(b) * p.k_batch_stride;
    o.v = static_cast<int64_t>(b) * p.v_batch_stride;
    o.dk = static_cast<int64_t>(b) * p.dk_batch_stride;
    o.dv = static_cast<int64_t>(b) * p.dv_batch_stride;
  }
  return o;
}

// lse of every packed row of the task, recomputed in Acc with the forward's online softmax (its
// transposed tiles: K row-major, one query per column).
template <typename T>
void recompute_lse(const AttnCtx<T>& c, const SeqInfo& s, const Mask& mask, int b, int hk,
                   int64_t k_off, BwdScratch<T>& sc) {
  using Acc = acc_t<T>;
  const int packed = s.seqlen_q * c.pr.group;
  const Acc ninf = -static_cast<Acc>(INFINITY);
  const T* kbase = c.k() + k_off + hk * c.p.k_head_stride;
  Acc *m = sc.m.data(), *off = sc.off.data(), *l = sc.l.data(), *factor = sc.dk.data();
  for (int pr0 = 0; pr0 < packed; pr0 += kBlockM) {
    const int nrows = packed - pr0 < kBlockM ? packed - pr0 : kBlockM;
    const int mt = pad_up(nrows);
    make_tile_rows(c, b, hk, pr0, nrows, &sc.rows);
    load_rows_t(c.q() + s.q_off, c.p.q_row_stride, c.p.q_head_stride, sc.rows, c.pr.d, mt,
                c.scale, sc.qt.data());
    for (int r = 0; r < mt; ++r) {
      m[r] = ninf;
      l[r] = Acc(0);
    }
    int nb, ne;
    mask.kv_range(sc.rows.i_first, sc.rows.i_last + 1, &nb, &ne);
    for (int n0 = nb; n0 < ne; n0 += kBlockN) {
      const int n = ne - n0 < kBlockN ? ne - n0 : kBlockN;
      for (int j = 0; j < n; ++j) sc.kv.k[j] = static_cast<int64_t>(n0 + j) * c.p.k_row_stride;
      load_kv_rows(kbase, sc.kv.k, n, c.pr.d, c.pr.dpad, sc.kr.data());
      compute_scores_t(c, mask, sc.rows, sc.qt.data(), mt, sc.kr.data(), n0, n, sc.s.data());
      for (int r = 0; r < mt; ++r) off[r] = m[r];
      col_max(sc.s.data(), mt, n, mt, off);
      for (int r = 0; r < mt; ++r) {
        factor[r] = m[r];
        m[r] = off[r];
        if (off[r] == ninf) off[r] = Acc(0);
      }
      exp_diff(factor, off, factor, mt);
      for (int r = 0; r < mt; ++r) l[r] *= factor[r];
      exp_cols(sc.s.data(), mt, sc.s.data(), mt, n, mt, off, l);
    }
    for (int r = 0; r < nrows; ++r)
      sc.lse[pr0 + r] = l[r] > Acc(0) ? off[r] + std::log(l[r]) : static_cast<Acc>(INFINITY);
  }
}

template <typename T>
void bwd_task(const AttnCtx<T>& c, const BwdParams& p, int b, int hk, BwdScratch<T>& sc) {
  using Acc = acc_t<T>;
  using Prob = prob_t<T>;
  const SeqInfo& s = c.pr.seqs[b];
  const BwdOffsets off = bwd_offsets(p, b);
  const int d = c.pr.d, dpad = c.pr.dpad, group = c.pr.group;
  const int packed = s.seqlen_q * group;
  const Mask mask(s.seqlen_q, s.seqlen_k, p.window_left, p.window_right);
  const T* dout = static_cast<const T*>(p.do_ptr) + off.dout;
  const T* out = static_cast<const T*>(p.o_ptr) + s.o_off;

  std::vector<Acc> dq_acc(static_cast<size_t>(packed) * dpad, Acc(0));
  std::vector<Acc> row_stats(2 * static_cast<size_t>(packed));
  sc.dq = dq_acc.data();
  sc.lse = row_stats.data();
  sc.dsum = row_stats.data() + packed;

  // D = rowsum(dO * O) and the lse of every row of the group.
  for (int pi = 0; pi < packed; ++pi) {
    const int i = pi / group, h = hk * group + pi % group;
    const T* dorow = dout + i * p.do_row_stride + h * p.do_head_stride;
    const T* orow = out + i * p.o_row_stride + h * p.o_head_stride;
    Acc acc = Acc(0);
    for (int col = 0; col < d; ++col)
      acc += Traits<T>::load(dorow[col]) * Traits<T>::load(orow[col]);
    sc.dsum[pi] = acc;
    sc.lse[pi] = static_cast<Acc>(p.softmax_lse_ptr[s.lse_off + h * c.pr.lse_head_stride + i]);
  }
  // fp32 and fp64 inputs (fp64 accumulation) recompute lse at that precision: the saved lse is
  // fp32, and its rounding (~1e-7 relative in P) would be the largest error of their gradients.
  if (sizeof(Acc) > sizeof(float)) recompute_lse(c, s, mask, b, hk, off.k, sc);

  T* dk_out = static_cast<T*>(p.dk_ptr) + off.dk + hk * p.dk_head_stride;
  T* dv_out = static_cast<T*>(p.dv_ptr) + off.dv + hk * p.dv_head_stride;
  const T* kbase = c.k() + off.k + hk * p.k_head_stride;
  const T* vbase = c.v() + off.v + hk * p.v_head_stride;
  const Acc ninf = -static_cast<Acc>(INFINITY);

  // Operands of dV, dQ and dK, in Prob. When Prob is Acc they are the Acc tiles themselves
  // (scaled Q, so dK needs no final scale); otherwise separate copies, Q unscaled (exact in
  // fp32) and softmax_scale applied when dK is written. S and dP are computed in Acc: dS = P (dP
  // - D) cancels where a row sees few keys, and fp32 rounding of dP would then dominate.
  constexpr bool same = std::is_same<Acc, Prob>::value;
  Prob *q_op, *k_op, *do_op, *p_op, *ds_op;
  if constexpr (same) {
    q_op = sc.qs.data();
    k_op = sc.kr.data();
    do_op = sc.do_a.data();
    p_op = sc.s.data();
    ds_op = sc.dp.data();
  } else {
    q_op = sc.q_p.data();
    k_op = sc.k_p.data();
    do_op = sc.do_p.data();
    p_op = sc.p_p.data();
    ds_op = sc.ds_p.data();
  }
  const Acc dk_scale = same ? Acc(1) : c.scale;

  for (int n0 = 0; n0 < s.seqlen_k; n0 += kBlockN) {
    const int n = s.seqlen_k - n0 < kBlockN ? s.seqlen_k - n0 : kBlockN;
    for (int e = 0; e < n * dpad; ++e) sc.dk[e] = sc.dv[e] = Acc(0);
    int ib, ie;
    mask.q_range(n0, n0 + n, &ib, &ie);
    if (ib < ie) {
      // K tile transposed (for S, in Acc) and row-major (for dQ), V transposed (for dP).
      for (int j = 0; j < n; ++j) {
        sc.kv.k[j] = static_cast<int64_t>(n0 + j) * p.k_row_stride;
        sc.kv.v[j] = static_cast<int64_t>(n0 + j) * p.v_row_stride;
      }
      load_kv_rows(kbase, sc.kv.k, n, d, dpad, sc.kr.data());
      transpose(sc.kr.data(), dpad, sc.kt.data(), kBlockN, n, d);
      if constexpr (!same) load_kv_rows<T, Prob>(kbase, sc.kv.k, n, d, dpad, k_op);
      for (int j = 0; j < n; ++j) {
        const T* src = vbase + sc.kv.v[j];
        for (int col = 0; col < d; ++col) sc.vt_a[col * kBlockN + j] = Traits<T>::load(src[col]);
      }
    }
    for (int pr0 = ib * group; pr0 < ie * group; pr0 += kBlockM) {
      const int nrows = ie * group - pr0 < kBlockM ? ie * group - pr0 : kBlockM;
      TileRows<Acc>& rows = sc.rows;
      make_tile_rows(c, b, hk, pr0, nrows, &rows);
      load_rows(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, rows, d, dpad, c.scale,
                sc.qs.data());
      if constexpr (!same)
        load_rows<T, Prob>(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, rows, d, dpad,
                           Acc(1), q_op);
      load_rows(dout, p.do_row_stride, p.do_head_stride, rows, d, dpad, Acc(1), sc.do_a.data());
      if constexpr (!same)
        load_rows<T, Prob>(dout, p.do_row_stride, p.do_head_stride, rows, d, dpad, Acc(1), do_op);
      // S = Q K^T, then P = exp(S - lse) (in Prob; rows with lse = +inf and masked entries: 0)
      compute_scores(c, mask, rows, sc.qs.data(), sc.kt.data(), n0, n, sc.s.data(),
                     c.has_softcap ? sc.tanh_s.data() : static_cast<Acc*>(nullptr));
      for (int r = 0; r < nrows; ++r) {
        Acc* srow = sc.s.data() + r * kBlockN;
        for (int j = n; j < pad_up(n); ++j) srow[j] = ninf;
        exp_row(srow, p_op + r * kBlockN, pad_up(n), sc.lse[pr0 + r]);
      }
      if (c.has_dropout) dropout_keep_tile(c, rows, n0, n, sc.keep.data());
      // dV += (P o Z)^T dO, with Z = keep * keep_scale; the transpose is read in place (element
      // (j, r) of the product's A at pz[r * kBlockN + j]). ds_op holds P o Z until dS.
      const Prob* pz = p_op;
      if (c.has_dropout) {
        const Prob ks = static_cast<Prob>(c.keep_scale);
        for (int r = 0; r < nrows; ++r)
          for (int j = 0; j < n; ++j)
            ds_op[r * kBlockN + j] = sc.keep[r * kBlockN + j] ? p_op[r * kBlockN + j] * ks : Prob(0);
        pz = ds_op;
      }
      gemm_acc(pz, 1, kBlockN, do_op, dpad, sc.dv.data(), dpad, n, nrows, dpad);
      // dP = dO V^T (Acc)
      gemm(sc.do_a.data(), dpad, sc.vt_a.data(), kBlockN, sc.dp.data(), kBlockN, nrows, d,
           pad_up(n), /*accumulate=*/false);
      // dS = P o (dP o Z - D), o (1 - tanh^2) under softcap
      for (int r = 0; r < nrows; ++r) {
        const Acc dsum = sc.dsum[pr0 + r];
        const Prob* prow = p_op + r * kBlockN;
        const Acc* dprow = sc.dp.data() + r * kBlockN;
        Prob* dsrow = ds_op + r * kBlockN;
        for (int j = 0; j < n; ++j) {
          Acc dpz = dprow[j];
          if (c.has_dropout) dpz = sc.keep[r * kBlockN + j] ? dpz * c.keep_scale : Acc(0);
          Acc ds = static_cast<Acc>(prow[j]) * (dpz - dsum);
          if (c.has_softcap) {
            const Acc t = sc.tanh_s[r * kBlockN + j];
            ds *= Acc(1) - t * t;
          }
          dsrow[j] = static_cast<Prob>(ds);
        }
      }
      // dQ += dS K (softmax_scale applied once when dQ is written)
      Acc* dq_tile = sc.dq + static_cast<int64_t>(pr0) * dpad;
      gemm_acc(ds_op, kBlockN, 1, k_op, dpad, dq_tile, dpad, nrows, n, dpad);
      // dK += dS^T Q, dS^T read in place
      gemm_acc(ds_op, 1, kBlockN, q_op, dpad, sc.dk.data(), dpad, n, nrows, dpad);
    }
    for (int j = 0; j < n; ++j) {
      T* dkrow = dk_out + static_cast<int64_t>(n0 + j) * p.dk_row_stride;
      T* dvrow = dv_out + static_cast<int64_t>(n0 + j) * p.dv_row_stride;
      for (int col = 0; col < d; ++col) {
        dkrow[col] = Traits<T>::store(sc.dk[j * dpad + col] * dk_scale);
        dvrow[col] = Traits<T>::store(sc.dv[j * dpad + col]);
      }
    }
  }
  // Keys the sequence owns but does not use (seqused_k) get zero gradients.
  for (int j = s.seqlen_k; j < s.seqlen_k_rows; ++j) {
    T* dkrow = dk_out + static_cast<int64_t>(j) * p.dk_row_stride;
    T* dvrow = dv_out + static_cast<int64_t>(j) * p.dv_row_stride;
    for (int col = 0; col < d; ++col) dkrow[col] = dvrow[col] = Traits<T>::store(Acc(0));
  }
  // dQ = scale * accumulated dS K
  T* dq_out = static_cast<T*>(p.dq_ptr) + off.dq;
  for (int pi = 0; pi < packed; ++pi) {
    const int i = pi / group, h = hk * group + pi % group;
    T* dst = dq_out + i * p.dq_row_stride + h * p.dq_head_stride;
    const Acc* src = sc.dq + static_cast<int64_t>(pi) * dpad;
    for (int col = 0; col < d; ++col) dst[col] = Traits<T>::store(src[col] * c.scale);
  }
}

template <typename T>
void run_bwd_typed(const BwdParams& p, const Problem& pr) {
  const AttnCtx<T> c(p, pr);
  const int64_t ntasks = static_cast<int64_t>(pr.batch) * pr.nheads_k;
  parallel_tasks(ntasks, pr.work, [&](int64_t t) {
    BwdScratch<T>& sc = thread_scratch<BwdScratch<T>>();
    sc.ensure(pr.dpad);
    bwd_task<T>(c, p, static_cast<int>(t / pr.nheads_k), static_cast<int>(t % pr.nheads_k), sc);
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
  cpu::dispatch_dtype(params.dtype, "q", [&](auto tag) {
    using T = decltype(tag);
    cpu::run_bwd_typed<T>(params, pr);
  });
}

FLASH_NAMESPACE_END
