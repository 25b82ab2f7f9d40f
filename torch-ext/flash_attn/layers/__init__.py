"""Layers. ``flash_attn.layers.rotary`` is FlashAttention-2's rotary module; the classes defined
here are this repository's kernel-hub layers, which ``kernels.kernelize`` swaps into models
(``kernels`` reads a repository's ``layers`` attribute and looks a layer up by class name).

Kernel-hub layers are stateless ``nn.Module`` classes whose ``forward`` has the signature of the
forward it replaces, with only the ``has_backward`` / ``can_torch_compile`` class attributes.
"""

import torch

from .rotary import apply_rotary_emb

__all__ = ["ApplyRotaryTransformers", "apply_rotary_transformers"]


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
