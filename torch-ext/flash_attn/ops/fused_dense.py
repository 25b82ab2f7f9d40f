"""FlashAttention-2.8's ``flash_attn.ops.fused_dense``: ``FusedDense`` (a linear layer that can
also return its input, for post-norm residuals), ``FusedMLP`` (linear -> activation -> linear),
their functions, and the tensor-parallel ``ColumnParallelLinear``, ``RowParallelLinear`` and
``ParallelFusedMLP``, with 2.8's names, arguments and defaults.

How it is computed (docs/fused_ops.md, "Dense"): no GEMM of our own. ``fused_mlp_func`` is a
``torch.autograd.Function`` over ATen's matmuls, which on CUDA are cuBLAS(Lt) calls:

* The first linear with its activation. ``torch._addmm_activation(bias, x, w.t())`` is one
  cuBLASLt call with the bias + ReLU or bias + GELU epilogue on CUDA; its GELU there is the tanh
  approximation (cuBLASLt's epilogue, and ATen's fallback ``gelu(..., "tanh")``), i.e. 2.8's
  ``gelu_approx``. On the CPU the same op computes the exact (erf) GELU, so there gelu_approx is
  ``addmm`` + ``F.gelu(approximate="tanh")``. ATen does not return the pre-activation from the
  GELU epilogue (cuBLASLt's GELU_AUX), so where the backward needs it (``checkpoint_lvl`` 0 and
  1), the forward is ``addmm`` (bias epilogue) followed by the tanh GELU, as 2.8's
  ``heuristic=-1``; the fused GELU epilogue runs where nothing is saved (no gradient needed,
  ``save_pre_act=False`` in eval mode, ``checkpoint_lvl=2``), in fp16/bf16 only (fp32 keeps
  ``F.gelu``: the epilogue's GELU is less exact than fp32 rounding). ReLU needs no pre-activation (its
  derivative is ``out > 0``), so relu and sqrelu always use the fused epilogue, on every device.
* The backward: ``grad_out1 = grad @ w2``, the activation's derivative elementwise (ATen's
  ``gelu_backward(approximate="tanh")``, ``threshold_backward``; sqrelu ``2 relu(pre) grad``),
  ``grad_w = grad^T @ in``, ``grad_b = grad.sum(0)``, ``grad_x = grad_pre @ w1``.
* ``checkpoint_lvl`` (2.8's meaning; higher saves more memory and recomputes more):
  0 saves the pre-activation and the activation output; 1 saves the pre-activation and recomputes
  the activation (relu keeps its output: it is the mask); 2 saves neither and recomputes the
  first linear in the backward. ``save_pre_act=False`` (2.8: eval mode) means 2.
* ``heuristic`` (2.8: cuBLASLt's algorithm index): -1 keeps the GELU out of the GEMM (addmm,
  then the GELU), any other value or "auto" lets the fused epilogue run where it applies.

``fused_dense_func`` is ``F.linear`` (on CUDA already cuBLASLt with the bias epilogue, and
autograd's backward is the same two matmuls and a sum), except with ``process_group``.

Tensor parallelism (2.8's layout; collectives in ``flash_attn.utils.distributed``):
``process_group`` with ``sequence_parallel=True`` means x is this rank's slice of dimension 0 (the
tokens), all-gathered before the first matmul, and the input gradient is reduce-scattered back;
with ``sequence_parallel=False`` x is the full input on every rank and its gradient is
all-reduced. The weights are this rank's shards: ``ColumnParallelLinear`` holds a slice of the
output features, ``RowParallelLinear`` a slice of the input features and sums the ranks' partial
outputs (``reduce_scatter`` with sequence parallelism, else ``all_reduce``; the bias lives on
rank 0 only). ``FusedMLP.forward(x, process_group)`` is 2.8's sequence-parallel MLP over
caller-sharded fc1 (rows) / fc2 (columns).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.distributed import (all_gather_raw, all_reduce, all_reduce_raw, get_dim_for_local_rank,
                                 reduce_scatter, reduce_scatter_raw)

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


def _check_activation(name):
    if name not in _ACTIVATIONS:
        raise ValueError(f"flash_attn: activation must be one of {_ACTIVATIONS}, got {name!r}")


def _check_checkpoint_lvl(lvl):
    if lvl not in (0, 1, 2):
        raise ValueError(f"flash_attn: checkpoint_lvl must be 0, 1 or 2, got {lvl}")


def _autocast(device_type, *tensors):
    """Under torch.autocast, the tensors in the autocast dtype (2.8 casts x and the weights)."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _check_dtypes(what, x, **others):
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"flash_attn: {what}: {name} has dtype {t.dtype} but x has {x.dtype}; "
                            "they must match (or run under torch.autocast)")


