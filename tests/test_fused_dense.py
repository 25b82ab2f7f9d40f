"""flash_attn.ops.fused_dense (FusedDense, FusedMLP and their functions): 2.8's constructors,
forwards and return values; FusedMLPFunc (the autograd.Function over ATen's matmuls and
torch._addmm_activation, docs/fused_ops.md) on every activation, checkpoint level and dtype
against fp64 by the 2x/3x rule, on the CPU and (when present) on CUDA; what each checkpoint level
saves; where the fused epilogue runs. Tensor parallelism: tests/test_fused_dense_tp.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import grid
from conftest import device_params

pytestmark = pytest.mark.fast


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


ACTS = {"gelu_approx": _gelu_tanh, "relu": torch.relu, "sqrelu": lambda x: torch.relu(x) ** 2}
# pt, the same math in the working dtype, is F.linear + PyTorch's own activation (its tanh GELU
# is one kernel: in fp32 it can be 2 ulps off where the formula above rounds luckier, and the
# error of a weight gradient is a sum of such errors).
PT_ACTS = dict(ACTS, gelu_approx=lambda x: F.gelu(x, approximate="tanh"))
# (in, hidden, out): odd sizes, a single feature, no bias on either linear.
SHAPES = [(24, 40, 17, True), (1, 3, 1, True), (33, 65, 7, False)]


def _dtypes(device):
    return grid.DTYPES_CPU if device == "cpu" else [torch.float16, torch.bfloat16, torch.float32]


def _oracle(params, activation, dout, upcast):
    """The MLP in plain PyTorch: fp64 on the CPU (ref) or the inputs' dtype and device (pt)."""
    leaves = [None if p is None else (p.detach().cpu().double() if upcast else p.detach().clone())
              for p in params]
    for p in leaves:
        if p is not None:
            p.requires_grad_()
    x, w1, b1, w2, b2 = leaves
    h = (ACTS if upcast else PT_ACTS)[activation](F.linear(x, w1, b1))
    out = F.linear(h, w2, b2)
    used = [p for p in leaves if p is not None]
    grads = torch.autograd.grad(out, used, dout.to(out.device, out.dtype))
    return out, grads


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("checkpoint_lvl", [0, 1, 2])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("shape", SHAPES,
                         ids=lambda s: "x".join(map(str, s[:3])) + ("" if s[3] else "-nobias"))
def test_fused_mlp_matches_fp64(flash, tol, device, checkpoint_lvl, activation, shape):
    fd = flash.ops.fused_dense
    d_in, d_hidden, d_out, bias = shape
    for dtype in _dtypes(device):
        mlp = fd.FusedMLP(d_in, hidden_features=d_hidden, out_features=d_out, bias1=bias,
                          bias2=bias, activation=activation, return_residual=True,
                          checkpoint_lvl=checkpoint_lvl, device=device, dtype=dtype)
        x = torch.randn(2, 5, d_in, device=device).to(dtype).requires_grad_()
        out, residual = mlp(x)
        assert residual is x and out.shape == (2, 5, d_out) and out.dtype == dtype
        dout = torch.randn_like(out)
        params = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
        used = [p for p in params if p is not None]
        grads = torch.autograd.grad(out, used, dout)
        ref, pt = _oracle(params, activation, dout, True), _oracle(params, activation, dout, False)
        ctx = f"({dtype}, {device})"
        tol.check("out", out, ref[0], pt[0], dtype, context=ctx)
        names = ["dx", "dw1", "db1", "dw2", "db2"]
        names = [n for n, p in zip(names, params) if p is not None]
        for name, g, rg, pg in zip(names, grads, ref[1], pt[1]):
            tol.check(name, g, rg, pg, dtype, factor=3.0, context=ctx)
        with torch.no_grad():  # no backward: the fused epilogue (CUDA), nothing saved
            mlp.eval()
            tol.check("out (eval)", mlp(x)[0], ref[0], pt[0], dtype, context=ctx)


