"""Static argument checks (ranks, shapes, dtypes, devices, scalar ranges) of the five ops.

Shared by the public functions (so eager callers get the error before any work) and by the fake
implementations (so ``torch.compile`` reports the same error while tracing). They only read
metadata, never tensor contents: the C++ binding repeats them and also checks the contents of host
index tensors (``torch-ext/checks.h``). Every failure is a ``RuntimeError`` starting with
``flash_attn:`` that names the argument, exactly like the C++ side.
"""

import torch

_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def fail(message):
    raise RuntimeError(f"flash_attn: {message}")


def rank(t, name, n, layout):
    if t.dim() != n:
        fail(f"{name} must have {n} dimensions {layout}, got shape {tuple(t.shape)}")


def on_q_device(t, name, q):
    if t.device != q.device:
        fail(f"{name} is on {t.device} but q is on {q.device}; all tensors must be on the same device")


def int32_on_q_device(t, name, q):
    # Index tensors: cu_seqlens, seqused_k, the cache vectors, block_table.
    on_q_device(t, name, q)
    if t.dtype != torch.int32:
        fail(f"{name} must have dtype torch.int32, got {t.dtype}")


def same_device_dtype(t, name, q):
    on_q_device(t, name, q)
    if t.dtype != q.dtype:
        fail(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")


def q_dtype(q):
    if q.device.type == "cpu":
        if q.dtype not in _CPU_DTYPES:
            fail(
                f"q has dtype {q.dtype}; the CPU backend supports torch.float16, torch.bfloat16, "
                "torch.float32 and torch.float64"
            )
    elif q.device.type == "cuda":
        if q.dtype not in _CUDA_DTYPES:
            fail(f"q has dtype {q.dtype}; the CUDA backend supports torch.float16 and torch.bfloat16 only")
    else:
        fail(f"q is on {q.device}; only CPU and CUDA tensors are supported")


def head_dim(q):
    d = q.shape[-1]
    if d < 1 or d > 256:
        fail(f"q has head dimension {d}; supported head dimensions are 1 to 256")
    return d


def same_head_dim(t, name, d):
    if t.shape[-1] != d:
        fail(f"{name} has head dimension {t.shape[-1]} but q has {d}; they must match")


def shape(t, name, expected, layout):
    if t.dim() != len(expected) or any(a != b for a, b in zip(t.shape, expected)):
        fail(f"{name} must have shape {tuple(expected)} {layout}, got {tuple(t.shape)}")


def nheads(h, hk):
    if hk < 1 or h % hk != 0:
        fail(f"q has {h} heads, which is not a multiple of the {hk} heads of k/v (nheads must be divisible by nheads_k)")


def last_dim_contiguous(t, name):
    # Strides of an empty tensor are meaningless (autograd hands out expanded stride-0 ones).
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(f"{name} must be contiguous in its last dimension (stride(-1) == 1), got stride {t.stride(-1)}")


def scalars(dropout_p, softmax_scale, softcap, window_left, window_right):
    if not (0.0 <= dropout_p < 1.0):
        fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale != softmax_scale or softmax_scale in (float("inf"), float("-inf")):
        fail(f"softmax_scale must be finite, got {softmax_scale}")
    if not (softcap >= 0.0) or softcap == float("inf"):
        fail(f"softcap must be >= 0 and finite (0 disables it), got {softcap}")
    if window_left < -1:
        fail(f"window_size_left must be >= -1 (-1 is unbounded), got {window_left}")
    if window_right < -1:
        fail(f"window_size_right must be >= -1 (-1 is unbounded), got {window_right}")


def alibi(a, q, batch, h):
    if a is None:
        return
    on_q_device(a, "alibi_slopes", q)
    if a.dtype != torch.float32:
        fail(f"alibi_slopes must have dtype torch.float32, got {a.dtype}")
    ok = (a.dim() == 1 and a.shape[0] == h) or (a.dim() == 2 and a.shape[0] == batch and a.shape[1] == h)
    if not ok:
        fail(
            f"alibi_slopes must have shape (nheads,) = ({h},) or (batch, nheads) = ({batch}, {h}), "
            f"got {tuple(a.shape)}"
        )
    last_dim_contiguous(a, "alibi_slopes")


def rng_state(dropout_p, r):
    if dropout_p <= 0:
        return
    if r is None:
        fail("rng_state is required when dropout_p > 0 (an int64 CPU tensor [seed, offset])")
    if r.device.type != "cpu" or r.dtype != torch.int64 or tuple(r.shape) != (2,):
        fail(
            "rng_state must be an int64 CPU tensor of shape (2,) holding [seed, offset], got "
            f"{r.dtype} {tuple(r.shape)} on {r.device}"
        )


def index_vector(t, name, length, q, what):
    if t is None:
        return
    int32_on_q_device(t, name, q)
    if t.dim() != 1 or t.shape[0] != length:
        fail(f"{name} must have shape ({length},) {what}, got {tuple(t.shape)}")


def block_table(t, q, batch):
    if t is None:
        return
    int32_on_q_device(t, "block_table", q)
    if t.dim() != 2 or t.shape[0] != batch:
        fail(f"block_table must have shape (batch, max_blocks_per_seq) with batch = {batch}, got {tuple(t.shape)}")


def max_seqlen(value, name):
    if isinstance(value, int):
        if value < -1:
            fail(f"{name} must be >= 0 (or -1: not given), got {value}")
        return
    # A SymInt (a traced .item() under torch.compile): torch._check gives a run-time assert
    # instead of a data-dependent guard. No message: Dynamo in torch 2.11 cannot trace a message
    # callable that closes over a local (graph break); the op repeats the check with a message.
    torch._check(value >= -1)


# ---- per op -------------------------------------------------------------------------------------


_PAGED_LAYOUT = "(num_blocks, page_block_size, nheads_k, head_dim) since block_table is given"


def _qkv_common(q, k, v, k_name="k", v_name="v"):
    # k/v are k_cache/v_cache for fwd_kvcache.
    q_dtype(q)
    same_device_dtype(k, k_name, q)
    same_device_dtype(v, v_name, q)
    d = head_dim(q)
    same_head_dim(k, k_name, d)
    return d


def _qkv_last_dim_contiguous(q, k, v, k_name="k", v_name="v"):
    for t, name in ((q, "q"), (k, k_name), (v, v_name)):
        last_dim_contiguous(t, name)


def _paged_pool(block_tbl, q, batch, k, k_name):
    # block_table indexes the first dimension of k (k_cache); its second is the page size.
    block_table(block_tbl, q, batch)
    if block_tbl is not None and k.shape[1] < 1:
        fail(f"{k_name} has page_block_size 0 (dimension 1); pages must hold keys")


def fwd(q, k, v, alibi_slopes, dropout_p, softmax_scale, softcap, window_left, window_right, rng):
    rank(q, "q", 4, "(batch, seqlen_q, nheads, head_dim)")
    rank(k, "k", 4, "(batch, seqlen_k, nheads_k, head_dim)")
    rank(v, "v", 4, "(batch, seqlen_k, nheads_k, head_dim)")
    d = _qkv_common(q, k, v)
    b, _, h, _ = q.shape
    _, sk, hk, _ = k.shape
    shape(k, "k", (b, sk, hk, d), "(batch, seqlen_k, nheads_k, head_dim) matching q")
    shape(v, "v", (b, sk, hk, d), "(batch, seqlen_k, nheads_k, head_dim) matching k")
    nheads(h, hk)
    _qkv_last_dim_contiguous(q, k, v)
    scalars(dropout_p, softmax_scale, softcap, window_left, window_right)
    alibi(alibi_slopes, q, b, h)
    rng_state(dropout_p, rng)


def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_tbl, alibi_slopes, max_seqlen_q,
               max_seqlen_k, dropout_p, softmax_scale, softcap, window_left, window_right, return_softmax,
               rng):
    paged = block_tbl is not None
    kv_layout = _PAGED_LAYOUT if paged else "(total_k, nheads_k, head_dim)"
    rank(q, "q", 3, "(total_q, nheads, head_dim)")
    rank(k, "k", 4 if paged else 3, kv_layout)
    rank(v, "v", 4 if paged else 3, kv_layout)
    _qkv_common(q, k, v)
    if tuple(v.shape) != tuple(k.shape):
        fail(f"v must have the same shape as k, got v {tuple(v.shape)} and k {tuple(k.shape)}")
    h, hk = q.shape[1], k.shape[-2]
    nheads(h, hk)
    _qkv_last_dim_contiguous(q, k, v)
    batch = _varlen_index(q, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k)
    _paged_pool(block_tbl, q, batch, k, "k")
    scalars(dropout_p, softmax_scale, softcap, window_left, window_right)
    if return_softmax and dropout_p > 0 and (max_seqlen_q < 0 or max_seqlen_k < 0):
        fail(
            "max_seqlen_q and max_seqlen_k must be given (not -1) when return_softmax is set with "
            "dropout_p > 0: they size S_dmask"
        )
    alibi(alibi_slopes, q, batch, h)
    rng_state(dropout_p, rng)
    return batch


