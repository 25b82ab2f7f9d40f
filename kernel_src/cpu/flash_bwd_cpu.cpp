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
#include <vector>

#include "../common/softmax_state.h"
#include "attn_tile_cpu.h"
#include "flash_api_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

// Key tiles per step of a task: each query tile (Q, dO) is loaded once for all of them.
constexpr int kSpan = 4;

template <typename T>
struct BwdScratch {
  using Tile = tile_t<T>;
  using Acc = acc_t<T>;
  // Tiles (thread-local, reused across calls); one K/V/dK/dV set per key tile of a span.
  std::vector<Tile> qs, dout, s, tanh_s, dp, pt, dst, prod;
  std::vector<Tile> kt[kSpan], ks[kSpan], vt[kSpan];
  std::vector<Acc> dk[kSpan], dv[kSpan];
  std::vector<uint8_t> keep;
  TileRows<Tile> rows;
  KvTileRows kv;
  // Per task, (seqlen_q * group) rows: pointers into the task's own buffers (not kept across
  // calls, since their size follows the sequence length).
  Acc* dq = nullptr;
  Acc* lse = nullptr;
  Acc* dsum = nullptr;

  void ensure(int dpad) {
    grow_to(qs, kBlockM * dpad);
    grow_to(dout, kBlockM * dpad);
    grow_to(s, kBlockM * kBlockN);
    grow_to(tanh_s, kBlockM * kBlockN);
    grow_to(dp, kBlockM * kBlockN);
    grow_to(pt, kBlockN * kBlockM);
    grow_to(dst, kBlockN * kBlockM);
    for (int u = 0; u < kSpan; ++u) {
      grow_to(kt[u], dpad * kBlockN);
      grow_to(ks[u], kBlockN * dpad);
      grow_to(vt[u], dpad * kBlockN);
      grow_to(dk[u], kBlockN * dpad);
      grow_to(dv[u], kBlockN * dpad);
    }
    grow_to(prod, (kBlockM > kBlockN ? kBlockM : kBlockN) * dpad);
    grow_to(keep, kBlockM * kBlockN);
  }
};

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

// lse of every packed row of the task, recomputed in Acc with the forward's online softmax.
template <typename T>
void recompute_lse(const AttnCtx<T>& c, const SeqInfo& s, const Mask& mask, int b, int hk,
                   BwdScratch<T>& sc) {
  using Tile = tile_t<T>;
  using Acc = acc_t<T>;
  const int packed = s.seqlen_q * c.pr.group;
  for (int pr0 = 0; pr0 < packed; pr0 += kBlockM) {
    const int nrows = packed - pr0 < kBlockM ? packed - pr0 : kBlockM;
    make_tile_rows(c, b, hk, pr0, nrows, &sc.rows);
    load_rows(c.q() + s.q_off, c.p.q_row_stride, c.p.q_head_stride, sc.rows, c.pr.d, c.pr.dpad,
              c.scale, sc.qs.data());
    SoftmaxState<Acc> state[kBlockM];
    for (int r = 0; r < nrows; ++r) state[r] = SoftmaxState<Acc>::empty();
    int nb, ne;
    mask.kv_range(sc.rows.i_first, sc.rows.i_last + 1, &nb, &ne);
    for (int n0 = nb; n0 < ne; n0 += kBlockN) {
      const int n = ne - n0 < kBlockN ? ne - n0 : kBlockN;
      kv_row_offsets(c.p, s, n0, n, sc.kv.k, sc.kv.v);
      load_k_transposed(c, sc.kv, hk, n, sc.kt[0].data());
      compute_scores(c, mask, sc.rows, sc.qs.data(), sc.kt[0].data(), n0, n, sc.s.data(),
                     static_cast<Tile*>(nullptr));
      for (int r = 0; r < nrows; ++r) {
        Tile* srow = sc.s.data() + r * kBlockN;
        for (int j = n; j < pad_up(n); ++j) srow[j] = -static_cast<Tile>(INFINITY);
        state[r].rescale(row_max(srow, pad_up(n)));
        state[r].add(exp_row(srow, pad_up(n), static_cast<Tile>(state[r].offset())));
      }
    }
    for (int r = 0; r < nrows; ++r) sc.lse[pr0 + r] = state[r].lse();
  }
}

