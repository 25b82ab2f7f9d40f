"""FlashAttention-2.8's internal API (`flash_attn_interface._flash_attn_forward`,
`_flash_attn_backward` and the varlen pair), which ring attention libraries call per K/V block.

* signatures, defaults and return values as in 2.8, seen the way ring-flash-attn sees them
  (`inspect.getfullargspec`, then a call with keyword arguments);
* the backward uses the out and softmax_lse it is given: backward over two K/V halves with the
  global out/LSE, summed, equals the full backward (batched and varlen, GQA, softcap), and
  lse + 1 scales dV by exactly 1/e;
* forward+backward through these functions equals the autograd path, and compiles with
  torch.compile(fullgraph=True).
"""
import inspect
import math

import pytest
import torch
import torch._dynamo.testing

import grid
from conftest import device_params
from helpers import cu_seqlens, qkv, randn

# 2.8's signatures (flash_attn/flash_attn_interface.py at v2.8.3): (argument names, defaults).
SIGNATURES = {
    "_flash_attn_forward": (
        ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size_left",
         "window_size_right", "softcap", "alibi_slopes", "return_softmax"], None),
    "_flash_attn_varlen_forward": (
        ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
         "dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right",
         "softcap", "alibi_slopes", "return_softmax", "block_table", "leftpad_k", "seqused_k",
         "zero_tensors"], (-1, -1, 0.0, None, False, None, None, None, False)),
    "_flash_attn_backward": (
        ["dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
         "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
         "alibi_slopes", "deterministic", "rng_state"], (None,)),
    "_flash_attn_varlen_backward": (
        ["dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "cu_seqlens_q",
         "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p", "softmax_scale", "causal",
         "window_size_left", "window_size_right", "softcap", "alibi_slopes", "deterministic",
         "rng_state", "zero_tensors"], (None, False)),
}


def _device_dtype_params():
    out = []
    for p in device_params():
        device = p if isinstance(p, str) else p.values[0]
        marks = () if isinstance(p, str) else p.marks
        dtypes = [torch.float32, torch.bfloat16] if device == "cpu" else list(grid.DTYPES_CUDA)
        for dt in dtypes:
            out.append(pytest.param(device, dt, id=f"{device}-{grid.dtype_name(dt)}", marks=marks))
    return out


def _default_args(func):
    # What ring-flash-attn's get_default_args does: every argument, None where 2.8 has no
    # default, then softcap = 0.0.
    spec = inspect.getfullargspec(func)
    defaults = spec.defaults or ()
    args = dict(zip(spec.args, (None,) * (len(spec.args) - len(defaults)) + tuple(defaults)))
    args["softcap"] = 0.0
    return args


@pytest.mark.fast
def test_signatures_are_those_of_2_8(flash):
    iface = flash.flash_attn_interface
    for name, (args, defaults) in SIGNATURES.items():
        fn = getattr(iface, name)
        assert inspect.isfunction(fn), name
        spec = inspect.getfullargspec(fn)
        assert spec.args == args and spec.defaults == defaults, name
        assert getattr(iface, "_wrapped" + name) is fn


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_called_like_ring_flash_attn(flash, device):
    """Keyword calls built from the introspected defaults; results equal the public function's
    and its autograd gradients (deterministic=True: bitwise)."""
    iface = flash.flash_attn_interface
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = qkv(2, 33, 50, 4, 2, 64, dtype=dtype, device=device, requires_grad=True)
    scale = 64 ** -0.5
    params = _default_args(iface._flash_attn_forward)
    params.update(q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=True,
                  window_size_left=-1, window_size_right=-1, return_softmax=False)
    with torch.no_grad():
        out, lse, s_dmask, rng_state = iface._flash_attn_forward(**params)
    out_ref, lse_ref, _ = flash.flash_attn_func(q, k, v, causal=True, deterministic=True,
                                                return_attn_probs=True)
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref)
    assert lse.dtype == torch.float32 and s_dmask.numel() == 0

    dout = torch.randn_like(out)
    grads_ref = torch.autograd.grad(out_ref, (q, k, v), dout)
    dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
    params = _default_args(iface._flash_attn_backward)
    params.update(dout=dout, q=q.detach(), k=k.detach(), v=v.detach(), out=out, softmax_lse=lse,
                  dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=True,
                  window_size_left=-1, window_size_right=-1, alibi_slopes=None,
                  deterministic=True)
    softmax_d = iface._flash_attn_backward(**params)
    for g, g_ref in zip((dq, dk, dv), grads_ref):
        assert torch.equal(g, g_ref)
    assert softmax_d.shape == lse.shape and softmax_d.dtype == torch.float32


def _close(got, want, parts, dtype, factor=4.0):
    """|got - want| within a few roundings of the dtype, relative to the summands' size."""
    eps = torch.finfo(dtype).eps
    bound = factor * eps * sum(float(p.abs().max()) for p in parts) + 1e-30
    err = float((got.double() - want.double()).abs().max())
    assert err <= bound, f"max error {err:.3e} > {bound:.3e}"