def _varlen_index(q, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        fail(f"cu_seqlens_q must have shape (batch + 1,), got {tuple(cu_seqlens_q.shape)}")
    batch = cu_seqlens_q.shape[0] - 1
    index_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1, q, "(batch + 1,)")
    index_vector(cu_seqlens_k, "cu_seqlens_k", batch + 1, q, "(batch + 1,), the length of cu_seqlens_q")
    index_vector(seqused_k, "seqused_k", batch, q, "(batch,)")
    max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_seqlen(max_seqlen_k, "max_seqlen_k")
    return batch


def _like(t, name, like, like_name, q):
    same_device_dtype(t, name, q)
    if tuple(t.shape) != tuple(like.shape):
        fail(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")
    last_dim_contiguous(t, name)


def _bwd_extra(dout, out, lse, dq, dk, dv, q, k, v, lse_shape, lse_layout):
    _like(out, "out", q, "q", q)
    _like(dout, "dout", q, "q", q)
    on_q_device(lse, "softmax_lse", q)
    # fp64 inputs may pass the fp64 LSE their forward op returns (the autograd path's exact one).
    if lse.dtype != torch.float32 and not (lse.dtype == torch.float64 and q.dtype == torch.float64):
        extra = " or torch.float64" if q.dtype == torch.float64 else ""
        fail(f"softmax_lse must have dtype torch.float32{extra}, got {lse.dtype}")
    shape(lse, "softmax_lse", lse_shape, lse_layout)
    # The caller's gradients: any strides with a contiguous last dimension.
    _like(dq, "dq", q, "q", q)
    _like(dk, "dk", k, "k", q)
    _like(dv, "dv", v, "v", q)


def bwd(dout, q, k, v, out, lse, dq, dk, dv, alibi_slopes, dropout_p, softmax_scale, softcap,
        window_left, window_right, rng):
    fwd(q, k, v, alibi_slopes, dropout_p, softmax_scale, softcap, window_left, window_right, rng)
    b, sq, h, _ = q.shape
    _bwd_extra(dout, out, lse, dq, dk, dv, q, k, v, (b, h, sq), "(batch, nheads, seqlen_q)")


def varlen_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_k,
               alibi_slopes, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, softcap,
               window_left, window_right, rng):
    varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, None, alibi_slopes, max_seqlen_q,
               max_seqlen_k, dropout_p, softmax_scale, softcap, window_left, window_right, False, rng)
    total_q, h, _ = q.shape
    _bwd_extra(dout, out, lse, dq, dk, dv, q, k, v, (h, total_q), "(nheads, total_q)")


