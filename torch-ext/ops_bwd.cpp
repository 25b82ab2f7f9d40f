// Owns: the backward ops `bwd` and `varlen_bwd`: argument checks -> BwdParams -> the CPU backend
// (the CUDA backward is not there yet and fails with a clear error). dq/dk/dv are allocated here,
// contiguous, with the shapes of q/k/v (GQA: dk/dv have nheads_k heads), and zero-filled: rows
// no query sees (masked keys, keys past seqused_k) then read 0 without the backend visiting them,
// and a backend may accumulate into them. The fill is O(N d) against the O(N^2 d) backward.
#include <vector>

#include "ops_common.h"
#include "torch_binding.h"

FLASH_NAMESPACE_BEGIN

using namespace binding;

namespace {

// dout and out must look like q (same shape, dtype, device, last dim contiguous).
void check_like_q(const Tensor& t, const char* name, const Tensor& q) {
  check_device(t, name, q);
  check_same_dtype(t, name, q);
  FLASH_CHECK(std::vector<int64_t>(t.sizes().begin(), t.sizes().end()) ==
                  std::vector<int64_t>(q.sizes().begin(), q.sizes().end()),
              name, " must have the shape of q ", shape_str(q), ", got ", shape_str(t));
  check_last_dim_contiguous(t, name);
}

void check_lse(const Tensor& lse, const Tensor& q, std::initializer_list<int64_t> shape,
               const char* layout) {
  check_device(lse, "softmax_lse", q);
  FLASH_CHECK(lse.scalar_type() == ScalarType::Float,
              "softmax_lse must have dtype torch.float32, got ", dtype_name(lse.scalar_type()));
  check_shape(lse, "softmax_lse", shape, layout);
}

// The forward tensors and the gradient pointers, shared by both backward ops.
void set_bwd_tensors(BwdParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& out, const Tensor& lse, const Tensor& dout, Tensor& dq,
                     Tensor& dk, Tensor& dv) {
  // Batched tensors have one more leading dimension than varlen ones; strides are read from
  // the end so that one function serves both (batch stride stays 0 for varlen).
  const bool batched = q.dim() == 4;
  auto strides = [batched](const Tensor& t, int64_t& b, int64_t& r, int64_t& h) {
    b = batched ? t.stride(0) : 0;
    r = t.stride(-3);
    h = t.stride(-2);
  };
  p.q_ptr = q.const_data_ptr();
  p.k_ptr = k.const_data_ptr();
  p.v_ptr = v.const_data_ptr();
  strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  // The forward's out is an input here; the backend only reads it.
  p.o_ptr = const_cast<void*>(out.const_data_ptr());
  strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.softmax_lse_ptr = const_cast<float*>(lse.const_data_ptr<float>());
  p.do_ptr = dout.const_data_ptr();
  strides(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  p.dq_ptr = dq.mutable_data_ptr();
  strides(dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  p.dk_ptr = dk.mutable_data_ptr();
  strides(dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  p.dv_ptr = dv.mutable_data_ptr();
  strides(dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
}

// With no query rows or no keys every gradient is zero and the backend is not called.
bool nothing_to_do(const Tensor& q, const Tensor& k) { return q.numel() == 0 || k.numel() == 0; }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> mha_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const OptTensor& alibi_slopes, double dropout_p,
    double softmax_scale, bool is_causal, int64_t window_size_left, int64_t window_size_right,
    double softcap, bool deterministic, const OptTensor& rng_state) {
  check_cpu_only(q, "bwd");
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
  check_like_q(out, "out", q);
  check_like_q(dout, "dout", q);
  check_lse(softmax_lse, q, {batch, nheads, seqlen_q}, "(batch, nheads, seqlen_q)");
  check_scalars(dropout_p, softmax_scale, softcap, window_size_left, window_size_right);
  const Dropout drop = check_dropout(dropout_p, rng_state);
  const Window window = normalize_window(window_size_left, window_size_right, is_causal, seqlen_k);
  const Tensor lse = torch::stable::contiguous(softmax_lse);

  // Outputs.
  Tensor dq = zeros_like(q), dk = zeros_like(k), dv = zeros_like(v);
  if (nothing_to_do(q, k)) return {dq, dk, dv};

  // Params.
  BwdParams p;
  p.dtype = dtype;
  set_bwd_tensors(p, q, k, v, out, lse, dout, dq, dk, dv);
  p.batch = to_int(batch, "batch");
  p.nheads = to_int(nheads, "nheads");
  p.nheads_k = to_int(nheads_k, "nheads_k");
  p.head_dim = head_dim;
  p.seqlen_q = to_int(seqlen_q, "seqlen_q");
  p.seqlen_k = to_int(seqlen_k, "seqlen_k");
  set_score_params(p, softmax_scale, softcap, window, drop);
  set_alibi(p, alibi_slopes, q, batch, nheads);
  p.deterministic = deterministic;

  run_bwd_cpu(p);
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor, Tensor> mha_varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, const OptTensor& alibi_slopes, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, double softmax_scale, bool is_causal,
    int64_t window_size_left, int64_t window_size_right, double softcap, bool deterministic,
    const OptTensor& rng_state) {
  check_cpu_only(q, "varlen_bwd");
  // Tensor checks.
  check_rank(q, "q", 3, "(total_q, nheads, head_dim)");
  check_rank(k, "k", 3, "(total_k, nheads_k, head_dim)");
  check_rank(v, "v", 3, "(total_k, nheads_k, head_dim)");
  const DType dtype = backend_dtype(q);
  check_device(k, "k", q);
  check_device(v, "v", q);
  check_same_dtype(k, "k", q);
  check_same_dtype(v, "v", q);
  const int64_t total_q = q.size(0), nheads = q.size(1);
  const int64_t total_k = k.size(0), nheads_k = k.size(1);
  const int head_dim = check_head_dim(q);
  FLASH_CHECK(k.size(2) == head_dim, "k has head dimension ", k.size(2), " but q has ", head_dim,
              "; they must match");
  check_shape(v, "v", {total_k, nheads_k, head_dim}, "(total_k, nheads_k, head_dim) matching k");
  check_nheads(nheads, nheads_k);
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  check_like_q(out, "out", q);
  check_like_q(dout, "dout", q);
  check_lse(softmax_lse, q, {nheads, total_q}, "(nheads, total_q)");
  const VarlenTensors ix = check_varlen_tensors(q, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                                max_seqlen_q, max_seqlen_k);
  check_scalars(dropout_p, softmax_scale, softcap, window_size_left, window_size_right);
  const Dropout drop = check_dropout(dropout_p, rng_state);
  const std::optional<Tensor> no_table;
  VarlenIndex index;
  index.cu_seqlens_q = &ix.cu_q;
  index.cu_seqlens_k = &ix.cu_k;
  index.seqused_k = &ix.used;
  index.block_table = &no_table;
  index.total_q = total_q;
  index.total_k = total_k;
  index.max_seqlen_q = max_seqlen_q;
  index.max_seqlen_k = max_seqlen_k;
  const VarlenBounds bounds = varlen_bounds(q, index);
  const Window window =
      normalize_window(window_size_left, window_size_right, is_causal, bounds.seqlen_k);
  const Tensor lse = torch::stable::contiguous(softmax_lse);

  // Outputs.
  Tensor dq = zeros_like(q), dk = zeros_like(k), dv = zeros_like(v);
  if (nothing_to_do(q, k) || ix.batch == 0) return {dq, dk, dv};

  // Params.
  BwdParams p;
  p.dtype = dtype;
  set_bwd_tensors(p, q, k, v, out, lse, dout, dq, dk, dv);
  p.batch = to_int(ix.batch, "batch");
  p.nheads = to_int(nheads, "nheads");
  p.nheads_k = to_int(nheads_k, "nheads_k");
  p.head_dim = head_dim;
  p.seqlen_q = to_int(bounds.seqlen_q, "max_seqlen_q");
  p.seqlen_k = to_int(bounds.seqlen_k, "max_seqlen_k");
  p.total_q = to_int(total_q, "total_q");
  p.cu_seqlens_q = ix.cu_q.const_data_ptr<int32_t>();
  p.cu_seqlens_k = ix.cu_k.const_data_ptr<int32_t>();
  p.seqused_k = ix.used ? ix.used->const_data_ptr<int32_t>() : nullptr;
  set_score_params(p, softmax_scale, softcap, window, drop);
  set_alibi(p, alibi_slopes, q, ix.batch, nheads);
  p.deterministic = deterministic;

  run_bwd_cpu(p);
  return {dq, dk, dv};
}

FLASH_NAMESPACE_END
