"""Fake (meta) implementations and autograd of the fused training ops, registered once.

* ``dropout_add_ln_fwd`` carries its backward (``register_autograd``): the backward op redraws
  the dropout mask from the saved ``rng_state`` (no mask is kept between forward and backward)
  and returns the gradients of x0, residual, weight, bias and layerscale. When the forward did not
  store x (it equals x0), x0 is saved in its place.
* ``cross_entropy_fwd`` carries its backward too; ``inplace_backward`` is an op argument (autograd
  sees only the op's inputs) and makes the backward overwrite the saved logits with their
  gradient through ``cross_entropy_bwd_inplace``, as FlashAttention-2 does. The tensor-parallel
  path (``losses.cross_entropy``) combines the shards in Python and uses its own
  ``torch.autograd.Function`` over the same ops.
* The backward ops have no derivative (no double backward), and ``cross_entropy_bwd_inplace``
  mutates its logits, so it cannot carry one either.
"""

import torch

from . import _fused_checks as fc
from ._ops import add_op_namespace_prefix, ops


def _rng_out(dropout_p, rng_state):
    if dropout_p > 0:
        return torch.empty_like(rng_state)
    return torch.empty((0,), dtype=torch.int64, device="cpu")


def _contiguous_last(t):
    return t.contiguous() if t is not None and t.dim() > 0 and t.stride(-1) != 1 else t


# ---- norm ---------------------------------------------------------------------------------------


@torch.library.register_fake(add_op_namespace_prefix("dropout_add_ln_fwd"))
def _ln_fwd_fake(x0, residual, gamma, beta, rowscale, colscale, dropout_p, epsilon, rng_state,
                 residual_in_fp32, is_rms_norm, return_dropout_mask):
    fc.ln_fwd(x0, residual, gamma, beta, rowscale, colscale, dropout_p, epsilon, rng_state)
    rows, cols = x0.shape
    x_dtype = fc.norm_x_dtype(x0, residual, residual_in_fp32)
    stores_x = fc.norm_stores_x(x0, residual, rowscale, colscale, dropout_p, x_dtype)
    stats = fc.stats_dtype(x_dtype)
    z = x0.new_empty((rows, cols))
    x = x0.new_empty((rows, cols) if stores_x else (0,), dtype=x_dtype)
    want_mask = return_dropout_mask and dropout_p > 0
    dmask = x0.new_empty((rows, cols) if want_mask else (0,), dtype=torch.uint8)
    mu = x0.new_empty((0,) if is_rms_norm else (rows,), dtype=stats)
    rsigma = x0.new_empty((rows,), dtype=stats)
    return z, x, dmask, mu, rsigma, _rng_out(dropout_p, rng_state)


@torch.library.register_fake(add_op_namespace_prefix("dropout_add_ln_bwd"))
def _ln_bwd_fake(dz, dx, x, x0, mu, rsigma, gamma, rowscale, colscale, dropout_p, rng_state,
                 has_residual, has_beta, is_rms_norm):
    fc.ln_bwd(dz, dx, x, x0, mu, rsigma, gamma, rowscale, colscale, dropout_p, rng_state,
              is_rms_norm)
    rows, cols = x.shape
    dx0 = x.new_empty((rows, cols), dtype=dz.dtype)
    dresidual = x.new_empty((rows, cols) if has_residual else (0,))
    dgamma = x.new_empty((cols,), dtype=gamma.dtype)
    dbeta = x.new_empty((cols,) if has_beta else (0,), dtype=gamma.dtype)
    dcolscale = x.new_empty((cols,) if colscale is not None else (0,), dtype=gamma.dtype)
    return dx0, dresidual, dgamma, dbeta, dcolscale


def _ln_setup_context(ctx, inputs, output):
    (x0, residual, gamma, beta, rowscale, colscale, dropout_p, _epsilon, _rng_state,
     residual_in_fp32, is_rms_norm, _return_dropout_mask) = inputs
    _z, x, dmask, mu, rsigma, rng_state = output
    x_dtype = fc.norm_x_dtype(x0, residual, residual_in_fp32)
    stores_x = fc.norm_stores_x(x0, residual, rowscale, colscale, dropout_p, x_dtype)
    ctx.save_for_backward(x if stores_x else x0, x0 if colscale is not None else None, mu, rsigma,
                          gamma, rowscale, colscale, rng_state)
    ctx.flags = (dropout_p, residual is not None, beta is not None, is_rms_norm, stores_x)
    ctx.z_dtype = x0.dtype
    ctx.mark_non_differentiable(dmask, mu, rsigma, rng_state)
    ctx.set_materialize_grads(False)