// One (key tile u of the step, query tile at packed row pr0) pair: recompute S and P, then
// dV_u += (P o Z)^T dO, dQ += dS K_u, dK_u += dS^T (scale Q), Q/dO already in sc.qs/sc.dout.
template <typename T>
void bwd_tile_pair(const AttnCtx<T>& c, const Mask& mask, BwdScratch<T>& sc, int u, int n0, int n,
                   int pr0, int nrows) {
  using Tile = tile_t<T>;
  using Acc = acc_t<T>;
  const int d = c.pr.d, dpad = c.pr.dpad;
  const Tile ninf = -static_cast<Tile>(INFINITY);
  const TileRows<Tile>& rows = sc.rows;
  // S = Q K^T, then P = exp(S - lse)
  compute_scores(c, mask, rows, sc.qs.data(), sc.kt[u].data(), n0, n, sc.s.data(),
                 c.has_softcap ? sc.tanh_s.data() : static_cast<Tile*>(nullptr));
  for (int r = 0; r < nrows; ++r) {
    Tile* srow = sc.s.data() + r * kBlockN;
    for (int j = n; j < pad_up(n); ++j) srow[j] = ninf;
    // masked -inf, and rows with lse = +inf, give 0
    exp_row(srow, pad_up(n), static_cast<Tile>(sc.lse[pr0 + r]));
  }
  if (c.has_dropout) dropout_keep_tile(c, rows, n0, n, sc.keep.data());
  // dV += (P o Z)^T dO, with Z = keep * keep_scale
  for (int r = 0; r < nrows; ++r)
    for (int j = 0; j < n; ++j) {
      Tile pz = sc.s[r * kBlockN + j];
      if (c.has_dropout)
        pz = sc.keep[r * kBlockN + j] ? static_cast<Tile>(pz * c.keep_scale) : Tile(0);
      sc.pt[j * kBlockM + r] = pz;
    }
  gemm_add(sc.pt.data(), kBlockM, sc.dout.data(), dpad, sc.dv[u].data(), dpad, sc.prod.data(), n,
           nrows, dpad);
  // dP = (dO V^T) o Z
  gemm(sc.dout.data(), dpad, sc.vt[u].data(), kBlockN, sc.dp.data(), kBlockN, nrows, d,
       pad_up(n), /*accumulate=*/false);
  // dS = P o (dP - D), o (1 - tanh^2) under softcap; kept in dp
  for (int r = 0; r < nrows; ++r) {
    const Tile dsum = static_cast<Tile>(sc.dsum[pr0 + r]);
    const Tile* prow = sc.s.data() + r * kBlockN;
    Tile* dprow = sc.dp.data() + r * kBlockN;
    for (int j = 0; j < n; ++j) {
      Tile dpz = dprow[j];
      if (c.has_dropout)
        dpz = sc.keep[r * kBlockN + j] ? static_cast<Tile>(dpz * c.keep_scale) : Tile(0);
      Tile ds = prow[j] * (dpz - dsum);
      if (c.has_softcap) {
        const Tile t = sc.tanh_s[r * kBlockN + j];
        ds *= Tile(1) - t * t;
      }
      dprow[j] = ds;
    }
  }
  // dQ += dS K (softmax_scale applied once when dQ is written)
  Acc* dq_tile = sc.dq + static_cast<int64_t>(pr0) * dpad;
  gemm_add(sc.dp.data(), kBlockN, sc.ks[u].data(), dpad, dq_tile, dpad, sc.prod.data(), nrows, n,
           dpad);
  // dK += dS^T (scale Q)
  transpose(sc.dp.data(), kBlockN, sc.dst.data(), kBlockM, nrows, n);
  gemm_add(sc.dst.data(), kBlockM, sc.qs.data(), dpad, sc.dk[u].data(), dpad, sc.prod.data(), n,
           nrows, dpad);
}

