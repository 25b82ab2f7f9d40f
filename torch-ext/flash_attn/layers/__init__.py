"""Layers. ``flash_attn.layers.rotary`` is FlashAttention-2's rotary module; the classes defined
here are this repository's kernel-hub layers, which ``kernels.kernelize`` swaps into models
(``kernels`` reads a repository's ``layers`` attribute and looks a layer up by class name).

Kernel-hub layers are stateless ``nn.Module`` classes whose ``forward`` has the signature of the
forward it replaces, with only the ``has_backward`` / ``can_torch_compile`` class attributes.
"""

import torch

from ..ops.layer_norm import norm_forward
from .rotary import apply_rotary_emb

__all__ = ["ApplyRotaryTransformers", "RMSNorm", "apply_rotary_transformers",
           "rms_norm_transformers"]


def _rotate_hf(x, cos, sin, unsqueeze_dim):
    # Transformers' layout: x (batch, nheads, seqlen, headdim) for unsqueeze_dim=1, (batch, seqlen,
    # nheads, headdim) for 2; cos/sin (batch or 1, seqlen, rotary_dim) with both halves equal
    # (its rotate_half convention is our non-interleaved one). Each batch row gets its own table
    # by stacking the rows and offsetting sequence b by b * seqlen.
    xs = x.transpose(1, 2) if unsqueeze_dim == 1 else x
    batch, seqlen = xs.shape[0], xs.shape[1]
    half = cos.shape[-1] // 2
    table_cos = cos[..., :half].reshape(-1, half)
    table_sin = sin[..., :half].reshape(-1, half)
    if cos.shape[0] == 1:
        offsets = 0
    else:
        offsets = torch.arange(batch, device=x.device, dtype=torch.int32) * seqlen
    out = apply_rotary_emb(xs, table_cos, table_sin, seqlen_offsets=offsets)
    return out.transpose(1, 2) if unsqueeze_dim == 1 else out


class ApplyRotaryTransformers(torch.nn.Module):
    """Transformers' ``apply_rotary_pos_emb`` (the ``rotary_pos_emb`` hub hook) on our rotary op:
    forward(q, k, cos, sin, unsqueeze_dim=1) -> (q_embed, k_embed). Differentiable in q and k."""

    has_backward = True
    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim not in (1, 2):
            raise RuntimeError(f"flash_attn: unsqueeze_dim must be 1 (q is (batch, nheads, "
                               f"seqlen, headdim)) or 2 (q is (batch, seqlen, nheads, headdim)), "
                               f"got {unsqueeze_dim}")
        return _rotate_hf(q, cos, sin, unsqueeze_dim), _rotate_hf(k, cos, sin, unsqueeze_dim)


# The layer name Transformers' own mapping uses for rotary kernels.
apply_rotary_transformers = ApplyRotaryTransformers


def rms_norm_transformers(hidden_states, weight, eps):
    """Transformers' ``LlamaRMSNorm.forward`` on our norm op: ``weight * (x / sqrt(mean(x^2) +
    eps)).to(x.dtype)``, the statistics computed at (at least) fp32. With weight in x's dtype (the
    usual case) the op forms the product itself and rounds once; otherwise the normalised x is
    rounded to x's dtype and multiplied by weight in PyTorch, so the result has Transformers'
    promoted dtype (an fp32 weight on bf16 activations gives fp32)."""
    if weight.dtype == hidden_states.dtype:
        return norm_forward(hidden_states, None, weight, None, 0.0, eps, is_rms_norm=True)
    ones = torch.ones(weight.shape, dtype=hidden_states.dtype, device=hidden_states.device)
    return weight * norm_forward(hidden_states, None, ones, None, 0.0, eps, is_rms_norm=True)


class RMSNorm(torch.nn.Module):
    """The kernel-hub layer for Transformers' ``@use_kernel_forward_from_hub("RMSNorm")`` hook
    (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm and the other Llama-style norms): forward reads
    the replaced module's ``weight`` and ``variance_epsilon``. Differentiable in the input and the
    weight. CPU and CUDA (fp16/bf16/fp32 on CUDA: map it for "cuda" too)."""

    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states):
        return rms_norm_transformers(hidden_states, self.weight, self.variance_epsilon)
