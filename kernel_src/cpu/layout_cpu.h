// Owns: how the CPU backend finds its rows. FwdParams describes batched, varlen, left-padded,
// cache-indirected and paged layouts; this file resolves all of them once per call into one
// SeqInfo per sequence, so that the kernels see a single shape: "query row i of sequence b, head
// h" and "key position j of sequence b" (j counted after left padding, as the mask and the
// dropout stream count it). It also validates FwdParams, throwing std::runtime_error naming the
// offending argument.
//
// Invariant: all element offsets are int64 (a tensor may exceed 2^31 elements).
#pragma once
#include <cstdint>
#include <vector>

#include "../common/params.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// Key tile width and query tile height of every CPU kernel.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;

struct SeqInfo {
  int seqlen_q = 0;
  int seqlen_k = 0;       // after seqused_k and left padding
  int seqlen_k_rows = 0;  // rows the sequence owns in the K tensor (varlen/batched, not paged)
  int64_t q_off = 0;      // element offset of (row 0, head 0) in q
  int64_t o_off = 0;      // likewise in out
  int64_t lse_off = 0;    // index of (head 0, row 0) in softmax_lse; rows are contiguous
  int64_t k_off = 0;      // not paged: element offset of key position 0 (head 0) in k
  int64_t v_off = 0;      //            likewise in v
  const int32_t* pages = nullptr;  // paged: this sequence's block-table row
  int page_shift = 0;              // paged: cache position of key 0 (the left padding)
};

struct Problem {
  int batch = 0, nheads = 0, nheads_k = 0;
  int group = 1;        // query heads per K/V head
  int d = 0, dpad = 0;  // head dim and its padded scratch width
  int max_seqlen_q = 0, max_seqlen_k = 0;  // over the batch (actual, not the hint)
  int64_t lse_head_stride = 0;
  int64_t work = 0;  // sum over sequences of nheads * seqlen_q * seqlen_k * d (multiply-adds of
                     // S = Q K^T without masking), to decide whether a call is worth threads
  std::vector<SeqInfo> seqs;
};

// Validates `p` (for a forward or, with is_bwd, a backward call) and resolves the sequences.
Problem make_problem(const FwdParams& p, bool is_bwd);

// Element offsets (head 0) of key positions [n0, n0 + n) of a sequence in k and v.
inline void kv_row_offsets(const FwdParams& p, const SeqInfo& s, int n0, int n, int64_t* k_rows,
                           int64_t* v_rows) {
  if (s.pages != nullptr) {
    const int page_size = p.page_block_size;
    for (int j = 0; j < n; ++j) {
      const int64_t pos = static_cast<int64_t>(s.page_shift) + n0 + j;
      const int64_t page = s.pages[pos / page_size];
      const int64_t row = pos % page_size;
      k_rows[j] = page * p.k_batch_stride + row * p.k_row_stride;
      v_rows[j] = page * p.v_batch_stride + row * p.v_row_stride;
    }
  } else {
    for (int j = 0; j < n; ++j) {
      k_rows[j] = s.k_off + static_cast<int64_t>(n0 + j) * p.k_row_stride;
      v_rows[j] = s.v_off + static_cast<int64_t>(n0 + j) * p.v_row_stride;
    }
  }
}

// Throws std::runtime_error("flash_attn (CPU): <what>") naming the argument.
// Per-sequence offsets of the gradient-side tensors (the backward has no paging or left padding).
struct BwdOffsets {
  int64_t dout, dq, k, v, dk, dv;
};
BwdOffsets bwd_offsets(const BwdParams& p, int b);

[[noreturn]] void fail(const char* what);
[[noreturn]] void fail(const char* arg, const char* what, long long value);

}  // namespace cpu
FLASH_NAMESPACE_END