def _saved_numel(fn):
    """Elements of the tensors autograd saves while fn() runs, beyond the parameters and x."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("activation,per_level", [("gelu_approx", (2, 1, 0)),
                                                  ("relu", (1, 1, 0)),
                                                  ("sqrelu", (2, 1, 0))])
def test_checkpoint_levels_save_less_and_agree(flash, activation, per_level):
    """Level 0 saves the pre-activation (sqrelu: relu(pre); relu: nothing, its output is the
    mask) and the activation output, 1 drops what it can recompute, 2 recomputes the first
    linear; on the CPU the gradients are bitwise those of level 0."""
    fd = flash.ops.fused_dense
    tokens, d_in, d_hidden = 6, 8, 20
    x = torch.randn(tokens, d_in, requires_grad=True)
    w1, b1 = torch.randn(d_hidden, d_in, requires_grad=True), torch.randn(d_hidden)
    w2 = torch.randn(5, d_hidden, requires_grad=True)
    first = None
    for lvl, n_hidden_sized in enumerate(per_level):
        out, sizes = _saved_numel(lambda lvl=lvl: fd.fused_mlp_func(
            x, w1, w2, b1, activation=activation, checkpoint_lvl=lvl))
        assert sizes.count(tokens * d_hidden) == n_hidden_sized, (lvl, sizes)
        grads = torch.autograd.grad(out.square().sum(), [x, w1, w2])
        if first is None:
            first = grads
        for g, g0 in zip(grads, first):
            assert torch.equal(g, g0), f"checkpoint_lvl {lvl} changed a gradient"
    # save_pre_act=False (2.8: eval mode) is level 2.
    _, sizes = _saved_numel(lambda: fd.fused_mlp_func(x, w1, w2, b1, activation=activation,
                                                      save_pre_act=False))
    assert sizes.count(tokens * d_hidden) == 0


def _count_addmm_activation(monkeypatch):
    calls = []
    real = torch._addmm_activation

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_gelu", args[5] if len(args) > 5 else False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_addmm_activation", counted)
    return calls


@pytest.mark.parametrize("device", device_params())
def test_where_the_fused_epilogue_runs(flash, monkeypatch, device):
    """relu and sqrelu: always torch._addmm_activation (bias + ReLU epilogue). gelu_approx: on
    CUDA in fp16/bf16 when no pre-activation is kept (no backward, level 2) and heuristic != -1;
    never in fp32, never on the CPU, where that op's GELU is the erf GELU."""
    fd = flash.ops.fused_dense
    calls = _count_addmm_activation(monkeypatch)
    x = torch.randn(4, 8, device=device)
    w1, w2 = torch.randn(16, 8, device=device), torch.randn(3, 16, device=device)
    fd.fused_mlp_func(x, w1, w2, activation="relu")
    fd.fused_mlp_func(x, w1, w2, activation="sqrelu")
    assert calls == [False, False]
    calls.clear()
    with torch.no_grad():  # fp32: never the GELU epilogue (less exact than fp32 rounding)
        fd.fused_mlp_func(x, w1, w2)
    assert calls == []
    x, w1, w2 = x.bfloat16(), w1.bfloat16().requires_grad_(), w2.bfloat16()
    for lvl in (0, 1, 2):
        fd.fused_mlp_func(x, w1, w2, checkpoint_lvl=lvl)
    fd.fused_mlp_func(x, w1, w2, checkpoint_lvl=2, heuristic=-1)
    with torch.no_grad():
        fd.fused_mlp_func(x, w1, w2)
    assert calls == ([True, True] if device == "cuda" else [])


@pytest.mark.parametrize("device", device_params())
def test_addmm_activation_gelu_flavour(device):
    """The premise of the dispatch above, so that a change in PyTorch shows here: ATen's
    _addmm_activation(use_gelu=True) is the tanh GELU on CUDA and the erf GELU on the CPU."""
    a, b = torch.randn(64, 32, device=device), torch.randn(32, 48, device=device)
    bias = torch.randn(48, device=device)
    got = torch._addmm_activation(bias, a, b, use_gelu=True).double()
    pre = torch.addmm(bias.double(), a.double(), b.double())
    err = {k: (got - F.gelu(pre, approximate=k)).abs().max().item() for k in ("tanh", "none")}
    want, other = ("tanh", "none") if device == "cuda" else ("none", "tanh")
    assert err[want] < 1e-4 < err[other], err


