// Owns: the tile-level steps that the CPU forward and backward share, so that the backward
// recomputes exactly the logits and dropout mask of the forward: loading a query tile, loading a
// K/V tile, S = scale * Q K^T with softcap, ALiBi and the mask applied, and the dropout keep mask
// of a tile.
//
// Query tiles pack the query heads of one K/V head (GQA/MQA): packed row pi of sequence b and
// K/V head hk is query row i = pi / group of query head h = hk * group + pi % group. The K/V tile
// is then loaded and converted once for the whole group, and decoding (seqlen_q = 1) still fills
// a tile with `group` rows (FA2 does the same "seqlen_q <-> ngroups swap" for decode).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/mask.h"
#include "../common/philox.h"
#include "../common/score_mod.h"
#include "dtype_cpu.h"
#include "layout_cpu.h"
#include "simd_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// Per-call constants, converted once to the accumulation type.
template <typename T>
struct AttnCtx {
  using Acc = acc_t<T>;
  const FwdParams& p;
  const Problem& pr;
  Acc scale, softcap, inv_softcap, keep_scale;
  bool has_softcap, has_alibi, has_dropout;
  uint32_t threshold;

  AttnCtx(const FwdParams& params, const Problem& problem)
      : p(params),
        pr(problem),
        scale(static_cast<Acc>(params.softmax_scale)),
        softcap(static_cast<Acc>(params.softcap)),
        inv_softcap(params.softcap > 0.f ? Acc(1) / static_cast<Acc>(params.softcap) : Acc(0)),
        // In Acc (not the float keep_scale field) so that fp64 keeps fp64 accuracy.
        keep_scale(Acc(1) / (Acc(1) - static_cast<Acc>(params.p_dropout))),
        has_softcap(params.softcap > 0.f),
        has_alibi(params.alibi_slopes != nullptr),
        has_dropout(params.p_dropout > 0.f),
        threshold(params.dropout_threshold) {}

  const T* q() const { return static_cast<const T*>(p.q_ptr); }
  const T* k() const { return static_cast<const T*>(p.k_ptr); }
  const T* v() const { return static_cast<const T*>(p.v_ptr); }
};

// What each packed row of a query tile is.
template <typename Acc>
struct TileRows {
  int n = 0;               // rows in the tile
  int i_first = 0, i_last = 0;  // query rows covered (inclusive)
  int i[kBlockM];          // query row within the sequence
  int h[kBlockM];          // query head
  Acc slope[kBlockM];      // ALiBi slope of (b, h), 0 without ALiBi
  uint64_t subseq[kBlockM];  // dropout subsequence of (b, h)
};

template <typename T>
void make_tile_rows(const AttnCtx<T>& c, int b, int hk, int pr0, int n,
                    TileRows<acc_t<T>>* rows) {
  const int group = c.pr.group;
  rows->n = n;
  for (int r = 0; r < n; ++r) {
    const int pi = pr0 + r;
    const int h = hk * group + pi % group;
    rows->i[r] = pi / group;
    rows->h[r] = h;
    rows->slope[r] =
        c.has_alibi ? static_cast<acc_t<T>>(
                          c.p.alibi_slopes[static_cast<int64_t>(b) * c.p.alibi_batch_stride + h])
                    : acc_t<T>(0);
    rows->subseq[r] = c.p.offset + static_cast<uint64_t>(b) * c.pr.nheads + h;
  }
  rows->i_first = rows->i[0];
  rows->i_last = rows->i[n - 1];
}