def fwd_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx,
                cache_leftpad, block_tbl, alibi_slopes, softmax_scale, softcap, window_left, window_right,
                num_splits):
    paged = block_tbl is not None
    cache_layout = _PAGED_LAYOUT if paged else "(batch_cache, seqlen_cache, nheads_k, head_dim)"
    rank(q, "q", 4, "(batch, seqlen_q, nheads, head_dim)")
    rank(k_cache, "k_cache", 4, cache_layout)
    rank(v_cache, "v_cache", 4, cache_layout)
    d = _qkv_common(q, k_cache, v_cache, "k_cache", "v_cache")
    shape(v_cache, "v_cache", tuple(k_cache.shape), "matching k_cache")
    b, _, h, _ = q.shape
    hk = k_cache.shape[2]
    nheads(h, hk)
    _qkv_last_dim_contiguous(q, k_cache, v_cache, "k_cache", "v_cache")
    if (k is None) != (v is None):
        fail("k and v must be given together (both or neither)")
    if k is not None:
        rank(k, "k", 4, "(batch, seqlen_new, nheads_k, head_dim)")
        for t, name in ((k, "k"), (v, "v")):
            same_device_dtype(t, name, q)
            shape(t, name, (b, k.shape[1], hk, d), "(batch, seqlen_new, nheads_k, head_dim) matching q and k_cache")
            last_dim_contiguous(t, name)
        if cache_seqlens is None:
            fail("cache_seqlens is required when k and v are given: it says where to append them")
    index_vector(cache_seqlens, "cache_seqlens", b, q, "(batch,)")
    if cache_batch_idx is not None and paged:
        fail("cache_batch_idx cannot be combined with block_table (a paged cache is indexed through block_table)")
    index_vector(cache_batch_idx, "cache_batch_idx", b, q, "(batch,)")
    if cache_batch_idx is None and not paged and k_cache.shape[0] < b:
        fail(
            f"k_cache has {k_cache.shape[0]} rows but q has batch {b}; pass cache_batch_idx to map "
            "sequences to rows"
        )
    index_vector(cache_leftpad, "cache_leftpad", b, q, "(batch,)")
    _paged_pool(block_tbl, q, b, k_cache, "k_cache")
    if (rotary_cos is None) != (rotary_sin is None):
        fail("rotary_cos and rotary_sin must be given together (both or neither)")
    if rotary_cos is not None:
        if cache_seqlens is None:
            fail("rotary_cos/rotary_sin need cache_seqlens: it gives the rotary positions of the queries and new keys")
        rank(rotary_cos, "rotary_cos", 2, "(seqlen_ro, rotary_dim / 2)")
        same_device_dtype(rotary_cos, "rotary_cos", q)
        same_device_dtype(rotary_sin, "rotary_sin", q)
        shape(rotary_sin, "rotary_sin", tuple(rotary_cos.shape), "matching rotary_cos")
        rd = 2 * rotary_cos.shape[1]
        if rd < 2 or rd > d:
            fail(
                f"rotary_cos has {rotary_cos.shape[1]} columns, so rotary_dim = {rd}, which must be in "
                f"[2, head_dim = {d}]"
            )
    scalars(0.0, softmax_scale, softcap, window_left, window_right)
    if num_splits < 0:
        fail(f"num_splits must be >= 0 (0: the backend chooses), got {num_splits}")
    alibi(alibi_slopes, q, b, h)


