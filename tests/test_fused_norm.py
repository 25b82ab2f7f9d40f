"""dropout + residual + LayerNorm/RMSNorm (flash_attn.ops.layer_norm / rms_norm) against plain
PyTorch in fp64 by the 2x/3x rule (docs/testing.md), forward and backward, over odd hidden sizes
(1, 17, 4095, 8193), every dtype, mixed weight/residual dtypes, and the options of 2.8
(prenorm, rowscale, layerscale, residual_in_fp32, bias); the dropout mask bit for bit against the
independent Python Philox (tests/philox_ref.py); the modules; bad inputs. On CUDA (fp16/bf16/fp32:
fp64 is CPU only there) the same checks run against the same CPU fp64 reference, and the CUDA
dropout mask equals the CPU one for the same seed."""
import pytest
import torch

import grid
from conftest import cuda_available, device_params
from fused_reference import norm_ref
from helpers import randn
from philox_ref import keep_mask_for

pytestmark = pytest.mark.usefixtures("fused_cuda")  # CUDA cases run the CUDA kernels

HIDDEN = [1, 17, 4095, 8193]

AXES = {
    "dtype": grid.DTYPES_CPU,
    "hidden": HIDDEN,
    "norm": ["ln", "rms"],
    "residual": ["none", "same", "fp32"],
    "weight": ["same", "fp32"],
    "dropout": [0.0, 0.27],
    "rowscale": [False, True],
    "layerscale": [False, True],
    "prenorm": [False, True],
    "fp32res": [False, True],
    "bias": [False, True],
}


DTYPES_CUDA = [torch.float16, torch.bfloat16, torch.float32]
CUDA_MARKS = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")]


def _cases():
    params = []
    for case in grid.pairwise(AXES):
        fast = case["hidden"] <= 17
        params.append(pytest.param("cpu", case, id="cpu-" + grid.case_id(case),
                                   marks=[pytest.mark.fast] if fast else []))
    for case in grid.pairwise(dict(AXES, dtype=DTYPES_CUDA)):
        params.append(pytest.param("cuda", case, id="cuda-" + grid.case_id(case),
                                   marks=CUDA_MARKS))
    return params


def _on(ts, device):
    """The same values on `device` as fresh leaves (requires_grad as the originals)."""
    return [None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)
            for t in ts]


def _rows(hidden):
    return 5 if hidden <= 17 else 3


def _inputs(case, device="cpu"):
    dtype, hidden = case["dtype"], case["hidden"]
    rows = _rows(hidden)
    wdtype = dtype if case["weight"] == "same" else torch.float32
    x0 = randn(2, rows, hidden, dtype=dtype, device=device, requires_grad=True)
    residual = None
    if case["residual"] != "none":
        rdtype = dtype if case["residual"] == "same" else torch.float32
        residual = randn(2, rows, hidden, dtype=rdtype, device=device, requires_grad=True)
    weight = (1 + 0.3 * torch.randn(hidden, device=device)).to(wdtype).requires_grad_()
    bias = None
    if case["bias"]:
        bias = (0.2 * torch.randn(hidden, device=device)).to(wdtype).requires_grad_()
    rowscale = None
    if case["rowscale"]:
        rowscale = (torch.rand(2, rows, device=device) + 0.5).to(dtype)
        rowscale[0, 0] = 0  # a dropped row (stochastic depth)
    layerscale = None
    if case["layerscale"]:
        layerscale = (0.5 + torch.rand(hidden, device=device)).to(wdtype).requires_grad_()
    return x0, residual, weight, bias, rowscale, layerscale


def _leaves(*ts):
    return [t for t in ts if t is not None and t.requires_grad]


def _ref_inputs(ts, upcast):
    # Fresh leaves for the oracles (the same values; fp64 copies for the reference).
    out = []
    for t in ts:
        if t is None:
            out.append(None)
            continue
        c = t.detach().double() if upcast else t.detach().clone()
        out.append(c.requires_grad_(t.requires_grad))
    return out


