"""The public API: FlashAttention-2 (2.8) functions with its names, arguments, defaults, shapes
and return values, on top of the custom ops of this kernel.

Differences from FlashAttention-2, all of them widenings: any head dimension in [1, 256] (the
CUDA path pads internally), any page size for ``block_table``, fp32/fp64 on CPU, ``seqused_k`` on
``flash_attn_varlen_func``, and ``max_seqlen_q/k`` may be 0-dim tensors (then they are not read,
so ``torch.compile(fullgraph=True)`` sees no data-dependent value).

Shapes follow FlashAttention-2: q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k,
nheads_k, headdim) with nheads % nheads_k == 0 (MQA/GQA); varlen tensors are (total, nheads,
headdim) with int32 ``cu_seqlens`` of length batch + 1. ``causal`` masks are aligned to the
bottom-right corner; ``window_size=(left, right)`` with -1 meaning unbounded; ``softcap > 0``
applies ``softcap * tanh(scores / softcap)``; ``alibi_slopes`` is fp32 (nheads,) or
(batch, nheads). Gradients flow to q, k, v (to the packed tensor for the packed variants).
"""

import operator

import torch

from . import _checks
from . import _ops_meta  # registers fakes and autograd; PackedAttn
from ._ops import ops

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


def _maybe_contiguous(x):
    # As FlashAttention-2: the kernels need a unit stride in the last dimension only.
    return x.contiguous() if x is not None and x.stride(-1) != 1 else x


def _softmax_scale(softmax_scale, q):
    if softmax_scale is None:
        return _checks.head_dim(q) ** (-0.5)  # checked first: head dim 0 has no default scale
    return float(softmax_scale)


def _window(window_size):
    """(left, right) as two ints; like FA2, an entry means "unbounded" only as -1, never None, and
    a bare int is an error rather than a guess at which side it bounds."""
    if window_size is None:
        return -1, -1
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        _checks.fail(
            f"window_size must be a pair (left, right) of ints, -1 meaning unbounded, e.g. (128, 0) "
            f"for a causal sliding window; got {window_size!r}"
        )
    try:
        return operator.index(window_size[0]), operator.index(window_size[1])
    except TypeError:
        _checks.fail(
            f"window_size entries must be ints (-1 means unbounded, not None); got {window_size!r}"
        )


def _max_seqlen(value, name):
    """An int is passed on; a tensor (Transformers' packed position_ids path) becomes -1, "not
    given", so that nothing reads its value (no .item(), no graph break under torch.compile)."""
    if value is None:
        return -1
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            _checks.fail(f"{name} must be an int or a one-element tensor, got shape {tuple(value.shape)}")
        return -1
    if isinstance(value, (int, torch.SymInt)):
        # A SymInt is a traced .item() (Transformers under torch.compile): passed on untouched,
        # since int() on it would be a data-dependent guard.
        return value
    return int(value)


def _max_seqlen_for_probs(value, name):
    # S_dmask is sized by the max lengths, so return_attn_probs with dropout needs their values.
    if isinstance(value, torch.Tensor):
        return int(value.item())
    return _max_seqlen(value, name)


def _prepare(q, k, v, softmax_scale, window_size):
    """What every entry point does first, in this order: unit last strides for q/k/v (k/v may be
    None), the default scale (after the head dim check) and the window pair."""
    q, k, v = [_maybe_contiguous(x) for x in (q, k, v)]
    softmax_scale = _softmax_scale(softmax_scale, q)
    window_left, window_right = _window(window_size)
    return q, k, v, softmax_scale, window_left, window_right


def _rng_state(dropout_p):
    """[seed, offset] from torch's default CPU generator: torch.manual_seed makes the dropout mask
    reproducible on every backend. Drawn only when dropout is on."""
    if dropout_p > 0:
        return torch.randint(0, 2**63 - 1, (2,), dtype=torch.int64, device="cpu")
    return None


