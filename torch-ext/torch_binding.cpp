// Owns: the op schemas (docs/design.md is the contract) and their registration, nothing else.
// max_seqlen_q/k are SymInt (an int at run time) so that a traced `.item()` can reach the op under
// torch.compile, as with FlashAttention-2's own custom ops.
// The library is named by TORCH_EXTENSION_NAME, which the build sets to the ops name
// (_flash_attn_<backend>_<rev>), so two builds never share a namespace. registration.h comes from
// the build (kernel-builder, or tools/build_local.py) and provides the *_EXPAND macros and
// REGISTER_EXTENSION (the Python module init that lets `from . import <ops name>` load the .so).
#include <torch/csrc/stable/library.h>

#include "registration.h"
#include "torch_binding.h"

STABLE_TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, float dropout_p, "
      "float softmax_scale, bool is_causal, int window_size_left, int window_size_right, "
      "float softcap, bool return_softmax, Tensor? rng_state, bool deterministic=False) "
      "-> (Tensor out, Tensor softmax_lse, Tensor S_dmask, Tensor rng_state)");
  ops.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor? seqused_k, Tensor? block_table, Tensor? alibi_slopes, SymInt max_seqlen_q, "
      "SymInt max_seqlen_k, float dropout_p, float softmax_scale, bool is_causal, "
      "int window_size_left, int window_size_right, float softcap, bool return_softmax, "
      "Tensor? rng_state, bool deterministic=False) "
      "-> (Tensor out, Tensor softmax_lse, Tensor S_dmask, Tensor rng_state)");
  ops.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor? alibi_slopes, float dropout_p, "
      "float softmax_scale, bool is_causal, int window_size_left, int window_size_right, "
      "float softcap, bool deterministic, Tensor? rng_state) -> Tensor softmax_d");
  ops.def(
      "varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor? seqused_k, Tensor? alibi_slopes, SymInt max_seqlen_q, SymInt max_seqlen_k, "
      "float dropout_p, float softmax_scale, bool is_causal, int window_size_left, "
      "int window_size_right, float softcap, bool deterministic, Tensor? rng_state) "
      "-> Tensor softmax_d");
  ops.def(
      "fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor? cache_seqlens, Tensor? rotary_cos, Tensor? rotary_sin, Tensor? cache_batch_idx, "
      "Tensor? cache_leftpad, Tensor? block_table, Tensor? alibi_slopes, float softmax_scale, "
      "bool is_causal, int window_size_left, int window_size_right, float softcap, "
      "bool rotary_interleaved, int num_splits) -> (Tensor out, Tensor softmax_lse)");
  ops.def(
      "rotary(Tensor x, Tensor cos, Tensor sin, Tensor? seqlen_offsets, Tensor? cu_seqlens, "
      "int seqlen_offset, SymInt max_seqlen, bool interleaved, bool conjugate) -> Tensor");
  // The fused training ops (docs/fused_ops.md).
  ops.def(
      "dropout_add_ln_fwd(Tensor x0, Tensor? residual, Tensor gamma, Tensor? beta, "
      "Tensor? rowscale, Tensor? colscale, float dropout_p, float epsilon, Tensor? rng_state, "
      "bool residual_in_fp32, bool is_rms_norm, bool return_dropout_mask) "
      "-> (Tensor z, Tensor x, Tensor dmask, Tensor mu, Tensor rsigma, Tensor rng_state)");
  ops.def(
      "dropout_add_ln_bwd(Tensor dz, Tensor? dx, Tensor x, Tensor? x0, Tensor mu, "
      "Tensor rsigma, Tensor gamma, Tensor? rowscale, Tensor? colscale, float dropout_p, "
      "Tensor? rng_state, bool has_residual, bool has_beta, bool is_rms_norm) "
      "-> (Tensor dx0, Tensor dresidual, Tensor dgamma, Tensor dbeta, Tensor dcolscale)");
  ops.def(
      "cross_entropy_fwd(Tensor logits, Tensor labels, Tensor? precomputed_lse, "
      "float smoothing, float logit_scale, float lse_square_scale, int ignore_index, "
      "int total_classes, int class_start_idx, bool split, bool inplace_backward=False) "
      "-> (Tensor losses, Tensor z_losses, Tensor lse)");
  ops.def(
      "cross_entropy_bwd(Tensor dlosses, Tensor logits, Tensor lse, Tensor labels, "
      "float smoothing, float logit_scale, float lse_square_scale, int ignore_index, "
      "int total_classes, int class_start_idx) -> Tensor dlogits");
  ops.def(
      "cross_entropy_bwd_inplace(Tensor dlosses, Tensor(a!) logits, Tensor lse, Tensor labels, "
      "float smoothing, float logit_scale, float lse_square_scale, int ignore_index, "
      "int total_classes, int class_start_idx) -> ()");
}

