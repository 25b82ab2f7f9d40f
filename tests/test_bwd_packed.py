"""The packed functions' backward writes into one packed gradient (issue: no concatenation of
dq/dk/dv), and the backward ops write into caller-given, strided dq/dk/dv.

* packed grads are bitwise equal to the unpacked function's grads (deterministic=True), batched
  and varlen, qkv- and kv-packed (GQA), with a non-contiguous dout;
* the backward of a packed function runs no aten.cat/stack, and the backward op receives views
  of one buffer (a dispatch mode records both); the unpacked function on views of a packed
  tensor is the control, whose gradient does go through a stack;
* the ops write only through the given strides (padding around the views stays NaN) and return
  softmax_d = rowsum(dout o out);
* torch.compile(fullgraph=True) of a packed forward+backward gives the eager gradients.
"""
import pytest
import torch
import torch._dynamo.testing
from torch.utils._python_dispatch import TorchDispatchMode

import grid
from conftest import device_params
from helpers import cu_seqlens, randn

VARIANTS = ["qkv", "kv_gqa", "varlen_qkv", "varlen_kv_gqa"]
LENS = [5, 0, 1, 17]  # varlen batch: an empty and a one-token sequence
LENS_K = [7, 3, 0, 20]


def _dtypes(device):
    return [torch.float32, torch.bfloat16] if device == "cpu" else list(grid.DTYPES_CUDA)


def _device_dtype_params():
    out = []
    for p in device_params():
        device = p if isinstance(p, str) else p.values[0]
        marks = () if isinstance(p, str) else p.marks
        for dt in _dtypes("cpu" if device == "cpu" else "cuda"):
            out.append(pytest.param(device, dt, id=f"{device}-{grid.dtype_name(dt)}", marks=marks))
    return out


def _make(variant, device, dtype):
    """(packed inputs as leaves, fn(packed inputs) -> out, fn_unpacked(q, k, v) -> out,
    split(packed inputs) -> (q, k, v) views)."""
    b, s, sk, h, hk, d = 2, 37, 45, 4, 2, 64
    kw = dict(causal=True, deterministic=True)
    if variant == "qkv":
        qkv = randn(b, s, 3, h, d, dtype=dtype, device=device, requires_grad=True)
        return ([qkv], lambda f, x: f.flash_attn_qkvpacked_func(x, **kw),
                lambda f, q, k, v: f.flash_attn_func(q, k, v, **kw), lambda x: x.unbind(2))
    if variant == "kv_gqa":
        q = randn(b, s, h, d, dtype=dtype, device=device, requires_grad=True)
        kv = randn(b, sk, 2, hk, d, dtype=dtype, device=device, requires_grad=True)
        return ([q, kv], lambda f, q, kv: f.flash_attn_kvpacked_func(q, kv, **kw),
                lambda f, q, k, v: f.flash_attn_func(q, k, v, **kw),
                lambda q, kv: (q, *kv.unbind(2)))
    cu_q = cu_seqlens(LENS, device)
    if variant == "varlen_qkv":
        qkv = randn(sum(LENS), 3, h, d, dtype=dtype, device=device, requires_grad=True)
        m = max(LENS)
        return ([qkv], lambda f, x: f.flash_attn_varlen_qkvpacked_func(x, cu_q, m, **kw),
                lambda f, q, k, v: f.flash_attn_varlen_func(q, k, v, cu_q, cu_q, m, m, **kw),
                lambda x: x.unbind(1))
    cu_k = cu_seqlens(LENS_K, device)
    q = randn(sum(LENS), h, d, dtype=dtype, device=device, requires_grad=True)
    kv = randn(sum(LENS_K), 2, hk, d, dtype=dtype, device=device, requires_grad=True)
    mq, mk = max(LENS), max(LENS_K)
    return ([q, kv],
            lambda f, q, kv: f.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, mq, mk, **kw),
            lambda f, q, k, v: f.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, **kw),
            lambda q, kv: (q, *kv.unbind(1)))


