// Owns: run_bwd_amx, the bf16 backward on AMX tiles (amx_cpu.h). Same phases, tasks, key splits
// and contracts as flash_bwd_cpu.cpp (D and lse per query tile; per sequence, K/V head and key
// split: dK/dV of its keys and its share of dQ in its own fp32 buffer; dQ = the splits' sum), with
// the five products of a (key tile, query tile) on the tile unit, bf16 operands and fp32
// accumulation:
//
//   S    = Q K^T       A = Q rows as stored,      B = K^T pairs (per key tile)
//   dP   = dO V^T      A = dO rows as stored,     B = V^T pairs (per key tile)
//   dV^T += dO^T (P Z) A = dO^T (per task),       B = bf16(P Z) in pair rows
//   dK^T += Q^T dS     A = Q^T (per task),        B = bf16(dS) in pair rows
//   dQ   += dS K       A = bf16(dS) rows,         B = K pairs (per key tile)
//
// (Z = keep / (1 - p) under dropout.) dK and dV are accumulated transposed (one key per column),
// so that P and dS serve as B operands packed along the query rows (no transposition of a tile of
// probabilities per step), and transposed once when the key tile is written. S is the forward's
// product (flash_fwd_amx_cpu.cpp: the same operands, the same depth chunks), so the logits are
// bitwise the forward's; P = exp(scale * S - lse) (amx_exp_rows).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "amx_cpu.h"
#include "attn_tile_cpu.h"
#include "bwd_tile_cpu.h"
#include "flash_amx_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

using T = BFloat16;

inline int pad32(int n) { return (n + 31) / 32 * 32; }

struct AmxBwdScratch {
  // Per task, for each of its query tiles: Q and dO rows [kBlockM][d32] and transposed
  // [dpad][kBlockM] (bf16 bits), and the tile's rows.
  Scratch<uint16_t> qb, qt, dob, dot;
  std::vector<TileRows<float>> rows;
  // Per key tile: K and V rows, K^T and V^T pairs, K pairs; dK^T and dV^T [dpad][kBlockN].
  Scratch<uint16_t> kraw, vraw, kt, vt, kp;
  Scratch<float> dkt, dvt;
  // Per (key tile, query tile): S / P, dP / dS, tanh (softcap), P Z; bf16 operands.
  Scratch<float> s, dp, tanh_s, pz;
  Scratch<uint16_t> pp, dsb, dsp;
  Scratch<uint8_t> keep;
  Scratch<float> dq_own;  // the task's dQ rows when keys are not split
  KvTileRows kv;

  void ensure(int d32, int dpad) {
    grow_to(kraw, kBlockN * d32);
    grow_to(vraw, kBlockN * d32);
    for (auto* x : {&kt, &vt}) grow_to(*x, d32 / 2 * 2 * kBlockN);
    grow_to(kp, kBlockN / 2 * 2 * dpad);
    for (auto* x : {&dkt, &dvt}) grow_to(*x, dpad * kBlockN);
    for (auto* x : {&s, &dp, &tanh_s, &pz}) grow_to(*x, kBlockM * kBlockN);
    for (auto* x : {&pp, &dsb, &dsp}) grow_to(*x, kBlockM * kBlockN);
    grow_to(keep, kBlockM * kBlockN);
  }
};

// The rows of one query tile as A operands: row-major [kBlockM][d32] and transposed
// [dpad][kBlockM], zero outside the tile's rows and the head dim.
void load_tile_operands(const T* base, int64_t row_stride, int64_t head_stride,
                        const TileRows<float>& rows, int d, int d32, int dpad, uint16_t* rm,
                        uint16_t* tr) {
  std::memset(rm, 0, sizeof(uint16_t) * kBlockM * d32);
  std::memset(tr, 0, sizeof(uint16_t) * dpad * kBlockM);
  for (int r = 0; r < rows.n; ++r) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(base + rows.i[r] * row_stride +
                                                            rows.h[r] * head_stride);
    std::memcpy(rm + r * d32, src, sizeof(uint16_t) * d);
    for (int col = 0; col < d; ++col) tr[col * kBlockM + r] = src[col];
  }
}

