// Owns: the C++ signatures of the custom ops (schemas in torch_binding.cpp and
// docs/design.md). Each op checks its arguments (checks.h), fills the params struct of
// kernel_src/common/params.h by named assignment, and calls the backend of the tensors' device.
// Stable ABI only: no ATen/c10 types, so one build serves every torch >= 2.10.
#pragma once
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../kernel_src/common/namespace.h"

FLASH_NAMESPACE_BEGIN

using torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;

// -> (out, softmax_lse, S_dmask, rng_state)
std::tuple<Tensor, Tensor, Tensor, Tensor> mha_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& alibi_slopes,
    double dropout_p, double softmax_scale, bool is_causal, int64_t window_size_left,
    int64_t window_size_right, double softcap, bool return_softmax, const OptTensor& rng_state,
    bool deterministic);

// -> (out, softmax_lse, S_dmask, rng_state)
std::tuple<Tensor, Tensor, Tensor, Tensor> mha_varlen_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, const OptTensor& seqused_k, const OptTensor& block_table,
    const OptTensor& alibi_slopes, int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p,
    double softmax_scale, bool is_causal, int64_t window_size_left, int64_t window_size_right,
    double softcap, bool return_softmax, const OptTensor& rng_state, bool deterministic);

// Writes the gradients into the caller's dq, dk, dv (any strides, last dim contiguous; zeroed
// first). -> softmax_d, D = rowsum(dout o out) in the LSE's layout (fp32).
Tensor mha_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, Tensor dq, Tensor dk, Tensor dv, const OptTensor& alibi_slopes,
    double dropout_p, double softmax_scale, bool is_causal, int64_t window_size_left,
    int64_t window_size_right, double softcap, bool deterministic, const OptTensor& rng_state);

// As mha_bwd, for packed sequences. -> softmax_d (nheads, total_q)
Tensor mha_varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, Tensor dq, Tensor dk, Tensor dv, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, const OptTensor& seqused_k, const OptTensor& alibi_slopes,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double dropout_p, double softmax_scale,
    bool is_causal, int64_t window_size_left, int64_t window_size_right, double softcap,
    bool deterministic, const OptTensor& rng_state);

// Appends k/v to the cache in place (k_cache, v_cache are mutated), then attends.
// -> (out, softmax_lse)
std::tuple<Tensor, Tensor> mha_fwd_kvcache(
    const Tensor& q, Tensor k_cache, Tensor v_cache, const OptTensor& k, const OptTensor& v,
    const OptTensor& cache_seqlens, const OptTensor& rotary_cos, const OptTensor& rotary_sin,
    const OptTensor& cache_batch_idx, const OptTensor& cache_leftpad,
    const OptTensor& block_table, const OptTensor& alibi_slopes, double softmax_scale,
    bool is_causal, int64_t window_size_left, int64_t window_size_right, double softcap,
    bool rotary_interleaved, int64_t num_splits);

// x with the first 2 * cos.size(1) dims of every head rotated (common/rotary.h); a new tensor.
Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin,
              const OptTensor& seqlen_offsets, const OptTensor& cu_seqlens,
              int64_t seqlen_offset, int64_t max_seqlen, bool interleaved, bool conjugate);

// ---- fused training ops (docs/fused_ops.md; CPU kernels, CUDA raises for now) ----------------

// dropout + residual add + LayerNorm/RMSNorm of x0 (rows, hidden). -> (z, x, dmask, mu, rsigma,
// rng_state); x is empty when it equals x0, dmask unless asked for, mu for RMSNorm.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dropout_add_ln_fwd(
    const Tensor& x0, const OptTensor& residual, const Tensor& gamma, const OptTensor& beta,
    const OptTensor& rowscale, const OptTensor& colscale, double dropout_p, double epsilon,
    const OptTensor& rng_state, bool residual_in_fp32, bool is_rms_norm, bool return_dropout_mask);

// -> (dx0, dresidual, dgamma, dbeta, dcolscale); the optional ones empty when not wanted.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dropout_add_ln_bwd(
    const Tensor& dz, const OptTensor& dx, const Tensor& x, const OptTensor& x0, const Tensor& mu,
    const Tensor& rsigma, const Tensor& gamma, const OptTensor& rowscale,
    const OptTensor& colscale, double dropout_p, const OptTensor& rng_state, bool has_residual,
    bool has_beta, bool is_rms_norm);

// Chunked cross-entropy of logits (batch, vocab). -> (losses, z_losses, lse)
std::tuple<Tensor, Tensor, Tensor> cross_entropy_fwd(
    const Tensor& logits, const Tensor& labels, const OptTensor& precomputed_lse,
    double smoothing, double logit_scale, double lse_square_scale, int64_t ignore_index,
    int64_t total_classes, int64_t class_start_idx, bool split, bool inplace_backward);

// -> dlogits (a new tensor)
Tensor cross_entropy_bwd(const Tensor& dlosses, const Tensor& logits, const Tensor& lse,
                         const Tensor& labels, double smoothing, double logit_scale,
                         double lse_square_scale, int64_t ignore_index, int64_t total_classes,
                         int64_t class_start_idx);

// Overwrites logits with dlogits (inplace_backward).
void cross_entropy_bwd_inplace(const Tensor& dlosses, Tensor logits, const Tensor& lse,
                               const Tensor& labels, double smoothing, double logit_scale,
                               double lse_square_scale, int64_t ignore_index,
                               int64_t total_classes, int64_t class_start_idx);

FLASH_NAMESPACE_END
