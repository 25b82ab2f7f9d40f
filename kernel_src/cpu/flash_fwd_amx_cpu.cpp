// Owns: run_fwd_amx, the bf16 forward on AMX tiles (amx_cpu.h). The task structure is the fp32
// path's (flash_fwd_cpu.cpp: one task per sequence, K/V head and group of kTileGroup query tiles
// of packed GQA rows; each K/V tile loaded once for the group), but both products run on the
// tile unit with bf16 operands and fp32 accumulation, as on a GPU's tensor cores:
//
//   S = Q K^T   A = the query tile as stored (bf16 rows), B = K^T in pair rows (a transposition
//               of 32-bit pairs of the K tile, once per K/V tile);
//   O += P V    A = P rounded to bf16 (row-major, written by the softmax step), B = V in pair
//               rows (rows 2i and 2i+1 interleaved, once per K/V tile).
//
// The scores are row-major (one query per row), the softmax runs along rows (amx_softmax_tile:
// max, rescale factor, exponentials, row sums, O rescaled, P in bf16), and softmax_scale is
// applied to the fp32 products inside it (exp(scale * s - m), one FMA), not to Q, which stays as
// given. O and the row sums are fp32, as on the fp32 path for bf16 inputs.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "amx_cpu.h"
#include "attn_tile_cpu.h"
#include "flash_amx_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

using T = BFloat16;
constexpr int kTileGroup = 16;
// Keys per step: two kBlockN tiles, so that each P V product has a depth of 128 (its fp32 C tiles,
// the running O, are loaded and stored once per 128 keys) and the softmax's per-row work (max,
// rescale of O) is shared by 128 keys.
constexpr int kN = 2 * kBlockN;

inline int pad32(int n) { return (n + 31) / 32 * 32; }

struct AmxQueryTile {
  Scratch<uint16_t> q;  // [mt][d32] bf16 bits
  Scratch<float> o;     // [mt][dpad]
  Scratch<float> m, l;  // running max (-inf while empty) and sum, per row
  TileRows<float> rows;
  int nrows = 0, mt = 0, nb = 0, ne = 0;
};

struct AmxFwdScratch {
  AmxQueryTile tiles[kTileGroup];
  Scratch<uint16_t> kraw, vraw;  // the K/V rows of a step, [kN][d32] / [kN][dpad]
  Scratch<uint16_t> kt, vp;      // B operands: K^T [d32/2][2 kN], V [kN/2][2 dpad]
  Scratch<float> s;              // [kBlockM][kN]
  Scratch<uint16_t> p;           // [kBlockM][kN] bf16
  Scratch<uint8_t> keep, keep_half;  // [kBlockM][kN], one kBlockN tile's [kBlockM][kBlockN]
  KvTileRows kv[2], kv_next[2];

  void ensure(int d32, int dpad) {
    for (auto& t : tiles) {
      grow_to(t.q, kBlockM * d32);
      grow_to(t.o, kBlockM * dpad);
      grow_to(t.m, kBlockM);
      grow_to(t.l, kBlockM);
    }
    grow_to(kraw, kN * d32);
    grow_to(vraw, kN * dpad);
    grow_to(kt, d32 / 2 * 2 * kN);
    grow_to(vp, kN / 2 * 2 * dpad);
    grow_to(s, kBlockM * kN);
    grow_to(p, kBlockM * kN);
    grow_to(keep, kBlockM * kN);
    grow_to(keep_half, kBlockM * kBlockN);
  }
};

// dst[j][0..width) = the bf16 bits of row j (zero past d).
// Rows not prefetched before (a task's first step) arrive from memory: each copy prefetches the
// row kLoadAhead further on (attn_tile_cpu.h).
constexpr int64_t kZeroOffset = 0;
inline void copy_rows(const T* base, const int64_t* row_off, int n, int d, int width,
                      uint16_t* dst) {
  for (int j = 0; j < n; ++j) {
    if (j + kLoadAhead < n) prefetch_rows(base, row_off + j + kLoadAhead, 1, d);
    amx_copy_row(reinterpret_cast<const uint16_t*>(base + row_off[j]), d, width,
                 dst + static_cast<int64_t>(j) * width);
  }
}

