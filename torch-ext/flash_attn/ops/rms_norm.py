"""FlashAttention-2.8's ``flash_attn.ops.rms_norm`` on this kernel's norm op (the same op as
``ops.layer_norm`` with ``is_rms_norm``): ``rms_norm``, ``dropout_add_rms_norm``, ``RMSNorm`` and
``DropoutAddRMSNorm`` with 2.8's arguments and defaults.

    x = dropout(x0 * rowscale) * layerscale + residual
    out = x / sqrt(mean(x^2) + epsilon) * weight (+ bias when given)

Computed in fp64 on the CPU and rounded once. Differences from 2.8 are those of ``ops.layer_norm``
(any hidden size, fp64 and mixed dtypes, Philox dropout redrawn in the backward, CUDA not yet);
see docs/fused_ops.md.
"""

import torch
from torch.nn import init

from .layer_norm import dropout_add_rms_norm, norm_forward

__all__ = [
    "DropoutAddRMSNorm",
    "RMSNorm",
    "dropout_add_rms_norm",
    "dropout_add_rms_norm_parallel_residual",
    "dropout_add_rms_norm_subset",
    "rms_norm",
]


def rms_norm(x, weight, epsilon):
    return norm_forward(x, None, weight, None, 0.0, epsilon, is_rms_norm=True)


def dropout_add_rms_norm_subset(*args, **kwargs):
    raise NotImplementedError(
        "flash_attn: dropout_add_rms_norm_subset is not implemented in this package; gather the "
        "rows with index_select and call dropout_add_rms_norm")


def dropout_add_rms_norm_parallel_residual(*args, **kwargs):
    raise NotImplementedError(
        "flash_attn: dropout_add_rms_norm_parallel_residual is not implemented in this package; "
        "call dropout_add_rms_norm on x0 + x1 (with dropout applied by the caller)")


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        init.ones_(self.weight)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class DropoutAddRMSNorm(torch.nn.Module):
    def __init__(self, hidden_size, prenorm=False, p=0.0, eps=1e-5, residual_in_fp32=False,
                 device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.prenorm = prenorm
        self.p = p
        self.eps = eps
        self.residual_in_fp32 = residual_in_fp32
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory_kwargs))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        init.ones_(self.weight)

    def forward(self, x0, residual=None):
        return dropout_add_rms_norm(x0, residual, self.weight, None,
                                    self.p if self.training else 0.0, self.eps,
                                    prenorm=self.prenorm,
                                    residual_in_fp32=self.residual_in_fp32)
