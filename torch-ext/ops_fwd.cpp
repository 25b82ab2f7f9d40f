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
  const BatchedQkv d = check_batched_qkv(q, k, v);
  const int64_t batch = d.batch, seqlen_q = d.seqlen_q, nheads = d.nheads;
  const int64_t seqlen_k = d.seqlen_k, nheads_k = d.nheads_k;
  const int head_dim = d.head_dim;
  check_scalars(dropout_p, softmax_scale, softcap, window_size_left, window_size_right);
  const Dropout drop = check_dropout(dropout_p, rng_state);
  const Window window = normalize_window(window_size_left, window_size_right, is_causal, seqlen_k);

  // Outputs.
  Tensor out = alloc(q, {batch, seqlen_q, nheads, head_dim}, q.scalar_type());
  Tensor lse = alloc(q, {batch, nheads, seqlen_q}, fwd_lse_dtype(q));
  Tensor s_dmask =
      alloc_s_dmask(q, return_softmax && dropout_p > 0, batch, nheads, seqlen_q, seqlen_k);

  // Params.
  FwdParams p;
  p.dtype = d.dtype;
  set_qkv(p, q, k, v);
  set_fwd_outputs(p, out, lse);
  p.p_ptr = s_dmask.numel() > 0 ? s_dmask.mutable_data_ptr() : nullptr;
  set_sizes(p, batch, nheads, nheads_k, head_dim, seqlen_q, "seqlen_q", seqlen_k, "seqlen_k");
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
  const DType dtype = check_kv_like_q(q, k, "k", v, "v");
  const int64_t total_q = q.size(0), nheads = q.size(1);
  const int64_t nheads_k = k.size(-2);
  const int head_dim = check_head_dim(q);
  check_k_head_dim(k, "k", head_dim);
  FLASH_CHECK(v.dim() == k.dim() && std::vector<int64_t>(v.sizes().begin(), v.sizes().end()) ==
                                        std::vector<int64_t>(k.sizes().begin(), k.sizes().end()),
              "v must have the same shape as k, got v ", shape_str(v), " and k ", shape_str(k));
  check_nheads(nheads, nheads_k);
  check_qkv_last_dim_contiguous(q, k, "k", v, "v");

  const VarlenTensors ix = check_varlen_tensors(q, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                                max_seqlen_q, max_seqlen_k);
  const int64_t batch = ix.batch;
  const PagedKv pk = paged ? check_paged_kv(*block_table, k, "k", batch, q) : PagedKv{};
  const std::optional<Tensor>& table = pk.table;
  const int64_t page_size = pk.page_size, num_blocks = pk.num_blocks;
  check_scalars(dropout_p, softmax_scale, softcap, window_size_left, window_size_right);
  const bool want_p = return_softmax && dropout_p > 0;
  FLASH_CHECK(!want_p || (max_seqlen_q >= 0 && max_seqlen_k >= 0),
              "max_seqlen_q and max_seqlen_k must be given (not -1) when return_softmax is set "
              "with dropout_p > 0: they size S_dmask");
  const Dropout drop = check_dropout(dropout_p, rng_state);

  // Index tensors' contents (host only) and the length bounds handed to the backend.
  const VarlenBounds bounds =
      varlen_bounds_of(q, ix, table, total_q, paged ? -1 : k.size(0), page_size, num_blocks,
                       max_seqlen_q, max_seqlen_k);
  const Window window =
      normalize_window(window_size_left, window_size_right, is_causal, bounds.seqlen_k);

  // Outputs.
  Tensor out = alloc(q, {total_q, nheads, head_dim}, q.scalar_type());
  Tensor lse = alloc(q, {nheads, total_q}, fwd_lse_dtype(q));
  Tensor s_dmask = alloc_s_dmask(q, want_p, batch, nheads, max_seqlen_q, max_seqlen_k);

  // Params.
  FwdParams p;
  p.dtype = dtype;
  set_qkv(p, q, k, v);  // k/v batch stride: the page stride when paged, else 0
  set_fwd_outputs(p, out, lse);
  p.p_ptr = s_dmask.numel() > 0 ? s_dmask.mutable_data_ptr() : nullptr;
  set_sizes(p, batch, nheads, nheads_k, head_dim, bounds.seqlen_q, "max_seqlen_q",
            bounds.seqlen_k, "max_seqlen_k");
  set_varlen_index(p, ix, total_q);
  // Bounds for the device index tensors, which are not validated here (no sync): page ids in
  // [0, pool pages); cu_seqlens_k offsets in [0, rows of k] when not paged.
  p.kv_num_blocks = paged ? num_blocks : 1;
  p.total_k = paged ? 0 : k.size(0);  // 0: not used (paged)
  if (paged) set_block_table(p, *table, page_size);
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