def _fwd_args(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
              deterministic, return_attn_probs):
    """The arguments of ops.fwd, checked (q/k/v with unit last strides)."""
    q, k, v, softmax_scale, window_left, window_right = _prepare(q, k, v, softmax_scale, window_size)
    dropout_p, softcap = float(dropout_p), float(softcap)
    rng_state = _rng_state(dropout_p)
    _checks.fwd(q, k, v, alibi_slopes, dropout_p, softmax_scale, softcap, window_left, window_right,
                rng_state)
    return (q, k, v, alibi_slopes, dropout_p, softmax_scale, bool(causal), window_left,
            window_right, softcap, bool(return_attn_probs) and dropout_p > 0, rng_state,
            bool(deterministic))


def _varlen_fwd_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                     softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                     return_attn_probs, block_table, seqused_k):
    """The arguments of ops.varlen_fwd, checked."""
    q, k, v, softmax_scale, window_left, window_right = _prepare(q, k, v, softmax_scale, window_size)
    dropout_p, softcap = float(dropout_p), float(softcap)
    want_probs = bool(return_attn_probs) and dropout_p > 0
    to_int = _max_seqlen_for_probs if want_probs else _max_seqlen
    max_seqlen_q = to_int(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = to_int(max_seqlen_k, "max_seqlen_k")
    rng_state = _rng_state(dropout_p)
    _checks.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes,
                       max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, softcap, window_left,
                       window_right, want_probs, rng_state)
    return (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes,
            max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, bool(causal), window_left,
            window_right, softcap, want_probs, rng_state, bool(deterministic))


def _public(out, softmax_lse, s_dmask, return_attn_probs):
    # The forward ops give fp64 inputs an fp64 LSE for the autograd path; callers get fp32.
    return (out, softmax_lse.float(), s_dmask) if return_attn_probs else out


def _attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
          deterministic, return_attn_probs):
    out, softmax_lse, s_dmask, _ = ops.fwd(*_fwd_args(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs))
    return _public(out, softmax_lse, s_dmask, return_attn_probs)


def _varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                 return_attn_probs, block_table, seqused_k):
    out, softmax_lse, s_dmask, _ = ops.varlen_fwd(*_varlen_fwd_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
        causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_table,
        seqused_k))
    return _public(out, softmax_lse, s_dmask, return_attn_probs)


def _unpack(packed, rank, dim, n, name, layout):
    """Checks a packed qkv/kv tensor of the given rank (size n along dim); returns it with a unit
    last stride and its views along dim."""
    _checks.rank(packed, name, rank, layout)
    if packed.dim() <= dim or packed.shape[dim] != n:
        _checks.fail(f"{name} must have shape {layout}, got {tuple(packed.shape)}")
    packed = _maybe_contiguous(packed)
    return packed, packed.unbind(dim)


