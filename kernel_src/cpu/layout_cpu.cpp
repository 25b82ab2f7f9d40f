// Owns: validation of FwdParams/BwdParams for the CPU backend and their resolution into
// per-sequence SeqInfo (see layout_cpu.h). Everything here is O(batch + pages), run once per call.
#include "layout_cpu.h"

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/philox.h"
#include "simd_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

void fail(const char* what) { throw std::runtime_error(std::string("flash_attn (CPU): ") + what); }

void fail(const char* arg, const char* what, long long value) {
  throw std::runtime_error(std::string("flash_attn (CPU): ") + arg + " " + what + " (got " +
                           std::to_string(value) + ")");
}

namespace {

void check_cu_seqlens(const int32_t* cu, int batch, const char* name) {
  if (cu[0] < 0) fail(name, "must start at a non-negative offset", cu[0]);
  for (int b = 0; b < batch; ++b)
    if (cu[b + 1] < cu[b]) fail(name, "must be non-decreasing; decreases at index", b + 1);
}

}  // namespace

Problem make_problem(const FwdParams& p, bool is_bwd) {
  Problem pr;
  if (p.batch < 0) fail("batch", "must be >= 0", p.batch);
  if (p.nheads < 1) fail("nheads", "must be >= 1", p.nheads);
  if (p.nheads_k < 1) fail("nheads_k", "must be >= 1", p.nheads_k);
  if (p.nheads % p.nheads_k != 0)
    fail("nheads", "must be divisible by nheads_k (GQA/MQA)", p.nheads);
  if (p.head_dim < 1 || p.head_dim > 256)
    fail("head_dim", "must be in [1, 256] for the CPU backend", p.head_dim);
  if (p.window_left < -1) fail("window_size_left", "must be >= -1", p.window_left);
  if (p.window_right < -1) fail("window_size_right", "must be >= -1", p.window_right);
  if (!(p.softcap >= 0.f)) fail("softcap must be >= 0");
  if (!(p.p_dropout >= 0.f && p.p_dropout < 1.f)) fail("dropout_p must be in [0, 1)");
  if (p.p_dropout > 0.f && p.dropout_threshold != dropout_threshold(p.p_dropout))
    fail("dropout_threshold", "is not dropout_threshold(p_dropout) of philox.h",
         static_cast<long long>(p.dropout_threshold));
  if (p.block_table != nullptr && p.page_block_size < 1)
    fail("page_block_size", "must be >= 1 with block_table", p.page_block_size);
  if (p.cache_batch_idx != nullptr && (p.cu_seqlens_k != nullptr || p.block_table != nullptr))
    fail("cache_batch_idx is not supported together with cu_seqlens_k or block_table");
  if (is_bwd) {
    if (p.block_table != nullptr) fail("block_table is not supported in the backward pass");
    if (p.cache_batch_idx != nullptr) fail("cache_batch_idx is not supported in the backward pass");
    if (p.leftpad_k != nullptr) fail("leftpad_k is not supported in the backward pass");
  }
  if (p.cu_seqlens_q == nullptr && p.seqlen_q < 0) fail("seqlen_q", "must be >= 0", p.seqlen_q);
  if (p.cu_seqlens_k == nullptr && p.seqlen_k < 0) fail("seqlen_k", "must be >= 0", p.seqlen_k);

  pr.batch = p.batch;
  pr.nheads = p.nheads;
  pr.nheads_k = p.nheads_k;
  pr.group = p.nheads / p.nheads_k;
  pr.d = p.head_dim;
  pr.dpad = pad_up(p.head_dim);
  if (p.batch == 0) return pr;

  if (p.q_ptr == nullptr) fail("q is null");
  if (p.k_ptr == nullptr) fail("k is null");
  if (p.v_ptr == nullptr) fail("v is null");
  if (p.o_ptr == nullptr) fail("out is null");
  if (p.softmax_lse_ptr == nullptr && p.softmax_lse_f64_ptr == nullptr)
    fail("softmax_lse is null");
  if (p.softmax_lse_f64_ptr != nullptr && p.dtype != DType::kFloat64)
    fail("an fp64 softmax_lse is only for fp64 inputs");

  if (p.cu_seqlens_q != nullptr) {
    check_cu_seqlens(p.cu_seqlens_q, p.batch, "cu_seqlens_q");
    if (p.cu_seqlens_q[p.batch] > p.total_q)
      fail("cu_seqlens_q", "ends past the number of query tokens (total_q)",
           p.cu_seqlens_q[p.batch]);
    pr.lse_head_stride = p.total_q;
  } else {
    pr.lse_head_stride = p.seqlen_q;
  }
  if (p.cu_seqlens_k != nullptr) {
    check_cu_seqlens(p.cu_seqlens_k, p.batch, "cu_seqlens_k");
    if (p.block_table == nullptr && p.total_k > 0 && p.cu_seqlens_k[p.batch] > p.total_k)
      fail("cu_seqlens_k", "ends past the number of key rows (total_k)", p.cu_seqlens_k[p.batch]);
  }

  pr.seqs.resize(p.batch);
  for (int b = 0; b < p.batch; ++b) {
    SeqInfo& s = pr.seqs[b];
    // Queries.
    if (p.cu_seqlens_q != nullptr) {
      const int64_t start = p.cu_seqlens_q[b];
      s.seqlen_q = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
      s.q_off = start * p.q_row_stride;
      s.o_off = start * p.o_row_stride;
      s.lse_off = start;
    } else {
      s.seqlen_q = p.seqlen_q;
      s.q_off = static_cast<int64_t>(b) * p.q_batch_stride;
      s.o_off = static_cast<int64_t>(b) * p.o_batch_stride;
      s.lse_off = static_cast<int64_t>(b) * p.nheads * p.seqlen_q;
    }
    // Keys: rows owned in K, then seqused_k and left padding.
    const int base_len =
        p.cu_seqlens_k != nullptr ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : p.seqlen_k;
    s.seqlen_k_rows = base_len;
    int end = base_len;
    if (p.seqused_k != nullptr) {
      end = p.seqused_k[b];
      if (end < 0 || end > base_len)
        fail("seqused_k", "must lie in [0, the sequence's key count]", end);
    }
    const int leftpad = p.leftpad_k != nullptr ? p.leftpad_k[b] : 0;
    if (leftpad < 0 || leftpad > end)
      fail("leftpad_k", "must lie in [0, the sequence's used key count]", leftpad);
    s.seqlen_k = end - leftpad;
    if (p.block_table != nullptr) {
      s.pages = p.block_table + static_cast<int64_t>(b) * p.block_table_batch_stride;
      s.page_shift = leftpad;
      if (s.seqlen_k > 0) {
        const int first = leftpad / p.page_block_size;
        const int last = (end - 1) / p.page_block_size;
        for (int i = first; i <= last; ++i) {
          if (s.pages[i] < 0) fail("block_table", "holds a negative page id", s.pages[i]);
          if (p.kv_num_blocks > 0 && s.pages[i] >= p.kv_num_blocks)
            fail("block_table", "holds a page id past the pool (kv_num_blocks)", s.pages[i]);
        }
      }
    } else if (p.cu_seqlens_k != nullptr) {
      const int64_t start = static_cast<int64_t>(p.cu_seqlens_k[b]) + leftpad;
      s.k_off = start * p.k_row_stride;
      s.v_off = start * p.v_row_stride;
    } else {
      int kb = b;
      if (p.cache_batch_idx != nullptr) {
        kb = p.cache_batch_idx[b];
        if (kb < 0) fail("cache_batch_idx", "holds a negative index", kb);
      }
      if (p.kv_num_blocks > 0 && kb >= p.kv_num_blocks)
        fail(p.cache_batch_idx != nullptr ? "cache_batch_idx" : "batch",
             "exceeds the K/V batch rows (kv_num_blocks)", kb);
      s.k_off = static_cast<int64_t>(kb) * p.k_batch_stride +
                static_cast<int64_t>(leftpad) * p.k_row_stride;
      s.v_off = static_cast<int64_t>(kb) * p.v_batch_stride +
                static_cast<int64_t>(leftpad) * p.v_row_stride;
    }
    pr.work += static_cast<int64_t>(s.seqlen_q) * s.seqlen_k * p.nheads * p.head_dim;
    if (s.seqlen_q > pr.max_seqlen_q) pr.max_seqlen_q = s.seqlen_q;
    if (s.seqlen_k > pr.max_seqlen_k) pr.max_seqlen_k = s.seqlen_k;
  }
  // Query rows of the heads sharing a K/V head are packed into one int-indexed row space.
  if (static_cast<int64_t>(pr.max_seqlen_q) * pr.group > INT32_MAX)
    fail("seqlen_q", "times nheads / nheads_k must be below 2^31 on the CPU backend",
         pr.max_seqlen_q);
  if (p.p_ptr != nullptr && (pr.max_seqlen_q > p.seqlen_q || pr.max_seqlen_k > p.seqlen_k))
    fail("S_dmask (p_ptr) is smaller than the longest sequence: seqlen_q/seqlen_k (max_seqlen) "
         "must bound every sequence");
  return pr;
}

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

}  // namespace cpu
FLASH_NAMESPACE_END