def _strided_dout(out, layout):
    """A dout like out that is not contiguous: heads-major memory, or a non-unit last stride."""
    if layout == "transposed":
        t = torch.randn(out.shape[:-3] + (out.shape[-2], out.shape[-3], out.shape[-1]),
                        device=out.device).to(out.dtype).transpose(-3, -2)
    else:
        t = torch.randn(out.shape[:-1] + (2 * out.shape[-1],), device=out.device).to(out.dtype)
        t = t[..., ::2]
    assert t.shape == out.shape and not t.is_contiguous()
    return t


@pytest.mark.fast
@pytest.mark.parametrize(("device", "dtype"), _device_dtype_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dout_layout", ["transposed", "strided_last"])
def test_packed_grads_equal_unpacked(flash, device, dtype, variant, dout_layout):
    inputs, fn, fn_unpacked, split = _make(variant, device, dtype)
    out = fn(flash, *inputs)
    dout = _strided_dout(out, dout_layout)
    grads = torch.autograd.grad(out, inputs, dout)

    parts = [t.detach().clone().requires_grad_() for t in split(*[x.detach() for x in inputs])]
    out_u = fn_unpacked(flash, *parts)
    grads_u = torch.autograd.grad(out_u, parts, dout)
    assert torch.equal(out, out_u)
    expected = [torch.zeros_like(x) for x in inputs]
    for view, g in zip(split(*expected), grads_u):  # the unpacked grads in the packed layout
        view.copy_(g)
    for g, e in zip(grads, expected):
        assert g.shape == e.shape and g.dtype == dtype
        assert torch.equal(g, e), f"max diff {(g.float() - e.float()).abs().max()}"


class _Recorder(TorchDispatchMode):
    """Records every op name, and the dq/dk/dv arguments of the backward ops."""

    def __init__(self, bwd_ops):
        super().__init__()
        self.names, self.grad_args, self.bwd_ops = [], [], bwd_ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        if func in self.bwd_ops:
            self.grad_args.append(tuple(args[6:9]))
        return func(*args, **(kwargs or {}))


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_backward_writes_one_buffer_without_cat(flash, ops, device, variant):
    dtype = torch.bfloat16
    inputs, fn, fn_unpacked, split = _make(variant, device, dtype)
    bwd_ops = (ops.bwd.default, ops.varlen_bwd.default)

    out = fn(flash, *inputs)
    with _Recorder(bwd_ops) as rec:
        grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
    assert not any(n.split(".")[-1] in ("cat", "stack") for n in rec.names), rec.names
    assert len(rec.grad_args) == 1, rec.names
    dq, dk, dv = rec.grad_args[0]
    packed_grad = grads[-1]
    base = packed_grad.untyped_storage().data_ptr()
    # dk/dv (and dq for qkv) are strided views into the packed gradient that autograd returns.
    views = (dq, dk, dv) if variant.endswith("qkv") else (dk, dv)
    for t in views:
        assert t.untyped_storage().data_ptr() == base and not t.is_contiguous()

    # Control: the unpacked function on views of the packed tensor stacks the gradients.
    out_u = fn_unpacked(flash, *split(*inputs))
    with _Recorder(bwd_ops) as rec_u:
        torch.autograd.grad(out_u, inputs, torch.randn_like(out_u))
    assert any(n.split(".")[-1] == "stack" for n in rec_u.names), rec_u.names


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_bwd_op_writes_through_strides(ops, device, varlen):
    """dq/dk/dv as views of a NaN-filled buffer with padding between rows and heads: the op
    writes exactly the views (bitwise as with contiguous outputs) and leaves the padding alone;
    it returns softmax_d = rowsum(dout o out) in the LSE's layout."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    h, hk, d = 4, 2, 40
    if varlen:
        cu_q, cu_k = cu_seqlens(LENS, device), cu_seqlens(LENS_K, device)
        q = randn(sum(LENS), h, d, dtype=dtype, device=device)
        k, v = (randn(sum(LENS_K), hk, d, dtype=dtype, device=device) for _ in range(2))
        fwd_args = (cu_q, cu_k, None, None, None, max(LENS), max(LENS_K), 0.0, d ** -0.5, True,
                    -1, -1, 0.0, False, None)
        out, lse, _, _ = ops.varlen_fwd(q, k, v, *fwd_args)
        pack_dim = 1

        def bwd(dout, dq, dk, dv):
            return ops.varlen_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, None, None,
                                  max(LENS), max(LENS_K), 0.0, d ** -0.5, True, -1, -1, 0.0, True,
                                  None)
    else:
        q = randn(2, 37, h, d, dtype=dtype, device=device)
        k, v = (randn(2, 45, hk, d, dtype=dtype, device=device) for _ in range(2))
        out, lse, _, _ = ops.fwd(q, k, v, None, 0.0, d ** -0.5, True, -1, -1, 0.0, False, None)
        pack_dim = 2

        def bwd(dout, dq, dk, dv):
            return ops.bwd(dout, q, k, v, out, lse, dq, dk, dv, None, 0.0, d ** -0.5, True, -1, -1,
                           0.0, True, None)

    dout = torch.randn_like(out)
    ref = [torch.empty_like(t) for t in (q, k, v)]
    softmax_d = bwd(dout, *ref)

    def padded_views(t, n):
        # (..., n, heads, d + 8) buffer, NaN, the views skip the last 8 columns
        shape = t.shape[:pack_dim] + (n,) + t.shape[pack_dim:-1] + (d + 8,)
        buf = torch.full(shape, float("nan"), dtype=dtype, device=device)
        return buf, [x[..., :d] for x in buf.unbind(pack_dim)]

    qbuf, (dq,) = padded_views(q, 1)
    kvbuf, (dk, dv) = padded_views(k, 2)
    softmax_d2 = bwd(dout, dq, dk, dv)
    for got, want in zip((dq, dk, dv), ref):
        assert not got.is_contiguous() and torch.equal(got, want)
    for buf in (qbuf, kvbuf):
        assert buf[..., d:].isnan().all(), "wrote outside the given views"
    assert torch.equal(softmax_d, softmax_d2)
    assert softmax_d.dtype == torch.float32 and softmax_d.shape == lse.shape
    rowsum = (dout.double() * out.double()).sum(-1)  # (..., seqlen, heads)
    rowsum = rowsum.permute(1, 0) if varlen else rowsum.transpose(1, 2)
    torch.testing.assert_close(softmax_d.double(), rowsum, rtol=1e-2, atol=1e-2)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("variant", ["qkv", "varlen_kv_gqa"])
def test_compile_packed_fullgraph_fwd_bwd(flash, device, variant):
    torch._dynamo.reset()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    inputs, fn, _, _ = _make(variant, device, dtype)

    def loss(*xs):
        return fn(flash, *xs).float().square().sum()

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss, backend=counter, fullgraph=True)
    grads_c = torch.autograd.grad(compiled(*inputs), inputs)
    grads_e = torch.autograd.grad(loss(*inputs), inputs)
    assert counter.frame_count == 1
    for gc, ge in zip(grads_c, grads_e):
        assert torch.equal(gc, ge)
    torch._dynamo.reset()


@pytest.mark.fast
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "qkvpacked"])
def test_double_backward_fails_loudly(flash, packed):
    """The backward ops have no derivative: gradients built with create_graph=True refuse to be
    differentiated instead of acting as constants."""
    qkv = randn(1, 5, 3, 2, 8, dtype=torch.float64, device="cpu", requires_grad=True)
    out = (flash.flash_attn_qkvpacked_func(qkv) if packed
           else flash.flash_attn_func(*qkv.unbind(2)))
    (g,) = torch.autograd.grad(out.sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="flash_attn: double backward"):
        torch.autograd.grad(g.square().sum(), qkv)