def _packed_attn(q, packed, dim, parts, varlen, dropout_p, softmax_scale, causal, window_size,
                 softcap, alibi_slopes, deterministic, return_attn_probs):
    """The packed functions: q is None for a packed qkv (parts = its q, k, v views), else parts
    are the k, v views of a packed kv. varlen: (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k) or None. Runs PackedAttn, whose backward writes the packed gradient in place."""
    q_, k, v = parts if q is None else (q, *parts)
    if varlen is None:
        (q_, _, _, alibi_slopes, dropout_p, softmax_scale, causal, window_left, window_right,
         softcap, want_probs, rng_state, deterministic) = _fwd_args(
            q_, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
            deterministic, return_attn_probs)
        cu_seqlens_q = cu_seqlens_k = None
        max_seqlen_q = max_seqlen_k = -1
    else:
        (q_, _, _, cu_seqlens_q, cu_seqlens_k, _, _, alibi_slopes, max_seqlen_q, max_seqlen_k,
         dropout_p, softmax_scale, causal, window_left, window_right, softcap, want_probs,
         rng_state, deterministic) = _varlen_fwd_args(
            q_, k, v, *varlen, dropout_p, softmax_scale, causal, window_size, softcap,
            alibi_slopes, deterministic, return_attn_probs, None, None)
    return _ops_meta.PackedAttn.apply(
        None if q is None else q_, packed, dim, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, alibi_slopes, dropout_p, softmax_scale, causal, window_left, window_right,
        softcap, want_probs, rng_state, deterministic, bool(return_attn_probs))


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Attention over packed qkv (batch, seqlen, 3, nheads, headdim) -> out (batch, seqlen, nheads,
    headdim); with return_attn_probs also softmax_lse (batch, nheads, seqlen) and S_dmask (testing
    only; empty unless dropout_p > 0). dropout_p should be 0.0 in evaluation."""
    qkv, parts = _unpack(qkv, 5, 2, 3, "qkv", "(batch, seqlen, 3, nheads, headdim)")
    return _packed_attn(None, qkv, 2, parts, None, dropout_p, softmax_scale, causal, window_size,
                        softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Attention of q (batch, seqlen_q, nheads, headdim) over packed kv (batch, seqlen_k, 2,
    nheads_k, headdim); MQA/GQA when nheads_k < nheads. Returns as flash_attn_func."""
    kv, parts = _unpack(kv, 5, 2, 2, "kv", "(batch, seqlen_k, 2, nheads_k, headdim)")
    return _packed_attn(q, kv, 2, parts, None, dropout_p, softmax_scale, causal, window_size,
                        softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """softmax(q k^T * softmax_scale + masks) v for q (batch, seqlen_q, nheads, headdim) and k, v
    (batch, seqlen_k, nheads_k, headdim). Returns out (batch, seqlen_q, nheads, headdim); with
    return_attn_probs, (out, softmax_lse (batch, nheads, seqlen_q) fp32, S_dmask). S_dmask is for
    testing: (batch, nheads, seqlen_q, seqlen_k) holding the softmax, negated where dropout dropped
    the entry, and empty unless dropout_p > 0. dropout_p should be 0.0 in evaluation."""
    return _attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 deterministic, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Varlen attention over packed qkv (total, 3, nheads, headdim) with int32 cu_seqlens
    (batch + 1,). Returns out (total, nheads, headdim); with return_attn_probs also softmax_lse
    (nheads, total) and S_dmask."""
    qkv, parts = _unpack(qkv, 4, 1, 3, "qkv", "(total, 3, nheads, headdim)")
    return _packed_attn(None, qkv, 1, parts, (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen),
                        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                        deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """Varlen attention of q (total_q, nheads, headdim) over packed kv (total_k, 2, nheads_k,
    headdim). Returns as flash_attn_varlen_func."""
    kv, parts = _unpack(kv, 4, 1, 2, "kv", "(total_k, 2, nheads_k, headdim)")
    return _packed_attn(q, kv, 1, parts, (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                        deterministic, return_attn_probs)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    seqused_k=None,
):
    """Attention over sequences packed without padding: q (total_q, nheads, headdim), k, v
    (total_k, nheads_k, headdim), cu_seqlens_q/k int32 (batch + 1,), max_seqlen_q/k ints or 0-dim
    tensors (an upper bound; a given int smaller than a sequence is an error).

    block_table (batch, max_blocks_per_seq) int32 makes k, v a paged pool (num_blocks,
    page_block_size, nheads_k, headdim) of any page size; sequence b then has
    cu_seqlens_k[b+1] - cu_seqlens_k[b] keys (forward only). seqused_k (batch,) int32 limits
    sequence b to its first seqused_k[b] keys.

    Returns out (total_q, nheads, headdim); with return_attn_probs, (out, softmax_lse (nheads,
    total_q) fp32, S_dmask (batch, nheads, max_seqlen_q, max_seqlen_k), empty unless
    dropout_p > 0)."""
    return _varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                        softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                        return_attn_probs, block_table, seqused_k)


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),  # -1 means infinite context window
    softcap=0.0,  # 0.0 means deactivated
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Decoding attention over a KV cache. If k and v (batch, seqlen_new, nheads_k, headdim) are
    given they are first written into k_cache/v_cache *in place* at positions cache_seqlens[b]
    onwards (row cache_batch_idx[b], or through block_table when paged, any page size), then q
    (batch, seqlen_q, nheads, headdim) attends to the keys [cache_leftpad[b], cache_seqlens[b] +
    seqlen_new) of its sequence (the whole cache when cache_seqlens is None).

    k_cache/v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or (num_blocks,
    page_block_size, nheads_k, headdim) with block_table (batch, max_blocks_per_seq) int32.
    cache_seqlens: int or (batch,) int32. rotary_cos/sin (seqlen_ro, rotary_dim / 2), which need
    cache_seqlens: the new key at cache position t is rotated with row t; queries use rows
    cache_seqlens[b] + i when causal or local, else row cache_seqlens[b] (without k/v only q is
    rotated, where FlashAttention-2 refuses); rotary_interleaved pairs (2i, 2i+1) (GPT-J) instead
    of (i, i + rotary_dim/2) (GPT-NeoX). num_splits is a performance hint (0: automatic).
    No backward (as FlashAttention-2). Returns out, or (out, softmax_lse (batch, nheads, seqlen_q))
    with return_softmax_lse."""
    q, k, v, softmax_scale, window_left, window_right = _prepare(q, k, v, softmax_scale, window_size)
    softcap = float(softcap)
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full(
            (q.shape[0],), int(cache_seqlens), dtype=torch.int32, device=k_cache.device
        )
    _checks.fwd_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                        cache_batch_idx, cache_leftpad, block_table, alibi_slopes, softmax_scale,
                        softcap, window_left, window_right, int(num_splits))
    # The op mutates the caches, so it cannot carry an autograd formula; like FlashAttention-2 the
    # output does not require grad.
    with torch.no_grad():
        out, softmax_lse = ops.fwd_kvcache(
            q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx,
            cache_leftpad, block_table, alibi_slopes, softmax_scale, bool(causal), window_left,
            window_right, softcap, bool(rotary_interleaved), int(num_splits),
        )
    return (out, softmax_lse) if return_softmax_lse else out


