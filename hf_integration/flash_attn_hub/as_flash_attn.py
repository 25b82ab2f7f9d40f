"""Make a loaded kernel importable as `flash_attn`, for libraries written against
FlashAttention-2's package (ring-flash-attn, yunchang: they call
`flash_attn.flash_attn_interface._flash_attn_forward` and friends, which the kernel provides).

    import flash_attn_hub
    from flash_attn_hub.as_flash_attn import install
    kernel, _ = flash_attn_hub.load("build")
    install(kernel)
    import ring_flash_attn          # now runs on the kernel

Two stand-ins, both outside the kernel package: `__version__` (yunchang compares it as a
string; the kernel keeps 2.8's API, so "2.8.3"), and Transformers'
`is_flash_attn_greater_or_equal_2_10`, which ring-flash-attn's Transformers adapter imports and
Transformers 5 removed (the adapter is imported by the library's `__init__`, not used here).
"""

from __future__ import annotations

import sys
from types import ModuleType

API_VERSION = "2.8.3"  # the FlashAttention-2 release whose functions the kernel keeps


def install(kernel: ModuleType) -> ModuleType:
    """Register `kernel` as `flash_attn` (and its interface module) in sys.modules; return it."""
    if not hasattr(kernel, "__version__"):
        kernel.__version__ = API_VERSION
    sys.modules["flash_attn"] = kernel
    sys.modules["flash_attn.flash_attn_interface"] = kernel.flash_attn_interface
    try:
        import transformers.modeling_flash_attention_utils as mfau
    except ImportError:
        return kernel
    if not hasattr(mfau, "is_flash_attn_greater_or_equal_2_10"):
        mfau.is_flash_attn_greater_or_equal_2_10 = lambda *args, **kwargs: True
    return kernel
