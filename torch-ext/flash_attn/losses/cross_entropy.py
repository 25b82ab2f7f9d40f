"""FlashAttention-2.8's ``flash_attn.losses.cross_entropy.CrossEntropyLoss`` on this kernel's
chunked cross-entropy op: the log-sum-exp of each row is an online max/sum over chunks of the
vocabulary, so no probability matrix is ever formed; the backward writes dlogits from the saved
per-row lse (in place into the logits with ``inplace_backward=True``).

Per row, with l = logit_scale * logits, eps = label_smoothing and n classes:

    loss = lse(l) - (1 - eps) * l[label] - eps * mean(l) + lse_square_scale * lse(l)^2

and 0 where label == ignore_index; ``z_loss`` is the ``lse_square_scale * lse^2`` part, returned
for logging (no gradient). With ``process_group`` each rank holds an equal slice of the vocabulary
(rank r: classes [r * V, (r + 1) * V)); the shards' lse are combined with ``all_gather`` and the
partial losses with ``all_reduce`` (``torch.distributed``, any backend, gloo included). Details
and the differences from 2.8 (CPU kernels, CUDA not yet; fp64 logits get fp64 losses; labels are
checked on the host): docs/fused_ops.md.
"""

import torch
import torch.nn as nn

from .. import _fused_checks, _fused_meta
from .._checks import fail
from .._ops import ops
from ..utils.distributed import all_gather_raw, all_reduce_raw

__all__ = ["CrossEntropyLoss", "cross_entropy_loss"]


def _world(process_group):
    if process_group is None:
        return 1, 0
    import torch.distributed as dist  # noqa: PLC0415

    return dist.get_world_size(process_group), dist.get_rank(process_group)


class _ShardedCrossEntropy(torch.autograd.Function):
    """Tensor-parallel cross-entropy: the op on this rank's vocabulary slice (split mode: losses
    without the lse and z-loss terms), then the global lse = logsumexp of the gathered shard lse
    and the sum of the partial losses over the group; the backward runs the op's backward on the
    slice with the global lse."""

    @staticmethod
    def forward(ctx, logits, labels, smoothing, logit_scale, lse_square_scale, ignore_index,
                inplace_backward, process_group, world_size, rank):
        n_cols = logits.shape[1]
        total, start = world_size * n_cols, rank * n_cols
        losses, _, lse = ops.cross_entropy_fwd(logits, labels, None, smoothing, logit_scale,
                                               lse_square_scale, ignore_index, total, start, True,
                                               inplace_backward)
        gathered = all_gather_raw(lse, process_group)[0].view(world_size, *lse.shape)
        losses = all_reduce_raw(losses, process_group)[0]
        lse = torch.logsumexp(gathered, dim=0)
        ignored = labels == ignore_index
        # The lse is fp64 for fp32 logits (docs/fused_ops.md); the losses keep their dtype.
        losses = (losses + lse).to(losses.dtype)
        z_losses = torch.zeros_like(losses)
        if lse_square_scale != 0.0:
            z_losses = (lse_square_scale * lse.square()).masked_fill(ignored, 0.0)
            losses = (losses + z_losses).to(losses.dtype)
            z_losses = z_losses.to(losses.dtype)
        losses = losses.masked_fill(ignored, 0.0)
        ctx.save_for_backward(logits, lse, labels)
        ctx.scalars = (smoothing, logit_scale, lse_square_scale, ignore_index, total, start)
        ctx.inplace = inplace_backward
        ctx.mark_non_differentiable(z_losses)
        return losses, z_losses

    @staticmethod
    def backward(ctx, dlosses, _dz_losses):
        logits, lse, labels = ctx.saved_tensors
        dlogits = _fused_meta.ce_backward_call(dlosses, logits, lse, labels, ctx.scalars,
                                               ctx.inplace)
        return (dlogits,) + (None,) * 9


def cross_entropy_loss(logits, labels, precomputed_lse=None, label_smoothing=0.0, logit_scale=1.0,
                       lse_square_scale=0.0, ignore_index=-100, inplace_backward=False,
                       process_group=None):
    """-> (losses, z_losses), each (batch,), fp32 (fp64 for fp64 logits). logits (batch,
    vocab_size) (this rank's slice with process_group), labels (batch,) int64 or int32.
    precomputed_lse (batch,) is used when label_smoothing == 0 and logit_scale == 1, as in 2.8."""
    _fused_checks.device(logits, "logits", "CrossEntropyLoss")
    if logits.dim() != 2:
        fail(f"logits must have 2 dimensions (batch, vocab_size), got shape "
             f"{tuple(logits.shape)}")
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    smoothing, logit_scale = float(label_smoothing), float(logit_scale)
    lse_square_scale, ignore_index = float(lse_square_scale), int(ignore_index)
    world_size, rank = _world(process_group)
    if world_size > 1:
        return _ShardedCrossEntropy.apply(logits, labels, smoothing, logit_scale,
                                          lse_square_scale, ignore_index, bool(inplace_backward),
                                          process_group, world_size, rank)
    use_lse = precomputed_lse is not None and smoothing == 0.0 and logit_scale == 1.0
    if use_lse:
        precomputed_lse = precomputed_lse.to(_fused_checks.ce_lse_dtype(logits)).reshape(-1)
    losses, z_losses, _lse = ops.cross_entropy_fwd(
        logits, labels, precomputed_lse if use_lse else None, smoothing, logit_scale,
        lse_square_scale, ignore_index, logits.shape[1], 0, False, bool(inplace_backward))
    return losses, z_losses


class CrossEntropyLoss(nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, logit_scale=1.0,
                 lse_square_scale=0.0, inplace_backward=False, process_group=None,
                 return_z_loss=False):
        """
        ignore_index: rows whose label is ignore_index get loss 0 (and are not counted by "mean").
        label_smoothing: float in [0, 1].
        logit_scale: the logits are multiplied by it first.
        lse_square_scale: adds lse_square_scale * lse(logits)^2 to the loss ("z-loss").
        inplace_backward: the backward overwrites the logits with their gradient (saves memory).
        process_group: tensor parallelism; each rank holds an equal slice of the vocabulary.
        return_z_loss: also return the z-loss part (for logging; no gradient).
        """
        super().__init__()
        if reduction not in ["mean", "none", "sum"]:
            raise NotImplementedError("Only support reduction = 'mean' or 'none' or 'sum'")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.logit_scale = logit_scale
        self.lse_square_scale = lse_square_scale
        self.inplace_backward = inplace_backward
        self.process_group = process_group
        self.return_z_loss = return_z_loss

    def _reduce(self, values, target):
        if self.reduction == "mean":
            return values.sum() / (target != self.ignore_index).sum()
        if self.reduction == "sum":
            return values.sum()
        return values

    def forward(self, input, target, precomputed_lse=None):
        """input (batch, vocab_size), target (batch,) -> loss ((batch,) with reduction "none",
        else a scalar), and the z-loss likewise with return_z_loss."""
        loss, z_loss = cross_entropy_loss(
            input, target, precomputed_lse=precomputed_lse, label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale, lse_square_scale=self.lse_square_scale,
            ignore_index=self.ignore_index, inplace_backward=self.inplace_backward,
            process_group=self.process_group)
        loss = self._reduce(loss, target)
        if not self.return_z_loss:
            return loss
        return loss, self._reduce(z_loss, target)
