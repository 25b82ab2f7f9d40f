"""ctypes access to run_fwd_cuda (build/harness/libflash_harness.so, benchmarks/build_harness.sh).

Lets the check and benchmark scripts drive the CUDA forward on the GPU machine exactly as the
torch binding will (FwdParams filled by name, outputs allocated here), without the package
build. Field offsets come from the library itself (fwd_harness.cu), so params.h changes cannot
shift fields silently.
"""
import ctypes
import math
import os
import struct

import torch

_LIB = None
_LAYOUT = None
_SIZEOF = None

# struct format per field (the C++ type of params.h).
_FORMATS = {
    "dtype": "i", "batch": "i", "nheads": "i", "nheads_k": "i", "head_dim": "i",
    "seqlen_q": "i", "seqlen_k": "i", "total_q": "i", "page_block_size": "i",
    "window_left": "i", "window_right": "i", "num_splits": "i",
    "softmax_scale": "f", "scale_log2": "f", "softcap": "f", "p_dropout": "f", "keep_scale": "f",
    # (floating fields switch to "d" when params.h declares them double: see _pack)
    "is_causal": "?", "dropout_threshold": "I", "seed": "Q", "offset": "Q",
}
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}
LOG2E = 1.4426950408889634


def lib_path():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("FLASH_HARNESS_LIB",
                          os.path.join(here, "..", "build", "harness", "libflash_harness.so"))


def _load():
    global _LIB, _LAYOUT, _SIZEOF
    if _LIB is not None:
        return
    _LIB = ctypes.CDLL(lib_path())
    buf = ctypes.create_string_buffer(8192)
    _LIB.flash_harness_layout(buf, 8192)
    _LAYOUT = {}
    for item in buf.value.decode().split(";"):
        if not item:
            continue
        parts = item.split()
        if parts[0] == "sizeof":
            _SIZEOF = int(parts[1])
        else:
            _LAYOUT[parts[0]] = (int(parts[1]), int(parts[2]))
    if hasattr(_LIB, "flash_harness_fwd"):  # the tuning library has the layout only
        _LIB.flash_harness_fwd.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                           ctypes.c_char_p, ctypes.c_int]
        _LIB.flash_harness_fwd.restype = ctypes.c_int


def _pack(fields):
    raw = bytearray(_SIZEOF)
    for name, value in fields.items():
        off, size = _LAYOUT[name]
        fmt = _FORMATS.get(name, "q" if size == 8 else "i")
        if name.endswith("_ptr") or name in ("cu_seqlens_q", "cu_seqlens_k", "seqused_k",
                                              "leftpad_k", "cache_batch_idx", "block_table",
                                              "alibi_slopes"):
            fmt = "Q"
            value = 0 if value is None else (value if isinstance(value, int) else value.data_ptr())
        if fmt == "f" and size == 8:
            fmt = "d"
        assert struct.calcsize(fmt) == size, (name, fmt, size)
        struct.pack_into("<" + fmt, raw, off, value)
    return bytes(raw)


def runner(fields, entry=None):
    """A zero-argument callable running run_fwd_cuda (or `entry`, a ctypes function with the
    signature of flash_harness_fwd) with these FwdParams fields (tensors for pointers), packed
    once: benchmarks time the kernel, not the Python packing."""
    _load()
    raw = _pack(fields)
    err = ctypes.create_string_buffer(2048)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    fn = entry if entry is not None else _LIB.flash_harness_fwd
    n = len(raw)

    def call():
        if fn(raw, n, stream, err, 2048) != 0:
            raise RuntimeError(err.value.decode())
    # The packed bytes hold raw pointers: keep every tensor they point into alive with the call.
    call.keep_alive = [v for v in fields.values() if isinstance(v, torch.Tensor)]
    return call