// Software prefetch of n rows of X (K or V) into the cache: the rows of a K/V tile are strided
// (by the heads, or scattered over pages), which the hardware prefetchers follow poorly.
template <typename T>
inline void prefetch_rows(const T* base, const int64_t* row_off, int n, int d) {
  const int bytes = d * static_cast<int>(sizeof(T));
  for (int j = 0; j < n; ++j) {
    const char* row = reinterpret_cast<const char*>(base + row_off[j]);
    for (int b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
  }
}

// The backward's prefetch of the next key tile, split between the query tiles that compute with
// the current one (issued all at once, the prefetches stall on the line fill buffers): query
// tile t of nq prefetches its share of rows [first, first + n) of K and V (contiguous rows of a
// sequence, row strides in elements).
template <typename T>
inline void prefetch_kv_share(const T* kbase, const T* vbase, int64_t k_stride, int64_t v_stride,
                              int first, int n, int nq, int t, int d) {
  const int share = nq > 0 ? (n + nq - 1) / nq : 0;
  for (int j = t * share; j < std::min(n, (t + 1) * share); ++j) {
    const int64_t koff = static_cast<int64_t>(first + j) * k_stride;
    const int64_t voff = static_cast<int64_t>(first + j) * v_stride;
    prefetch_rows(kbase, &koff, 1, d);
    prefetch_rows(vbase, &voff, 1, d);
  }
}

// Row loads that are not prefetched otherwise (a task's query rows, its first K/V tile) wait on
// memory row by row: each load prefetches the row kLoadAhead further on.
constexpr int kLoadAhead = 8;

// dst[r][0..dpad) = factor * src row (zero padded), for the rows of a tile, in Out (the
// accumulation type by default). src_base points at (row 0, head 0) of the sequence; rows live
// at src_base + i * row_stride + h * head_stride.
template <typename T, typename Out = acc_t<T>>
void load_rows(const T* src_base, int64_t row_stride, int64_t head_stride,
               const TileRows<acc_t<T>>& rows, int d, int dpad, acc_t<T> factor, Out* dst) {
  for (int r = 0; r < rows.n; ++r) {
    const T* src = src_base + rows.i[r] * row_stride + rows.h[r] * head_stride;
    Out* out = dst + r * dpad;
    for (int c = 0; c < d; ++c) out[c] = static_cast<Out>(Traits<T>::load(src[c]) * factor);
    for (int c = d; c < dpad; ++c) out[c] = Out(0);
  }
}

// dst[c][r] = factor * src row r, col c (the tile transposed, ld = mt): columns r in
// [rows.n, mt) are zero, so the padding columns of a product with it stay finite.
template <typename T>
void load_rows_t(const T* src_base, int64_t row_stride, int64_t head_stride,
                 const TileRows<acc_t<T>>& rows, int d, int mt, acc_t<T> factor, acc_t<T>* dst) {
  const int64_t zero = 0;
  for (int r = 0; r < rows.n; ++r) {
    if (r + kLoadAhead < rows.n)
      prefetch_rows(src_base + rows.i[r + kLoadAhead] * row_stride +
                        rows.h[r + kLoadAhead] * head_stride,
                    &zero, 1, d);
    const T* src = src_base + rows.i[r] * row_stride + rows.h[r] * head_stride;
    for (int c = 0; c < d; ++c) dst[c * mt + r] = Traits<T>::load(src[c]) * factor;
  }
  for (int c = 0; c < d; ++c)
    for (int r = rows.n; r < mt; ++r) dst[c * mt + r] = acc_t<T>(0);
}

// Row offsets of key positions [n0, n0 + n) of sequence s, into the caller's buffers.
struct KvTileRows {
  int64_t k[kBlockN];
  int64_t v[kBlockN];
};

// kt[c][j] = K[n0 + j][c] (transposed, for S = Q K^T), for c < d, j < n.
template <typename T>
void load_k_transposed(const AttnCtx<T>& c, const KvTileRows& kv, int hk, int n,
                       acc_t<T>* kt) {
  const T* kbase = c.k() + hk * c.p.k_head_stride;
  const int d = c.pr.d;
  for (int j = 0; j < n; ++j) {
    const T* src = kbase + kv.k[j];
    for (int col = 0; col < d; ++col) kt[col * kBlockN + j] = Traits<T>::load(src[col]);
  }
}

// dst[j][c] = X[n0 + j][c] row-major (zero padded to dpad), X = K or V, converted to Out (the
// accumulation type, or the probability type for V).
template <typename T, typename Out = acc_t<T>>
void load_kv_rows(const T* base, const int64_t* row_off, int n, int d, int dpad, Out* dst) {
  for (int j = 0; j < n; ++j) {
    if (j + kLoadAhead < n) prefetch_rows(base, row_off + j + kLoadAhead, 1, d);
    const T* src = base + row_off[j];
    Out* out = dst + j * dpad;
    for (int col = 0; col < d; ++col) out[col] = static_cast<Out>(Traits<T>::load(src[col]));
    for (int col = d; col < dpad; ++col) out[col] = Out(0);
  }
}

// Softcap, ALiBi and the mask on a tile of raw scores (scale already in Q): element (row r, key
// n0 + j) lives at S[r * rs + j * js], so one routine serves the row layout (rs = ld, js = 1) and
// the transposed one (rs = 1, js = ld). When tanh_out is given (backward with softcap), it
// receives tanh(s / softcap) at the same positions, for the chain rule.
template <typename T>
void apply_score_mods(const AttnCtx<T>& c, const Mask& mask, const TileRows<acc_t<T>>& rows,
                      int n0, int n, acc_t<T>* S, long rs, long js, acc_t<T>* tanh_out) {
  using Acc = acc_t<T>;
  const bool full = mask.tile_is_full(rows.i_first, rows.i_last + 1, n0, n0 + n);
  if (!c.has_softcap && !c.has_alibi && full) return;
  const int shift = mask.seqlen_k - mask.seqlen_q;
  const Acc ninf = -static_cast<Acc>(INFINITY);
  for (int r = 0; r < rows.n; ++r) {
    Acc* srow = S + r * rs;
    if (c.has_softcap) {
      Acc* trow = tanh_out != nullptr ? tanh_out + r * rs : nullptr;
      for (int j = 0; j < n; ++j) {
        Acc t;
        srow[j * js] = softcap_apply(srow[j * js], c.softcap, c.inv_softcap, &t);
        if (trow != nullptr) trow[j * js] = t;
      }
    }
    if (c.has_alibi) {
      const Acc slope = rows.slope[r];
      const int i = rows.i[r];
      for (int j = 0; j < n; ++j) srow[j * js] += alibi_bias(slope, i, n0 + j, shift);
    }
    if (!full) {
      int cb, ce;
      mask.col_limits(rows.i[r], &cb, &ce);
      for (int j = 0; j < n; ++j) {
        const int col = n0 + j;
        if (col < cb || col >= ce) srow[j * js] = ninf;
      }
    }
  }
}

// S[r][j] (row layout, ld kBlockN) for key positions n0 + j, j < n: the final logits of params.h
// (scale, softcap, ALiBi), -inf where masked. qs holds the query tile pre-scaled by
// softmax_scale, kt the key tile transposed (kt[c][j], ld kBlockN). Columns from n up to
// pad_up(n) are computed and meaningless.
template <typename T>
void compute_scores(const AttnCtx<T>& c, const Mask& mask, const TileRows<acc_t<T>>& rows,
                    const acc_t<T>* qs, const acc_t<T>* kt, int n0, int n, acc_t<T>* S,
                    acc_t<T>* tanh_out) {
  gemm(qs, c.pr.dpad, kt, kBlockN, S, kBlockN, rows.n, c.pr.d, pad_up(n), /*accumulate=*/false);
  apply_score_mods(c, mask, rows, n0, n, S, kBlockN, 1, tanh_out);
}

// The same logits transposed, one query per column: St[j][r] (ld = mt, the tile's padded row
// count), from the key tile row-major (k[j][c], ld dpad) and the query tile transposed
// (qt[c][r], ld mt, pre-scaled). Each logit is the same FMA chain over c as compute_scores',
// so both layouts give bitwise the same values. Columns from rows.n up to mt are meaningless.
template <typename T>
void compute_scores_t(const AttnCtx<T>& c, const Mask& mask, const TileRows<acc_t<T>>& rows,
                      const acc_t<T>* qt, int mt, const acc_t<T>* k, int n0, int n,
                      acc_t<T>* St) {
  gemm(k, c.pr.dpad, qt, mt, St, mt, n, c.pr.d, mt, /*accumulate=*/false);
  apply_score_mods(c, mask, rows, n0, n, St, 1, mt, static_cast<acc_t<T>*>(nullptr));
}

// keep[r][j] = 1 where element (row, key n0 + j) survives dropout, else 0 (philox.h spec).
template <typename T>
void dropout_keep_tile(const AttnCtx<T>& c, const TileRows<acc_t<T>>& rows, int n0, int n,
                       uint8_t* keep) {
  for (int r = 0; r < rows.n; ++r) {
    uint8_t* krow = keep + r * kBlockN;
    const uint32_t i = static_cast<uint32_t>(rows.i[r]);
    for (int c4 = n0 & ~3; c4 < n0 + n; c4 += 4) {
      const Philox4 draw = dropout_draws(c.p.seed, rows.subseq[r], i, static_cast<uint32_t>(c4));
      for (int t = 0; t < 4; ++t) {
        const int j = c4 + t - n0;
        if (j >= 0 && j < n) krow[j] = philox_word(draw, t) >= c.threshold ? 1 : 0;
      }
    }
  }
}

}  // namespace cpu
FLASH_NAMESPACE_END
