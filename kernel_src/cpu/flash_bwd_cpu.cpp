// Owns: run_bwd_cpu, the CPU backward. Exact gradients by recomputation (FA2 algorithm 2):
// P = exp(S - lse) is rebuilt from the lse and out it is given, never from an lse recomputed
// from K/V (a caller may hand the out/lse of a longer key sequence, as ring attention does for
// each K/V block), the dropout mask is regenerated from the same Philox stream,
// D = rowsum(dO * O) (also returned, softmax_d), dS = P * (dP - D), softcap's chain rule
// dS *= 1 - tanh^2. fp64 inputs get an fp64 lse from the autograd path (params.h), so gradcheck
// sees the exact gradient of the fp64 forward. dQ/dK/dV are written through their own strides
// (views of one packed gradient work).
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

#include "attn_tile_cpu.h"
#include "flash_api_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

template <typename T>
struct BwdScratch {
  using Acc = acc_t<T>;
  // Tiles (thread-local, reused across calls).
  std::vector<Acc> qs, dout, kt, ks, vt, s, tanh_s, dp, pt, dst, dk, dv;
  std::vector<uint8_t> keep;
  TileRows<Acc> rows;
  KvTileRows kv;
  // Per task, (seqlen_q * group) rows: pointers into the task's own buffers (not kept across
  // calls, since their size follows the sequence length).
  Acc* dq = nullptr;
  Acc* lse = nullptr;
  Acc* dsum = nullptr;