@pytest.mark.fast
@pytest.mark.parametrize(("device", "dtype"), _device_dtype_params())
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
def test_backward_over_two_kv_halves_equals_full(flash, device, dtype, softcap):
    """Batched, GQA: dq = dq(keys[:m]) + dq(keys[m:]), dk/dv = the halves' rows, every call with
    the global out and LSE of all keys (what each ring step does)."""
    iface = flash.flash_attn_interface
    b, sq, sk, h, hk, d, m = 2, 37, 90, 4, 2, 64, 41
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype=dtype, device=device)
    scale = d ** -0.5
    fwd = dict(dropout_p=0.0, softmax_scale=scale, causal=False, window_size_left=-1,
               window_size_right=-1, softcap=softcap, alibi_slopes=None, return_softmax=False)
    out, lse, _, _ = iface._flash_attn_forward(q, k, v, **fwd)
    dout = torch.randn_like(out)
    bwd = dict(dropout_p=0.0, softmax_scale=scale, causal=False, window_size_left=-1,
               window_size_right=-1, softcap=softcap, alibi_slopes=None, deterministic=True)

    def backward(k_, v_):
        grads = [torch.empty_like(t) for t in (q, k_, v_)]
        iface._flash_attn_backward(dout, q, k_, v_, out, lse, *grads, **bwd)
        return grads

    dq, dk, dv = backward(k, v)
    dq1, dk1, dv1 = backward(k[:, :m], v[:, :m])
    dq2, dk2, dv2 = backward(k[:, m:], v[:, m:])
    _close(dq1.double() + dq2.double(), dq, (dq1, dq2, dq), dtype)
    for full, h1, h2 in ((dk, dk1, dk2), (dv, dv1, dv2)):
        _close(full[:, :m], h1, (full,), dtype)
        _close(full[:, m:], h2, (full,), dtype)


@pytest.mark.fast
@pytest.mark.parametrize(("device", "dtype"), _device_dtype_params())
def test_varlen_backward_over_two_kv_halves_equals_full(flash, device, dtype):
    """Varlen (an empty key sequence, a one-key one), each sequence's keys split in two."""
    iface = flash.flash_attn_interface
    lens_q, lens_k = [5, 3, 1, 30], [7, 0, 1, 40]
    h, hk, d = 4, 1, 32
    q = randn(sum(lens_q), h, d, dtype=dtype, device=device)
    k, v = (randn(sum(lens_k), hk, d, dtype=dtype, device=device) for _ in range(2))
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    scale = d ** -0.5
    common = dict(dropout_p=0.0, softmax_scale=scale, causal=False, window_size_left=-1,
                  window_size_right=-1, softcap=0.0, alibi_slopes=None)
    out, lse, _, _ = iface._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max(lens_q),
                                                      max(lens_k), **common)
    dout = torch.randn_like(out)

    # Rows of k in the first and second half of each sequence.
    starts = [0] + torch.tensor(lens_k).cumsum(0).tolist()
    first = [list(range(s, s + n // 2)) for s, n in zip(starts, lens_k)]
    second = [list(range(s + n // 2, s + n)) for s, n in zip(starts, lens_k)]

    def backward(rows_per_seq):
        idx = torch.tensor(sum(rows_per_seq, []), dtype=torch.long, device=device)
        lens = [len(r) for r in rows_per_seq]
        k_, v_ = k[idx], v[idx]
        grads = [torch.empty_like(t) for t in (q, k_, v_)]
        iface._flash_attn_varlen_backward(dout, q, k_, v_, out, lse, *grads, cu_q,
                                          cu_seqlens(lens, device), max(lens_q), max(lens),
                                          **common, deterministic=True)
        return idx, grads

    _, (dq, dk, dv) = backward([list(range(s, s + n)) for s, n in zip(starts, lens_k)])
    idx1, (dq1, dk1, dv1) = backward(first)
    idx2, (dq2, dk2, dv2) = backward(second)
    _close(dq1.double() + dq2.double(), dq, (dq1, dq2, dq), dtype)
    for full, h1, h2 in ((dk, dk1, dk2), (dv, dv1, dv2)):
        _close(full[idx1], h1, (full,), dtype)
        _close(full[idx2], h2, (full,), dtype)


@pytest.mark.fast
@pytest.mark.parametrize(("device", "dtype"), _device_dtype_params())
def test_backward_uses_the_given_lse(flash, device, dtype):
    """P = exp(S - lse): lse + 1 must scale dV = P^T dO by exactly 1/e (no recomputed LSE)."""
    iface = flash.flash_attn_interface
    q, k, v = qkv(1, 20, 30, 2, 2, 32, dtype=dtype, device=device)
    common = dict(dropout_p=0.0, softmax_scale=32 ** -0.5, causal=False, window_size_left=-1,
                  window_size_right=-1, softcap=0.0, alibi_slopes=None)
    out, lse, _, _ = iface._flash_attn_forward(q, k, v, **common, return_softmax=False)
    dout = torch.randn_like(out)
    dvs = []
    for shift in (0.0, 1.0):
        grads = [torch.empty_like(t) for t in (q, k, v)]
        iface._flash_attn_backward(dout, q, k, v, out, lse + shift, *grads, **common,
                                   deterministic=True)
        dvs.append(grads[2])
    _close(dvs[1], dvs[0].double() / math.e, (dvs[0],), dtype)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_compile_internal_api_fullgraph(flash, device):
    """Forward and backward through the internal API under torch.compile(fullgraph=True): one
    graph, the eager values (dq/dk/dv written in place through functionalization)."""
    torch._dynamo.reset()
    iface = flash.flash_attn_interface
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = qkv(2, 17, 24, 4, 2, 32, dtype=dtype, device=device)
    dout = torch.randn_like(q)
    kvbuf = torch.empty(2, 24, 2, 2, 32, dtype=dtype, device=device)

    def fn(q, k, v, dout, kvbuf):
        out, lse, _, _ = iface._flash_attn_forward(q, k, v, 0.0, 0.25, True, -1, -1, 0.0, None,
                                                   False)
        dq = torch.empty_like(q)
        dk, dv = kvbuf.unbind(2)
        d = iface._flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, 0.25, True, -1,
                                       -1, 0.0, None, True)
        return out, dq, kvbuf.clone(), d

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    got = compiled(q, k, v, dout, torch.empty_like(kvbuf))
    want = fn(q, k, v, dout, torch.empty_like(kvbuf))
    assert counter.frame_count == 1
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    torch._dynamo.reset()
