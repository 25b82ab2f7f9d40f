"""FlashAttention-2.8's ``flash_attn.losses``: the fused, chunked cross-entropy."""

from . import cross_entropy

__all__ = ["cross_entropy"]
