// Owns: the flat parameter structs handed from the torch binding to every backend (CPU, sm80,
// sm90). Filled by named assignment in torch-ext/torch_binding.cpp; no torch types here.
//
// Conventions shared by all backends (normative):
// * Shapes: batched q (batch, seqlen_q, nheads, d); varlen q (total_q, nheads, d) with
//   cu_seqlens_q (batch + 1). K/V likewise with nheads_k, nheads % nheads_k == 0; query head h reads
//   K/V head h / (nheads / nheads_k). Last dim contiguous; every other stride is given (int64).
// * Per sequence b: seqlen_q_b, seqlen_k_b (after seqused_k and left padding). The first key of
//   the sequence is at position leftpad_k[b] of its K row range (0 without leftpad_k).
// * Mask, bottom-right aligned: query row i may see key j iff
//     j <= i + seqlen_k_b - seqlen_q_b + window_right   (window_right < 0: unbounded)
//     j >= i + seqlen_k_b - seqlen_q_b - window_left    (window_left  < 0: unbounded)
//   causal is window_right = 0 (the binding folds is_causal into the window).
// * Logits: s = softmax_scale * (q . k); with softcap > 0, s = softcap * tanh(s / softcap);
//   with ALiBi, s -= slope[b][h] * |i + seqlen_k_b - seqlen_q_b - j|.
// * Output O = dropout(softmax(s)) V; softmax_lse = log(sum_j exp(s_ij)) over visible j (natural
//   log, fp32). A row that sees no key has O = 0 and lse = +inf.
// * Dropout: see philox.h. keep_scale = 1 / (1 - p_dropout).
#pragma once
#include <cstdint>

#include "namespace.h"

FLASH_NAMESPACE_BEGIN

enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

struct FwdParams {
  DType dtype = DType::kFloat16;

  // Inputs. K/V point at the paged pool when block_table != nullptr.
  const void* q_ptr = nullptr;  // (batch, seqlen_q, nheads, d) or (total_q, nheads, d)
  const void* k_ptr = nullptr;  // (batch_k, seqlen_k, nheads_k, d), (total_k, nheads_k, d) or
                                // paged (num_blocks, page_block_size, nheads_k, d)
  const void* v_ptr = nullptr;  // same layout as k
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;  // in elements
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;  // batch stride = block stride
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;  //   when paged

  // Outputs.
  void* o_ptr = nullptr;  // same shape as q (d = head_dim of v, equal to q's here)
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  float* softmax_lse_ptr = nullptr;  // (batch, nheads, seqlen_q) or varlen (nheads, total_q)
  // CPU backend, fp64 inputs of fwd/varlen_fwd/bwd/varlen_bwd: the LSE at fp64 in the same
  // layout, used instead of softmax_lse_ptr (which is then null). It lets the autograd path carry
  // an fp64-exact LSE from the forward to the backward (gradcheck); other backends never see it.
  double* softmax_lse_f64_ptr = nullptr;
  void* p_ptr = nullptr;  // optional S_dmask (batch, nheads, seqlen_q, seqlen_k), input dtype,
                          // contiguous, seqlen_* = the max over the batch for varlen

  // Problem size.
  int batch = 0;
  int nheads = 0, nheads_k = 0;
  int head_dim = 0;   // d, any value in [1, 256]; kernels with a fixed kHeadDim predicate or pad
  int seqlen_q = 0;   // batched: the common length; varlen: an upper bound (max_seqlen_q)
  int seqlen_k = 0;   // batched: the K/V length (cache length for kvcache); varlen: upper bound
  int total_q = 0;    // varlen: number of query tokens (rows of q)
  // Bounds of the K/V tensors, so that kernels never read out of bounds on bad device index
  // tensors (the binding does not sync to validate them). 0 or less: unknown, not clamped (a
  // call with an empty K never reaches a backend, so 0 is never a real bound).
  int64_t kv_num_blocks = 0;  // pages in the pool (paged), else K/V batch rows (k.size(0));
                              //   page ids and cache_batch_idx must lie in [0, kv_num_blocks)
  int64_t total_k = 0;        // varlen, not paged: rows of k; cu_seqlens_k must lie in [0, total_k]

