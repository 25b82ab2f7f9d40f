"""FlashAttention-2.8's fused training ops: ``layer_norm`` / ``rms_norm`` (dropout + residual +
norm in one op), ``fused_dense`` (linear + bias + activation). ``flash_attn.losses.cross_entropy``
holds the fused cross-entropy. docs/fused_ops.md has the semantics and what runs where."""

from . import fused_dense, layer_norm, rms_norm

__all__ = ["fused_dense", "layer_norm", "rms_norm"]