def _strides(t, varlen):
    """(batch, row, head) strides in elements of a (b, s, h, d) or varlen (t, h, d) tensor."""
    assert t.stride(-1) == 1, "last dim must be contiguous"
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def flash_fwd(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, dropout_p=0.0, seed=0, offset=0, return_softmax=False,
              cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=-1, max_seqlen_k=-1,
              seqused_k=None, block_table=None, leftpad_k=None, cache_batch_idx=None,
              poison=True, out=None, prepare_only=False, entry=None):
    """Like the fwd / varlen_fwd ops: returns (out, lse, S_dmask or None), or with prepare_only
    a zero-argument callable that reruns the call into the same outputs.

    Batched: q (b, sq, h, d), k/v (b_k, sk, hk, d). Varlen: q (total_q, h, d) with cu_seqlens_q,
    k/v (total_k, hk, d) with cu_seqlens_k, or paged pools (num_blocks, page, hk, d) with
    block_table. max_seqlen_* = -1 means "not given" (the kernel must not need it).
    """
    varlen = cu_seqlens_q is not None
    d = q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    wl, wr = window_size
    if causal:
        wr = 0
    if varlen:
        total_q, nheads = q.shape[0], q.shape[1]
        batch = cu_seqlens_q.numel() - 1
        seqlen_q = max_seqlen_q if max_seqlen_q >= 0 else -1
        if block_table is not None:
            seqlen_k = max_seqlen_k if max_seqlen_k >= 0 else block_table.shape[1] * k.shape[1]
        else:
            seqlen_k = max_seqlen_k if max_seqlen_k >= 0 else k.shape[0]
        nheads_k = k.shape[-2]
    else:
        batch, seqlen_q, nheads = q.shape[0], q.shape[1], q.shape[2]
        total_q = batch * seqlen_q
        seqlen_k = k.shape[1] if block_table is None else block_table.shape[1] * k.shape[1]
        nheads_k = k.shape[2]
    # FA2 folds a window that covers everything into "unbounded".
    if wl >= 0 and wl >= seqlen_k and seqlen_k >= 0 and not varlen:
        wl = -1
    if wr >= 0 and wr >= seqlen_k and seqlen_k >= 0 and not varlen:
        wr = -1
    if out is None:
        out = torch.empty_like(q) if q.is_contiguous() else torch.empty(
            q.shape, dtype=q.dtype, device=q.device)
    if poison:
        out.fill_(float("nan"))
    lse_shape = (nheads, total_q) if varlen else (batch, nheads, seqlen_q)
    lse = torch.full(lse_shape, float("nan"), dtype=torch.float32, device=q.device)
    p = None
    if return_softmax and dropout_p > 0:
        pr = max_seqlen_q if varlen else seqlen_q
        pc = max_seqlen_k if varlen else seqlen_k
        p = torch.full((batch, nheads, pr, pc), float("nan"), dtype=q.dtype, device=q.device)
    paged = block_table is not None
    qb, qr, qh = _strides(q, varlen)
    kb, kr, kh = (k.stride(0), k.stride(1), k.stride(2)) if paged else _strides(k, varlen)
    vb, vr, vh = (v.stride(0), v.stride(1), v.stride(2)) if paged else _strides(v, varlen)
    ob, orr, oh = _strides(out, varlen)
    thr = 0
    if dropout_p > 0:
        t = float(torch.tensor(dropout_p, dtype=torch.float32)) * 4294967296.0 + 0.5
        thr = 0xFFFFFFFF if t >= 4294967295.0 else int(t)
    fields = dict(
        dtype=_DTYPE_CODE[q.dtype], q_ptr=q, k_ptr=k, v_ptr=v,
        q_batch_stride=qb, q_row_stride=qr, q_head_stride=qh,
        k_batch_stride=kb, k_row_stride=kr, k_head_stride=kh,
        v_batch_stride=vb, v_row_stride=vr, v_head_stride=vh,
        o_ptr=out, o_batch_stride=ob, o_row_stride=orr, o_head_stride=oh,
        softmax_lse_ptr=lse, p_ptr=p, batch=batch, nheads=nheads, nheads_k=nheads_k,
        head_dim=d, seqlen_q=seqlen_q if seqlen_q is not None else -1,
        seqlen_k=seqlen_k, total_q=total_q,
        total_k=k.shape[0] if varlen and not paged else 0,  # what the binding passes
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
        leftpad_k=leftpad_k, cache_batch_idx=cache_batch_idx, block_table=block_table,
        block_table_batch_stride=block_table.stride(0) if paged else 0,
        page_block_size=k.shape[1] if paged else 0,
        softmax_scale=softmax_scale, scale_log2=softmax_scale * LOG2E, softcap=softcap,
        alibi_slopes=alibi_slopes,
        alibi_batch_stride=(alibi_slopes.stride(0)
                            if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0),
        window_left=wl, window_right=wr, is_causal=bool(causal),
        p_dropout=float(dropout_p), keep_scale=1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0,
        dropout_threshold=thr, seed=seed & 0xFFFFFFFFFFFFFFFF,
        offset=offset & 0xFFFFFFFFFFFFFFFF, num_splits=0,
    )
    call = runner(fields, entry)
    if prepare_only:
        call.out, call.lse = out, lse
        return call
    call()
    return out, lse, p