// Phase 2, keys [k_begin, k_end) of (b, hk): dK, dV of those keys and their share of dQ
// (unscaled, fp32) in dq, rows padded to whole query tiles, written by this task alone.
void bwd_task(const AttnCtx<T>& c, const BwdParams& p, int b, int hk, int k_begin, int k_end,
              const float* lse, const float* dsum, float* dq, AmxBwdScratch& sc) {
  const SeqInfo& s = c.pr.seqs[b];
  const BwdOffsets off = bwd_offsets(p, b);
  const int d = c.pr.d, dpad = c.pr.dpad, d32 = pad32(d), group = c.pr.group;
  const int packed = s.seqlen_q * group;
  const int ntiles_q = (packed + kBlockM - 1) / kBlockM;
  const Mask mask(s.seqlen_q, s.seqlen_k, p.window_left, p.window_right);
  const T* dout = static_cast<const T*>(p.do_ptr) + off.dout;
  std::fill(dq, dq + static_cast<int64_t>(ntiles_q) * kBlockM * dpad, 0.f);
  T* dk_out = static_cast<T*>(p.dk_ptr) + off.dk + hk * p.dk_head_stride;
  T* dv_out = static_cast<T*>(p.dv_ptr) + off.dv + hk * p.dv_head_stride;
  const T* kbase = c.k() + off.k + hk * p.k_head_stride;
  const T* vbase = c.v() + off.v + hk * p.v_head_stride;
  // Without softcap or ALiBi the scale is applied inside the exponential (exp(scale * s - lse));
  // with them the logits are formed first (apply_score_mods works on final logits).
  const bool prescale = c.has_softcap || c.has_alibi || !(c.scale > 0.f);
  const float sm_scale = prescale ? 1.f : c.scale;

  int qb, qe;
  mask.q_range(k_begin, k_end, &qb, &qe);
  const int t_first = qb * group / kBlockM;
  const int t_end = (qe * group + kBlockM - 1) / kBlockM;
  if (t_first < t_end) {
    const size_t tiles = static_cast<size_t>(t_end - t_first);
    for (auto* x : {&sc.qb, &sc.dob}) grow_to(*x, tiles * kBlockM * d32);
    for (auto* x : {&sc.qt, &sc.dot}) grow_to(*x, tiles * dpad * kBlockM);
    grow_to(sc.rows, tiles);
  }
  for (int t = t_first; t < t_end; ++t) {
    const int pr0 = t * kBlockM;
    const int nrows = std::min(kBlockM, packed - pr0);
    const size_t at_r = static_cast<size_t>(t - t_first) * kBlockM * d32;
    const size_t at_t = static_cast<size_t>(t - t_first) * dpad * kBlockM;
    TileRows<float>& rows = sc.rows[t - t_first];
    make_tile_rows(c, b, hk, pr0, nrows, &rows);
    load_tile_operands(c.q() + s.q_off, p.q_row_stride, p.q_head_stride, rows, d, d32, dpad,
                       sc.qb.data() + at_r, sc.qt.data() + at_t);
    load_tile_operands(dout, p.do_row_stride, p.do_head_stride, rows, d, d32, dpad,
                       sc.dob.data() + at_r, sc.dot.data() + at_t);
  }

  for (int n0 = k_begin; n0 < k_end; n0 += kBlockN) {
    const int n = std::min(kBlockN, k_end - n0);
    const int n16 = pad_up(n), n32 = pad32(n);
    std::fill(sc.dkt.begin(), sc.dkt.begin() + dpad * kBlockN, 0.f);
    std::fill(sc.dvt.begin(), sc.dvt.begin() + dpad * kBlockN, 0.f);
    int ib, ie;
    mask.q_range(n0, n0 + n, &ib, &ie);
    if (ib < ie) {
      for (int j = 0; j < n; ++j) {
        const uint16_t* ksrc = reinterpret_cast<const uint16_t*>(
            kbase + static_cast<int64_t>(n0 + j) * p.k_row_stride);
        const uint16_t* vsrc = reinterpret_cast<const uint16_t*>(
            vbase + static_cast<int64_t>(n0 + j) * p.v_row_stride);
        uint16_t* kdst = sc.kraw.data() + j * d32;
        uint16_t* vdst = sc.vraw.data() + j * d32;
        std::memcpy(kdst, ksrc, sizeof(uint16_t) * d);
        std::memcpy(vdst, vsrc, sizeof(uint16_t) * d);
        std::memset(kdst + d, 0, sizeof(uint16_t) * (d32 - d));
        std::memset(vdst + d, 0, sizeof(uint16_t) * (d32 - d));
      }
      amx_pack_transposed(sc.kraw.data(), d32, n, n16, d32, sc.kt.data(), 2 * kBlockN);
      amx_pack_transposed(sc.vraw.data(), d32, n, n16, d32, sc.vt.data(), 2 * kBlockN);
      amx_pack_pairs(sc.kraw.data(), d32, n, n32, dpad, sc.kp.data(), 2 * dpad);
    }
    // The next key tile's rows, prefetched in shares between this tile's query tiles.
    const int n_next = n0 + kBlockN < k_end ? std::min(kBlockN, k_end - n0 - kBlockN) : 0;
    const int pr_first = ib * group / kBlockM * kBlockM;
    const int nq = ie * group > pr_first ? (ie * group - pr_first + kBlockM - 1) / kBlockM : 0;
    for (int pr0 = pr_first; pr0 < ie * group; pr0 += kBlockM) {
      prefetch_kv_share(kbase, vbase, p.k_row_stride, p.v_row_stride, n0 + kBlockN, n_next, nq,
                        (pr0 - pr_first) / kBlockM, d);
      const int nrows = std::min(kBlockM, packed - pr0);
      const int mt = pad_up(nrows), mt32 = pad32(nrows);
      const int tile = pr0 / kBlockM - t_first;
      const TileRows<float>& rows = sc.rows[tile];
      const uint16_t* qb_t = sc.qb.data() + static_cast<size_t>(tile) * kBlockM * d32;
      const uint16_t* qt_t = sc.qt.data() + static_cast<size_t>(tile) * dpad * kBlockM;
      const uint16_t* dob_t = sc.dob.data() + static_cast<size_t>(tile) * kBlockM * d32;
      const uint16_t* dot_t = sc.dot.data() + static_cast<size_t>(tile) * dpad * kBlockM;
      float* S = sc.s.data();
      // S, then P = exp(scale * S - lse) in place (0 past n and for empty rows)
      amx_gemm(qb_t, d32, sc.kt.data(), 2 * kBlockN, S, kBlockN, mt, n16, d32, false);
      if (prescale)
        for (int r = 0; r < nrows; ++r)
          for (int j = 0; j < n; ++j) S[r * kBlockN + j] *= c.scale;
      apply_score_mods(c, mask, rows, n0, n, S, kBlockN, 1,
                       c.has_softcap ? sc.tanh_s.data() : static_cast<float*>(nullptr));
      amx_exp_rows(S, kBlockN, nrows, n, n16, sm_scale, lse + pr0, S, kBlockN);
      // dV^T += dO^T (P Z)
      const float* pz = S;
      const uint8_t* keep = nullptr;
      if (c.has_dropout) {
        dropout_keep_tile(c, rows, n0, n, sc.keep.data());
        keep = sc.keep.data();
        for (int r = 0; r < nrows; ++r)
          for (int j = 0; j < n16; ++j)
            sc.pz[r * kBlockN + j] =
                j < n && keep[r * kBlockN + j] ? S[r * kBlockN + j] * c.keep_scale : 0.f;
        pz = sc.pz.data();
      }
      amx_pack_pairs(pz, kBlockN, nrows, mt32, n16, sc.pp.data(), 2 * kBlockN);
      amx_gemm(dot_t, kBlockM, sc.pp.data(), 2 * kBlockN, sc.dvt.data(), kBlockN, dpad, n16,
               mt32, true);
      // dP = dO V^T, then dS = P (dP Z - D) (1 - tanh^2) in dp
      float* dP = sc.dp.data();
      amx_gemm(dob_t, d32, sc.vt.data(), 2 * kBlockN, dP, kBlockN, mt, n16, d32, false);
      amx_ds_tile(S, dP, kBlockN, nrows, mt, n16, dsum + pr0, keep, kBlockN, c.keep_scale,
                  c.has_softcap ? sc.tanh_s.data() : static_cast<const float*>(nullptr));
      // dQ += dS K, dK^T += Q^T dS
      amx_to_bf16(dP, kBlockN, mt, n, n32, sc.dsb.data(), kBlockN);
      amx_gemm(sc.dsb.data(), kBlockN, sc.kp.data(), 2 * dpad,
               dq + static_cast<int64_t>(pr0) * dpad, dpad, mt, dpad, n32, true);
      amx_pack_pairs(dP, kBlockN, nrows, mt32, n16, sc.dsp.data(), 2 * kBlockN);
      amx_gemm(qt_t, kBlockM, sc.dsp.data(), 2 * kBlockN, sc.dkt.data(), kBlockN, dpad, n16,
               mt32, true);
    }
    for (int j = 0; j < n; ++j) {
      T* dkrow = dk_out + static_cast<int64_t>(n0 + j) * p.dk_row_stride;
      T* dvrow = dv_out + static_cast<int64_t>(n0 + j) * p.dv_row_stride;
      for (int col = 0; col < d; ++col) {
        dkrow[col] = Traits<T>::store(sc.dkt[col * kBlockN + j] * c.scale);
        dvrow[col] = Traits<T>::store(sc.dvt[col * kBlockN + j]);
      }
    }
  }
  if (k_end == s.seqlen_k) {  // keys the sequence owns but does not use (seqused_k)
    for (int j = s.seqlen_k; j < s.seqlen_k_rows; ++j) {
      T* dkrow = dk_out + static_cast<int64_t>(j) * p.dk_row_stride;
      T* dvrow = dv_out + static_cast<int64_t>(j) * p.dv_row_stride;
      for (int col = 0; col < d; ++col) dkrow[col] = dvrow[col] = Traits<T>::store(0.f);
    }
  }
}

}  // namespace

