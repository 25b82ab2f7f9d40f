"""FlashAttention-2.8's ``flash_attn.utils``: ``distributed`` (the tensor-parallel collectives of
``ops.fused_dense``)."""

from . import distributed

__all__ = ["distributed"]
