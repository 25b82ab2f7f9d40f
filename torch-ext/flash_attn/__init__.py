"""FlashAttention-2 compatible attention for the Hugging Face kernel hub (CPU and CUDA).

The public functions carry FlashAttention-2's names and keyword arguments, so Transformers and
existing callers can use this package as a drop-in (see flash_attn_interface.py).
"""

from . import bert_padding, flash_attn_interface
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = ["bert_padding", *flash_attn_interface.__all__]
