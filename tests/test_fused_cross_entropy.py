"""The chunked cross-entropy (flash_attn.losses.cross_entropy) against plain PyTorch in fp64 by the
2x/3x rule (docs/testing.md), forward and backward: vocab sizes that are multiples of nothing
(50257, 128256) and small ones, every dtype, label smoothing, logit_scale, z-loss,
ignore_index, int32/int64 labels, strided logits, the in-place backward, precomputed_lse and the
reductions of CrossEntropyLoss; bad inputs. On CUDA (fp16/bf16/fp32: fp64 is CPU only there) the
same cases run against the same CPU fp64 reference."""
import pytest
import torch

import grid
from conftest import cuda_available, device_params
from fused_reference import cross_entropy_ref

pytestmark = pytest.mark.usefixtures("fused_cuda")  # CUDA cases run the CUDA kernels

AXES = {
    "dtype": grid.DTYPES_CPU,
    "vocab": [1, 7, 2049, 50257],
    "smoothing": [0.0, 0.1],
    "logit_scale": [1.0, 0.7],
    "zloss": [0.0, 1e-3],
    "labels": ["int64", "int32"],
    "inplace": [False, True],
    "strided": [False, True],
}


DTYPES_CUDA = [torch.float16, torch.bfloat16, torch.float32]
CUDA_MARKS = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")]


def _cases():
    params = []
    for case in grid.pairwise(AXES):
        params.append(pytest.param("cpu", case, id="cpu-" + grid.case_id(case),
                                   marks=[pytest.mark.fast] if case["vocab"] <= 2049 else []))
    for case in grid.pairwise(dict(AXES, dtype=DTYPES_CUDA)):
        params.append(pytest.param("cuda", case, id="cuda-" + grid.case_id(case),
                                   marks=CUDA_MARKS))
    # The largest vocabulary once per dtype, few rows.
    for device, dtypes in (("cpu", grid.DTYPES_CPU), ("cuda", DTYPES_CUDA)):
        for dtype in dtypes:
            case = dict(dtype=dtype, vocab=128256, smoothing=0.1, logit_scale=1.0, zloss=1e-4,
                        labels="int64", inplace=dtype == torch.bfloat16, strided=False)
            params.append(pytest.param(device, case, id=f"{device}-" + grid.case_id(case),
                                       marks=CUDA_MARKS if device == "cuda" else []))
    return params


def _logits(rows, vocab, dtype, strided):
    scale = 4.0  # spread the logits so that the softmax is far from uniform
    if strided:  # a row stride larger than the row: a slice of a wider tensor
        wide = (scale * torch.randn(rows, vocab + 5)).to(dtype)
        return wide[:, 2:2 + vocab]
    return (scale * torch.randn(rows, vocab)).to(dtype)


