"""FlashAttention-2's module wrappers (``flash_attn.modules.mha``)."""