  // Variable length, paging, KV-cache indirection (all optional).
  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1)
  const int32_t* cu_seqlens_k = nullptr;  // (batch + 1)
  const int32_t* seqused_k = nullptr;     // (batch): keys actually used by sequence b; for the
                                          //   KV cache this is cache_seqlens + seqlen_new
  const int32_t* leftpad_k = nullptr;     // (batch): first valid key position of sequence b
  const int32_t* cache_batch_idx = nullptr;  // (batch): K/V batch row used by sequence b
  const int32_t* block_table = nullptr;   // (batch, max_blocks_per_seq): page ids
  int64_t block_table_batch_stride = 0;
  int page_block_size = 0;                // keys per page, any positive value

  // Score modifiers.
  // Scalars are double so that fp64 problems (gradcheck, the CPU oracle) keep fp64 accuracy; GPU
  // kernels narrow them to float where they use them.
  double softmax_scale = 0.0;
  float scale_log2 = 0.f;  // softmax_scale * log2(e), computed once on the host
  double softcap = 0.0;    // 0: off
  const float* alibi_slopes = nullptr;  // (nheads) or (batch, nheads), fp32
  int64_t alibi_batch_stride = 0;       // 0 for (nheads)
  int window_left = -1, window_right = -1;
  bool is_causal = false;  // informational: window_right == 0 already encodes it

  // Dropout (p_dropout == 0: off).
  double p_dropout = 0.0;
  double keep_scale = 1.0;      // 1 / (1 - p_dropout)
  uint32_t dropout_threshold = 0;
  uint64_t seed = 0, offset = 0;

  // Split-KV (common/split_kv.h). The caller's request: 0 lets the backend choose, 1 turns
  // splitting off, n > 1 asks for n partitions of the keys; never changes the result beyond
  // rounding. The CUDA binding resolves it (fwd_cuda_num_splits) before the call: when the
  // resolved count is above 1 it stores it here and hands in the fp32 partial buffers below
  // (their presence is what selects the split path), which the combine step merges into O and
  // the LSE. The CPU backend ignores all three.
  int num_splits = 0;
  float* o_accum_ptr = nullptr;    // num_splits x (rows of q) x nheads x dq_accum_width(d)
  float* lse_accum_ptr = nullptr;  // num_splits x (the softmax_lse layout)
};

// Varlen: whether seqlen_q is a real bound on the sequence lengths (max_seqlen_q given, and below
// total_q unless there is one sequence). The launchers size their grids from it when it is, from
// the average length otherwise (both CUDA paths).
inline bool varlen_rows_bounded(const FwdParams& p) {
  return p.seqlen_q > 0 && (p.seqlen_q < p.total_q || p.batch == 1);
}

struct BwdParams : FwdParams {
  // Gradient inputs/outputs; o_ptr/softmax_lse_ptr above hold the forward's out and lse, which
  // every backend uses as given (never recomputed from K/V: a caller may pass the out/lse of a
  // longer key sequence, as ring attention does for each K/V block). dq/dk/dv may be strided
  // views (e.g. of one packed qkv gradient); only their last dimension is contiguous.
  const void* do_ptr = nullptr;  // same shape as q
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  void* dq_ptr = nullptr;  // same shape as q
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  void* dk_ptr = nullptr;  // same shape as k (GQA: summed over the query heads of a group)
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  void* dv_ptr = nullptr;  // same shape as v
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  bool deterministic = false;
  // Workspace of the CUDA backward, allocated and zero-filled by the binding (the CPU backend
  // ignores the accumulator and the counters): linear in the number of query rows, never in
  // seqlen_q x seqlen_k.
  float* dq_accum_ptr = nullptr;      // fp32 dQ accumulator, bwd_cuda_dq_accum_elems floats in
                                      //   the kernel's blocked layout (sm80/bwd_dq_sm80.h)
  float* dsoftmax_sum_ptr = nullptr;  // D_i = dO_i . O_i, laid out like softmax_lse (fp32);
                                      //   an output of the op (softmax_d), written by every
                                      //   backend for every row of every sequence
  int32_t* dq_semaphore = nullptr;    // deterministic: nheads x bwd_semaphores_per_head counters
  bool dq_bulk_reduce = false;        // CUDA: the launch reserved shared memory for dQ's bulk
                                      //   reductions (sm80/bwd_dq_sm80.h)
};

