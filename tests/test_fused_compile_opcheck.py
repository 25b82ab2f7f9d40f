"""torch.library.opcheck on the five fused ops (schema, fake impls, autograd registration, AOT
dispatch), and torch.compile(fullgraph=True) through the public norm, cross-entropy and fused-MLP
functions with no graph break and the eager result, forward and backward; on CPU and CUDA."""
import pytest
import torch
import torch._dynamo.testing

from conftest import device_params

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("fused_cuda")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ln_fwd_args(*, dropout, rms, mixed, grad=True, device="cpu"):
    dtype = torch.bfloat16 if mixed else torch.float32
    x0 = torch.randn(6, 19).to(device, dtype).requires_grad_(grad)
    residual = torch.randn(6, 19, device=device, requires_grad=grad)  # fp32 residual stream
    gamma = torch.randn(19, device=device, requires_grad=grad)
    beta = None if rms else torch.randn(19, device=device, requires_grad=grad)
    rowscale = torch.rand(6).to(device, dtype)
    colscale = torch.rand(19, device=device, requires_grad=grad)
    p = 0.25 if dropout else 0.0
    rng = torch.tensor([99, 3], dtype=torch.int64) if dropout else None
    return (x0, residual, gamma, beta, rowscale, colscale, p, 1e-5, rng, False, rms, dropout)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("mixed", [False, True])
def test_opcheck_norm(ops, device, dropout, rms, mixed):
    args = _ln_fwd_args(dropout=dropout, rms=rms, mixed=mixed, device=device)
    torch.library.opcheck(ops.dropout_add_ln_fwd.default, args)
    # The backward op on what the forward returned.
    with torch.no_grad():
        z, x, _, mu, rsigma, rng = ops.dropout_add_ln_fwd(*args)
    x0, _, gamma, _, rowscale, colscale = args[:6]
    dz = torch.randn_like(z)
    dx = torch.randn_like(x)
    torch.library.opcheck(ops.dropout_add_ln_bwd.default,
                          (dz, dx, x, x0.detach(), mu, rsigma, gamma.detach(), rowscale,
                           colscale.detach(), args[6], rng if dropout else None, True, not rms,
                           rms))


@pytest.mark.parametrize("device", device_params())
def test_opcheck_norm_without_stored_x(ops, device):
    """No residual, dropout or scales: x is returned empty and x0 stands for it."""
    x0 = torch.randn(4, 9, device=device, requires_grad=True)
    gamma = torch.randn(9, device=device, requires_grad=True)
    torch.library.opcheck(ops.dropout_add_ln_fwd.default,
                          (x0, None, gamma, None, None, None, 0.0, 1e-6, None, False, True, False))


def _ce_args(*, smoothing, dtype, grad=True, device="cpu"):
    logits = torch.randn(5, 3000).to(device, dtype).requires_grad_(grad)
    labels = torch.tensor([3, -100, 2999, 0, 17], device=device)
    return (logits, labels, None, smoothing, 0.9, 1e-3, -100, 3000, 0, False, False)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_cross_entropy(ops, device, smoothing, dtype):
    args = _ce_args(smoothing=smoothing, dtype=dtype, device=device)
    torch.library.opcheck(ops.cross_entropy_fwd.default, args)
    with torch.no_grad():
        _, _, lse = ops.cross_entropy_fwd(*args)
    logits, labels = args[0].detach(), args[1]
    dlosses = torch.rand(5, device=device)
    scalars = (smoothing, 0.9, 1e-3, -100, 3000, 0)
    torch.library.opcheck(ops.cross_entropy_bwd.default, (dlosses, logits, lse, labels, *scalars))
    torch.library.opcheck(ops.cross_entropy_bwd_inplace.default,
                          (dlosses, logits.clone(), lse, labels, *scalars))
    # The in-place op writes exactly what the out-of-place one returns.
    into = logits.clone()
    ops.cross_entropy_bwd_inplace(dlosses, into, lse, labels, *scalars)
    assert torch.equal(into, ops.cross_entropy_bwd(dlosses, logits, lse, labels, *scalars))


def _compile(fn):
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def _same(compiled, fn, counter, args, inputs, seed=0):
    torch.manual_seed(seed)  # dropout draws its seed inside the graph: the same one both times
    out_c = compiled(*args)
    torch.manual_seed(seed)
    out_e = fn(*args)
    assert counter.frame_count == 1, "one graph, no break"
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    grads_c = torch.autograd.grad(out_c, args[:inputs])
    grads_e = torch.autograd.grad(out_e, args[:inputs])
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)


@pytest.mark.parametrize("device", device_params())
def test_compile_dropout_add_layer_norm_fullgraph(flash, device):
    x0 = torch.randn(2, 5, 33, device=device, requires_grad=True)
    res = torch.randn(2, 5, 33, device=device, requires_grad=True)
    w = torch.randn(33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)

    def fn(x0, res, w, b):
        z, x = flash.ops.layer_norm.dropout_add_layer_norm(x0, res, w, b, 0.2, 1e-5,
                                                           prenorm=True)
        return (z.square().sum() + x.sum()).float()

    compiled, counter = _compile(fn)
    _same(compiled, fn, counter, (x0, res, w, b), 4)


@pytest.mark.parametrize("device", device_params())
def test_compile_rms_norm_fullgraph(flash, device):
    x = torch.randn(3, 7, 40, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = torch.randn(40, device=device, requires_grad=True)  # fp32 weight on bf16 activations

    def fn(x, w):
        return flash.ops.rms_norm.rms_norm(x, w, 1e-6).float().square().sum()

    compiled, counter = _compile(fn)
    _same(compiled, fn, counter, (x, w), 2)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("inplace", [False, True])
def test_compile_cross_entropy_fullgraph(flash, device, inplace):
    logits = torch.randn(6, 1000, device=device, requires_grad=True)
    labels = torch.randint(0, 1000, (6,), device=device)
    labels[2] = -100
    loss_fn = flash.losses.cross_entropy.CrossEntropyLoss(
        label_smoothing=0.1, lse_square_scale=1e-4, inplace_backward=inplace)

    def fn(logits, labels):
        return loss_fn(logits * 1.0, labels)  # a non-leaf, as the in-place backward needs

    compiled, counter = _compile(fn)
    _same(compiled, fn, counter, (logits, labels), 1)


@pytest.mark.parametrize("device", device_params())
def test_compile_fused_mlp_fullgraph(flash, device):
    """FusedMLPFunc (an autograd.Function over ATen ops) traces in one graph, at the checkpoint
    levels with and without the fused epilogue, and gives the eager values and gradients."""
    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    w1 = torch.randn(40, 24, device=device, requires_grad=True)
    b1 = torch.randn(40, device=device, requires_grad=True)
    w2 = torch.randn(17, 40, device=device, requires_grad=True)
    fd = flash.ops.fused_dense

    def fn(x, w1, b1, w2):
        a = fd.fused_mlp_func(x, w1, w2, b1, checkpoint_lvl=1)
        b = fd.fused_mlp_func(x, w1, w2, b1, activation="relu", checkpoint_lvl=2)
        return a.square().sum() + b.sum()

    compiled, counter = _compile(fn)
    _same(compiled, fn, counter, (x, w1, b1, w2), 4)