# ---- the first linear and its activation ------------------------------------------------------


def _linear_act(x, weight, bias, activation, keep_pre_act, fuse_gelu):
    """(saved, out1) for x (M, K) and weight (N, K): out1 = activation(x @ weight.T + bias) and
    what the backward needs besides it: the pre-activation for gelu_approx (None unless
    keep_pre_act), relu(pre) for sqrelu, None for relu (its output is its own mask)."""
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device)
    if activation == "gelu_approx":
        if fuse_gelu and not keep_pre_act:
            # cuBLASLt's bias + GELU epilogue: tanh GELU on CUDA (module docstring).
            return None, torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
        pre_act = torch.addmm(bias, x, weight.t())
        return pre_act, F.gelu(pre_act, approximate="tanh")
    relu_out = torch._addmm_activation(bias, x, weight.t(), use_gelu=False)
    if activation == "relu":
        return None, relu_out
    return relu_out, relu_out.square()


def _act_grad(activation, grad, saved, out1):
    """d out1 / d pre-activation applied to grad."""
    if activation == "gelu_approx":
        return torch.ops.aten.gelu_backward(grad, saved, approximate="tanh")
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, out1, 0)
    return grad * (2.0 * saved)


def _fuses_gelu(x, heuristic):
    """Whether torch._addmm_activation's GELU is tanh GELU here (CUDA only), its error is below
    the output's rounding (fp16/bf16: in fp32 the epilogue's GELU measured about 10x the error of
    F.gelu on the H200, docs/fused_ops.md) and the caller did not refuse it (heuristic -1)."""
    return (x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)
            and heuristic != -1)


def _grad_input(grad_pre, weight, batch_shape, process_group, sequence_parallel):
    """grad_pre @ weight, reshaped to the (gathered) input's shape, then summed over the ranks
    (reduce_scatter with sequence parallelism, else all_reduce)."""
    grad_input = torch.mm(grad_pre, weight).reshape(*batch_shape, weight.shape[1])
    if process_group is not None:
        reduce = reduce_scatter_raw if sequence_parallel else all_reduce_raw
        grad_input = reduce(grad_input, process_group)[0]
    return grad_input


def _weight_grads(grad, inp, needs_w, needs_b):
    grad_w = torch.mm(grad.t(), inp) if needs_w else None
    grad_b = grad.sum(0) if needs_b else None
    return grad_w, grad_b


# ---- the autograd functions ---------------------------------------------------------------------


