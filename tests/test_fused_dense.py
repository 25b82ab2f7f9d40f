"""flash_attn.ops.fused_dense (FusedDense, FusedMLP and their functions): 2.8's constructors,
forwards and return values, computed with PyTorch (docs/fused_ops.md), checked against fp64 by
the 2x/3x rule; tensor parallelism raises NotImplementedError."""
import math

import pytest
import torch

import grid

pytestmark = pytest.mark.fast


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


ACTS = {"gelu_approx": _gelu_tanh, "relu": torch.relu, "sqrelu": lambda x: torch.relu(x) ** 2}


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dtype", grid.DTYPES_CPU)
def test_fused_mlp_matches_fp64(flash, tol, activation, dtype):
    fd = flash.ops.fused_dense
    mlp = fd.FusedMLP(24, hidden_features=40, out_features=17, activation=activation,
                      return_residual=True, dtype=dtype)
    x = torch.randn(2, 5, 24).to(dtype).requires_grad_()
    out, residual = mlp(x)
    assert residual is x and out.shape == (2, 5, 17) and out.dtype == dtype
    dout = torch.randn_like(out)
    params = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    grads = torch.autograd.grad(out, params, dout)

    def oracle(upcast):
        leaves = [p.detach().double() if upcast else p.detach().clone() for p in params]
        for p in leaves:
            p.requires_grad_()
        xx, w1, b1, w2, b2 = leaves
        h = ACTS[activation](xx @ w1.T + b1)
        o = h @ w2.T + b2
        return o, torch.autograd.grad(o, leaves, dout.to(o.dtype))

    ref, pt = oracle(True), oracle(False)
    tol.check("out", out, ref[0], pt[0], dtype)
    for name, g, rg, pg in zip(["dx", "dw1", "db1", "dw2", "db2"], grads, ref[1], pt[1]):
        tol.check(name, g, rg, pg, dtype, factor=3.0)


def test_fused_dense_and_functions(flash):
    fd = flash.ops.fused_dense
    layer = fd.FusedDense(8, 5, return_residual=True)
    x = torch.randn(3, 8)
    out, res = layer(x)
    assert res is x
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert isinstance(layer, torch.nn.Linear)
    out = fd.fused_dense_func(x, layer.weight)
    torch.testing.assert_close(out, x @ layer.weight.T)
    w1, w2 = torch.randn(16, 8), torch.randn(4, 16)
    out = fd.fused_mlp_func(x, w1, w2, activation="relu")
    torch.testing.assert_close(out, torch.relu(x @ w1.T) @ w2.T)
    # 2.8's defaults: hidden 4 * in, out = in, gelu_approx.
    mlp = fd.FusedMLP(6)
    assert mlp.fc1.out_features == 24 and mlp.fc2.out_features == 6
    assert mlp.activation == "gelu_approx" and mlp.checkpoint_lvl == 0


def test_fused_dense_bad_arguments(flash):
    fd = flash.ops.fused_dense
    with pytest.raises(ValueError, match="flash_attn: activation"):
        fd.FusedMLP(4, activation="swish")
    with pytest.raises(ValueError, match="flash_attn: checkpoint_lvl"):
        fd.FusedMLP(4, checkpoint_lvl=3)
    with pytest.raises(NotImplementedError, match="flash_attn: .*process_group"):
        fd.FusedDense(4, 4)(torch.randn(2, 4), process_group=object())
    with pytest.raises(NotImplementedError, match="flash_attn: ColumnParallelLinear"):
        fd.ColumnParallelLinear(4, 4, None)