// Columns per (row, head) of a row-major fp32 accumulator (the split-KV forward's o_accum_ptr):
// head_dim rounded up to a multiple of 8, so that kernels may add column pairs (and 32-byte
// pieces) without a ragged end.
FLASH_HOST_DEVICE int dq_accum_width(int head_dim) { return (head_dim + 7) / 8 * 8; }

// In-place KV-cache update of flash_attn_with_kvcache, run before the attention.
struct KvAppendParams {
  DType dtype = DType::kFloat16;
  int batch = 0, nheads_k = 0, head_dim = 0, seqlen_new = 0;
  const void* k_new_ptr = nullptr;  // (batch, seqlen_new, nheads_k, d)
  const void* v_new_ptr = nullptr;
  int64_t knew_batch_stride = 0, knew_row_stride = 0, knew_head_stride = 0;
  int64_t vnew_batch_stride = 0, vnew_row_stride = 0, vnew_head_stride = 0;
  void* k_cache_ptr = nullptr;  // contiguous-or-strided cache, paged when block_table != nullptr
  void* v_cache_ptr = nullptr;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  const int32_t* cache_seqlens = nullptr;    // (batch): write position of the first new token
  const int32_t* cache_batch_idx = nullptr;  // (batch) or null
  const int32_t* block_table = nullptr;
  int64_t block_table_batch_stride = 0;
  int page_block_size = 0;
  // Rotary (rotary_dim == 0: off). cos/sin: (seqlen_ro, rotary_dim / 2), contiguous, input dtype.
  // The new key at cache position t is rotated with row t of the tables.
  const void* rotary_cos_ptr = nullptr;
  const void* rotary_sin_ptr = nullptr;
  int rotary_dim = 0;
  int rotary_seqlen = 0;  // rows of the tables: positions past them are left unrotated (CUDA:
                          //   the host cannot check device-resident cache_seqlens without a sync)
  bool rotary_interleaved = false;  // true: pairs (2i, 2i+1) (GPT-J); false: (i, i + r/2) (NeoX)
  // Optional (CUDA): seqused_out[b] = cache_seqlens[b] + seqlen_new, the key count the attention
  // step reads as seqused_k, written on the device so that the call never synchronises.
  int32_t* seqused_out = nullptr;
  // Bounds for the CUDA append, whose index tensors are not checked on the host (no sync): keys a
  // sequence can hold (seqlen_cache, or block-table columns x page size) and rows of the cache
  // (pages when paged, else batch rows). A token past them is dropped instead of written out of
  // bounds. 0: unknown.
  int64_t capacity = 0;
  int64_t kv_num_rows = 0;
};

// Rotary on the queries of flash_attn_with_kvcache (out-of-place: q is never modified).
// Query row i of sequence b uses table row cache_seqlens[b] + i when the attention is causal or
// local, and row cache_seqlens[b] for every query otherwise (FA2 semantics).
struct RotaryQParams {
  DType dtype = DType::kFloat16;
  int batch = 0, seqlen_q = 0, nheads = 0, head_dim = 0;
  const void* q_ptr = nullptr;  // (batch, seqlen_q, nheads, d)
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  void* q_out_ptr = nullptr;  // (batch, seqlen_q, nheads, d) contiguous
  const int32_t* cache_seqlens = nullptr;
  const void* rotary_cos_ptr = nullptr;
  const void* rotary_sin_ptr = nullptr;
  int rotary_dim = 0;
  int rotary_seqlen = 0;  // rows of the tables (see KvAppendParams)
  bool rotary_interleaved = false;
  bool positions_per_row = true;  // causal or local
};

FLASH_NAMESPACE_END
