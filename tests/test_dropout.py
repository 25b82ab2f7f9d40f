"""Dropout: keep-rate statistics, the mask equals the Philox spec (kernel_src/common/philox.h)
bit for bit, forward and backward use the same mask, and the generator state makes it
reproducible. S_dmask (return_attn_probs) holds P, negated where dropped (docs/design.md)."""
import math

import numpy as np
import pytest
import torch

import grid
import philox_ref
from conftest import device_params, grid_params
from helpers import case_context, cu_seqlens, qkv, randn, random_seqlens, window_for
from reference import attention_ref, max_abs, pt_options, varlen_ref, visible_mask

DROPOUT_AXES = {"dtype": grid.DTYPES_CPU, "mask": grid.MASKS, "heads": grid.HEADS,
                "p": [0.17, 0.5, 0.9], "seqlens": [(64, 64), (113, 203), (239, 1)]}


def pytest_generate_tests(metafunc):
    if "drop_case" in metafunc.fixturenames:
        metafunc.parametrize(("device", "drop_case"), grid_params(
            metafunc.config, DROPOUT_AXES, cuda_axes={"dtype": grid.DTYPES_CUDA},
            fast=lambda c: c["seqlens"] == (64, 64)))


def rng(seed, offset):
    return torch.tensor([seed, offset], dtype=torch.int64)


def random_rng_state():
    return int(torch.randint(-2**62, 2**62, ())), int(torch.randint(0, 2**40, ()))


