// Owns: the forward ops `fwd` (batched) and `varlen_fwd` (packed sequences, optionally paged K/V):
// argument checks -> FwdParams -> the backend of q's device. Outputs are allocated here.
#include <vector>

#include "ops_common.h"
#include "torch_binding.h"

FLASH_NAMESPACE_BEGIN

using namespace binding;

namespace {

// S_dmask holds P for testing only (return_softmax with dropout): zero-filled so that entries the
// backend does not visit (outside each sequence, masked) read 0 as the contract says.
Tensor alloc_s_dmask(const Tensor& q, bool want, int64_t batch, int64_t nheads, int64_t seqlen_q,
                     int64_t seqlen_k) {
  return want ? alloc_zeros(q, {batch, nheads, seqlen_q, seqlen_k}, q.scalar_type())
              : alloc(q, {0}, q.scalar_type());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> mha_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& alibi_slopes,
    double dropout_p, double softmax_scale, bool is_causal, int64_t window_size_left,
    int64_t window_size_right, double softcap, bool return_softmax, const OptTensor& rng_state,
    bool /*deterministic: read by the autograd backward from the saved inputs*/) {
  // Tensor checks.
  check_rank(q, "q", 4, "(batch, seqlen_q, nheads, head_dim)");
  check_rank(k, "k", 4, "(batch, seqlen_k, nheads_k, head_dim)");
  check_rank(v, "v", 4, "(batch, seqlen_k, nheads_k, head_dim)");
  const DType dtype = backend_dtype(q);
  check_device(k, "k", q);
  check_device(v, "v", q);
  check_same_dtype(k, "k", q);
  check_same_dtype(v, "v", q);
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2);
  const int64_t seqlen_k = k.size(1), nheads_k = k.size(2);
  const int head_dim = check_head_dim(q);
  FLASH_CHECK(k.size(3) == head_dim, "k has head dimension ", k.size(3), " but q has ", head_dim,
              "; they must match");
  check_shape(k, "k", {batch, seqlen_k, nheads_k, head_dim},
              "(batch, seqlen_k, nheads_k, head_dim) matching q");
  check_shape(v, "v", {batch, seqlen_k, nheads_k, head_dim},
              "(batch, seqlen_k, nheads_k, head_dim) matching k");
  check_nheads(nheads, nheads_k);
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_scalars(dropout_p, softmax_scale, softcap, window_size_left, window_size_right);
  const Dropout drop = check_dropout(dropout_p, rng_state);
  const Window window = normalize_window(window_size_left, window_size_right, is_causal, seqlen_k);

  // Outputs.
  Tensor out = alloc(q, {batch, seqlen_q, nheads, head_dim}, q.scalar_type());
  Tensor lse = alloc(q, {batch, nheads, seqlen_q}, ScalarType::Float);
  Tensor s_dmask =
      alloc_s_dmask(q, return_softmax && dropout_p > 0, batch, nheads, seqlen_q, seqlen_k);

  // Params.
  FwdParams p;
  p.dtype = dtype;
  p.q_ptr = q.const_data_ptr();
  p.k_ptr = k.const_data_ptr();
  p.v_ptr = v.const_data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_row_stride = k.stride(1);
  p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_row_stride = v.stride(1);
  p.v_head_stride = v.stride(2);
  p.o_ptr = out.mutable_data_ptr();
  p.o_batch_stride = out.stride(0);
  p.o_row_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.softmax_lse_ptr = static_cast<float*>(lse.mutable_data_ptr());
  p.p_ptr = s_dmask.numel() > 0 ? s_dmask.mutable_data_ptr() : nullptr;
  p.batch = to_int(batch, "batch");
  p.nheads = to_int(nheads, "nheads");
  p.nheads_k = to_int(nheads_k, "nheads_k");
  p.head_dim = head_dim;
  p.seqlen_q = to_int(seqlen_q, "seqlen_q");
  p.seqlen_k = to_int(seqlen_k, "seqlen_k");
  p.kv_num_blocks = batch;  // K/V batch rows (bounds the kernel's addressing)
  set_score_params(p, softmax_scale, softcap, window, drop);
  set_alibi(p, alibi_slopes, q, batch, nheads);