// One implementation per op serves both devices: it checks the device itself and calls the
// matching backend.
STABLE_TORCH_LIBRARY_IMPL_EXPAND(TORCH_EXTENSION_NAME, CPU, ops) {
  ops.impl("fwd", TORCH_BOX(&FLASH_NAMESPACE::mha_fwd));
  ops.impl("varlen_fwd", TORCH_BOX(&FLASH_NAMESPACE::mha_varlen_fwd));
  ops.impl("bwd", TORCH_BOX(&FLASH_NAMESPACE::mha_bwd));
  ops.impl("varlen_bwd", TORCH_BOX(&FLASH_NAMESPACE::mha_varlen_bwd));
  ops.impl("fwd_kvcache", TORCH_BOX(&FLASH_NAMESPACE::mha_fwd_kvcache));
  ops.impl("rotary", TORCH_BOX(&FLASH_NAMESPACE::rotary));
  ops.impl("dropout_add_ln_fwd", TORCH_BOX(&FLASH_NAMESPACE::dropout_add_ln_fwd));
  ops.impl("dropout_add_ln_bwd", TORCH_BOX(&FLASH_NAMESPACE::dropout_add_ln_bwd));
  ops.impl("cross_entropy_fwd", TORCH_BOX(&FLASH_NAMESPACE::cross_entropy_fwd));
  ops.impl("cross_entropy_bwd", TORCH_BOX(&FLASH_NAMESPACE::cross_entropy_bwd));
  ops.impl("cross_entropy_bwd_inplace", TORCH_BOX(&FLASH_NAMESPACE::cross_entropy_bwd_inplace));
}

#ifdef CUDA_KERNEL
STABLE_TORCH_LIBRARY_IMPL_EXPAND(TORCH_EXTENSION_NAME, CUDA, ops) {
  ops.impl("fwd", TORCH_BOX(&FLASH_NAMESPACE::mha_fwd));
  ops.impl("varlen_fwd", TORCH_BOX(&FLASH_NAMESPACE::mha_varlen_fwd));
  ops.impl("bwd", TORCH_BOX(&FLASH_NAMESPACE::mha_bwd));
  ops.impl("varlen_bwd", TORCH_BOX(&FLASH_NAMESPACE::mha_varlen_bwd));
  ops.impl("fwd_kvcache", TORCH_BOX(&FLASH_NAMESPACE::mha_fwd_kvcache));
  ops.impl("rotary", TORCH_BOX(&FLASH_NAMESPACE::rotary));
  ops.impl("dropout_add_ln_fwd", TORCH_BOX(&FLASH_NAMESPACE::dropout_add_ln_fwd));
  ops.impl("dropout_add_ln_bwd", TORCH_BOX(&FLASH_NAMESPACE::dropout_add_ln_bwd));
  ops.impl("cross_entropy_fwd", TORCH_BOX(&FLASH_NAMESPACE::cross_entropy_fwd));
  ops.impl("cross_entropy_bwd", TORCH_BOX(&FLASH_NAMESPACE::cross_entropy_bwd));
  ops.impl("cross_entropy_bwd_inplace", TORCH_BOX(&FLASH_NAMESPACE::cross_entropy_bwd_inplace));
}
#endif

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