  void ensure(int dpad) {
    grow_to(qs, kBlockM * dpad);
    grow_to(dout, kBlockM * dpad);
    grow_to(kt, dpad * kBlockN);
    grow_to(ks, kBlockN * dpad);
    grow_to(vt, dpad * kBlockN);
    grow_to(s, kBlockM * kBlockN);
    grow_to(tanh_s, kBlockM * kBlockN);
    grow_to(dp, kBlockM * kBlockN);
    grow_to(pt, kBlockN * kBlockM);
    grow_to(dst, kBlockN * kBlockM);
    grow_to(dk, kBlockN * dpad);
    grow_to(dv, kBlockN * dpad);
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

template <typename T>
void bwd_task(const AttnCtx<T>& c, const BwdParams& p, int b, int hk, BwdScratch<T>& sc) {
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

  // D = rowsum(dO * O) (also written out as softmax_d) and the given lse of every row of the
  // group.
  for (int pi = 0; pi < packed; ++pi) {
    const int i = pi / group, h = hk * group + pi % group;
    const T* dorow = dout + i * p.do_row_stride + h * p.do_head_stride;
    const T* orow = out + i * p.o_row_stride + h * p.o_head_stride;
    Acc acc = Acc(0);
    for (int col = 0; col < d; ++col)
      acc += Traits<T>::load(dorow[col]) * Traits<T>::load(orow[col]);
    sc.dsum[pi] = acc;
    const int64_t lse_idx = s.lse_off + h * c.pr.lse_head_stride + i;
    if (p.dsoftmax_sum_ptr != nullptr) p.dsoftmax_sum_ptr[lse_idx] = static_cast<float>(acc);
    sc.lse[pi] = p.softmax_lse_f64_ptr != nullptr
                     ? static_cast<Acc>(p.softmax_lse_f64_ptr[lse_idx])
                     : static_cast<Acc>(p.softmax_lse_ptr[lse_idx]);
  }

  T* dk_out = static_cast<T*>(p.dk_ptr) + off.dk + hk * p.dk_head_stride;
  T* dv_out = static_cast<T*>(p.dv_ptr) + off.dv + hk * p.dv_head_stride;
  const T* kbase = c.k() + off.k + hk * p.k_head_stride;
  const T* vbase = c.v() + off.v + hk * p.v_head_stride;
  const Acc ninf = -static_cast<Acc>(INFINITY);

  for (int n0 = 0; n0 < s.seqlen_k; n0 += kBlockN) {
    const int n = s.seqlen_k - n0 < kBlockN ? s.seqlen_k - n0 : kBlockN;
    for (int e = 0; e < n * dpad; ++e) sc.dk[e] = sc.dv[e] = Acc(0);
    int ib, ie;
    mask.q_range(n0, n0 + n, &ib, &ie);
    if (ib < ie) {
      // K tile row-major (for dQ) and transposed (for S), V transposed (for dP).
      for (int j = 0; j < n; ++j) {
        sc.kv.k[j] = static_cast<int64_t>(n0 + j) * p.k_row_stride;
        sc.kv.v[j] = static_cast<int64_t>(n0 + j) * p.v_row_stride;
      }
      load_kv_rows(kbase, sc.kv.k, n, d, dpad, sc.ks.data());
      transpose(sc.ks.data(), dpad, sc.kt.data(), kBlockN, n, d);
      for (int j = 0; j < n; ++j) {
        const T* src = vbase + sc.kv.v[j];
        for (int col = 0; col < d; ++col) sc.vt[col * kBlockN + j] = Traits<T>::load(src[col]);
      }
    }
    for (int pr0 = ib * group; pr0 < ie * group; pr0 += kBlockM) {
      const int nrows = ie * group - pr0 < kBlockM ? ie * group - pr0 : kBlockM;
      TileRows<Acc>& rows = sc.rows;
      make_tile_rows(c, b, hk, pr0, nrows, &rows);
      load_rows(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, rows, d, dpad, c.scale,
                sc.qs.data());
      load_rows(dout, p.do_row_stride, p.do_head_stride, rows, d, dpad, Acc(1), sc.dout.data());
      // S = Q K^T, then P = exp(S - lse)
      compute_scores(c, mask, rows, sc.qs.data(), sc.kt.data(), n0, n, sc.s.data(),
                     c.has_softcap ? sc.tanh_s.data() : static_cast<Acc*>(nullptr));
      for (int r = 0; r < nrows; ++r) {
        Acc* srow = sc.s.data() + r * kBlockN;
        for (int j = n; j < pad_up(n); ++j) srow[j] = ninf;
        exp_row(srow, pad_up(n), sc.lse[pr0 + r]);  // masked -inf, and rows with lse = +inf, give 0
      }
      if (c.has_dropout) dropout_keep_tile(c, rows, n0, n, sc.keep.data());
      // dV += (P o Z)^T dO, with Z = keep * keep_scale
      for (int r = 0; r < nrows; ++r)
        for (int j = 0; j < n; ++j) {
          Acc pz = sc.s[r * kBlockN + j];
          if (c.has_dropout) pz = sc.keep[r * kBlockN + j] ? pz * c.keep_scale : Acc(0);
          sc.pt[j * kBlockM + r] = pz;
        }
      gemm(sc.pt.data(), kBlockM, sc.dout.data(), dpad, sc.dv.data(), dpad, n, nrows, dpad,
           /*accumulate=*/true);
      // dP = (dO V^T) o Z
      gemm(sc.dout.data(), dpad, sc.vt.data(), kBlockN, sc.dp.data(), kBlockN, nrows, d,
           pad_up(n), /*accumulate=*/false);
      // dS = P o (dP - D), o (1 - tanh^2) under softcap; kept in dp
      for (int r = 0; r < nrows; ++r) {
        const Acc dsum = sc.dsum[pr0 + r];
        const Acc* prow = sc.s.data() + r * kBlockN;
        Acc* dprow = sc.dp.data() + r * kBlockN;
        for (int j = 0; j < n; ++j) {
          Acc dpz = dprow[j];
          if (c.has_dropout) dpz = sc.keep[r * kBlockN + j] ? dpz * c.keep_scale : Acc(0);
          Acc ds = prow[j] * (dpz - dsum);
          if (c.has_softcap) {
            const Acc t = sc.tanh_s[r * kBlockN + j];
            ds *= Acc(1) - t * t;
          }
          dprow[j] = ds;
        }
      }
      // dQ += dS K (softmax_scale applied once when dQ is written)
      Acc* dq_tile = sc.dq + static_cast<int64_t>(pr0) * dpad;
      gemm(sc.dp.data(), kBlockN, sc.ks.data(), dpad, dq_tile, dpad, nrows, n, dpad,
           /*accumulate=*/true);
      // dK += dS^T (scale Q)
      transpose(sc.dp.data(), kBlockN, sc.dst.data(), kBlockM, nrows, n);
      gemm(sc.dst.data(), kBlockM, sc.qs.data(), dpad, sc.dk.data(), dpad, n, nrows, dpad,
           /*accumulate=*/true);
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