class FusedDenseFunc(torch.autograd.Function):
    """x @ weight.T + bias with tensor parallelism: x all-gathered first with sequence
    parallelism; the input gradient reduce-scattered (sequence parallel) or all-reduced."""

    @staticmethod
    def forward(ctx, x, weight, bias, process_group, sequence_parallel):
        total_x = x
        if process_group is not None and sequence_parallel:
            total_x = all_gather_raw(x, process_group)[0]
        ctx.process_group, ctx.sequence_parallel = process_group, sequence_parallel
        ctx.batch_shape = total_x.shape[:-1]
        ctx.save_for_backward(x, weight)
        return F.linear(total_x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        pg, sp = ctx.process_group, ctx.sequence_parallel
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _grad_input(grad, weight, ctx.batch_shape, pg, sp)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            total_x = all_gather_raw(x, pg)[0] if pg is not None and sp else x
            grad_w, grad_b = _weight_grads(grad, total_x.reshape(-1, x.shape[-1]),
                                           ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return grad_x, grad_w, grad_b, None, None


class FusedMLPFunc(torch.autograd.Function):
    """activation(x @ w1.T + b1) @ w2.T + b2; the module docstring has what runs and what is
    saved per checkpoint_lvl."""

    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2, activation, checkpoint_lvl, heuristic,
                process_group, sequence_parallel, needs_grad):
        total_x = x
        if process_group is not None and sequence_parallel:
            total_x = all_gather_raw(x, process_group)[0]
        batch_shape = total_x.shape[:-1]
        x2d = total_x.reshape(-1, total_x.shape[-1])
        fuse = _fuses_gelu(x, heuristic)
        saved, out1 = _linear_act(x2d, weight1, bias1, activation,
                                  keep_pre_act=needs_grad and checkpoint_lvl < 2, fuse_gelu=fuse)
        out2 = F.linear(out1, weight2, bias2)
        ctx.activation, ctx.checkpoint_lvl = activation, checkpoint_lvl
        ctx.process_group, ctx.sequence_parallel = process_group, sequence_parallel
        ctx.batch_shape = batch_shape
        if not needs_grad:
            pass
        elif checkpoint_lvl == 2:
            ctx.save_for_backward(x, weight1, weight2, bias1)
        elif checkpoint_lvl == 0 or activation == "relu":
            ctx.save_for_backward(x, weight1, weight2, saved, out1)
        else:  # level 1: the activation output is recomputed from what is saved
            ctx.save_for_backward(x, weight1, weight2, saved)
        return out2.reshape(*batch_shape, out2.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        x, weight1, weight2, *rest = ctx.saved_tensors
        pg, sp, act = ctx.process_group, ctx.sequence_parallel, ctx.activation
        needs = ctx.needs_input_grad
        x2d = None  # the (gathered) input, for recomputing and for weight1's gradient only
        if ctx.checkpoint_lvl == 2 or needs[1]:
            total_x = all_gather_raw(x, pg)[0] if pg is not None and sp else x
            x2d = total_x.reshape(-1, total_x.shape[-1])
        if ctx.checkpoint_lvl == 2:
            saved, out1 = _linear_act(x2d, weight1, rest[0], act, keep_pre_act=True,
                                      fuse_gelu=False)
        elif len(rest) == 2:
            saved, out1 = rest
        else:
            saved = rest[0]
            out1 = F.gelu(saved, approximate="tanh") if act == "gelu_approx" else saved.square()
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_w2, grad_b2 = _weight_grads(grad, out1, needs[3], needs[4])
        grad_x = grad_w1 = grad_b1 = None
        if needs[0] or needs[1] or needs[2]:
            grad_pre = _act_grad(act, torch.mm(grad, weight2), saved, out1)
            del out1, saved
            if needs[0]:
                grad_x = _grad_input(grad_pre, weight1, ctx.batch_shape, pg, sp)
            grad_w1, grad_b1 = _weight_grads(grad_pre, x2d, needs[1], needs[2])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None, None, None, None


# ---- the functions ------------------------------------------------------------------------------


def fused_dense_func(x, weight, bias=None, return_residual=False, process_group=None,
                     sequence_parallel=True):
    """x @ weight.T + bias; with return_residual also x. With process_group, weight is this
    rank's slice of the output features and x (with sequence_parallel) this rank's slice of
    dimension 0, gathered first; the output has every token and this rank's features."""
    x, weight, bias = _autocast(x.device.type, x, weight, bias)
    _check_dtypes("fused_dense_func", x, weight=weight, bias=bias)
    if process_group is None:
        out = F.linear(x, weight, bias)
    else:
        out = FusedDenseFunc.apply(x, weight, bias, process_group, bool(sequence_parallel))
    return out if not return_residual else (out, x)


def fused_mlp_func(x, weight1, weight2, bias1=None, bias2=None, activation="gelu_approx",
                   save_pre_act=True, return_residual=False, checkpoint_lvl=0, heuristic=0,
                   process_group=None, sequence_parallel=True):
    """activation(x @ weight1.T + bias1) @ weight2.T + bias2; with return_residual also x.
    activation: "gelu_approx" (tanh GELU), "relu", "sqrelu" (relu squared). With process_group
    the weights are this rank's shards (weight1 rows, weight2 columns), x (with
    sequence_parallel) this rank's slice of dimension 0, and the output this rank's partial sum
    over every token, which the caller reduces (reduce_scatter / all_reduce)."""
    _check_activation(activation)
    _check_checkpoint_lvl(checkpoint_lvl)
    if heuristic != "auto" and not (isinstance(heuristic, int) and -1 <= heuristic <= 4):
        raise ValueError(f"flash_attn: heuristic must be 'auto' or in [-1, 4], got {heuristic}")
    x, weight1, weight2, bias1, bias2 = _autocast(x.device.type, x, weight1, weight2, bias1, bias2)
    _check_dtypes("fused_mlp_func", x, weight1=weight1, weight2=weight2, bias1=bias1, bias2=bias2)
    if not save_pre_act:
        checkpoint_lvl = 2  # 2.8: nothing saved, everything recomputed
    heuristic = 0 if heuristic == "auto" else int(heuristic)
    # Inside forward grad mode is off and ctx.needs_input_grad ignores torch.no_grad(): whether a
    # backward can follow is decided here (no backward: nothing saved, the fused epilogue runs).
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight1, bias1, weight2, bias2))
    out = FusedMLPFunc.apply(x, weight1, bias1, weight2, bias2, activation, checkpoint_lvl,
                             heuristic, process_group, bool(sequence_parallel), needs_grad)
    return out if not return_residual else (out, x)


