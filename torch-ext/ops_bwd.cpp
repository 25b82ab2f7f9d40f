// Owns: the backward ops `bwd` and `varlen_bwd`: argument checks -> BwdParams -> the backend of
// q's device (run_bwd, ops_common.h, which also allocates the CUDA backward's workspace).
// dq/dk/dv are the caller's (FlashAttention-2's contract): shaped like q/k/v (GQA: dk/dv have
// nheads_k heads), any strides with a contiguous last dimension, so that the packed functions
// pass views of one packed gradient. They are zero-filled first: rows no query sees (masked keys,
// keys past seqused_k) then read 0 without the backend visiting them, and a backend may
// accumulate into them. The fill is O(N d) against the O(N^2 d) backward. The op returns D =
// rowsum(dO o O) (softmax_d, fp32, the LSE's layout), as FlashAttention-2's backward does.
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

// fp32, or fp64 for fp64 inputs (the LSE fwd returns for them: the autograd path's exact one).
void check_lse(const Tensor& lse, const Tensor& q, std::initializer_list<int64_t> shape,
               const char* layout) {
  check_device(lse, "softmax_lse", q);
  const bool fp64_ok = q.scalar_type() == ScalarType::Double;
  FLASH_CHECK(lse.scalar_type() == ScalarType::Float ||
                  (fp64_ok && lse.scalar_type() == ScalarType::Double),
              "softmax_lse must have dtype torch.float32", fp64_ok ? " or torch.float64" : "",
              ", got ", dtype_name(lse.scalar_type()));
  check_shape(lse, "softmax_lse", shape, layout);
}

// A caller-given gradient: the shape, dtype and device of the tensor it is the gradient of,
// last dimension contiguous, any other strides.
void check_grad(const Tensor& g, const char* name, const Tensor& t, const char* t_name,
                const Tensor& q) {
  check_device(g, name, q);
  check_same_dtype(g, name, q);
  FLASH_CHECK(std::vector<int64_t>(g.sizes().begin(), g.sizes().end()) ==
                  std::vector<int64_t>(t.sizes().begin(), t.sizes().end()),
              name, " must have the shape of ", t_name, " ", shape_str(t), ", got ", shape_str(g));
  check_last_dim_contiguous(g, name);
}

void check_grads(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& q,
                 const Tensor& k, const Tensor& v) {
  check_grad(dq, "dq", q, "q", q);
  check_grad(dk, "dk", k, "k", q);
  check_grad(dv, "dv", v, "v", q);
}

// Zero-filled gradients and softmax_d (D) shaped like the LSE; D is written by the backend for
// every row, or stays 0 when the backend is not called (no rows or no keys: out is 0 there).
Tensor prepare_outputs(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& lse, bool run) {
  torch::stable::zero_(dq);
  torch::stable::zero_(dk);
  torch::stable::zero_(dv);
  std::vector<int64_t> sizes(lse.sizes().begin(), lse.sizes().end());
  Tensor softmax_d = torch::stable::new_empty(lse, sizes, ScalarType::Float);
  if (!run) torch::stable::zero_(softmax_d);
  return softmax_d;
}