def rotary(x, cos, sin, seqlen_offsets, cu_seqlens):
    """The `rotary` op: x (batch, seqlen, nheads, headdim), or (total, nheads, headdim) with
    cu_seqlens; cos/sin (seqlen_ro, rotary_dim / 2) in x's dtype with rotary_dim <= headdim."""
    varlen = cu_seqlens is not None
    if varlen:
        rank(x, "x", 3, "(total, nheads, headdim) since cu_seqlens is given")
    else:
        rank(x, "x", 4, "(batch, seqlen, nheads, headdim)")
    if x.dtype not in _CPU_DTYPES:
        fail(f"x has dtype {x.dtype}; rotary supports {', '.join(map(str, _CPU_DTYPES))}")
    last_dim_contiguous(x, "x")
    for t, name in ((cos, "cos"), (sin, "sin")):
        if t.device != x.device:
            fail(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on the "
                 f"same device")
        if t.dtype != x.dtype:
            fail(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; cos/sin must have x's "
                 f"dtype")
        rank(t, name, 2, "(seqlen_ro, rotary_dim / 2)")
    if tuple(sin.shape) != tuple(cos.shape):
        fail(f"sin must have shape {tuple(cos.shape)} matching cos, got {tuple(sin.shape)}")
    if 2 * cos.shape[1] > x.shape[-1]:
        fail(f"cos/sin have {cos.shape[1]} columns, so rotary_dim = {2 * cos.shape[1]} exceeds "
             f"the head dimension {x.shape[-1]} of x")
    batch = cu_seqlens.shape[0] - 1 if varlen else x.shape[0]
    if varlen:
        index_vector(cu_seqlens, "cu_seqlens", batch + 1, x, "(batch + 1)")
    if seqlen_offsets is not None:
        index_vector(seqlen_offsets, "seqlen_offsets", batch, x, "(batch)")