# ---- the modules --------------------------------------------------------------------------------


class FusedDense(nn.Linear):
    def __init__(self, in_features, out_features, bias=True, return_residual=False, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.return_residual = return_residual

    def forward(self, x, process_group=None):
        """With process_group: sequence-parallel column-parallel linear (x all-gathered first)."""
        return fused_dense_func(x, self.weight, self.bias, return_residual=self.return_residual,
                                process_group=process_group)


class ColumnParallelLinear(nn.Linear):
    def __init__(self, in_features, out_features, process_group, bias=True,
                 sequence_parallel=True, multiple_of=1, device=None, dtype=None):
        """This rank's slice of the output features, split in units of multiple_of (the first
        ranks get one unit more when it does not divide); with sequence_parallel the input is
        this rank's slice of dimension 0, else the full input."""
        import torch.distributed as dist  # noqa: PLC0415

        if out_features % multiple_of:
            raise ValueError(f"flash_attn: out_features ({out_features}) must be a multiple of "
                             f"multiple_of ({multiple_of})")
        local = get_dim_for_local_rank(out_features, dist.get_world_size(process_group),
                                       dist.get_rank(process_group), multiple_of)
        super().__init__(in_features, local, bias=bias, device=device, dtype=dtype)
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        return fused_dense_func(x, self.weight, self.bias, process_group=self.process_group,
                                sequence_parallel=self.sequence_parallel)


class RowParallelLinear(nn.Linear):
    def __init__(self, in_features, out_features, process_group, bias=True,
                 sequence_parallel=True, multiple_of=1, device=None, dtype=None):
        """This rank's slice of the input features (split as ColumnParallelLinear's outputs);
        the bias on rank 0 only. The output is the sum over ranks: this rank's slice of
        dimension 0 with sequence_parallel (reduce_scatter), else the whole (all_reduce)."""
        import torch.distributed as dist  # noqa: PLC0415

        if in_features % multiple_of:
            raise ValueError(f"flash_attn: in_features ({in_features}) must be a multiple of "
                             f"multiple_of ({multiple_of})")
        rank = dist.get_rank(process_group)
        local = get_dim_for_local_rank(in_features, dist.get_world_size(process_group), rank,
                                       multiple_of)
        super().__init__(local, out_features, bias=bias and rank == 0, device=device,
                         dtype=dtype)
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        out = fused_dense_func(x, self.weight, self.bias)
        reduce = reduce_scatter if self.sequence_parallel else all_reduce
        return reduce(out, self.process_group)


def _init_mlp(module, in_features, hidden_features, out_features, activation, checkpoint_lvl,
              heuristic):
    """FusedMLP's and ParallelFusedMLP's shared setup: the argument checks, the activation and
    recomputation settings on `module` (sqrelu never fuses its GEMM), and 2.8's defaults
    -> (hidden_features: 4 * in_features, out_features: in_features)."""
    _check_checkpoint_lvl(checkpoint_lvl)
    _check_activation(activation)
    module.activation = activation
    module.checkpoint_lvl = checkpoint_lvl
    module.heuristic = heuristic if activation != "sqrelu" else -1
    return hidden_features or in_features * 4, out_features or in_features


class FusedMLP(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, bias1=True,
                 bias2=True, activation="gelu_approx", return_residual=False, checkpoint_lvl=0,
                 heuristic="auto", device=None, dtype=None):
        """fc1 (in_features -> hidden_features, default 4 * in_features), the activation
        ("gelu_approx": tanh GELU, "relu", "sqrelu": relu squared), fc2 (-> out_features, default
        in_features). checkpoint_lvl: 0 no recomputation in the backward, 1 recompute the
        activation, 2 recompute the first linear and the activation. heuristic: -1 keeps the GELU
        out of the GEMM; other values and "auto" use the fused epilogue where it applies (module
        docstring). return_residual: also return x (post-norm residuals)."""
        super().__init__()
        hidden_features, out_features = _init_mlp(self, in_features, hidden_features,
                                                  out_features, activation, checkpoint_lvl,
                                                  heuristic)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.return_residual = return_residual
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias1, **factory_kwargs)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias2, **factory_kwargs)

    def forward(self, x, process_group=None):
        """With process_group: fc1/fc2 hold this rank's shards, x is this rank's slice of
        dimension 0 (all-gathered), and the output is reduce-scattered back to that slice."""
        out = fused_mlp_func(x, self.fc1.weight, self.fc2.weight, self.fc1.bias, self.fc2.bias,
                             activation=self.activation, save_pre_act=self.training,
                             return_residual=self.return_residual,
                             checkpoint_lvl=self.checkpoint_lvl, heuristic=self.heuristic,
                             process_group=process_group)
        if self.return_residual:
            out, x = out
        if process_group is not None:
            out = reduce_scatter(out, process_group)
        return out if not self.return_residual else (out, x)


