// Owns: the attention mask policy shared by every backend (CPU, sm80, sm90): which keys a query
// row may see, the KV range of a query block (computed here and nowhere else; optionally cut to
// one split-KV partition), which tiles need the element-wise mask at all (tile_is_full, and
// full_tiles in closed form for the GPU loops), and the element-wise apply.
//
// Convention (params.h, bottom-right aligned): query row i of a sequence with seqlen_q rows and
// seqlen_k keys may see key j iff
//     i + (seqlen_k - seqlen_q) - window_left <= j <= i + (seqlen_k - seqlen_q) + window_right
// with a negative window unbounded on that side; causal is window_right = 0.
//
// Invariant: the two diagonal bounds are stored as offsets on (j - i) and clamped to the range
// where they can still cut something ([-seqlen_q, seqlen_k]). Everything therefore fits in int
// whatever the window values (INT_MAX included), and "unbounded" needs no special case: a mask
// with no window is the same arithmetic with bounds that never bite.
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>

#include "namespace.h"

FLASH_NAMESPACE_BEGIN

struct Mask {
  int seqlen_q = 0, seqlen_k = 0;
  int diag_lo = 0;  // key j visible from row i needs j - i >= diag_lo
  int diag_hi = 0;  //                       and j - i <= diag_hi

  Mask() = default;

  FLASH_HOST_DEVICE Mask(int seqlen_q_, int seqlen_k_, int window_left, int window_right)
      : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_) {
    // 64-bit while clamping: window + (seqlen_k - seqlen_q) can exceed int.
    const int64_t shift = static_cast<int64_t>(seqlen_k_) - seqlen_q_;
    const int64_t lo = window_left < 0 ? -static_cast<int64_t>(seqlen_q_) : shift - window_left;
    const int64_t hi = window_right < 0 ? static_cast<int64_t>(seqlen_k_) : shift + window_right;
    diag_lo = static_cast<int>(lo < -static_cast<int64_t>(seqlen_q_) ? -seqlen_q_ : lo);
    diag_hi = static_cast<int>(hi > seqlen_k_ ? seqlen_k_ : hi);
  }

  // Visible keys of query row `row` are [*col_begin, *col_end) (empty when begin >= end).
  FLASH_HOST_DEVICE void col_limits(int row, int* col_begin, int* col_end) const {
    const int64_t b = static_cast<int64_t>(row) + diag_lo;
    const int64_t e = static_cast<int64_t>(row) + diag_hi + 1;
    *col_begin = static_cast<int>(b < 0 ? 0 : b);
    *col_end = static_cast<int>(e > seqlen_k ? seqlen_k : e);
  }

  // The KV range for the query block [row_begin, row_end): the union of the visible keys of its
  // rows, [*col_begin, *col_end), intersected with the split-KV partition
  // [split_begin, split_end) (default: every key). row_begin >= 0; rows past seqlen_q are
  // ignored. Empty when begin >= end; then the block's rows see no key of the partition (O = 0,
  // lse = +inf, or an empty partial for merge()). Backends iterate key tiles only over this.
  FLASH_HOST_DEVICE void kv_range(int row_begin, int row_end, int* col_begin, int* col_end,
                                  int split_begin = 0, int split_end = INT_MAX) const {
    if (row_end > seqlen_q) row_end = seqlen_q;
    if (row_begin >= row_end || seqlen_k <= 0) {
      *col_begin = 0;
      *col_end = 0;
      return;
    }
    int b0, e0, b1, e1;
    col_limits(row_begin, &b0, &e0);  // the bounds grow with the row: first row gives the start,
    col_limits(row_end - 1, &b1, &e1);  // last row the end
    *col_begin = b0 > split_begin ? b0 : split_begin;
    *col_end = e1 < split_end ? e1 : split_end;
    if (*col_end < *col_begin) *col_end = *col_begin;
  }

  // The key tiles [n * block_n, (n + 1) * block_n) that every row of [row_begin, row_end) sees
  // whole, tile_is_full's closed form: n in [*n_begin, *n_end) (empty when begin >= end), the
  // tiles at or after the last row's first key and ending before the first row's end (which is
  // at most seqlen_k, so a ragged last tile is never full). Rows past seqlen_q are ignored (no
  // backend stores them); with no row left every tile counts as full (nothing in it is stored,
  // so nothing needs the mask). Rows before 0 (sm90's causal blocks anchored at the end) count
  // like any row. The GPU loops compute this once per row block and apply the element-wise mask
  // only outside it.
  FLASH_HOST_DEVICE void full_tiles(int row_begin, int row_end, int block_n, int* n_begin,
                                    int* n_end) const {
    if (row_end > seqlen_q) row_end = seqlen_q;
    if (row_begin >= row_end) {
      *n_begin = 0;
      *n_end = INT_MAX;
      return;
    }
    int b0, e0, b1, e1;
    col_limits(row_begin, &b0, &e0);
    col_limits(row_end - 1, &b1, &e1);
    *n_begin = (b1 + block_n - 1) / block_n;  // b1 >= 0
    *n_end = e0 / block_n;  // e0 < 0 (no key for the first row) gives <= 0: empty
  }

  // The query rows that see at least one key of [col_begin, col_end): [*row_begin, *row_end).
  // The backward pass iterates query tiles over this for a key tile.
  FLASH_HOST_DEVICE void q_range(int col_begin, int col_end, int* row_begin, int* row_end) const {
    if (col_end > seqlen_k) col_end = seqlen_k;
    if (col_begin < 0) col_begin = 0;
    if (col_begin >= col_end || seqlen_q <= 0) {
      *row_begin = 0;
      *row_end = 0;
      return;
    }
    // Row i sees key j iff i in [j - diag_hi, j - diag_lo].
    const int64_t b = static_cast<int64_t>(col_begin) - diag_hi;
    const int64_t e = static_cast<int64_t>(col_end - 1) - diag_lo + 1;
    *row_begin = static_cast<int>(b < 0 ? 0 : (b > seqlen_q ? seqlen_q : b));
    *row_end = static_cast<int>(e > seqlen_q ? seqlen_q : (e < 0 ? 0 : e));
    if (*row_end < *row_begin) *row_end = *row_begin;
  }

  // True when every element of the tile [row_begin, row_end) x [col_begin, col_end), with the
  // tile inside [0, seqlen_q) x [0, seqlen_k), is visible: such tiles skip the element-wise apply.
  FLASH_HOST_DEVICE bool tile_is_full(int row_begin, int row_end, int col_begin,
                                      int col_end) const {
    // Worst cases: the last row for the lower bound, the first row for the upper one.
    return static_cast<int64_t>(col_begin) - (row_end - 1) >= diag_lo &&
           static_cast<int64_t>(col_end - 1) - row_begin <= diag_hi;
  }

  FLASH_HOST_DEVICE bool visible(int row, int col) const {
    const int64_t d = static_cast<int64_t>(col) - row;
    return col >= 0 && col < seqlen_k && d >= diag_lo && d <= diag_hi;
  }

  // Element-wise apply: the score, or -inf where the key is not visible (also past seqlen_k, so
  // ragged last tiles need no separate predicate).
  template <typename T>
  FLASH_HOST_DEVICE T apply(int row, int col, T score) const {
    return visible(row, col) ? score : -static_cast<T>(INFINITY);
  }
};

FLASH_NAMESPACE_END
