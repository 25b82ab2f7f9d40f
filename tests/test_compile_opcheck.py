"""torch.library.opcheck on all five ops (schema, fake impls, autograd registration, AOT
dispatch), and torch.compile(fullgraph=True) through the public API with no graph break and
the eager result."""
import pytest
import torch
import torch._dynamo.testing

from conftest import device_params
from helpers import cu_seqlens, qkv, randn

OPS = ["fwd", "varlen_fwd", "bwd", "varlen_bwd", "fwd_kvcache"]
BACKWARD_OF = {"fwd": "bwd", "varlen_fwd": "varlen_bwd"}


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.float16


def _grad_buffers(q, k, v, pack_dim):
    """dq contiguous; dk/dv strided views of one packed kv gradient (what the packed functions
    hand the backward ops)."""
    dkv = torch.empty(k.shape[:pack_dim] + (2,) + k.shape[pack_dim:], dtype=k.dtype,
                      device=k.device)
    return (torch.empty_like(q), *dkv.unbind(pack_dim))


def sample_args(ops, op, device, *, dropout=False, grad=False):
    """Positional args for each op, in schema order (docs/design.md)."""
    dtype = _dtype(device)
    p = 0.2 if dropout else 0.0
    rng = torch.tensor([12345, 67], dtype=torch.int64) if dropout else None
    slopes = torch.rand(4, device=device)
    if op in ("fwd", "bwd"):
        q, k, v = qkv(2, 7, 9, 4, 2, 32, dtype=dtype, device=device, requires_grad=grad)
        fwd = (q, k, v, slopes, p, 0.2, True, -1, -1, 0.0, False, rng)
        if op == "fwd":
            return fwd
        with torch.no_grad():
            out, lse, _, rng_out = ops.fwd(*fwd)
        dout = torch.randn_like(out)
        dq, dk, dv = _grad_buffers(q, k, v, pack_dim=2)
        return (dout, q, k, v, out, lse, dq, dk, dv, slopes, p, 0.2, True, -1, -1, 0.0, False,
                rng_out if dropout else None)
    if op in ("varlen_fwd", "varlen_bwd"):
        lens_q, lens_k = [3, 0, 5], [4, 2, 6]
        q = randn(8, 4, 32, dtype=dtype, device=device, requires_grad=grad)
        k = randn(12, 2, 32, dtype=dtype, device=device, requires_grad=grad)
        v = randn(12, 2, 32, dtype=dtype, device=device, requires_grad=grad)
        cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
        fwd = (q, k, v, cu_q, cu_k, None, None, slopes, 5, 6, p, 0.2, True, -1, -1, 0.0, False,
               rng)
        if op == "varlen_fwd":
            return fwd
        with torch.no_grad():
            out, lse, _, rng_out = ops.varlen_fwd(*fwd)
        dout = torch.randn_like(out)
        dq, dk, dv = _grad_buffers(q, k, v, pack_dim=1)
        return (dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, None, slopes, 5, 6, p, 0.2, True,
                -1, -1, 0.0, False, rng_out if dropout else None)
    # fwd_kvcache
    q = randn(2, 2, 4, 32, dtype=dtype, device=device)
    kc, vc = (randn(2, 16, 2, 32, dtype=dtype, device=device) for _ in range(2))
    k, v = (randn(2, 2, 2, 32, dtype=dtype, device=device) for _ in range(2))
    lens = torch.tensor([3, 9], dtype=torch.int32, device=device)
    angle = torch.rand(16, 8, device=device)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    return (q, kc, vc, k, v, lens, cos, sin, None, None, None, slopes, 0.2, True, -1, -1, 0.0,
            False, 0)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("op", OPS)
def test_opcheck(ops, device, op):
    for dropout in ([False, True] if op != "fwd_kvcache" else [False]):
        grad = op in BACKWARD_OF
        args = sample_args(ops, op, device, dropout=dropout, grad=grad)
        torch.library.opcheck(getattr(ops, op).default, args)


def _compile(fn):
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_compile_flash_attn_func_fullgraph_fwd_bwd(flash, device):
    grad = True
    q, k, v = qkv(2, 33, 40, 4, 2, 64, dtype=_dtype(device), device=device, requires_grad=grad)
    slopes = torch.rand(4, device=device)

    def fn(q, k, v):
        out = flash.flash_attn_func(q, k, v, causal=True, softcap=5.0, alibi_slopes=slopes,
                                    window_size=(20, 0))
        return out.float().square().sum()

    compiled, counter = _compile(fn)
    _check_compiled_equals_eager(compiled, fn, counter, (q, k, v), grad)


