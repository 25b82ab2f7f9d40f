"""FlashAttention-2.8's ``flash_attn.ops.layer_norm`` on this kernel's norm op: dropout, residual
add and LayerNorm (or RMSNorm) in one pass, differentiable, ``torch.compile``-able.

    x = dropout(x0 * rowscale) * layerscale + residual        (each part only when given)
    out = LayerNorm(x) * weight + bias                         (RMSNorm: no mean, no bias needed)

Same names, arguments, defaults and return values as 2.8: ``out``, or ``(out, x)`` with
``prenorm=True``, plus the dropout mask (uint8, 1 = kept) with ``return_dropout_mask=True``. x has
the residual's dtype, or fp32 with ``residual_in_fp32`` when there is no residual, else x0's.
Differences from 2.8, all widenings: any hidden size (2.8's kernel: multiples of 8 up to 8192),
fp64 and mixed dtypes (e.g. bf16 activations with fp32 weights), and the dropout mask is drawn
from this kernel's Philox stream (``kernel_src/common/philox.h``; ``torch.manual_seed`` makes it
reproducible) and redrawn in the backward instead of being stored. CUDA tensors raise until the
CUDA kernels land; the ``_subset`` and ``_parallel_residual`` variants raise
``NotImplementedError``. Details: docs/fused_ops.md.
"""

import torch
from torch.nn import init

from .. import _fused_checks, _fused_meta  # noqa: F401  (registers fakes and autograd)
from .._checks import fail
from .._ops import ops
from ..flash_attn_interface import _rng_state

__all__ = [
    "DropoutAddLayerNorm",
    "dropout_add_layer_norm",
    "dropout_add_layer_norm_parallel_residual",
    "dropout_add_layer_norm_subset",
    "dropout_add_rms_norm",
    "layer_norm",
]


def _rows(t, hidden, name):
    """t as (rows, hidden) with a unit last stride (a view when possible)."""
    if t.dim() == 0 or t.shape[-1] != hidden:
        fail(f"{name} must have the hidden size {hidden} of weight as its last dimension, got "
             f"shape {tuple(t.shape)}")
    t = t.reshape(-1, hidden)
    return t if t.stride(-1) == 1 or hidden <= 1 else t.contiguous()


def norm_forward(x0, residual, weight, bias, dropout_p, epsilon, rowscale=None, layerscale=None,
                 prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                 return_dropout_mask=False):
    """The shared body of every public norm function (2.8's ``DropoutAddLayerNormFn``)."""
    if weight.dim() != 1:
        fail(f"weight must have shape (hidden_size,), got {tuple(weight.shape)}")
    _fused_checks.device(x0, "x0", "dropout_add_layer_norm / rms_norm")
    hidden = weight.shape[0]
    shape = x0.shape
    x0m = _rows(x0, hidden, "x0")
    res = _rows(residual, hidden, "residual") if residual is not None else None
    if rowscale is not None:
        rowscale = rowscale.reshape(-1)
    dropout_p = float(dropout_p)
    rng_state = _rng_state(dropout_p)
    z, x, dmask, _mu, _rsigma, _rng = ops.dropout_add_ln_fwd(
        x0m, res, weight, bias, rowscale, layerscale, dropout_p, float(epsilon), rng_state,
        bool(residual_in_fp32), bool(is_rms_norm), bool(return_dropout_mask))
    x_dtype = _fused_checks.norm_x_dtype(x0m, res, residual_in_fp32)
    if not _fused_checks.norm_stores_x(x0m, res, rowscale, layerscale, dropout_p, x_dtype):
        x = x0m  # x equals x0: the op does not store it (2.8 returns x0 too)
    out = (z.view(shape),)
    if prenorm:
        out += (x.view(shape),)
    if return_dropout_mask:
        if dropout_p > 0:
            dmask = dmask.view(shape)
        else:
            dmask = torch.ones(shape, dtype=torch.uint8, device=x0.device)
        out += (dmask,)
    return out[0] if len(out) == 1 else out


def layer_norm(x, weight, bias, epsilon):
    return norm_forward(x, None, weight, bias, 0.0, epsilon)


def dropout_add_layer_norm(x0, residual, weight, bias, dropout_p, epsilon, rowscale=None,
                           layerscale=None, prenorm=False, residual_in_fp32=False,
                           return_dropout_mask=False):
    """residual_in_fp32 only has an effect if residual is None; otherwise x has residual's
    dtype."""
    return norm_forward(x0, residual, weight, bias, dropout_p, epsilon, rowscale, layerscale,
                        prenorm, residual_in_fp32, False, return_dropout_mask)


def dropout_add_rms_norm(x0, residual, weight, bias, dropout_p, epsilon, rowscale=None,
                         layerscale=None, prenorm=False, residual_in_fp32=False,
                         return_dropout_mask=False):
    """2.8 defines this in ``ops.rms_norm``; it is here too for convenience."""
    return norm_forward(x0, residual, weight, bias, dropout_p, epsilon, rowscale, layerscale,
                        prenorm, residual_in_fp32, True, return_dropout_mask)


def dropout_add_layer_norm_subset(*args, **kwargs):
    raise NotImplementedError(
        "flash_attn: dropout_add_layer_norm_subset is not implemented in this package; gather the "
        "rows with index_select and call dropout_add_layer_norm")


def dropout_add_layer_norm_parallel_residual(*args, **kwargs):
    raise NotImplementedError(
        "flash_attn: dropout_add_layer_norm_parallel_residual is not implemented in this "
        "package; call dropout_add_layer_norm on x0 + x1 (with dropout applied by the caller)")


class DropoutAddLayerNorm(torch.nn.Module):
    def __init__(self, hidden_size, prenorm=False, p=0.0, eps=1e-5, residual_in_fp32=False,
                 device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.prenorm = prenorm
        self.p = p
        self.eps = eps
        self.residual_in_fp32 = residual_in_fp32
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.bias = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.reset_parameters()

    def reset_parameters(self):
        init.ones_(self.weight)
        init.zeros_(self.bias)

    def forward(self, x0, residual=None):
        return dropout_add_layer_norm(x0, residual, self.weight, self.bias,
                                      self.p if self.training else 0.0, self.eps,
                                      prenorm=self.prenorm,
                                      residual_in_fp32=self.residual_in_fp32)