def test_fused_dense_and_functions(flash):
    fd = flash.ops.fused_dense
    layer = fd.FusedDense(8, 5, return_residual=True)
    x = torch.randn(3, 8)
    out, res = layer(x)
    assert res is x
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))
    assert isinstance(layer, torch.nn.Linear)
    out = fd.fused_dense_func(x, layer.weight)
    torch.testing.assert_close(out, x @ layer.weight.T)
    w1, w2 = torch.randn(16, 8), torch.randn(4, 16)
    out = fd.fused_mlp_func(x, w1, w2, activation="relu")
    torch.testing.assert_close(out, torch.relu(x @ w1.T) @ w2.T)
    one = fd.fused_mlp_func(x[0], w1, w2, activation="relu")  # a single unbatched row
    assert one.shape == (4,)
    torch.testing.assert_close(one, out[0])
    # 2.8's defaults: hidden 4 * in, out = in, gelu_approx; sqrelu never fuses its GEMM.
    mlp = fd.FusedMLP(6)
    assert mlp.fc1.out_features == 24 and mlp.fc2.out_features == 6
    assert mlp.activation == "gelu_approx" and mlp.checkpoint_lvl == 0
    assert mlp.heuristic == "auto" and fd.FusedMLP(6, activation="sqrelu").heuristic == -1


def test_autocast_casts_like_2_8(flash):
    """Under torch.autocast x and the weights run in the autocast dtype; the fp32 parameters get
    fp32 gradients, the same values as with the casts written out."""
    fd = flash.ops.fused_dense
    mlp = fd.FusedMLP(16, 24)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert mlp.fc1.weight.grad.dtype == torch.float32
    params = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    w1, b1, w2, b2 = (p.detach().requires_grad_() for p in params)
    want = fd.fused_mlp_func(x.bfloat16(), w1.bfloat16(), w2.bfloat16(), b1.bfloat16(),
                             b2.bfloat16())
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    want.float().square().sum().backward()
    for p, q in zip(params, (w1, b1, w2, b2)):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_fused_dense_bad_arguments(flash):
    fd = flash.ops.fused_dense
    with pytest.raises(ValueError, match="flash_attn: activation"):
        fd.FusedMLP(4, activation="swish")
    with pytest.raises(ValueError, match="flash_attn: checkpoint_lvl"):
        fd.FusedMLP(4, checkpoint_lvl=3)
    with pytest.raises(ValueError, match="flash_attn: checkpoint_lvl"):
        fd.fused_mlp_func(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4, 3),
                          checkpoint_lvl=-1)
    with pytest.raises(ValueError, match="flash_attn: heuristic"):
        fd.fused_mlp_func(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4, 3), heuristic=5)
    with pytest.raises(ValueError, match="flash_attn: heuristic"):
        fd.FusedMLP(4, heuristic="fast")(torch.randn(2, 4))
    with pytest.raises(TypeError, match="flash_attn: fused_mlp_func: weight1 has dtype"):
        fd.fused_mlp_func(torch.randn(2, 4).bfloat16(), torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(TypeError, match="flash_attn: fused_dense_func: bias has dtype"):
        fd.fused_dense_func(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3).double())
    with pytest.raises(ValueError, match="flash_attn: ParallelFusedMLP needs a process_group"):
        fd.ParallelFusedMLP(4)


@pytest.mark.parametrize("checkpoint_lvl", [0, 1, 2])
def test_gradients_of_a_subset_of_inputs(flash, checkpoint_lvl):
    """Only x, or only the weights, requiring grad: the same gradients as with all of them
    (the backward skips the matmuls and the gather nobody needs)."""
    fd = flash.ops.fused_dense
    x, w1, b1 = torch.randn(3, 4, 8), torch.randn(16, 8), torch.randn(16)
    w2, b2 = torch.randn(5, 16), torch.randn(5)
    dout = torch.randn(3, 4, 5)

    def grads(flags):
        leaves = [t.clone().requires_grad_(f) for t, f in zip((x, w1, b1, w2, b2), flags)]
        out = fd.fused_mlp_func(leaves[0], leaves[1], leaves[3], leaves[2], leaves[4],
                                checkpoint_lvl=checkpoint_lvl)
        out.backward(dout)
        return [t.grad for t in leaves]

    full = grads([True] * 5)
    for flags in ([True, False, False, False, False], [False, True, True, True, True],
                  [False, False, False, True, False]):
        for g, g_full, f in zip(grads(flags), full, flags):
            assert (g is None) == (not f)
            if f:
                assert torch.equal(g, g_full)
