// Owns: split-KV (FlashDecoding, Dao et al. 2023; FA2's num_splits): the partition of a
// sequence's keys into FwdParams::num_splits ranges, the layout of the fp32 partial results the
// forward writes per range, and the choice of the number of splits. The CUDA forward computes
// one partial (O_s normalised over its range, lse_s) per range; the combine step merges them
// with merge_lse (softmax_state.h).
//
// Invariants:
// * Ranges are whole key tiles of the kernel (block_n keys), the first ranges one tile longer
//   when the tiles do not divide evenly; a range may be empty (short sequences): its partial has
//   lse = -inf and O = 0 and weighs nothing in the merge.
// * Partial row index: the row of q in the packed layout (varlen: its row of q; batched:
//   b * seqlen_q + i), so the partial buffers are linear in the number of query rows.
#pragma once
#include <cstdint>

#include "params.h"

FLASH_NAMESPACE_BEGIN

// The most partitions a call uses (the combine kernel reduces them in one warp, a lane each, and
// beyond this the partial traffic outweighs the parallelism gained).
constexpr int kMaxSplits = 128;

// Keys [*begin, *end) of split `split` out of num_splits for a sequence of seqlen_k keys.
FLASH_HOST_DEVICE void split_key_range(int num_splits, int split, int seqlen_k, int block_n,
                                       int* begin, int* end) {
  const int tiles = (seqlen_k + block_n - 1) / block_n;
  const int base = tiles / num_splits, extra = tiles % num_splits;
  const int first = split * base + (split < extra ? split : extra);
  const int count = base + (split < extra ? 1 : 0);
  *begin = first * block_n;
  const int e = (first + count) * block_n;
  *end = e < seqlen_k ? e : seqlen_k;
}

// Where the partials of one (row, head) live: lse_accum[split * lse_numel + lse index] and
// o_accum[((split * rows + row) * nheads + head) * width + col].
struct PartialLayout {
  int64_t rows = 0;       // rows of q (batch * seqlen_q, or total_q)
  int64_t lse_numel = 0;  // elements of softmax_lse
  int width = 0;          // columns per (row, head): head_dim rounded up to 8 (float2 stores)

  FLASH_HOST_DEVICE explicit PartialLayout(const FwdParams& p)
      : rows(p.cu_seqlens_q != nullptr ? int64_t(p.total_q) : int64_t(p.batch) * p.seqlen_q),
        lse_numel(rows * p.nheads),
        width(dq_accum_width(p.head_dim)) {}

  FLASH_HOST_DEVICE int64_t o_offset(int split, int64_t row, int head, int nheads) const {
    return ((split * rows + row) * nheads + head) * width;
  }
};

// The number of splits for a call with `ctas` CTAs before splitting (row blocks x heads x
// batch), `key_tiles` key tiles per sequence (the longest), on a device with `slots` CTA slots
// (SMs x resident CTAs per SM). `requested` > 0 is the caller's count (capped by the tiles and
// kMaxSplits). Otherwise: no split when the grid already fills the device; else the count whose
// last wave is fullest (wave efficiency, FA2's heuristic), the smallest one within 85% of the
// best, so that a split always has several tiles to stream.
inline int choose_num_splits(int64_t ctas, int key_tiles, int slots, int requested) {
  int max_splits = key_tiles < kMaxSplits ? key_tiles : kMaxSplits;
  if (max_splits < 1) max_splits = 1;
  if (requested > 0) return requested < max_splits ? requested : max_splits;
  if (ctas <= 0 || slots <= 0 || ctas * 5 >= int64_t(slots) * 4) return 1;
  // Splits beyond the point where every slot is busy only add partial traffic.
  const int64_t fill = (int64_t(slots) + ctas - 1) / ctas;
  if (fill < max_splits) max_splits = static_cast<int>(fill);
  double eff[kMaxSplits + 1] = {};
  double best = 0.0;
  for (int s = 1; s <= max_splits; ++s) {
    const double waves = double(ctas) * s / slots;
    const double full = static_cast<double>(static_cast<int64_t>(waves + 0.999999));
    eff[s] = waves / (full > 0 ? full : 1.0);
    if (eff[s] > best) best = eff[s];
  }
  for (int s = 1; s <= max_splits; ++s) {
    if (eff[s] >= 0.85 * best) return s;
  }
  return 1;
}

FLASH_NAMESPACE_END
