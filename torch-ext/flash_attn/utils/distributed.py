"""FlashAttention-2.8's ``flash_attn.utils.distributed``: the collectives of tensor parallelism
with sequence parallelism, on plain ``torch.distributed`` (any backend: NCCL on GPUs, gloo on the
CPU).

Sequence parallelism splits dimension 0 of an activation (the tokens, flattened as
``(batch * seqlen, hidden)`` by 2.8's models) evenly over the ranks, in rank order:

* ``all_gather``: this rank's ``(n, ...)`` slice -> the full ``(world * n, ...)`` tensor; its
  backward is ``reduce_scatter`` (each rank keeps the sum of the gradients of its own slice).
* ``reduce_scatter``: ``(world * n, ...)`` partial sums on every rank -> the sum's ``(n, ...)``
  slice of this rank; its backward is ``all_gather``.
* ``all_reduce``: partial sums -> their sum on every rank; its backward passes the gradient
  through unchanged (the output is replicated, so every rank already holds the whole gradient).

The ``*_raw`` functions are the collectives without autograd (``async_op`` returns the work
handle as 2.8's do); the others are differentiable. ``get_dim_for_local_rank`` is the uneven
split of 2.8's ``ColumnParallelLinear`` / ``RowParallelLinear``.
"""

import torch
import torch.distributed as dist

__all__ = [
    "all_gather",
    "all_gather_raw",
    "all_reduce",
    "all_reduce_raw",
    "get_dim_for_local_rank",
    "reduce_scatter",
    "reduce_scatter_raw",
]


def all_gather_raw(input_, process_group, async_op=False):
    """-> (the ranks' dim-0 slices concatenated in rank order, work handle or None)."""
    world_size = dist.get_world_size(process_group)
    output = torch.empty(world_size * input_.shape[0], *input_.shape[1:], dtype=input_.dtype,
                         device=input_.device)
    handle = dist.all_gather_into_tensor(output, input_.contiguous(), group=process_group,
                                         async_op=async_op)
    return output, handle


def reduce_scatter_raw(input_, process_group, async_op=False):
    """-> (this rank's dim-0 slice of the sum over ranks, work handle or None)."""
    world_size = dist.get_world_size(process_group)
    if input_.shape[0] % world_size != 0:
        raise ValueError(f"flash_attn: reduce_scatter needs dimension 0 ({input_.shape[0]}) to be "
                         f"a multiple of the process group's size ({world_size})")
    output = torch.empty(input_.shape[0] // world_size, *input_.shape[1:], dtype=input_.dtype,
                         device=input_.device)
    handle = dist.reduce_scatter_tensor(output, input_.contiguous(), group=process_group,
                                        async_op=async_op)
    return output, handle


def all_reduce_raw(input_, process_group, async_op=False):
    """In place: input_ becomes the sum over ranks. -> (input_, work handle or None)."""
    input_ = input_.contiguous()
    handle = dist.all_reduce(input_, group=process_group, async_op=async_op)
    return input_, handle


class AllGatherFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, process_group):
        ctx.process_group = process_group
        return all_gather_raw(input_, process_group)[0]

    @staticmethod
    def backward(ctx, grad_output):
        return reduce_scatter_raw(grad_output, ctx.process_group)[0], None


class ReduceScatterFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, process_group):
        ctx.process_group = process_group
        return reduce_scatter_raw(input_, process_group)[0]

    @staticmethod
    def backward(ctx, grad_output):
        return all_gather_raw(grad_output, ctx.process_group)[0], None


class AllReduceFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, process_group):
        # A copy: the caller's tensor stays the partial sum autograd may have saved.
        return all_reduce_raw(input_.clone(), process_group)[0]

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


def all_gather(input_, process_group):
    return AllGatherFunc.apply(input_, process_group)


def reduce_scatter(input_, process_group):
    return ReduceScatterFunc.apply(input_, process_group)


def all_reduce(input_, process_group):
    return AllReduceFunc.apply(input_, process_group)


def get_dim_for_local_rank(dim, world_size, local_rank, multiple_of=1):
    """This rank's share of `dim` split in units of `multiple_of`: the first
    (dim // multiple_of) % world_size ranks get one unit more (2.8's split)."""
    multiple = dim // multiple_of
    div, mod = divmod(multiple, world_size)
    return (div + int(local_rank < mod)) * multiple_of
