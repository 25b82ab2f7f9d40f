"""Fake (meta) implementations of the custom ops, and their autograd, registered once.

The fakes give ``torch.compile`` / ``torch.export`` the output shapes, dtypes and devices without
running a kernel; they repeat the static argument checks (``_checks``) so that a traced call fails
with the same message as an eager one. Autograd is registered on ``fwd`` and ``varlen_fwd`` with
``torch.library.register_autograd`` (no parallel ``autograd.Function``): the backward calls the
``bwd`` / ``varlen_bwd`` ops. The backward ops get a formula that refuses double backward, so
differentiating them fails loudly instead of silently returning nothing. ``fwd_kvcache`` mutates
its caches, so it cannot carry an autograd formula; the public function runs it without grad, as
FlashAttention-2 does.
"""

import torch

from . import _checks
from ._ops import add_op_namespace_prefix, ops


def _rng_out(dropout_p, rng_state):
    # The op returns a fresh copy of rng_state when dropout is on, else an empty int64 CPU tensor.
    if dropout_p > 0:
        return torch.empty_like(rng_state)
    return torch.empty((0,), dtype=torch.int64, device="cpu")


def _s_dmask(q, want, shape):
    return q.new_empty(shape if want else (0,))


# ---- fakes --------------------------------------------------------------------------------------


@torch.library.register_fake(add_op_namespace_prefix("fwd"))
def _fwd_fake(q, k, v, alibi_slopes, dropout_p, softmax_scale, is_causal, window_size_left,
              window_size_right, softcap, return_softmax, rng_state, deterministic=False):
    _checks.fwd(q, k, v, alibi_slopes, dropout_p, softmax_scale, softcap, window_size_left,
                window_size_right, rng_state)
    b, sq, h, d = q.shape
    out = q.new_empty((b, sq, h, d))
    lse = q.new_empty((b, h, sq), dtype=torch.float32)
    s_dmask = _s_dmask(q, return_softmax and dropout_p > 0, (b, h, sq, k.shape[1]))
    return out, lse, s_dmask, _rng_out(dropout_p, rng_state)


@torch.library.register_fake(add_op_namespace_prefix("varlen_fwd"))
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes,
                     max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, is_causal,
                     window_size_left, window_size_right, softcap, return_softmax, rng_state,
                     deterministic=False):
    batch = _checks.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table,
                               alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                               softcap, window_size_left, window_size_right, return_softmax,
                               rng_state)
    total_q, h, d = q.shape
    out = q.new_empty((total_q, h, d))
    lse = q.new_empty((h, total_q), dtype=torch.float32)
    s_dmask = _s_dmask(q, return_softmax and dropout_p > 0, (batch, h, max_seqlen_q, max_seqlen_k))
    return out, lse, s_dmask, _rng_out(dropout_p, rng_state)


@torch.library.register_fake(add_op_namespace_prefix("bwd"))
def _bwd_fake(dout, q, k, v, out, softmax_lse, alibi_slopes, dropout_p, softmax_scale, is_causal,
              window_size_left, window_size_right, softcap, deterministic, rng_state):
    _checks.bwd(dout, q, k, v, out, softmax_lse, alibi_slopes, dropout_p, softmax_scale, softcap,
                window_size_left, window_size_right, rng_state)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake(add_op_namespace_prefix("varlen_bwd"))
def _varlen_bwd_fake(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_k,
                     alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, is_causal,
                     window_size_left, window_size_right, softcap, deterministic, rng_state):
    _checks.varlen_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_k,
                       alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, softcap,
                       window_size_left, window_size_right, rng_state)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake(add_op_namespace_prefix("fwd_kvcache"))
def _fwd_kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                      cache_batch_idx, cache_leftpad, block_table, alibi_slopes, softmax_scale,
                      is_causal, window_size_left, window_size_right, softcap, rotary_interleaved,
                      num_splits):
    # k_cache/v_cache are mutated in place (declared in the schema); their metadata never changes
    # and the outputs are fresh tensors, so the fake only has to produce out and softmax_lse.
    _checks.fwd_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                        cache_batch_idx, cache_leftpad, block_table, alibi_slopes, softmax_scale,
                        softcap, window_size_left, window_size_right, num_splits)
    b, sq, h, d = q.shape
    return q.new_empty((b, sq, h, d)), q.new_empty((b, h, sq), dtype=torch.float32)


# ---- autograd -----------------------------------------------------------------------------------