// One step of n <= kN keys (operands in sc.kt / sc.vp) applied to one query tile.
void fwd_key_tile(const AttnCtx<T>& c, const Mask& mask, int n0, int n, int d32,
                  AmxQueryTile& q, AmxFwdScratch& sc) {
  const int dpad = c.pr.dpad;
  const int n16 = pad_up(n), n32 = pad32(n);
  float* s = sc.s.data();
  amx_gemm(q.q.data(), d32, sc.kt.data(), 2 * kN, s, kN, q.mt, n16, d32, false);
  // The logit is scale * s; softcap and ALiBi need it formed first, the mask alone does not
  // (it writes -inf), and a non-positive scale would reverse the max.
  float sm_scale = c.scale;
  if (c.has_softcap || c.has_alibi || !(c.scale > 0.f)) {
    for (int r = 0; r < q.nrows; ++r)
      for (int j = 0; j < n; ++j) s[r * kN + j] *= c.scale;
    sm_scale = 1.f;
  }
  apply_score_mods(c, mask, q.rows, n0, n, s, kN, 1, static_cast<float*>(nullptr));
  const uint8_t* keep = nullptr;
  if (c.has_dropout) {  // the keep tiles of the step's kBlockN tiles, side by side
    for (int h0 = 0; h0 < n; h0 += kBlockN) {
      const int nh = std::min(kBlockN, n - h0);
      dropout_keep_tile(c, q.rows, n0 + h0, nh, sc.keep_half.data());
      for (int r = 0; r < q.nrows; ++r)
        std::memcpy(sc.keep.data() + r * kN + h0, sc.keep_half.data() + r * kBlockN, nh);
    }
    keep = sc.keep.data();
  }
  amx_softmax_tile(s, kN, q.nrows, n, n32, sm_scale, q.m.data(), q.l.data(), q.o.data(), dpad,
                   dpad, keep, kN, sc.p.data(), kN);
  amx_gemm(sc.p.data(), kN, sc.vp.data(), 2 * dpad, q.o.data(), dpad, q.mt, dpad, n32, true);
}