@pytest.mark.parametrize("device,case", _cases())
def test_norm_matches_fp64_reference(flash, tol, device, case):
    cpu_inputs = _inputs(case)  # the reference's inputs (CPU); the op's are the same values
    x0, residual, weight, bias, rowscale, layerscale = (
        cpu_inputs if device == "cpu" else _on(cpu_inputs, device))
    dtype, p = case["dtype"], case["dropout"]
    is_rms = case["norm"] == "rms"
    fn = (flash.ops.rms_norm.dropout_add_rms_norm if is_rms
          else flash.ops.layer_norm.dropout_add_layer_norm)
    eps = 1e-5
    outs = fn(x0, residual, weight, bias, p, eps, rowscale=rowscale, layerscale=layerscale,
              prenorm=case["prenorm"], residual_in_fp32=case["fp32res"], return_dropout_mask=True)
    if case["prenorm"]:
        z, x, mask = outs
    else:
        (z, mask), x = outs, None
    assert z.dtype == dtype and z.shape == x0.shape and mask.dtype == torch.uint8
    keep = mask.bool().reshape(-1, x0.shape[-1]).cpu() if p > 0 else None
    if p == 0:
        assert bool(mask.all())

    grads_in = _leaves(x0, residual, weight, bias, layerscale)
    gz = torch.randn(z.shape, dtype=torch.float32).to(dtype)
    loss = (z.float() * gz.float().to(device)).sum()
    gx = None
    if x is not None:
        gx = torch.randn(x.shape).to(x.dtype)
        # The gradient handed to the op is gx either way; CUDA has no fp64 kernels to need it.
        acc = torch.float64 if device == "cpu" else torch.float32
        loss = loss + (x.to(acc) * gx.to(device, acc)).sum()
    grads = [g.cpu() for g in torch.autograd.grad(loss, grads_in)]
    z = z.cpu()
    x = None if x is None else x.cpu()

    results = {}
    for mode in ("ref", "pt"):
        upcast = mode == "ref"
        r_x0, r_res, r_w, r_b, r_rs, r_ls = _ref_inputs(cpu_inputs, upcast)
        hid = x0.shape[-1]
        rz, rx = norm_ref(r_x0.reshape(-1, hid), None if r_res is None else r_res.reshape(-1, hid),
                          r_w, r_b, eps=eps, keep=keep, dropout_p=p,
                          rowscale=None if r_rs is None else r_rs.reshape(-1),
                          colscale=r_ls, residual_in_fp32=case["fp32res"], is_rms_norm=is_rms,
                          upcast=upcast)
        r_loss = (rz.double() * gz.double().reshape(rz.shape)).sum()
        if gx is not None:
            r_loss = r_loss + (rx.double() * gx.double().reshape(rx.shape)).sum()
        leaves = _leaves(r_x0, r_res, r_w, r_b, r_ls)
        results[mode] = (rz, rx, torch.autograd.grad(r_loss, leaves))

    ctx = f"[{device}-{grid.case_id(case)}]"
    (ref_z, ref_x, ref_g), (pt_z, pt_x, pt_g) = results["ref"], results["pt"]
    tol.check("z", z.reshape(ref_z.shape), ref_z, pt_z, dtype, context=ctx)
    if x is not None:
        tol.check("x", x.reshape(ref_x.shape), ref_x, pt_x, dtype, context=ctx)
    names = ["dx0", "dresidual", "dweight", "dbias", "dlayerscale"]
    present = [n for n, t in zip(names, (x0, residual, weight, bias, layerscale))
               if t is not None and t.requires_grad]
    for name, g, rg, pg in zip(present, grads, ref_g, pt_g):
        assert g.dtype == {"dx0": x0, "dresidual": residual}.get(name, weight).dtype, name
        tol.check(name, g, rg, pg, dtype, factor=3.0, context=ctx)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("rows,hidden", [(7, 1), (3, 17), (2, 4095), (1, 8193), (5, 64)])
def test_dropout_mask_is_the_philox_stream(ops, device, rows, hidden):
    """Element (r, c) is kept iff the attention stream's draw for (batch 0, head 0, row r,
    col c) with subsequence = offset is kept (kernel_src/common/philox.h)."""
    p = 0.37
    seed, offset = -0x6DCB_A987_6543_2110, 77  # a negative int64 seed: read as uint64
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    x0 = torch.randn(rows, hidden)
    gamma = torch.ones(hidden)
    z, x, dmask, mu, rsigma, rng_out = ops.dropout_add_ln_fwd(
        x0.to(device), None, gamma.to(device), None, None, None, p, 1e-5, rng, False, False, True)
    want = keep_mask_for(seed, offset, 0, 1, 1, rows, hidden, p)[0]
    assert torch.equal(dmask.cpu().bool(), torch.from_numpy(want))
    assert torch.equal(rng_out, rng)
    # x is the masked, scaled x0, exactly as the mask says (CUDA scales in fp32: one rounding
    # more than the CPU's fp64).
    want_x = torch.where(dmask.cpu().bool(), (x0.double() / (1 - p)).float(),
                         torch.zeros_like(x0))
    if device == "cpu":
        assert torch.equal(x, want_x)
    else:
        torch.testing.assert_close(x.cpu(), want_x, rtol=2.5e-7, atol=0)
        assert torch.equal(x.cpu() == 0, want_x == 0)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("hidden", [1, 17, 64, 4095, 8193])