// The forward tensors and the gradient pointers, shared by both backward ops.
void set_bwd_tensors(BwdParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                     const Tensor& out, const Tensor& lse, const Tensor& dout, Tensor& dq,
                     Tensor& dk, Tensor& dv, Tensor& softmax_d) {
  set_qkv(p, q, k, v);
  // The forward's out is an input here; the backend only reads it.
  p.o_ptr = const_cast<void*>(out.const_data_ptr());
  read_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  set_lse(p, lse);
  p.dsoftmax_sum_ptr = softmax_d.mutable_data_ptr<float>();
  p.do_ptr = dout.const_data_ptr();
  read_strides(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  p.dq_ptr = dq.mutable_data_ptr();
  read_strides(dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  p.dk_ptr = dk.mutable_data_ptr();
  read_strides(dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  p.dv_ptr = dv.mutable_data_ptr();
  read_strides(dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
}

// With no query rows or no keys every gradient is zero and the backend is not called.
bool nothing_to_do(const Tensor& q, const Tensor& k) { return q.numel() == 0 || k.numel() == 0; }

}  // namespace

Tensor mha_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, Tensor dq, Tensor dk, Tensor dv, const OptTensor& alibi_slopes,
    double dropout_p,
    double softmax_scale, bool is_causal, int64_t window_size_left, int64_t window_size_right,
    double softcap, bool deterministic, const OptTensor& rng_state) {
  // Tensor checks.
  const BatchedQkv d = check_batched_qkv(q, k, v);
  const int64_t batch = d.batch, seqlen_q = d.seqlen_q, nheads = d.nheads;
  const int64_t seqlen_k = d.seqlen_k, nheads_k = d.nheads_k;
  check_like_q(out, "out", q);
  check_like_q(dout, "dout", q);
  check_lse(softmax_lse, q, {batch, nheads, seqlen_q}, "(batch, nheads, seqlen_q)");
  check_grads(dq, dk, dv, q, k, v);
  check_scalars(dropout_p, softmax_scale, softcap, window_size_left, window_size_right);
  const Dropout drop = check_dropout(dropout_p, rng_state);
  const Window window = normalize_window(window_size_left, window_size_right, is_causal, seqlen_k);
  const Tensor lse = torch::stable::contiguous(softmax_lse);

  // Outputs.
  const bool run = !nothing_to_do(q, k);
  Tensor softmax_d = prepare_outputs(dq, dk, dv, lse, run);
  if (!run) return softmax_d;

  // Params.
  BwdParams p;
  p.dtype = d.dtype;
  set_bwd_tensors(p, q, k, v, out, lse, dout, dq, dk, dv, softmax_d);
  set_sizes(p, batch, nheads, nheads_k, d.head_dim, seqlen_q, "seqlen_q", seqlen_k, "seqlen_k");
  set_score_params(p, softmax_scale, softcap, window, drop);
  set_alibi(p, alibi_slopes, q, batch, nheads);
  p.deterministic = deterministic;

  run_bwd(p, q);
  return softmax_d;
}

Tensor mha_varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, Tensor dq, Tensor dk, Tensor dv, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k,
    const OptTensor& seqused_k, const OptTensor& alibi_slopes, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double dropout_p, double softmax_scale, bool is_causal,
    int64_t window_size_left, int64_t window_size_right, double softcap, bool deterministic,
    const OptTensor& rng_state) {
  // Tensor checks.
  check_rank(q, "q", 3, "(total_q, nheads, head_dim)");
  check_rank(k, "k", 3, "(total_k, nheads_k, head_dim)");
  check_rank(v, "v", 3, "(total_k, nheads_k, head_dim)");
  const DType dtype = check_kv_like_q(q, k, "k", v, "v");
  const int64_t total_q = q.size(0), nheads = q.size(1);
  const int64_t total_k = k.size(0), nheads_k = k.size(1);
  const int head_dim = check_head_dim(q);
  check_k_head_dim(k, "k", head_dim);
  check_shape(v, "v", {total_k, nheads_k, head_dim}, "(total_k, nheads_k, head_dim) matching k");
  check_nheads(nheads, nheads_k);
  check_qkv_last_dim_contiguous(q, k, "k", v, "v");
  check_like_q(out, "out", q);
  check_like_q(dout, "dout", q);
  check_lse(softmax_lse, q, {nheads, total_q}, "(nheads, total_q)");
  check_grads(dq, dk, dv, q, k, v);
  const VarlenTensors ix = check_varlen_tensors(q, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                                max_seqlen_q, max_seqlen_k);
  check_scalars(dropout_p, softmax_scale, softcap, window_size_left, window_size_right);
  const Dropout drop = check_dropout(dropout_p, rng_state);
  const VarlenBounds bounds = varlen_bounds_of(q, ix, std::nullopt, total_q, total_k, 0, 0,
                                               max_seqlen_q, max_seqlen_k);
  const Window window =
      normalize_window(window_size_left, window_size_right, is_causal, bounds.seqlen_k);
  const Tensor lse = torch::stable::contiguous(softmax_lse);

  // Outputs.
  const bool run = !nothing_to_do(q, k) && ix.batch > 0;
  Tensor softmax_d = prepare_outputs(dq, dk, dv, lse, run);
  if (!run) return softmax_d;

  // Params.
  BwdParams p;
  p.dtype = dtype;
  set_bwd_tensors(p, q, k, v, out, lse, dout, dq, dk, dv, softmax_d);
  set_sizes(p, ix.batch, nheads, nheads_k, head_dim, bounds.seqlen_q, "max_seqlen_q",
            bounds.seqlen_k, "max_seqlen_k");
  set_varlen_index(p, ix, total_q);
  set_score_params(p, softmax_scale, softcap, window, drop);
  set_alibi(p, alibi_slopes, q, ix.batch, nheads);
  p.deterministic = deterministic;

  run_bwd(p, q);
  return softmax_d;
}

FLASH_NAMESPACE_END