def test_dropout_grads_use_the_forward_mask(flash, tol, device, drop_case):
    """Recover the keep mask from S_dmask's sign, then check out (2x) and dq/dk/dv (3x)
    against the reference that applies exactly that mask: a backward that drew a different
    mask than the forward fails here."""
    c = drop_case
    dtype, p = c["dtype"], c["p"]
    sq, sk = c["seqlens"]
    h, hk = grid.head_counts(c["heads"], device)
    q, k, v = qkv(2, sq, sk, h, hk, 64, dtype=dtype, device=device, requires_grad=True)
    causal, window = window_for(c["mask"], sq, sk)
    out, lse, s_dmask = flash.flash_attn_func(q, k, v, dropout_p=p, causal=causal,
                                              window_size=window, return_attn_probs=True)
    assert s_dmask.shape == (2, h, sq, sk)
    keep = s_dmask >= 0  # where P == 0 the mask does not matter
    dout = randn(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    kw = dict(causal=causal, window_size=window, dropout_p=p, keep_mask=keep.cpu())
    ctx = case_context(window=window, p=p)

    def oracle(**o):
        ins = [t.detach().cpu() for t in (q, k, v)]
        ins = [(t.double() if o.get("upcast") else t.clone()).requires_grad_() for t in ins]
        res, lse_r, probs = attention_ref(*ins, **kw, **o)
        return res, lse_r, probs, torch.autograd.grad(res, ins, dout.cpu().to(res.dtype))

    out_ref, lse_ref, p_ref, g_ref = oracle(upcast=True)
    out_pt, lse_pt, p_pt, g_pt = oracle(**pt_options(dtype))
    tol.check("out", out, out_ref, out_pt, dtype, 2.0, ctx)
    tol.check("lse", lse, lse_ref, lse_pt, dtype, 2.0, ctx)
    tol.check("|S_dmask| = P", s_dmask.abs(), p_ref, p_pt, dtype, 2.0, ctx)
    gscale = max_abs(*g_ref)  # the gradients' common magnitude
    for name, g, gr, gp in zip(("dq", "dk", "dv"), grads, g_ref, g_pt):
        tol.check(name, g, gr, gp, dtype, 3.0, ctx, scale=gscale)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("p", [0.1, 0.5, 0.93])
def test_dropout_keep_rate_within_binomial_bound(flash, device, p):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = qkv(2, 128, 160, 4, 2, 32, dtype=dtype, device=device)
    _, _, s_dmask = flash.flash_attn_func(q, k, v, dropout_p=p, causal=True,
                                          return_attn_probs=True)
    vis = visible_mask(128, 160, causal=True, device=device)
    assert torch.all(s_dmask[..., ~vis] == 0), "S_dmask must be 0 where masked"
    nonzero = s_dmask[..., vis] != 0
    n = int(nonzero.sum())
    assert n > 0.99 * vis.sum() * 2 * 4
    dropped = int((s_dmask[..., vis] < 0).sum())
    rate = dropped / n
    bound = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(rate - p) <= bound, f"drop rate {rate:.5f}, expected {p} +- {bound:.5f}"


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("layout", ["batched", "varlen"])
def test_dropout_mask_is_the_philox_spec_bit_for_bit(ops, device, layout):
    """The kept/dropped pattern equals tests/philox_ref.py (written from philox.h's spec):
    counter (col/4, row, subsequence), subsequence = offset + batch * nheads + head."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    seed, offset = random_rng_state()
    p, h, d = 0.37, 3, 32
    if layout == "batched":
        b, sq, sk = 2, 37, 45
        q, k, v = qkv(b, sq, sk, h, 1, d, dtype=dtype, device=device)
        out, lse, s_dmask, rng_out = ops.fwd(q, k, v, None, p, d ** -0.5, False, -1, -1, 0.0,
                                             True, rng(seed, offset))
        lens_q, lens_k = [sq] * b, [sk] * b
    else:
        lens_q, lens_k = [5, 0, 1, 17], [9, 4, 1, 13]
        b = len(lens_q)
        q = randn(sum(lens_q), h, d, dtype=dtype, device=device)
        k = randn(sum(lens_k), 1, d, dtype=dtype, device=device)
        v = randn(sum(lens_k), 1, d, dtype=dtype, device=device)
        out, lse, s_dmask, rng_out = ops.varlen_fwd(
            q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device), None, None, None,
            max(lens_q), max(lens_k), p, d ** -0.5, False, -1, -1, 0.0, True, rng(seed, offset))
    assert torch.equal(rng_out.cpu(), rng(seed, offset)), "rng_state must be returned as given"
    s = s_dmask.cpu()
    for bi in range(b):
        expect = philox_ref.keep_mask_for(seed, offset, bi, h, h, lens_q[bi], lens_k[bi], p)
        got = s[bi, :, :lens_q[bi], :lens_k[bi]].numpy()
        decided = got != 0
        assert decided.mean() > 0.99 if decided.size else True
        mismatch = (got >= 0) != expect
        assert not np.any(mismatch & decided), (
            f"sequence {bi}: {int(np.sum(mismatch & decided))} of {decided.sum()} elements "
            f"differ from the Philox spec (seed={seed}, offset={offset})")
        # zero outside each sequence
        assert torch.all(s[bi, :, lens_q[bi]:] == 0) and torch.all(s[bi, :, :, lens_k[bi]:] == 0)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_dropout_reproducible_from_torch_manual_seed(flash, device):
    """rng_state comes from torch's default CPU generator: manual_seed fixes the mask, and
    successive calls draw fresh masks."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = qkv(1, 40, 40, 2, 2, 32, dtype=dtype, device=device)

    def mask():
        return flash.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)[2] < 0

    torch.manual_seed(7)
    a, b = mask(), mask()
    torch.manual_seed(7)
    a2 = mask()
    assert torch.equal(a, a2)
    assert not torch.equal(a, b), "two calls must not reuse one mask"


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_dropout_off_returns_empty_s_dmask_and_rng_state(ops, device):
    q, k, v = qkv(1, 8, 8, 2, 2, 32, dtype=torch.float32 if device == "cpu" else torch.float16,
                  device=device)
    out, lse, s_dmask, rng_out = ops.fwd(q, k, v, None, 0.0, 0.2, False, -1, -1, 0.0, True,
                                         None)
    assert s_dmask.shape == (0,) and rng_out.shape == (0,)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_dropout_varlen_grads_use_the_forward_mask(flash, tol, device):
    """Varlen dropout: S_dmask is (batch, nheads, max_seqlen_q, max_seqlen_k); recovered mask
    reproduces out and gradients."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    lens_q, lens_k = random_seqlens(4, 30), random_seqlens(4, 30)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    q = randn(sum(lens_q), 2, 32, dtype=dtype, device=device, requires_grad=True)
    k = randn(sum(lens_k), 2, 32, dtype=dtype, device=device, requires_grad=True)
    v = randn(sum(lens_k), 2, 32, dtype=dtype, device=device, requires_grad=True)
    out, lse, s_dmask = flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q),
                                                     max(lens_k), dropout_p=0.25, causal=True,
                                                     return_attn_probs=True)
    assert s_dmask.shape == (4, 2, max(lens_q), max(lens_k))
    keep = (s_dmask >= 0).cpu()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    kw = dict(causal=True, dropout_p=0.25, keep_mask=keep)

    def oracle(**o):
        ins = [t.detach().cpu() for t in (q, k, v)]
        ins = [(t.double() if o.get("upcast") else t.clone()).requires_grad_() for t in ins]
        res = varlen_ref(*ins, cu_q.cpu(), cu_k.cpu(), **kw, **o)[0]
        return res, torch.autograd.grad(res, ins, dout.cpu().to(res.dtype))

    out_ref, g_ref = oracle(upcast=True)
    out_pt, g_pt = oracle(**pt_options(dtype))
    tol.check("out", out, out_ref, out_pt, dtype)
    gscale = max_abs(*g_ref)  # the gradients' common magnitude
    for name, g, gr, gp in zip(("dq", "dk", "dv"), grads, g_ref, g_pt):
        tol.check(name, g, gr, gp, dtype, 3.0, scale=gscale)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_mask_identical_on_cpu_and_cuda(ops, causal):
    """The same rng_state gives the bit-identical mask on both backends (S_dmask sign)."""
    seed, offset = random_rng_state()
    q, k, v = qkv(2, 77, 130, 4, 2, 64, dtype=torch.float16, device="cpu")
    args = (None, 0.3, 0.125, causal, -1, -1, 0.0, True)
    s_cpu = ops.fwd(q, k, v, *args, rng(seed, offset))[2]
    s_gpu = ops.fwd(q.cuda(), k.cuda(), v.cuda(), *args, rng(seed, offset))[2].cpu()
    decided = (s_cpu != 0) & (s_gpu != 0)
    assert decided.float().mean() > 0.4
    assert torch.equal((s_cpu < 0)[decided], (s_gpu < 0)[decided])
