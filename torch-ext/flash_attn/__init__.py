"""FlashAttention-2 compatible attention for the Hugging Face kernel hub (CPU and CUDA).

The public functions carry FlashAttention-2's names and keyword arguments, so Transformers and
existing callers can use this package as a drop-in (see flash_attn_interface.py). The toolkit
around them keeps FlashAttention-2's module paths: ``flash_attn.bert_padding``,
``flash_attn.layers.rotary``, ``flash_attn.modules.mha``, and the fused training ops
``flash_attn.ops.layer_norm`` / ``ops.rms_norm`` / ``ops.fused_dense`` and
``flash_attn.losses.cross_entropy`` (docs/fused_ops.md), with ``flash_attn.utils.distributed``
(the tensor-parallel collectives). ``layers`` also holds this repository's kernel-hub layers for
``kernels.kernelize``.
"""

from . import bert_padding, flash_attn_interface, layers, losses, modules, ops, utils
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from .modules import mha
from .modules.mha import FlashCrossAttention, FlashSelfAttention

__all__ = ["bert_padding", "layers", "losses", "modules", "ops", "utils", "FlashCrossAttention", "FlashSelfAttention",
           *flash_attn_interface.__all__]