void fwd_task(const AttnCtx<T>& c, int b, int hk, int pr0, AmxFwdScratch& sc) {
  const FwdParams& p = c.p;
  const SeqInfo& s = c.pr.seqs[b];
  const int d = c.pr.d, dpad = c.pr.dpad, d32 = pad32(d);
  const int packed = s.seqlen_q * c.pr.group;
  const Mask mask(s.seqlen_q, s.seqlen_k, p.window_left, p.window_right);
  int ntiles = 0, nb = s.seqlen_k, ne = 0;
  const T* qbase = c.q() + s.q_off;
  for (int r0 = pr0; r0 < packed && ntiles < kTileGroup; r0 += kBlockM, ++ntiles) {
    AmxQueryTile& q = sc.tiles[ntiles];
    q.nrows = packed - r0 < kBlockM ? packed - r0 : kBlockM;
    q.mt = pad_up(q.nrows);
    make_tile_rows(c, b, hk, r0, q.nrows, &q.rows);
    for (int r = 0; r < q.mt; ++r) {
      if (r + kLoadAhead < q.nrows)
        prefetch_rows(qbase + q.rows.i[r + kLoadAhead] * p.q_row_stride +
                          q.rows.h[r + kLoadAhead] * p.q_head_stride,
                      &kZeroOffset, 1, d);
      uint16_t* out = q.q.data() + r * d32;
      if (r < q.nrows)
        amx_copy_row(reinterpret_cast<const uint16_t*>(qbase + q.rows.i[r] * p.q_row_stride +
                                                       q.rows.h[r] * p.q_head_stride),
                     d, d32, out);
      else
        std::memset(out, 0, sizeof(uint16_t) * d32);
    }
    mask.kv_range(q.rows.i_first, q.rows.i_last + 1, &q.nb, &q.ne);
    if (q.nb < q.ne) {
      nb = std::min(nb, q.nb);
      ne = std::max(ne, q.ne);
    }
    std::fill(q.o.begin(), q.o.begin() + q.mt * dpad, 0.f);
    std::fill(q.m.begin(), q.m.begin() + q.mt, -INFINITY);
    std::fill(q.l.begin(), q.l.begin() + q.mt, 0.f);
  }

  const T* kbase = c.k() + hk * p.k_head_stride;
  const T* vbase = c.v() + hk * p.v_head_stride;
  for (int n0 = nb; n0 < ne; n0 += kN) {
    const int n = std::min(kN, ne - n0);
    for (int h0 = 0; h0 < n; h0 += kBlockN) {
      const int nh = std::min(kBlockN, n - h0);
      KvTileRows& kv = sc.kv[h0 / kBlockN];
      kv_row_offsets(p, s, n0 + h0, nh, kv.k, kv.v);
      copy_rows(kbase, kv.k, nh, d, d32, sc.kraw.data() + h0 * d32);
      copy_rows(vbase, kv.v, nh, d, dpad, sc.vraw.data() + h0 * dpad);
    }
    // The next step's rows, prefetched in shares between this step's query tiles (issued all
    // at once, the prefetches stalled on the line fill buffers: ~40% of the task's own time).
    int n_next = 0;
    for (int h0 = n0 + kN; h0 < std::min(ne, n0 + 2 * kN); h0 += kBlockN) {
      const int nh = std::min(kBlockN, ne - h0);
      KvTileRows& kv = sc.kv_next[(h0 - n0 - kN) / kBlockN];
      kv_row_offsets(p, s, h0, nh, kv.k, kv.v);
      n_next += nh;
    }
    amx_pack_transposed(sc.kraw.data(), d32, n, pad_up(n), d32, sc.kt.data(), 2 * kN);
    amx_pack_pairs(sc.vraw.data(), dpad, n, pad32(n), dpad, sc.vp.data(), 2 * dpad);
    const int share = (n_next + ntiles - 1) / ntiles;
    for (int g = 0; g < ntiles; ++g) {
      for (int j = g * share; j < std::min(n_next, (g + 1) * share); ++j) {
        const KvTileRows& kv = sc.kv_next[j / kBlockN];
        prefetch_rows(kbase, &kv.k[j % kBlockN], 1, d);
        prefetch_rows(vbase, &kv.v[j % kBlockN], 1, d);
      }
      AmxQueryTile& q = sc.tiles[g];
      if (n0 < q.ne && n0 + n > q.nb) fwd_key_tile(c, mask, n0, n, d32, q, sc);
    }
  }

  // epilogue: O /= row_sum (x keep_scale), lse; rows that saw no key get O = 0, lse = +inf
  T* out = static_cast<T*>(p.o_ptr) + s.o_off;
  for (int g = 0; g < ntiles; ++g) {
    AmxQueryTile& q = sc.tiles[g];
    for (int r = 0; r < q.nrows; ++r) {
      const float sum = q.l[r];
      const bool empty = !(sum > 0.f);
      const float inv = empty ? 0.f : 1.f / sum * (c.has_dropout ? c.keep_scale : 1.f);
      const float* orow = q.o.data() + r * dpad;
      T* dst = out + q.rows.i[r] * p.o_row_stride + q.rows.h[r] * p.o_head_stride;
      amx_store_bf16(orow, d, inv, reinterpret_cast<uint16_t*>(dst));
      const float lse = empty ? INFINITY : q.m[r] + std::log(sum);
      const int64_t lse_idx = s.lse_off + q.rows.h[r] * c.pr.lse_head_stride + q.rows.i[r];
      if (p.softmax_lse_f64_ptr != nullptr)
        p.softmax_lse_f64_ptr[lse_idx] = static_cast<double>(lse);
      else
        p.softmax_lse_ptr[lse_idx] = lse;
    }
  }
}

}  // namespace

bool amx_fwd_applies(const FwdParams& p) {
  return p.dtype == DType::kBFloat16 && p.p_ptr == nullptr && amx_usable();
}

void run_fwd_amx(const FwdParams& p, const Problem& pr) {
  const AttnCtx<T> c(p, pr);
  std::vector<int64_t> first_task(pr.batch + 1, 0);
  for (int b = 0; b < pr.batch; ++b) {
    const int64_t packed = static_cast<int64_t>(pr.seqs[b].seqlen_q) * pr.group;
    constexpr int rows = kTileGroup * kBlockM;
    first_task[b + 1] = first_task[b] + (packed + rows - 1) / rows * pr.nheads_k;
  }
  const int64_t ntasks = first_task[pr.batch];
  parallel_tasks(ntasks, pr.work, [&](int64_t t) {
    AmxFwdScratch& sc = thread_scratch<AmxFwdScratch>();
    sc.ensure(pad32(pr.d), pr.dpad);
    const int b = static_cast<int>(
        std::upper_bound(first_task.begin(), first_task.end(), t) - first_task.begin() - 1);
    const int64_t local = t - first_task[b];
    const int64_t nblocks = (first_task[b + 1] - first_task[b]) / pr.nheads_k;
    amx_begin();
    fwd_task(c, b, static_cast<int>(local / nblocks),
             static_cast<int>(nblocks - 1 - local % nblocks) * kTileGroup * kBlockM, sc);
    amx_end();
  });
}

}  // namespace cpu
FLASH_NAMESPACE_END