def test_cuda_dropout_mask_equals_cpu(flash, ops, hidden):
    """The same seed gives the same mask on both backends: through the op with one rng_state,
    and through the public function after torch.manual_seed (the seed is drawn on the CPU), with
    mixed dtypes and a strided x0."""
    rng = torch.tensor([1234567, 89], dtype=torch.int64)
    wide = torch.randn(6, hidden + 3).to(torch.bfloat16)
    res = torch.randn(6, hidden)
    gamma = torch.randn(hidden)
    masks = {}
    for device in ("cpu", "cuda"):
        x0 = wide.to(device)[:, 1:hidden + 1]  # a row stride larger than the row
        out = ops.dropout_add_ln_fwd(x0, res.to(device), gamma.to(device), None, None, None, 0.3,
                                     1e-5, rng, False, True, True)
        masks[device] = out[2].cpu()
    assert masks["cpu"].shape == (6, hidden)
    assert torch.equal(masks["cpu"], masks["cuda"])
    ln = flash.ops.layer_norm.dropout_add_layer_norm
    public = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(7)
        _, m = ln(res.to(device), None, gamma.to(device), None, 0.5, 1e-5,
                  return_dropout_mask=True)
        public[device] = m.cpu()
    assert torch.equal(public["cpu"], public["cuda"])


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_same_seed_same_mask_and_backward_uses_it(flash, device):
    ln = flash.ops.layer_norm
    x0 = torch.randn(4, 33, device=device, requires_grad=True)
    w = torch.ones(33, device=device, requires_grad=True)
    b = torch.zeros(33, device=device)
    torch.manual_seed(5)
    z1, m1 = ln.dropout_add_layer_norm(x0, None, w, b, 0.5, 1e-5, return_dropout_mask=True)
    torch.manual_seed(5)
    z2, m2 = ln.dropout_add_layer_norm(x0, None, w, b, 0.5, 1e-5, return_dropout_mask=True)
    assert torch.equal(m1, m2) and torch.equal(z1, z2)
    (g,) = torch.autograd.grad((z1 * torch.randn_like(z1)).sum(), x0)
    assert bool((g[m1 == 0] == 0).all()), "dropped elements get no gradient"
    assert bool((g[m1 == 1] != 0).any())


@pytest.mark.fast
def test_modules_and_layer_norm_functions(flash, tol):
    ln, rms = flash.ops.layer_norm, flash.ops.rms_norm
    x = torch.randn(2, 5, 24)
    m = ln.DropoutAddLayerNorm(24, prenorm=True, p=0.1)
    m.eval()
    res = torch.randn(2, 5, 24)
    z, xs = m(x, res)
    torch.testing.assert_close(xs, x + res)
    torch.testing.assert_close(z, torch.nn.functional.layer_norm(x + res, (24,), eps=1e-5),
                               rtol=1e-5, atol=1e-5)
    r = rms.RMSNorm(24, eps=1e-6)
    torch.testing.assert_close(r(x), torch.nn.functional.rms_norm(x, (24,), eps=1e-6),
                               rtol=1e-5, atol=1e-5)
    d = rms.DropoutAddRMSNorm(24, prenorm=False, p=0.0)
    torch.testing.assert_close(d(x, res), torch.nn.functional.rms_norm(x + res, (24,), eps=1e-5),
                               rtol=1e-5, atol=1e-5)
    w, b = torch.randn(24), torch.randn(24)
    torch.testing.assert_close(ln.layer_norm(x, w, b, 1e-5),
                               torch.nn.functional.layer_norm(x, (24,), w, b, 1e-5),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rms.rms_norm(x, w, 1e-5),
                               torch.nn.functional.rms_norm(x, (24,), w, 1e-5),
                               rtol=1e-5, atol=1e-5)
    # prenorm without residual or dropout returns x0 itself as x, as 2.8 does.
    z, xs = ln.dropout_add_layer_norm(x, None, w, b, 0.0, 1e-5, prenorm=True)
    assert torch.equal(xs, x)
    with pytest.raises(NotImplementedError, match="flash_attn: .*not implemented"):
        ln.dropout_add_layer_norm_subset(x, None, w, b, 0.0, 1e-5)