template <typename T>
void bwd_task(const AttnCtx<T>& c, const BwdParams& p, int b, int hk, BwdScratch<T>& sc) {
  using Tile = tile_t<T>;
  using Acc = acc_t<T>;
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
      acc += Acc(Traits<T>::load(dorow[col])) * Acc(Traits<T>::load(orow[col]));
    sc.dsum[pi] = acc;
    sc.lse[pi] = static_cast<Acc>(p.softmax_lse_ptr[s.lse_off + h * c.pr.lse_head_stride + i]);
  }
  // fp64 inputs recompute lse at fp64: the saved lse is fp32, and its rounding (~1e-7 relative
  // in P) would be the largest error of their gradients. fp32 inputs have fp32 tiles, whose
  // logits carry that error anyway.
  if (sizeof(Tile) > sizeof(float)) recompute_lse(c, s, mask, b, hk, sc);

  T* dk_out = static_cast<T*>(p.dk_ptr) + off.dk + hk * p.dk_head_stride;
  T* dv_out = static_cast<T*>(p.dv_ptr) + off.dv + hk * p.dv_head_stride;
  const T* kbase = c.k() + off.k + hk * p.k_head_stride;
  const T* vbase = c.v() + off.v + hk * p.v_head_stride;

  // Steps of kSpan key tiles; query tiles on the grid of multiples of kBlockM (rows of a query
  // tile that see no key of a key tile contribute exact zeros), so the span changes no rounding.
  for (int g0 = 0; g0 < s.seqlen_k; g0 += kSpan * kBlockN) {
    int span = 0, ib[kSpan], ie[kSpan], ib_all = s.seqlen_q, ie_all = 0;
    for (int n0 = g0; n0 < s.seqlen_k && span < kSpan; n0 += kBlockN, ++span) {
      const int u = span;
      const int n = s.seqlen_k - n0 < kBlockN ? s.seqlen_k - n0 : kBlockN;
      for (int e = 0; e < n * dpad; ++e) sc.dk[u][e] = sc.dv[u][e] = Acc(0);
      mask.q_range(n0, n0 + n, &ib[u], &ie[u]);
      if (ib[u] >= ie[u]) continue;
      ib_all = ib[u] < ib_all ? ib[u] : ib_all;
      ie_all = ie[u] > ie_all ? ie[u] : ie_all;
      // K tile row-major (for dQ) and transposed (for S), V transposed (for dP).
      for (int j = 0; j < n; ++j) {
        sc.kv.k[j] = static_cast<int64_t>(n0 + j) * p.k_row_stride;
        sc.kv.v[j] = static_cast<int64_t>(n0 + j) * p.v_row_stride;
      }
      load_kv_rows(kbase, sc.kv.k, n, d, dpad, sc.ks[u].data());
      transpose(sc.ks[u].data(), dpad, sc.kt[u].data(), kBlockN, n, d);
      for (int j = 0; j < n; ++j) {
        const T* src = vbase + sc.kv.v[j];
        for (int col = 0; col < d; ++col) sc.vt[u][col * kBlockN + j] = Traits<T>::load(src[col]);
      }
    }
    const int packed_end = ie_all * group;
    for (int pr0 = ib_all * group / kBlockM * kBlockM; pr0 < packed_end; pr0 += kBlockM) {
      const int nrows = packed_end - pr0 < kBlockM ? packed_end - pr0 : kBlockM;
      TileRows<Tile>& rows = sc.rows;
      make_tile_rows(c, b, hk, pr0, nrows, &rows);
      load_rows(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, rows, d, dpad, c.scale,
                sc.qs.data());
      load_rows(dout, p.do_row_stride, p.do_head_stride, rows, d, dpad, Tile(1), sc.dout.data());
      for (int u = 0; u < span; ++u) {
        if (rows.i_last < ib[u] || rows.i_first >= ie[u]) continue;  // sees no key of tile u
        const int n0 = g0 + u * kBlockN;
        const int n = s.seqlen_k - n0 < kBlockN ? s.seqlen_k - n0 : kBlockN;
        bwd_tile_pair(c, mask, sc, u, n0, n, pr0, nrows);
      }
    }
    for (int u = 0; u < span; ++u) {
      const int n0 = g0 + u * kBlockN;
      const int n = s.seqlen_k - n0 < kBlockN ? s.seqlen_k - n0 : kBlockN;
      for (int j = 0; j < n; ++j) {
        T* dkrow = dk_out + static_cast<int64_t>(n0 + j) * p.dk_row_stride;
        T* dvrow = dv_out + static_cast<int64_t>(n0 + j) * p.dv_row_stride;
        for (int col = 0; col < d; ++col) {
          dkrow[col] = Traits<T>::store(sc.dk[u][j * dpad + col]);
          dvrow[col] = Traits<T>::store(sc.dv[u][j * dpad + col]);
        }
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