bool amx_bwd_applies(const BwdParams& p) { return p.dtype == DType::kBFloat16 && amx_usable(); }

void run_bwd_amx(const BwdParams& p, const Problem& pr) {
  const AttnCtx<T> c(p, pr);
  const int64_t pairs = static_cast<int64_t>(pr.batch) * pr.nheads_k;
  // Per sequence: first packed row (K/V head 0) in the row buffers, each (sequence, K/V head)
  // padded to whole query tiles (the dQ product writes whole tiles), and first query-tile task.
  std::vector<int64_t> row0(pr.batch + 1, 0), tile0(pr.batch + 1, 0);
  int max_key_tiles = 1;
  for (int b = 0; b < pr.batch; ++b) {
    const int64_t tiles = (static_cast<int64_t>(pr.seqs[b].seqlen_q) * pr.group + kBlockM - 1) /
                          kBlockM;
    row0[b + 1] = row0[b] + tiles * kBlockM * pr.nheads_k;
    tile0[b + 1] = tile0[b] + tiles * pr.nheads_k;
    max_key_tiles = std::max(max_key_tiles, (pr.seqs[b].seqlen_k + kBlockN - 1) / kBlockN);
  }
  const int64_t rows = row0[pr.batch];
  const int nsplit = bwd_key_splits(pr, pairs, max_key_tiles);
  Scratch<float> stats(2 * static_cast<size_t>(rows));
  // Shared by the splits when keys are split, else each task's own (thread-local, grow-only:
  // flash_bwd_cpu.cpp) and the task writes dQ itself.
  Scratch<float> dq(nsplit > 1 ? static_cast<size_t>(nsplit) * rows * pr.dpad : 0);
  float* lse = stats.data();
  float* dsum = stats.data() + rows;
  const int64_t split_stride = rows * pr.dpad;
  auto first_row = [&](int b, int hk) {
    return row0[b] + (row0[b + 1] - row0[b]) / pr.nheads_k * hk;
  };
  auto tile_task = [&](int64_t t, int* b, int* hk, int* m_block) {
    *b = static_cast<int>(std::upper_bound(tile0.begin(), tile0.end(), t) - tile0.begin() - 1);
    const int64_t nblocks = (tile0[*b + 1] - tile0[*b]) / pr.nheads_k;
    const int64_t local = t - tile0[*b];
    *hk = static_cast<int>(local / nblocks);
    *m_block = static_cast<int>(local % nblocks);
  };
  parallel_tasks(tile0[pr.batch], pr.work, [&](int64_t t) {
    int b, hk, m_block;
    tile_task(t, &b, &hk, &m_block);
    const int64_t r0 = first_row(b, hk);
    bwd_stats_tile<T, double>(c, p, b, hk, m_block, lse + r0, dsum + r0);  // D summed in fp64
  });
  parallel_tasks(pairs * nsplit, pr.work, [&](int64_t t) {
    AmxBwdScratch& sc = thread_scratch<AmxBwdScratch>();
    sc.ensure(pad32(pr.d), pr.dpad);
    const int split = static_cast<int>(t % nsplit);
    const int b = static_cast<int>(t / nsplit / pr.nheads_k);
    const int hk = static_cast<int>(t / nsplit % pr.nheads_k);
    const int seqlen_k = pr.seqs[b].seqlen_k;
    const int chunk = ((seqlen_k + nsplit - 1) / nsplit + kBlockN - 1) / kBlockN * kBlockN;
    const int k_begin = std::min(seqlen_k, split * chunk);
    const int k_end = split == nsplit - 1 ? seqlen_k : std::min(seqlen_k, k_begin + chunk);
    const int64_t r0 = first_row(b, hk);
    float* dq_task = dq.data() + split * split_stride + r0 * pr.dpad;
    if (nsplit == 1) {
      grow_to(sc.dq_own, static_cast<size_t>(row0[b + 1] - row0[b]) / pr.nheads_k * pr.dpad);
      dq_task = sc.dq_own.data();
    }
    amx_begin();
    bwd_task(c, p, b, hk, k_begin, k_end, lse + r0, dsum + r0, dq_task, sc);
    amx_end();
    if (nsplit == 1)
      for (int m_block = 0; m_block * kBlockM < pr.seqs[b].seqlen_q * pr.group; ++m_block)
        bwd_write_dq<T>(c, p, b, hk, m_block, dq_task, 0, 1);
  });
  if (nsplit == 1) return;
  parallel_tasks(tile0[pr.batch], pr.work, [&](int64_t t) {
    int b, hk, m_block;
    tile_task(t, &b, &hk, &m_block);
    bwd_write_dq<T>(c, p, b, hk, m_block, dq.data() + first_row(b, hk) * pr.dpad, split_stride,
                    nsplit);
  });
}

}  // namespace cpu
FLASH_NAMESPACE_END