@pytest.mark.fast
def test_fp64_gradcheck(flash):
    ln = flash.ops.layer_norm
    x0 = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    res = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ls = torch.rand(7, dtype=torch.float64, requires_grad=True)
    rs = torch.rand(3, dtype=torch.float64)

    def fn(x0, res, w, b, ls):
        torch.manual_seed(11)  # the same mask on every evaluation
        return ln.dropout_add_layer_norm(x0, res, w, b, 0.2, 1e-5, rowscale=rs, layerscale=ls,
                                         prenorm=True)

    assert torch.autograd.gradcheck(fn, (x0, res, w, b, ls))


# ---- bad input -----------------------------------------------------------------------------------


def _raises(match, fn):
    with pytest.raises(RuntimeError, match=match):
        fn()


@pytest.mark.fast
def test_bad_norm_inputs(flash):
    ln = flash.ops.layer_norm.dropout_add_layer_norm
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    _raises(r"flash_attn: x0 must have the hidden size 8 of weight", lambda: ln(
        torch.randn(4, 9), None, w, b, 0.0, 1e-5))
    _raises(r"flash_attn: x0 has dtype torch.int64", lambda: ln(
        torch.ones(4, 8, dtype=torch.int64), None, w, b, 0.0, 1e-5))
    _raises(r"flash_attn: bias has dtype torch.float64 but must have torch.float32", lambda: ln(
        x, None, w, b.double(), 0.0, 1e-5))
    _raises(r"flash_attn: residual must have the hidden size", lambda: ln(
        x, torch.randn(4, 7), w, b, 0.0, 1e-5))
    _raises(r"flash_attn: residual must have shape \(4, 8\)", lambda: ln(
        x, torch.randn(5, 8), w, b, 0.0, 1e-5))
    _raises(r"flash_attn: dropout_p must be in \[0, 1\)", lambda: ln(x, None, w, b, 1.0, 1e-5))
    _raises(r"flash_attn: epsilon must be >= 0", lambda: ln(x, None, w, b, 0.0, -1.0))
    _raises(r"flash_attn: rowscale must have shape \(4,\)", lambda: ln(
        x, None, w, b, 0.0, 1e-5, rowscale=torch.ones(3)))
    _raises(r"flash_attn: layerscale must have shape \(8,\)", lambda: ln(
        x, None, w, b, 0.0, 1e-5, layerscale=torch.ones(9)))
    _raises(r"flash_attn: weight must have shape \(hidden_size,\)", lambda: ln(
        x, None, w[None], b, 0.0, 1e-5))
    _raises(r"flash_attn: x0 is on meta but only CPU|flash_attn: weight is on cpu but x0 is on meta",
            lambda: ln(x.to("meta"), None, w, b, 0.0, 1e-5))


@pytest.mark.fast
def test_bad_norm_op_inputs_in_cpp(ops):
    """The binding repeats the checks (the op is callable directly)."""
    x, w = torch.randn(4, 8), torch.randn(8)
    _raises(r"flash_attn: x0 must have 2 dimensions", lambda: ops.dropout_add_ln_fwd(
        x[None], None, w, None, None, None, 0.0, 1e-5, None, False, False, False))
    _raises(r"flash_attn: rng_state is required", lambda: ops.dropout_add_ln_fwd(
        x, None, w, None, None, None, 0.5, 1e-5, None, False, False, False))
    _raises(r"flash_attn: weight must have shape \(8,\)", lambda: ops.dropout_add_ln_fwd(
        x, None, torch.randn(7), None, None, None, 0.0, 1e-5, None, False, False, False))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_norm_on_cuda_dtype_limits(flash, ops):
    """On CUDA fp64 is rejected, and the residual / weights have x0's dtype or fp32
    (docs/fused_ops.md), in the Python layer and in the binding."""
    x, w = torch.randn(4, 8, device="cuda"), torch.randn(8, device="cuda")
    ln = flash.ops.layer_norm.dropout_add_layer_norm
    _raises(r"flash_attn: x0 has dtype torch.float64, which the fused ops support on CPU",
            lambda: ln(x.double(), None, w.double(), None, 0.0, 1e-5))
    _raises(r"flash_attn: x0 has dtype torch.float64, which the fused ops support on CPU",
            lambda: ops.dropout_add_ln_fwd(x.double(), None, w.double(), None, None, None, 0.0,
                                           1e-5, None, False, False, False))
    xh = x.half()
    _raises(r"flash_attn: weight has dtype torch.bfloat16 but on CUDA it must have x0's dtype",
            lambda: ln(xh, None, w.bfloat16(), None, 0.0, 1e-5))
    _raises(r"flash_attn: residual has dtype torch.bfloat16 but on CUDA",
            lambda: ops.dropout_add_ln_fwd(xh, x.bfloat16(), w, None, None, None, 0.0, 1e-5,
                                           None, False, False, False))
    # The supported mixes run: fp16 x0 with an fp32 residual stream and fp32 weights.
    z, xs = ln(xh, x, w, None, 0.0, 1e-5, prenorm=True)
    assert z.dtype == torch.float16 and xs.dtype == torch.float32