def _contiguous_last(t):
    return t.contiguous() if t.stride(-1) != 1 else t


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, alibi_slopes, dropout_p, softmax_scale, is_causal, window_size_left,
     window_size_right, softcap, _return_softmax, _rng_state, deterministic) = inputs
    out, lse, s_dmask, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, rng_state, alibi_slopes)
    ctx.scalars = (dropout_p, softmax_scale, is_causal, window_size_left, window_size_right,
                   softcap, deterministic)
    # softmax_lse is returned for inspection only, as in FlashAttention-2: no gradient flows
    # through it (nor through S_dmask and rng_state).
    ctx.mark_non_differentiable(lse, s_dmask, rng_state)


def _fwd_backward(ctx, dout, _dlse, _ds_dmask, _drng_state):
    q, k, v, out, lse, rng_state, alibi_slopes = ctx.saved_tensors
    (dropout_p, softmax_scale, is_causal, window_size_left, window_size_right, softcap,
     deterministic) = ctx.scalars
    dq, dk, dv = ops.bwd(_contiguous_last(dout), q, k, v, out, lse, alibi_slopes, dropout_p,
                         softmax_scale, is_causal, window_size_left, window_size_right, softcap,
                         deterministic, rng_state if dropout_p > 0 else None)
    return (dq, dk, dv) + (None,) * 10


def _varlen_fwd_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, max_seqlen_q,
     max_seqlen_k, dropout_p, softmax_scale, is_causal, window_size_left, window_size_right, softcap,
     _return_softmax, _rng_state, deterministic) = inputs
    out, lse, s_dmask, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes,
                          rng_state)
    ctx.paged = block_table is not None
    ctx.scalars = (max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, is_causal,
                   window_size_left, window_size_right, softcap, deterministic)
    ctx.mark_non_differentiable(lse, s_dmask, rng_state)


def _varlen_fwd_backward(ctx, dout, _dlse, _ds_dmask, _drng_state):
    if ctx.paged:
        _checks.fail(
            "backward through a paged K/V cache (block_table) is not supported; run the forward "
            "without block_table (contiguous k/v with cu_seqlens_k) to train"
        )
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, rng_state = (
        ctx.saved_tensors
    )
    (max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, is_causal, window_size_left,
     window_size_right, softcap, deterministic) = ctx.scalars
    dq, dk, dv = ops.varlen_bwd(_contiguous_last(dout), q, k, v, out, lse, cu_seqlens_q,
                                cu_seqlens_k, seqused_k, alibi_slopes, max_seqlen_q, max_seqlen_k,
                                dropout_p, softmax_scale, is_causal, window_size_left,
                                window_size_right, softcap, deterministic,
                                rng_state if dropout_p > 0 else None)
    return (dq, dk, dv) + (None,) * 16


def _no_double_backward(ctx, *grads):
    _checks.fail("double backward (differentiating the attention backward) is not supported")


torch.library.register_autograd(
    add_op_namespace_prefix("fwd"), _fwd_backward, setup_context=_fwd_setup_context
)
torch.library.register_autograd(
    add_op_namespace_prefix("varlen_fwd"), _varlen_fwd_backward,
    setup_context=_varlen_fwd_setup_context
)
torch.library.register_autograd(add_op_namespace_prefix("bwd"), _no_double_backward)
torch.library.register_autograd(add_op_namespace_prefix("varlen_bwd"), _no_double_backward)


# ---- rotary -------------------------------------------------------------------------------------
# The rotation is linear and orthogonal in x, so its backward is the conjugate rotation (by -theta)
# of the incoming gradient: the same op with `conjugate` flipped. cos/sin get no gradient, as in
# FlashAttention-2.


@torch.library.register_fake(add_op_namespace_prefix("rotary"))
def _rotary_fake(x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, interleaved,
                 conjugate):
    _checks.rotary(x, cos, sin, seqlen_offsets, cu_seqlens)
    return x.new_empty(x.shape)


def _rotary_setup_context(ctx, inputs, output):
    x, cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset, max_seqlen, interleaved, conjugate = (
        inputs
    )
    ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
    ctx.scalars = (seqlen_offset, max_seqlen, interleaved, conjugate)


def _rotary_backward(ctx, dout):
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    seqlen_offset, max_seqlen, interleaved, conjugate = ctx.scalars
    dx = ops.rotary(_contiguous_last(dout), cos, sin, seqlen_offsets, cu_seqlens, seqlen_offset,
                    max_seqlen, interleaved, not conjugate)
    return (dx,) + (None,) * 8


torch.library.register_autograd(
    add_op_namespace_prefix("rotary"), _rotary_backward, setup_context=_rotary_setup_context
)