  if (out.numel() == 0) return {out, lse, s_dmask, drop.rng_out};
  if (k.numel() == 0) {
    fill_no_keys(out, lse);
  } else {
    run_fwd(p, q);
  }
  return {out, lse, s_dmask, drop.rng_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mha_varlen_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, const OptTensor& seqused_k, const OptTensor& block_table,
    const OptTensor& alibi_slopes, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
    double softmax_scale, bool is_causal, int64_t window_size_left, int64_t window_size_right,
    double softcap, bool return_softmax, const OptTensor& rng_state,
    bool /*deterministic: read by the autograd backward from the saved inputs*/) {
  const bool paged = block_table.has_value();
  const char* kv_layout = paged ? "(num_blocks, page_block_size, nheads_k, head_dim) since "
                                  "block_table is given"
                                : "(total_k, nheads_k, head_dim)";

  // Tensor checks.
  check_rank(q, "q", 3, "(total_q, nheads, head_dim)");
  check_rank(k, "k", paged ? 4 : 3, kv_layout);
  check_rank(v, "v", paged ? 4 : 3, kv_layout);
  const DType dtype = backend_dtype(q);
  check_device(k, "k", q);
  check_device(v, "v", q);
  check_same_dtype(k, "k", q);
  check_same_dtype(v, "v", q);
  const int64_t total_q = q.size(0), nheads = q.size(1);
  const int64_t nheads_k = k.size(-2);
  const int head_dim = check_head_dim(q);
  FLASH_CHECK(k.size(-1) == head_dim, "k has head dimension ", k.size(-1), " but q has ",
              head_dim, "; they must match");
  FLASH_CHECK(v.dim() == k.dim() && std::vector<int64_t>(v.sizes().begin(), v.sizes().end()) ==
                                        std::vector<int64_t>(k.sizes().begin(), k.sizes().end()),
              "v must have the same shape as k, got v ", shape_str(v), " and k ", shape_str(k));
  check_nheads(nheads, nheads_k);
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");

  const VarlenTensors ix = check_varlen_tensors(q, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                                max_seqlen_q, max_seqlen_k);
  const int64_t batch = ix.batch;
  std::optional<Tensor> table;
  int64_t page_size = 0, num_blocks = 0;
  if (paged) {
    check_device(*block_table, "block_table", q);
    FLASH_CHECK(block_table->scalar_type() == ScalarType::Int,
                "block_table must have dtype torch.int32, got ",
                dtype_name(block_table->scalar_type()));
    FLASH_CHECK(block_table->dim() == 2 && block_table->size(0) == batch,
                "block_table must have shape (batch, max_blocks_per_seq) with batch = ", batch,
                ", got ", shape_str(*block_table));
    table = torch::stable::contiguous(*block_table);
    num_blocks = k.size(0);
    page_size = k.size(1);
    FLASH_CHECK(page_size >= 1, "k has page_block_size 0 (dimension 1); pages must hold keys");
  }
  check_scalars(dropout_p, softmax_scale, softcap, window_size_left, window_size_right);
  const bool want_p = return_softmax && dropout_p > 0;
  FLASH_CHECK(!want_p || (max_seqlen_q >= 0 && max_seqlen_k >= 0),
              "max_seqlen_q and max_seqlen_k must be given (not -1) when return_softmax is set "
              "with dropout_p > 0: they size S_dmask");
  const Dropout drop = check_dropout(dropout_p, rng_state);

  // Index tensors' contents (host only) and the length bounds handed to the backend.
  VarlenIndex index;
  index.cu_seqlens_q = &ix.cu_q;
  index.cu_seqlens_k = &ix.cu_k;
  index.seqused_k = &ix.used;
  index.block_table = &table;
  index.total_q = total_q;
  index.total_k = paged ? -1 : k.size(0);
  index.page_size = page_size;
  index.num_blocks = num_blocks;
  index.max_seqlen_q = max_seqlen_q;
  index.max_seqlen_k = max_seqlen_k;
  const VarlenBounds bounds = varlen_bounds(q, index);
  const Window window =
      normalize_window(window_size_left, window_size_right, is_causal, bounds.seqlen_k);

  // Outputs.
  Tensor out = alloc(q, {total_q, nheads, head_dim}, q.scalar_type());
  Tensor lse = alloc(q, {nheads, total_q}, ScalarType::Float);
  Tensor s_dmask = alloc_s_dmask(q, want_p, batch, nheads, max_seqlen_q, max_seqlen_k);

  // Params.
  FwdParams p;
  p.dtype = dtype;
  p.q_ptr = q.const_data_ptr();
  p.k_ptr = k.const_data_ptr();
  p.v_ptr = v.const_data_ptr();
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_batch_stride = paged ? k.stride(0) : 0;
  p.k_row_stride = k.stride(-3);
  p.k_head_stride = k.stride(-2);
  p.v_batch_stride = paged ? v.stride(0) : 0;
  p.v_row_stride = v.stride(-3);
  p.v_head_stride = v.stride(-2);
  p.o_ptr = out.mutable_data_ptr();
  p.o_row_stride = out.stride(0);
  p.o_head_stride = out.stride(1);
  p.softmax_lse_ptr = static_cast<float*>(lse.mutable_data_ptr());
  p.p_ptr = s_dmask.numel() > 0 ? s_dmask.mutable_data_ptr() : nullptr;
  p.batch = to_int(batch, "batch");
  p.nheads = to_int(nheads, "nheads");
  p.nheads_k = to_int(nheads_k, "nheads_k");
  p.head_dim = head_dim;
  p.seqlen_q = to_int(bounds.seqlen_q, "max_seqlen_q");
  p.seqlen_k = to_int(bounds.seqlen_k, "max_seqlen_k");
  p.total_q = to_int(total_q, "total_q");
  // Bounds for the device index tensors, which are not validated here (no sync): page ids in
  // [0, pool pages); cu_seqlens_k offsets in [0, rows of k] when not paged.
  p.kv_num_blocks = paged ? num_blocks : 1;
  p.total_k = paged ? 0 : k.size(0);  // 0: not used (paged)
  p.cu_seqlens_q = ix.cu_q.const_data_ptr<int32_t>();
  p.cu_seqlens_k = ix.cu_k.const_data_ptr<int32_t>();
  p.seqused_k = ix.used ? ix.used->const_data_ptr<int32_t>() : nullptr;
  if (paged) {
    p.block_table = table->const_data_ptr<int32_t>();
    p.block_table_batch_stride = table->stride(0);
    p.page_block_size = to_int(page_size, "page_block_size");
  }
  set_score_params(p, softmax_scale, softcap, window, drop);
  set_alibi(p, alibi_slopes, q, batch, nheads);

  if (out.numel() == 0 || batch == 0) return {out, lse, s_dmask, drop.rng_out};
  if (k.numel() == 0) {
    fill_no_keys(out, lse);
  } else {
    run_fwd(p, q);
  }
  return {out, lse, s_dmask, drop.rng_out};
}

FLASH_NAMESPACE_END