@pytest.mark.parametrize("device,case", _cases())
def test_cross_entropy_matches_fp64_reference(flash, tol, device, case):
    dtype, vocab = case["dtype"], case["vocab"]
    rows = 5 if vocab <= 2049 else 3
    logits = _logits(rows, vocab, dtype, case["strided"])
    labels = torch.randint(0, vocab, (rows,))
    labels[1] = -100  # ignored
    labels = labels.to(torch.int64 if case["labels"] == "int64" else torch.int32)
    kw = dict(label_smoothing=case["smoothing"], logit_scale=case["logit_scale"],
              lse_square_scale=case["zloss"])
    # A strided view stays strided on the device (the same slice of the moved wide tensor).
    on_dev = logits if device == "cpu" else (
        logits._base.to(device)[:, 2:2 + vocab] if case["strided"] else logits.to(device))
    ours_in = on_dev.detach().clone() if not case["strided"] else on_dev.detach()
    ours_in.requires_grad_()
    # The in-place backward overwrites its input: hand it a non-leaf copy, as a model does.
    fed = ours_in * 1 if case["inplace"] else ours_in
    losses, z_losses = flash.losses.cross_entropy.cross_entropy_loss(
        fed, labels.to(device), inplace_backward=case["inplace"], **kw)
    assert losses.dtype == z_losses.dtype == (torch.float64 if dtype == torch.float64
                                              else torch.float32)
    dloss = torch.rand(rows, dtype=losses.dtype)
    (losses * dloss.to(device)).sum().backward()
    if case["inplace"]:
        assert not torch.equal(fed.detach().cpu(), logits), "the logits were not overwritten"
    losses, z_losses = losses.cpu(), z_losses.cpu()

    res = {}
    for mode in ("ref", "pt"):
        leaf = (logits.detach().double() if mode == "ref" else logits.detach().clone())
        leaf.requires_grad_()
        ref_kw = dict(smoothing=case["smoothing"], logit_scale=case["logit_scale"],
                      lse_square_scale=case["zloss"])
        l, z = cross_entropy_ref(leaf, labels, upcast=mode == "ref", **ref_kw)
        (g,) = torch.autograd.grad((l * dloss.to(l.dtype)).sum(), leaf)
        res[mode] = (l, z, g)
    ctx = f"[{device}-{grid.case_id(case)}]"
    grad = ours_in.grad.cpu()
    tol.check("losses", losses, res["ref"][0], res["pt"][0], dtype, context=ctx)
    tol.check("z_losses", z_losses, res["ref"][1], res["pt"][1], dtype, context=ctx)
    assert grad.dtype == dtype
    tol.check("dlogits", grad, res["ref"][2], res["pt"][2], dtype, factor=3.0, context=ctx)
    assert bool((grad[1] == 0).all()), "an ignored row gets no gradient"
    assert losses[1] == 0 and z_losses[1] == 0


@pytest.mark.fast
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_module(flash, reduction):
    ce = flash.losses.cross_entropy.CrossEntropyLoss(
        reduction=reduction, label_smoothing=0.2, lse_square_scale=1e-2, return_z_loss=True)
    logits = torch.randn(6, 301, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 301, (6,))
    labels[[0, 4]] = -100
    loss, z_loss = ce(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits, labels, reduction="none",
                                            label_smoothing=0.2)
    lse = torch.logsumexp(logits, -1)
    z_ref = torch.where(labels != -100, 1e-2 * lse.square(), torch.zeros_like(lse))
    ref = ref + z_ref
    if reduction == "mean":
        ref, z_ref = ref.sum() / 4, z_ref.sum() / 4
    elif reduction == "sum":
        ref, z_ref = ref.sum(), z_ref.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_loss, z_ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert z_loss.grad_fn is None, "z_loss is for logging only"


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_precomputed_lse_is_used(flash, device):
    ce = flash.losses.cross_entropy.cross_entropy_loss
    logits = torch.randn(4, 50, device=device)
    labels = torch.randint(0, 50, (4,), device=device)
    lse = torch.logsumexp(logits, -1)
    losses, _ = ce(logits, labels, precomputed_lse=lse + 1.0)
    plain, _ = ce(logits, labels)
    torch.testing.assert_close(losses, plain + 1.0)
    # With label smoothing 2.8 ignores it; so do we.
    smoothed, _ = ce(logits, labels, precomputed_lse=lse + 1.0, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, ce(logits, labels, label_smoothing=0.1)[0])


@pytest.mark.fast
def test_fp64_gradcheck(flash):
    ce = flash.losses.cross_entropy.cross_entropy_loss
    labels = torch.tensor([3, -100, 0, 9])
    logits = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: ce(x, labels, label_smoothing=0.15, logit_scale=1.3, lse_square_scale=0.01)[0],
        (logits,))


# ---- bad input -----------------------------------------------------------------------------------


def _raises(match, fn):
    with pytest.raises(RuntimeError, match=match):
        fn()