class ParallelFusedMLP(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None,
                 activation="gelu_approx", process_group=None, bias1=True, bias2=True,
                 sequence_parallel=True, checkpoint_lvl=0, heuristic="auto", device=None,
                 dtype=None):
        """FusedMLP with fc1 a ColumnParallelLinear and fc2 a RowParallelLinear over
        process_group (required); the output is reduce-scattered (sequence_parallel) or
        all-reduced."""
        if process_group is None:
            raise ValueError("flash_attn: ParallelFusedMLP needs a process_group")
        super().__init__()
        hidden_features, out_features = _init_mlp(self, in_features, hidden_features,
                                                  out_features, activation, checkpoint_lvl,
                                                  heuristic)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.process_group = process_group
        self.sequence_parallel = sequence_parallel
        self.fc1 = ColumnParallelLinear(in_features, hidden_features, process_group, bias=bias1,
                                        **factory_kwargs)
        self.fc2 = RowParallelLinear(hidden_features, out_features, process_group, bias=bias2,
                                     **factory_kwargs)

    def forward(self, x):
        out = fused_mlp_func(x, self.fc1.weight, self.fc2.weight, self.fc1.bias, self.fc2.bias,
                             activation=self.activation, save_pre_act=self.training,
                             checkpoint_lvl=self.checkpoint_lvl, heuristic=self.heuristic,
                             process_group=self.process_group,
                             sequence_parallel=self.sequence_parallel)
        reduce = reduce_scatter if self.sequence_parallel else all_reduce
        return reduce(out, self.process_group)