def _check_compiled_equals_eager(compiled, fn, counter, args, grad, inputs=3):
    loss_c = compiled(*args)
    loss_e = fn(*args)
    assert counter.frame_count == 1, "one graph, no break"
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    if grad:
        grads_c = torch.autograd.grad(loss_c, args[:inputs])
        grads_e = torch.autograd.grad(loss_e, args[:inputs])
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=0, atol=0)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("max_seqlen", ["int", "tensor"])
def test_compile_flash_attn_varlen_func_fullgraph(flash, device, max_seqlen):
    """Including max_seqlen as 0-dim tensors (Transformers' packed path): no graph break."""
    grad = True
    lens = [7, 0, 1, 12]
    cu = cu_seqlens(lens, device)
    q, k, v = (randn(sum(lens), 2, 32, dtype=_dtype(device), device=device, requires_grad=grad)
               for _ in range(3))
    m = 12 if max_seqlen == "int" else torch.tensor(12, device=device)

    def fn(q, k, v, cu, m):
        return flash.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True).sum()

    compiled, counter = _compile(fn)
    _check_compiled_equals_eager(compiled, fn, counter, (q, k, v, cu, m), grad)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_compile_with_dropout_fullgraph(flash, device):
    """Dropout draws rng_state inside the compiled region without a graph break."""
    grad = True
    q, k, v = qkv(1, 16, 16, 2, 2, 32, dtype=_dtype(device), device=device, requires_grad=grad)

    def fn(q, k, v):
        return flash.flash_attn_func(q, k, v, dropout_p=0.3)

    compiled, counter = _compile(fn)
    torch.manual_seed(3)
    out_c = compiled(q, k, v)
    if grad:
        out_c.sum().backward()
    torch.manual_seed(3)
    out_e = fn(q, k, v)
    assert counter.frame_count == 1
    assert torch.isfinite(out_c).all()
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_compile_flash_attn_with_kvcache_fullgraph(flash, device):
    """The in-place cache append survives functionalization: same out and cache as eager."""
    dtype = _dtype(device)
    q = randn(2, 1, 4, 32, dtype=dtype, device=device)
    k, v = (randn(2, 1, 2, 32, dtype=dtype, device=device) for _ in range(2))
    kc, vc = (randn(2, 16, 2, 32, dtype=dtype, device=device) for _ in range(2))
    lens = torch.tensor([3, 9], dtype=torch.int32, device=device)

    def fn(q, kc, vc, k, v, lens):
        return flash.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)

    compiled, counter = _compile(fn)
    kc_c, vc_c = kc.clone(), vc.clone()
    out_c = compiled(q, kc_c, vc_c, k, v, lens)
    out_e = fn(q, kc, vc, k, v, lens)
    assert counter.frame_count == 1
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(kc_c, kc, rtol=0, atol=0)
    torch.testing.assert_close(vc_c, vc, rtol=0, atol=0)


def _rotary_args(device, *, varlen, grad):
    dtype = _dtype(device)
    angle = torch.rand(16, 8, device=device)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    if varlen:
        x = randn(10, 3, 24, dtype=dtype, device=device, requires_grad=grad)
        return (x, cos, sin, torch.tensor([1, 0, 4], dtype=torch.int32, device=device),
                cu_seqlens([4, 0, 6], device), 0, 6, True, False)
    x = randn(2, 7, 3, 24, dtype=dtype, device=device, requires_grad=grad)
    return (x, cos, sin, None, None, 3, -1, False, False)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("varlen", [False, True])
def test_opcheck_rotary(ops, device, varlen):
    torch.library.opcheck(ops.rotary.default, _rotary_args(device, varlen=varlen, grad=True))


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_compile_apply_rotary_emb_fullgraph_fwd_bwd(flash, device):
    x, cos, sin, offsets, cu, *_ = _rotary_args(device, varlen=True, grad=True)

    def fn(x, cos, sin, offsets, cu):
        out = flash.layers.rotary.apply_rotary_emb(x, cos, sin, interleaved=True,
                                                   seqlen_offsets=offsets, cu_seqlens=cu,
                                                   max_seqlen=6)
        return out.float().square().sum()

    compiled, counter = _compile(fn)
    _check_compiled_equals_eager(compiled, fn, counter, (x, cos, sin, offsets, cu), True,
                                 inputs=1)
