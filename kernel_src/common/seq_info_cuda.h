// Owns: where one sequence of the batch lives on the GPU (its lengths and the 64-bit element
// offsets of its first Q/K/V/O row and LSE entry), for batched, varlen, paged and KV-cache layouts
// alike; read by the sm80 and the sm90 kernels (the CPU backend resolves layouts on the host,
// cpu/layout_cpu.h).
//
// Invariants:
// * Every offset is int64 (tensors may exceed 2^31 elements).
// * Index tensors are read on the device without validation by the binding (no sync), so bad
//   contents are clamped here into what the params describe: cu_seqlens_q into [0, total_q] and
//   non-decreasing, cu_seqlens_k into [0, total_k] and non-decreasing (when total_k > 0), key
//   lengths into [0, seqlen_k]; a cache_batch_idx outside [0, kv_num_blocks) gives the sequence
//   no keys (O = 0, lse = +inf) instead of reading another allocation. Page ids are clamped
//   per row in PagedRows (copy_sm80.h).
#pragma once
#include <cstdint>

#include "../common/params.h"

FLASH_NAMESPACE_BEGIN
namespace cuda {

__device__ __forceinline__ int clamp_int(int x, int lo, int hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Exclusive upper bound for page ids and cache_batch_idx as an unsigned value, so one compare
// rejects negative ids too; UINT64_MAX (nothing rejected) when the binding gave no bound.
__device__ __forceinline__ uint64_t kv_bound(const FwdParams& p) {
  return p.kv_num_blocks > 0 ? static_cast<uint64_t>(p.kv_num_blocks) : UINT64_MAX;
}

struct SeqInfo {
  int seqlen_q = 0;  // query rows of this sequence
  int seqlen_k = 0;  // keys of this sequence (after seqused_k and left padding)
  int64_t q_row0 = 0;   // element offset of query row 0, head 0 (q and o share it in rows)
  int64_t o_row0 = 0;
  int64_t lse_row0 = 0;  // index of this sequence's row 0 in softmax_lse for head 0
  int64_t lse_head_stride = 0;
  int64_t k_row0 = 0;   // element offset of key 0, head 0 (non-paged)
  int64_t v_row0 = 0;
  int kv_pos0 = 0;      // position of key 0 in the sequence's K rows / pages (left padding)
  // The same places as tensor coordinates (TMA, sm90): row index of query row 0 in q (varlen: its
  // packed row; batched: 0) and of key 0 in k/v, and the K/V batch index (0 for varlen).
  int q_first_row = 0;
  int k_first_row = 0;
  int64_t kv_batch = 0;

  __device__ __forceinline__ SeqInfo(const FwdParams& p, int bidb) {
    // Queries.
    if (p.cu_seqlens_q != nullptr) {
      const int start = clamp_int(p.cu_seqlens_q[bidb], 0, p.total_q);
      const int end = clamp_int(p.cu_seqlens_q[bidb + 1], start, p.total_q);
      seqlen_q = end - start;
      q_first_row = start;
      q_row0 = static_cast<int64_t>(start) * p.q_row_stride;
      o_row0 = static_cast<int64_t>(start) * p.o_row_stride;
      lse_row0 = start;
      lse_head_stride = p.total_q;
    } else {
      seqlen_q = p.seqlen_q;
      q_row0 = static_cast<int64_t>(bidb) * p.q_batch_stride;
      o_row0 = static_cast<int64_t>(bidb) * p.o_batch_stride;
      lse_row0 = static_cast<int64_t>(bidb) * p.nheads * p.seqlen_q;
      lse_head_stride = p.seqlen_q;
    }
    // Keys. With seqused_k the length is seqused_k[b] (FA2): bounded by the sequence's rows of
    // K when they are contiguous, by the pages otherwise (paged: cu_seqlens_k carries no
    // offsets). Every length is also bounded by params.seqlen_k, which the binding sets to the
    // largest length the shapes allow when max_seqlen_k is not given (total_k, or block_table
    // columns x page size), so a bad seqused_k cannot walk past the block-table row.
    int k_start = 0;
    int len_k = p.seqlen_k;
    if (p.cu_seqlens_k != nullptr) {
      // total_k <= 0: unknown (paged: the offsets are not used, only the lengths).
      const int hi =
          p.total_k > 0 && p.total_k < INT32_MAX ? static_cast<int>(p.total_k) : INT32_MAX;
      k_start = clamp_int(p.cu_seqlens_k[bidb], 0, hi);
      const int k_end = clamp_int(p.cu_seqlens_k[bidb + 1], k_start, hi);
      len_k = k_end - k_start;
    }
    if (p.seqused_k != nullptr) {
      const int used = p.seqused_k[bidb];
      len_k = p.block_table != nullptr ? used : clamp_int(used, 0, len_k);
    }
    len_k = clamp_int(len_k, 0, p.seqlen_k < 0 ? 0 : p.seqlen_k);
    kv_batch = bidb;
    if (p.cache_batch_idx != nullptr) {
      kv_batch = p.cache_batch_idx[bidb];
      if (static_cast<uint64_t>(kv_batch) >= kv_bound(p)) {
        kv_batch = 0;
        len_k = 0;
      }
    }
    if (p.cu_seqlens_k != nullptr) kv_batch = 0;
    kv_pos0 = p.leftpad_k != nullptr ? clamp_int(p.leftpad_k[bidb], 0, len_k) : 0;
    seqlen_k = len_k - kv_pos0;
    k_first_row = k_start + kv_pos0;
    k_row0 = kv_batch * p.k_batch_stride + static_cast<int64_t>(k_start + kv_pos0) * p.k_row_stride;
    v_row0 = kv_batch * p.v_batch_stride + static_cast<int64_t>(k_start + kv_pos0) * p.v_row_stride;
  }
};

}  // namespace cuda
FLASH_NAMESPACE_END
