"""Fake (meta) implementations of the custom ops, and their autograd, registered once.

The fakes give ``torch.compile`` / ``torch.export`` the output shapes, dtypes and devices without
running a kernel; they repeat the static argument checks (``_checks``) so that a traced call fails
with the same message as an eager one. Autograd is registered on ``fwd`` and ``varlen_fwd`` with
``torch.library.register_autograd``: the backward allocates dq/dk/dv and calls the ``bwd`` /
``varlen_bwd`` ops, which write into them. The packed public functions use ``PackedAttn``
instead, whose backward hands the ops views of one packed gradient, so the gradient of a packed
qkv/kv needs no concatenation. The backward ops and ``fwd_kvcache`` mutate their arguments, so
they cannot carry an autograd formula (torch refuses one for a non-functional op); the public
functions run ``fwd_kvcache`` without grad, as FlashAttention-2 does.

The forward ops return the LSE in fp32, except in fp64 for fp64 inputs: the autograd paths carry
that exact LSE to the backward (which uses the LSE it is given, never one recomputed from K/V),
while every public function hands out the fp32 LSE of FlashAttention-2's contract.
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


def _lse_dtype(q):
    # The forward ops' LSE: fp64 for fp64 inputs (the autograd path's exact LSE), else fp32.
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ---- fakes --------------------------------------------------------------------------------------


@torch.library.register_fake(add_op_namespace_prefix("fwd"))
def _fwd_fake(q, k, v, alibi_slopes, dropout_p, softmax_scale, is_causal, window_size_left,
              window_size_right, softcap, return_softmax, rng_state, deterministic=False):
    _checks.fwd(q, k, v, alibi_slopes, dropout_p, softmax_scale, softcap, window_size_left,
                window_size_right, rng_state)
    b, sq, h, d = q.shape
    out = q.new_empty((b, sq, h, d))
    lse = q.new_empty((b, h, sq), dtype=_lse_dtype(q))
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
    lse = q.new_empty((h, total_q), dtype=_lse_dtype(q))
    s_dmask = _s_dmask(q, return_softmax and dropout_p > 0, (batch, h, max_seqlen_q, max_seqlen_k))
    return out, lse, s_dmask, _rng_out(dropout_p, rng_state)


@torch.library.register_fake(add_op_namespace_prefix("bwd"))
def _bwd_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, alibi_slopes, dropout_p, softmax_scale,
              is_causal, window_size_left, window_size_right, softcap, deterministic, rng_state):
    # dq/dk/dv are written in place (declared in the schema); softmax_d is a fresh tensor.
    _checks.bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, alibi_slopes, dropout_p, softmax_scale,
                softcap, window_size_left, window_size_right, rng_state)
    return softmax_lse.new_empty(softmax_lse.shape, dtype=torch.float32)


@torch.library.register_fake(add_op_namespace_prefix("varlen_bwd"))
def _varlen_bwd_fake(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                     seqused_k, alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                     is_causal, window_size_left, window_size_right, softcap, deterministic,
                     rng_state):
    _checks.varlen_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                       seqused_k, alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p,
                       softmax_scale, softcap, window_size_left, window_size_right, rng_state)
    return softmax_lse.new_empty(softmax_lse.shape, dtype=torch.float32)


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


def _empty(t):
    # A gradient buffer for t (contiguous; the ops take any strides).
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradients that refuses to be differentiated. The backward ops have no
    derivative; with create_graph=True the gradients they write get this node (anchored on an
    input that requires grad), so differentiating them fails loudly instead of treating them as
    constants."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *_):
        _checks.fail("double backward (differentiating the attention backward) is not supported")


def _guard_double_backward(anchor, *grads):
    if torch.is_grad_enabled() and anchor.requires_grad:
        return _NoDoubleBackward.apply(anchor, *grads)
    return grads


def _bwd_call(dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, rng_state, varlen, scalars):
    """One call of bwd / varlen_bwd writing into dq, dk, dv. `varlen` is (cu_seqlens_q,
    cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k) or None; `scalars` is (dropout_p,
    softmax_scale, is_causal, window_size_left, window_size_right, softcap, deterministic)."""
    dropout_p, softmax_scale, is_causal, window_left, window_right, softcap, deterministic = scalars
    rng = rng_state if dropout_p > 0 else None
    dout = _contiguous_last(dout)
    if varlen is None:
        ops.bwd(dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, dropout_p, softmax_scale,
                is_causal, window_left, window_right, softcap, deterministic, rng)
    else:
        cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k = varlen
        ops.varlen_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_k,
                       alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                       is_causal, window_left, window_right, softcap, deterministic, rng)


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
    dq, dk, dv = _empty(q), _empty(k), _empty(v)
    _bwd_call(dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, rng_state, None, ctx.scalars)
    return _guard_double_backward(q, dq, dk, dv) + (None,) * 10


def _varlen_fwd_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, max_seqlen_q,
     max_seqlen_k, dropout_p, softmax_scale, is_causal, window_size_left, window_size_right, softcap,
     _return_softmax, _rng_state, deterministic) = inputs
    out, lse, s_dmask, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes,
                          rng_state)
    ctx.paged = block_table is not None
    ctx.max_seqlen = (max_seqlen_q, max_seqlen_k)
    ctx.scalars = (dropout_p, softmax_scale, is_causal, window_size_left, window_size_right,
                   softcap, deterministic)
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
    dq, dk, dv = _empty(q), _empty(k), _empty(v)
    _bwd_call(dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, rng_state,
              (cu_seqlens_q, cu_seqlens_k, seqused_k) + ctx.max_seqlen, ctx.scalars)
    return _guard_double_backward(q, dq, dk, dv) + (None,) * 16


torch.library.register_autograd(
    add_op_namespace_prefix("fwd"), _fwd_backward, setup_context=_fwd_setup_context
)
torch.library.register_autograd(
    add_op_namespace_prefix("varlen_fwd"), _varlen_fwd_backward,
    setup_context=_varlen_fwd_setup_context
)


class PackedAttn(torch.autograd.Function):
    """Attention over a packed qkv (``q`` is None) or a packed kv, stacked along ``dim``: the
    forward hands the ops views of ``packed``; the backward allocates one gradient of
    ``packed``'s shape and hands the backward op its views (strided: FlashAttention-2's layout),
    so the packed gradient is produced without concatenating separate dq/dk/dv. Non-tensor
    arguments are those of ``fwd`` / ``varlen_fwd`` (batched when cu_seqlens_q is None). Returns
    out, or (out, softmax_lse in fp32, S_dmask) with return_attn_probs."""

    @staticmethod
    def forward(ctx, q, packed, dim, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                alibi_slopes, dropout_p, softmax_scale, is_causal, window_size_left,
                window_size_right, softcap, return_softmax, rng_state, deterministic,
                return_attn_probs):
        parts = packed.unbind(dim)
        q_, k, v = parts if q is None else (q, *parts)
        if cu_seqlens_q is None:
            out, lse, s_dmask, rng = ops.fwd(
                q_, k, v, alibi_slopes, dropout_p, softmax_scale, is_causal, window_size_left,
                window_size_right, softcap, return_softmax, rng_state, deterministic)
        else:
            out, lse, s_dmask, rng = ops.varlen_fwd(
                q_, k, v, cu_seqlens_q, cu_seqlens_k, None, None, alibi_slopes, max_seqlen_q,
                max_seqlen_k, dropout_p, softmax_scale, is_causal, window_size_left,
                window_size_right, softcap, return_softmax, rng_state, deterministic)
        ctx.save_for_backward(q, packed, out, lse, rng, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
        ctx.dim = dim
        ctx.max_seqlen = (max_seqlen_q, max_seqlen_k)
        ctx.scalars = (dropout_p, softmax_scale, is_causal, window_size_left, window_size_right,
                       softcap, deterministic)
        if not return_attn_probs:
            return out
        lse_out = lse.float()
        ctx.mark_non_differentiable(lse_out, s_dmask)
        return out, lse_out, s_dmask

    @staticmethod
    def backward(ctx, dout, *_):
        q, packed, out, lse, rng, alibi_slopes, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        qkv_packed = q is None
        dpacked = _empty(packed)
        parts, dparts = packed.unbind(ctx.dim), dpacked.unbind(ctx.dim)
        if qkv_packed:
            (q, k, v), (dq, dk, dv) = parts, dparts
        else:
            (k, v), (dk, dv) = parts, dparts
            dq = _empty(q)
        varlen = None
        if cu_seqlens_q is not None:
            varlen = (cu_seqlens_q, cu_seqlens_k, None) + ctx.max_seqlen
        _bwd_call(dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, rng, varlen, ctx.scalars)
        dq, dpacked = _guard_double_backward(packed, dq, dpacked)
        return (None if qkv_packed else dq, dpacked) + (None,) * 16


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