@pytest.mark.fast
def test_bad_cross_entropy_inputs(flash, ops):
    ce = flash.losses.cross_entropy.cross_entropy_loss
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    _raises(r"flash_attn: labels\[2\] = 10 is neither ignore_index \(-100\) nor a class in "
            r"\[0, 10\)", lambda: ce(logits, torch.tensor([1, 2, 10, 4])))
    _raises(r"flash_attn: labels\[0\] = -1", lambda: ce(logits, torch.tensor([-1, 2, 3, 4])))
    _raises(r"flash_attn: labels must have dtype torch.int64 or torch.int32",
            lambda: ce(logits, labels.float()))
    _raises(r"flash_attn: labels must have shape \(4,\)", lambda: ce(logits, labels[:3]))
    _raises(r"flash_attn: logits must have 2 dimensions", lambda: ce(logits[None], labels))
    _raises(r"flash_attn: logits has dtype torch.int64", lambda: ce(logits.long(), labels))
    _raises(r"flash_attn: label_smoothing must be in \[0, 1\]",
            lambda: ce(logits, labels, label_smoothing=1.5))
    _raises(r"flash_attn: logit_scale must be > 0", lambda: ce(logits, labels, logit_scale=0.0))
    _raises(r"flash_attn: logits has vocab_size 0", lambda: ce(torch.randn(4, 0), labels))
    _raises(r"flash_attn: precomputed_lse must have shape \(4,\)", lambda: ops.cross_entropy_fwd(
        logits, labels, torch.zeros(3, dtype=torch.float64), 0.0, 1.0, 0.0, -100, 10, 0, False,
        False))
    _raises(r"flash_attn: without a process group total_classes", lambda: ops.cross_entropy_fwd(
        logits, labels, None, 0.0, 1.0, 0.0, -100, 20, 0, False, False))
    _raises(r"flash_attn: dlosses has dtype torch.float64 but must have torch.float32",
            lambda: ops.cross_entropy_bwd(torch.ones(4, dtype=torch.float64), logits,
                                          torch.zeros(4, dtype=torch.float64), labels, 0.0, 1.0, 0.0, -100,
                                          10, 0))
    with pytest.raises(NotImplementedError):
        flash.losses.cross_entropy.CrossEntropyLoss(reduction="batchmean")


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_cross_entropy_on_cuda(flash, ops):
    """fp64 is CPU only on CUDA; an out-of-range label is not checked on the device (no sync)
    and gets FlashAttention-2's treatment (no label term); the in-place op writes exactly what
    the out-of-place one returns."""
    logits = torch.randn(4, 10, device="cuda")
    labels = torch.tensor([1, 2, 3, 4], device="cuda")
    _raises(r"flash_attn: logits has dtype torch.float64, which the fused ops support on CPU",
            lambda: flash.losses.cross_entropy.CrossEntropyLoss()(logits.double(), labels))
    _raises(r"flash_attn: logits has dtype torch.float64, which the fused ops support on CPU",
            lambda: ops.cross_entropy_fwd(logits.double(), labels, None, 0.0, 1.0, 0.0, -100,
                                          10, 0, False, False))
    losses, _, lse = ops.cross_entropy_fwd(logits, torch.tensor([1, 2, 30, 4], device="cuda"),
                                           None, 0.0, 1.0, 0.0, -100, 10, 0, False, False)
    assert losses[2].item() == 0.0
    torch.testing.assert_close(lse.float(), torch.logsumexp(logits, -1))
    scalars = (0.1, 0.9, 1e-3, -100, 10, 0)
    dl = torch.rand(4, device="cuda")
    into = logits.clone()
    ops.cross_entropy_bwd_inplace(dl, into, lse, labels, *scalars)
    assert torch.equal(into, ops.cross_entropy_bwd(dl, logits, lse, labels, *scalars))


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_no_rows(flash, device):
    logits = torch.randn(0, 10, device=device, requires_grad=True)
    loss = flash.losses.cross_entropy.CrossEntropyLoss(reduction="sum")(
        logits, torch.zeros(0, dtype=torch.long, device=device))
    loss.backward()
    assert loss.item() == 0 and logits.grad.shape == (0, 10)