def _ln_backward(ctx, dz, dx, *_):
    x, x0, mu, rsigma, gamma, rowscale, colscale, rng_state = ctx.saved_tensors
    dropout_p, has_residual, has_beta, is_rms_norm, stores_x = ctx.flags
    if dz is None:  # only the returned x (prenorm) was used
        dz = torch.zeros(x.shape, dtype=ctx.z_dtype, device=x.device)
    dx = _contiguous_last(dx) if stores_x else None
    dx0, dresidual, dgamma, dbeta, dcolscale = ops.dropout_add_ln_bwd(
        _contiguous_last(dz), dx, x, x0, mu, rsigma, gamma, rowscale, colscale, dropout_p,
        rng_state if dropout_p > 0 else None, has_residual, has_beta, is_rms_norm)
    return (dx0, dresidual if has_residual else None, dgamma, dbeta if has_beta else None, None,
            dcolscale if colscale is not None else None) + (None,) * 6


torch.library.register_autograd(
    add_op_namespace_prefix("dropout_add_ln_fwd"), _ln_backward, setup_context=_ln_setup_context
)


# ---- cross-entropy ------------------------------------------------------------------------------


@torch.library.register_fake(add_op_namespace_prefix("cross_entropy_fwd"))
def _ce_fwd_fake(logits, labels, precomputed_lse, smoothing, logit_scale, lse_square_scale,
                 ignore_index, total_classes, class_start_idx, split, inplace_backward=False):
    fc.ce_fwd(logits, labels, precomputed_lse, smoothing, logit_scale, lse_square_scale,
              total_classes, class_start_idx, split)
    rows = logits.shape[0]
    dtype = fc.ce_row_dtype(logits)
    return (logits.new_empty((rows,), dtype=dtype), logits.new_empty((rows,), dtype=dtype),
            logits.new_empty((rows,), dtype=fc.ce_lse_dtype(logits)))


@torch.library.register_fake(add_op_namespace_prefix("cross_entropy_bwd"))
def _ce_bwd_fake(dlosses, logits, lse, labels, smoothing, logit_scale, lse_square_scale,
                 ignore_index, total_classes, class_start_idx):
    fc.ce_bwd(dlosses, logits, lse, labels, smoothing, logit_scale, lse_square_scale,
              total_classes, class_start_idx)
    return logits.new_empty(logits.shape)


@torch.library.register_fake(add_op_namespace_prefix("cross_entropy_bwd_inplace"))
def _ce_bwd_inplace_fake(dlosses, logits, lse, labels, smoothing, logit_scale, lse_square_scale,
                         ignore_index, total_classes, class_start_idx):
    fc.ce_bwd(dlosses, logits, lse, labels, smoothing, logit_scale, lse_square_scale,
              total_classes, class_start_idx)


def ce_backward_call(dlosses, logits, lse, labels, scalars, inplace):
    """dlogits from the saved forward tensors; in place (into logits) when asked. `scalars` is
    (smoothing, logit_scale, lse_square_scale, ignore_index, total_classes, class_start_idx)."""
    dlosses = dlosses.to(fc.ce_row_dtype(logits))
    if inplace:
        ops.cross_entropy_bwd_inplace(dlosses, logits, lse, labels, *scalars)
        return logits
    return ops.cross_entropy_bwd(dlosses, logits, lse, labels, *scalars)


def _ce_setup_context(ctx, inputs, output):
    (logits, labels, _precomputed_lse, smoothing, logit_scale, lse_square_scale, ignore_index,
     total_classes, class_start_idx, _split, inplace_backward) = inputs
    _losses, z_losses, lse = output
    ctx.save_for_backward(logits, lse, labels)
    ctx.scalars = (smoothing, logit_scale, lse_square_scale, ignore_index, total_classes,
                   class_start_idx)
    ctx.inplace = inplace_backward
    # z_losses are for logging (FlashAttention-2): no gradient flows through them or the lse.
    ctx.mark_non_differentiable(z_losses, lse)
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, dlosses, *_):
    if dlosses is None:
        return (None,) * 11
    logits, lse, labels = ctx.saved_tensors
    dlogits = ce_backward_call(dlosses, logits, lse, labels, ctx.scalars, ctx.inplace)
    return (dlogits,) + (None,) * 10


torch.library.register_autograd(
    add_op_namespace_prefix("cross_entropy_fwd"), _ce_backward, setup_context=_ce_setup_context
)
