"""FlashAttention-2.8's ``flash_attn.ops.fused_dense``: ``FusedDense`` (a linear layer that can
also return its input, for post-norm residuals), ``FusedMLP`` (linear -> activation -> linear)
and their functions, with 2.8's names, arguments and defaults.

This release computes them with PyTorch itself (``F.linear`` and the activation, differentiated
by autograd) on every device: on the CPU that is the plan, and on CUDA ``F.linear`` already goes
through cuBLAS(Lt). The fused CUDA path (one cuBLASLt call with the bias and GELU epilogue, and its
backward with the bias-gradient/dGELU epilogue, as 2.8's ``fused_dense_lib``) is future work
(docs/fused_ops.md). Accepted and documented: ``heuristic`` (which cuBLASLt algorithm; no effect
here) and ``checkpoint_lvl`` (what 2.8 recomputes in the backward to save memory; here autograd
keeps what it keeps, so the values are the same and only the memory differs). Tensor parallelism
(``process_group``, ``ColumnParallelLinear``, ``RowParallelLinear``, ``ParallelFusedMLP``) raises
``NotImplementedError``.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ColumnParallelLinear",
    "FusedDense",
    "FusedMLP",
    "ParallelFusedMLP",
    "RowParallelLinear",
    "fused_dense_func",
    "fused_mlp_func",
]

_ACTIVATIONS = ("gelu_approx", "relu", "sqrelu")


def _no_tensor_parallel(what):
    raise NotImplementedError(
        f"flash_attn: {what} with a process_group (tensor parallelism) is not implemented in this "
        "package; call it without process_group on each rank's full input")


def _activation(name):
    if name not in _ACTIVATIONS:
        raise ValueError(f"flash_attn: activation must be one of {_ACTIVATIONS}, got {name!r}")
    if name == "gelu_approx":
        return partial(F.gelu, approximate="tanh")
    if name == "relu":
        return F.relu
    return lambda x: F.relu(x).square()


def fused_dense_func(x, weight, bias=None, return_residual=False, process_group=None,
                     sequence_parallel=True):
    """x @ weight.T + bias; with return_residual also x."""
    if process_group is not None:
        _no_tensor_parallel("fused_dense_func")
    out = F.linear(x, weight, bias)
    return out if not return_residual else (out, x)


def fused_mlp_func(x, weight1, weight2, bias1=None, bias2=None, activation="gelu_approx",
                   save_pre_act=True, return_residual=False, checkpoint_lvl=0, heuristic=0,
                   process_group=None, sequence_parallel=True):
    """activation(x @ weight1.T + bias1) @ weight2.T + bias2; with return_residual also x."""
    act = _activation(activation)
    if checkpoint_lvl not in (0, 1, 2):
        raise ValueError(f"flash_attn: checkpoint_lvl must be 0, 1 or 2, got {checkpoint_lvl}")
    if process_group is not None:
        _no_tensor_parallel("fused_mlp_func")
    out = F.linear(act(F.linear(x, weight1, bias1)), weight2, bias2)
    return out if not return_residual else (out, x)


class FusedDense(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, return_residual=False, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.return_residual = return_residual

    def forward(self, x, process_group=None):
        return fused_dense_func(x, self.weight, self.bias, return_residual=self.return_residual,
                                process_group=process_group)


class FusedMLP(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, bias1=True,
                 bias2=True, activation="gelu_approx", return_residual=False, checkpoint_lvl=0,
                 heuristic="auto", device=None, dtype=None):
        """fc1 (in_features -> hidden_features, default 4 * in_features), the activation
        ("gelu_approx": tanh GELU, "relu", "sqrelu": relu squared), fc2 (-> out_features, default
        in_features). checkpoint_lvl and heuristic are accepted (see the module docstring)."""
        if checkpoint_lvl not in (0, 1, 2):
            raise ValueError(f"flash_attn: checkpoint_lvl must be 0, 1 or 2, got {checkpoint_lvl}")
        _activation(activation)
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features * 4
        self.activation = activation
        self.return_residual = return_residual
        self.checkpoint_lvl = checkpoint_lvl
        self.heuristic = heuristic if activation != "sqrelu" else -1
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **factory_kwargs)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x, process_group=None):
        return fused_mlp_func(x, self.fc1.weight, self.fc2.weight, self.fc1.bias, self.fc2.bias,
                              activation=self.activation, save_pre_act=self.training,
                              return_residual=self.return_residual,
                              checkpoint_lvl=self.checkpoint_lvl, process_group=process_group)


class ColumnParallelLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        _no_tensor_parallel("ColumnParallelLinear")


class RowParallelLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        _no_tensor_parallel("RowParallelLinear")


class ParallelFusedMLP(nn.Module):
    def __init__(self, *args, **kwargs):
        _no_tensor_parallel("ParallelFusedMLP")