# ---- FlashAttention-2.8's internal API ------------------------------------------------------------
# The four functions sequence-parallel libraries (ring-flash-attn, yunchang) build on, with 2.8's
# names, argument names, order, defaults and return values. They are plain functions over this
# kernel's ops: `inspect.getfullargspec` sees 2.8's signature, and torch.compile traces them into
# the ops (whose fakes and, for the backward, declared mutations of dq/dk/dv it needs). The
# backward uses the `out` and `softmax_lse` it is given on every backend and dtype, so it may be
# called per K/V block with the global out/LSE of a longer key sequence (ring attention).
# Differences from 2.8, all widenings or documented no-ops: softmax_scale may be None (the
# default 1/sqrt(d)); rng_state is this kernel's int64 CPU [seed, offset] (empty without
# dropout); S_dmask and softmax_d are not padded to multiples of 128 (softmax_d has the LSE's
# shape); zero_tensors is accepted and changes nothing (the backward zero-fills dq/dk/dv anyway;
# the forward writes every row of every sequence); leftpad_k must be None.


def _flash_attn_forward(
    q,
    k,
    v,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    return_softmax,
):
    """-> (out, softmax_lse, S_dmask, rng_state) for q (batch, seqlen_q, nheads, headdim), k/v
    (batch, seqlen_k, nheads_k, headdim). softmax_lse (batch, nheads, seqlen_q) is fp32; S_dmask
    is empty unless return_softmax and dropout_p > 0. No autograd needed: pass out, softmax_lse
    and rng_state to _flash_attn_backward."""
    args = _fwd_args(q, k, v, dropout_p, softmax_scale, causal,
                     (window_size_left, window_size_right), softcap, alibi_slopes, False,
                     return_softmax)
    out, softmax_lse, s_dmask, rng_state = ops.fwd(*args)
    return out, softmax_lse.float(), s_dmask, rng_state