@pytest.mark.fast
@pytest.mark.parametrize("used", ["z", "x"])
def test_prenorm_with_one_output_used(flash, used):
    """Autograd hands the backward None for the unused output (no materialised zeros)."""
    x0 = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    res = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64, requires_grad=True)
    z, x = flash.ops.layer_norm.dropout_add_layer_norm(x0, res, w, None, 0.0, 1e-5,
                                                       prenorm=True)
    out = z if used == "z" else x
    g = torch.autograd.grad(out.square().sum(), (x0, res, w), allow_unused=True)
    x0r, resr, wr = (t.detach().clone().requires_grad_() for t in (x0, res, w))
    xr = x0r + resr
    zr = torch.nn.functional.layer_norm(xr, (10,), wr, None, 1e-5)
    outr = zr if used == "z" else xr
    gr = torch.autograd.grad(outr.square().sum(), (x0r, resr, wr), allow_unused=True)
    for a, b in zip(g, gr):
        if b is None:
            assert a is None or bool((a == 0).all())
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_no_rows(flash, device):
    x0 = torch.randn(0, 5, 8, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    ls = torch.rand(8, device=device, requires_grad=True)
    z = flash.ops.layer_norm.dropout_add_layer_norm(x0, torch.randn(0, 5, 8, device=device), w,
                                                    None, 0.1, 1e-5, layerscale=ls)
    z.sum().backward()
    assert z.shape == x0.shape and x0.grad.shape == x0.shape
    assert bool((w.grad == 0).all()) and bool((ls.grad == 0).all())


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("hidden", [33, 64])
def test_strided_rows_equal_contiguous(flash, device, hidden):
    """x0 and residual with a row stride larger than the row (slices of wider tensors) give
    bitwise the contiguous result, forward and backward (on CUDA: scalar loads for the strided
    rows, 16-byte loads for the contiguous ones at hidden 64)."""
    ln = flash.ops.layer_norm.dropout_add_layer_norm
    wide_x = torch.randn(2, 6, hidden + 7, device=device)
    wide_r = torch.randn(2, 6, hidden + 8, device=device)
    w, b = torch.randn(hidden, device=device), torch.randn(hidden, device=device)
    outs = []
    for x0, res in ((wide_x[..., 3:3 + hidden], wide_r[..., :hidden]),
                    (wide_x[..., 3:3 + hidden].contiguous(), wide_r[..., :hidden].contiguous())):
        x0 = x0.detach().requires_grad_()
        torch.manual_seed(1)
        z, x = ln(x0, res, w, b, 0.2, 1e-5, prenorm=True)
        (g,) = torch.autograd.grad((z * z).sum() + x.sum(), x0)
        outs.append((z, x, g))
    for a, b_ in zip(*outs):
        assert torch.equal(a, b_)


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_public_functions_refuse_cuda_until_enabled(flash, monkeypatch):
    """The release refuses CUDA tensors in the public fused functions until their kernels pass
    the GPU tests (flash_attn._fused_checks.CUDA_ENABLED); the message says what to do."""
    monkeypatch.setattr(flash._fused_checks, "CUDA_ENABLED", False)
    x = torch.randn(4, 64, device="cuda")
    w = torch.ones(64, device="cuda")
    with pytest.raises(RuntimeError, match="not enabled in this release.*use CPU tensors"):
        flash.ops.rms_norm.rms_norm(x, w, 1e-6)
    with pytest.raises(RuntimeError, match="not enabled in this release"):
        flash.losses.cross_entropy.CrossEntropyLoss()(x, torch.zeros(4, dtype=torch.long,
                                                                     device="cuda"))