def _flash_attn_varlen_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
    leftpad_k=None,
    seqused_k=None,
    zero_tensors=False,
):
    """-> (out, softmax_lse, S_dmask, rng_state) for packed sequences: q (total_q, nheads,
    headdim), k/v (total_k, nheads_k, headdim) or a paged pool with block_table; softmax_lse
    (nheads, total_q) fp32."""
    if leftpad_k is not None:
        _checks.fail("leftpad_k is not supported by _flash_attn_varlen_forward; pass None")
    args = _varlen_fwd_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p, softmax_scale, causal,
                            (window_size_left, window_size_right), softcap, alibi_slopes, False,
                            return_softmax, block_table, seqused_k)
    out, softmax_lse, s_dmask, rng_state = ops.varlen_fwd(*args)
    return out, softmax_lse.float(), s_dmask, rng_state


def _bwd_inputs(dout, q, k, v, out, dq, dk, dv, softmax_scale, window_size_left,
                window_size_right, dropout_p, rng_state):
    dout, q, k, v, out = [_maybe_contiguous(x) for x in (dout, q, k, v, out)]
    # 2.8 declares dq/dk/dv Optional; it then computes gradients nobody sees. Same here.
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    softmax_scale = _softmax_scale(softmax_scale, q)
    window_left, window_right = _window((window_size_left, window_size_right))
    dropout_p = float(dropout_p)
    return (dout, q, k, v, out, dq, dk, dv, softmax_scale, window_left, window_right, dropout_p,
            rng_state if dropout_p > 0 else None)


def _flash_attn_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
):
    """Writes the gradients of q, k, v into dq, dk, dv (shaped like q, k, v; any strides with a
    contiguous last dimension, e.g. views of one packed gradient) from the given out and
    softmax_lse (fp32, or fp64 for fp64 inputs). Returns softmax_d = rowsum(dout * out), fp32,
    shaped like softmax_lse."""
    (dout, q, k, v, out, dq, dk, dv, softmax_scale, window_left, window_right, dropout_p,
     rng_state) = _bwd_inputs(dout, q, k, v, out, dq, dk, dv, softmax_scale, window_size_left,
                              window_size_right, dropout_p, rng_state)
    return ops.bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, alibi_slopes, dropout_p,
                   softmax_scale, bool(causal), window_left, window_right, float(softcap),
                   bool(deterministic), rng_state)


def _flash_attn_varlen_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
    zero_tensors=False,
):
    """_flash_attn_backward for packed sequences (softmax_lse and softmax_d (nheads, total_q))."""
    (dout, q, k, v, out, dq, dk, dv, softmax_scale, window_left, window_right, dropout_p,
     rng_state) = _bwd_inputs(dout, q, k, v, out, dq, dk, dv, softmax_scale, window_size_left,
                              window_size_right, dropout_p, rng_state)
    return ops.varlen_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                          None, alibi_slopes, _max_seqlen(max_seqlen_q, "max_seqlen_q"),
                          _max_seqlen(max_seqlen_k, "max_seqlen_k"), dropout_p, softmax_scale,
                          bool(causal), window_left, window_right, float(softcap),
                          bool(deterministic), rng_state)


# 2.8 also exposes its registered ops under these names; some libraries import them.
_wrapped_flash_attn_forward = _flash_attn_forward
_wrapped_flash_attn_varlen_forward = _flash_attn_varlen_forward
_wrapped_flash_attn_backward = _flash_attn_backward
_wrapped_flash_attn_varlen_backward = _flash_attn_varlen_backward
