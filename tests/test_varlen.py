"""flash_attn_varlen_func (and packed variants): batches with 0- and 1-length sequences,
seqused_k, paged K/V through block_table with any page size, tensor max_seqlen, gradients."""
import pytest
import torch

import grid
from conftest import device_params, grid_params
from helpers import (alibi_for, case_context, cu_seqlens, paged_pool, randn, random_seqlens,
                     window_for)
from reference import max_abs, pt_options, varlen_ref

VARLEN_AXES = {"dtype": grid.DTYPES_CPU, "hdim": [32, 59, 128, 256], "mask": grid.MASKS,
               "heads": grid.HEADS, "kv": ["plain", "seqused_k"], "alibi": ["none", "bh"],
               "max_len": [1, 9, 130, 300]}
PAGED_AXES = {"page_size": grid.PAGE_SIZES, "dtype": grid.DTYPES_CPU, "mask": grid.MASKS,
              "heads": grid.HEADS, "seqused_k": [False, True]}


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    cuda = {"dtype": grid.DTYPES_CUDA}
    if "varlen_case" in metafunc.fixturenames:
        metafunc.parametrize(("device", "varlen_case"), grid_params(
            cfg, VARLEN_AXES, cuda_axes=cuda, fast=lambda c: c["max_len"] <= 130
            and c["hdim"] <= 128))
    if "paged_case" in metafunc.fixturenames:
        metafunc.parametrize(("device", "paged_case"), grid_params(
            cfg, PAGED_AXES, cuda_axes=cuda, fast=lambda c: c["page_size"] in (3, 16)))
    if "varlen_bwd_case" in metafunc.fixturenames:
        axes = {k: VARLEN_AXES[k] for k in ("dtype", "hdim", "mask", "heads", "kv", "max_len")}
        metafunc.parametrize(("device", "varlen_bwd_case"), grid_params(
            cfg, axes, cuda_axes=cuda, fast=lambda c: c["max_len"] <= 9))


class Batch:
    """A random varlen batch. Query seq i is paired with a key seq of another random length,
    so that empty queries, empty keys and seqlen_q > seqlen_k all occur."""

    def __init__(self, n, max_len, h, hk, d, dtype, device, *, seqused=False, grad=False):
        self.lens_q = random_seqlens(n, max_len)
        lens_k = random_seqlens(n, max_len)
        self.lens_k = lens_k[1:] + lens_k[:1]
        # with seqused_k, each K range holds extra poisoned rows past the used ones
        alloc_k = [n_k + (int(torch.randint(0, 4, ())) if seqused else 0)
                   for n_k in self.lens_k]
        self.cu_q = cu_seqlens(self.lens_q, device)
        self.cu_k = cu_seqlens(alloc_k, device)
        self.seqused_k = (torch.tensor(self.lens_k, dtype=torch.int32, device=device)
                          if seqused else None)
        self.q = randn(sum(self.lens_q), h, d, dtype=dtype, device=device, requires_grad=grad)
        k = randn(sum(alloc_k), hk, d, dtype=dtype, device=device)
        v = randn(sum(alloc_k), hk, d, dtype=dtype, device=device)
        if seqused:
            for b in range(n):
                start = int(self.cu_k[b]) + self.lens_k[b]
                k[start:int(self.cu_k[b + 1])] = float("nan")
                v[start:int(self.cu_k[b + 1])] = float("nan")
        self.k, self.v = k.requires_grad_(grad), v.requires_grad_(grad)
        self.max_q, self.max_k = max(self.lens_q), max(alloc_k)


def _check_varlen(flash, tol, bt, dtype, *, block_table=None, k=None, v=None, context="",
                  **kw):
    k = bt.k if k is None else k
    v = bt.v if v is None else v
    out, lse, s_dmask = flash.flash_attn_varlen_func(
        bt.q, k, v, bt.cu_q, bt.cu_k, bt.max_q, bt.max_k, seqused_k=bt.seqused_k,
        block_table=block_table, return_attn_probs=True, **kw)
    rkw = dict(seqused_k=bt.seqused_k, block_table=block_table, **kw)
    out_ref, lse_ref = varlen_ref(bt.q, k, v, bt.cu_q, bt.cu_k, **rkw)
    out_pt, lse_pt = varlen_ref(bt.q, k, v, bt.cu_q, bt.cu_k, **rkw, **pt_options(dtype))
    assert lse.shape == (bt.q.shape[1], bt.q.shape[0]) and lse.dtype == torch.float32
    assert s_dmask.numel() == 0
    tol.check("out", out, out_ref, out_pt, dtype, 2.0, context)
    tol.check("lse", lse, lse_ref, lse_pt, dtype, 2.0, context)


def test_varlen_fwd_grid(flash, tol, device, varlen_case):
    """Varlen forward with empty and 1-token sequences, seqused_k and (batch, nheads) ALiBi."""
    c = varlen_case
    h, hk = grid.head_counts(c["heads"], device)
    n = 5
    bt = Batch(n, c["max_len"], h, hk, c["hdim"], c["dtype"], device,
               seqused=c["kv"] == "seqused_k")
    causal, window = window_for(c["mask"], c["max_len"], c["max_len"])
    _check_varlen(flash, tol, bt, c["dtype"], causal=causal, window_size=window,
                  alibi_slopes=alibi_for(c["alibi"], n, h, device),
                  context=case_context(window=window, lens_q=bt.lens_q, lens_k=bt.lens_k))


def test_varlen_paged_kv_any_page_size(flash, tol, device, paged_case):
    """Paged K/V through block_table with page sizes 1, 3, 16, 17, 256 (FA2 needs multiples
    of 256; we do not). Unused pool slots are NaN, so reading past a sequence shows."""
    c = paged_case
    h, hk = grid.head_counts(c["heads"], device)
    d, dtype = 64, c["dtype"]
    bt = Batch(4, 70, h, hk, d, dtype, device)
    lens_used = bt.lens_k
    k_seqs = [bt.k[int(bt.cu_k[b]):int(bt.cu_k[b + 1])] for b in range(4)]
    v_seqs = [bt.v[int(bt.cu_k[b]):int(bt.cu_k[b + 1])] for b in range(4)]
    k_pool, table = paged_pool(k_seqs, c["page_size"])
    v_pool = torch.full_like(k_pool, float("nan"))
    for b, t in enumerate(v_seqs):
        for i in range(t.shape[0]):
            v_pool[int(table[b, i // c["page_size"]]), i % c["page_size"]] = t[i]
    if c["seqused_k"]:
        used = [int(torch.randint(0, n_k + 1, ())) for n_k in lens_used]
        bt.seqused_k = torch.tensor(used, dtype=torch.int32, device=device)
    causal, window = window_for(c["mask"], 70, 70)
    _check_varlen(flash, tol, bt, dtype, block_table=table, k=k_pool, v=v_pool, causal=causal,
                  window_size=window, context=case_context(window=window, lens_k=lens_used))


def test_varlen_bwd_grid(flash, tol, device, varlen_bwd_case):
    """Varlen gradients (3x rule), including sequences of length 0 and 1 and seqused_k."""
    c = varlen_bwd_case
    h, hk = grid.head_counts(c["heads"], device)
    dtype = c["dtype"]
    bt = Batch(5, c["max_len"], h, hk, c["hdim"], dtype, device,
               seqused=c["kv"] == "seqused_k", grad=True)
    causal, window = window_for(c["mask"], c["max_len"], c["max_len"])
    kw = dict(causal=causal, window_size=window)
    out = flash.flash_attn_varlen_func(bt.q, bt.k, bt.v, bt.cu_q, bt.cu_k, bt.max_q, bt.max_k,
                                       seqused_k=bt.seqused_k, **kw)
    dout = randn(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, (bt.q, bt.k, bt.v), dout)
    ctx = case_context(window=window, lens_q=bt.lens_q, lens_k=bt.lens_k)

    def oracle(**o):
        ins = [t.detach().clone() for t in (bt.q, bt.k, bt.v)]
        if o.get("upcast"):
            ins = [t.double() for t in ins]
        ins = [t.requires_grad_() for t in ins]
        res = varlen_ref(*ins, bt.cu_q, bt.cu_k, seqused_k=bt.seqused_k, **kw, **o)[0]
        return res, torch.autograd.grad(res, ins, dout.to(res.dtype))

    out_ref, g_ref = oracle(upcast=True)
    out_pt, g_pt = oracle(**pt_options(dtype))
    tol.check("out", out, out_ref, out_pt, dtype, 2.0, ctx)
    # K/V rows past seqused_k take no part: their gradient is 0 (the reference slices them
    # away, so its gradient there is 0 too), never unwritten memory.
    gscale = max_abs(*g_ref)  # the gradients' common magnitude
    for name, g, gr, gp in zip(("dq", "dk", "dv"), grads, g_ref, g_pt):
        tol.check(name, g, gr, gp, dtype, 3.0, ctx, scale=gscale)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_varlen_tensor_max_seqlen_equals_int(flash, tol, device):
    """max_seqlen_q/k may arrive as 0-dim tensors (Transformers' packed position_ids path). The
    value of a tensor is not read (no sync), so on an H100/H200 the call may take another kernel
    than with ints (the sm90 one needs the bound): both must meet the error rule; elsewhere they
    are the same kernel and must agree bit for bit."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    bt = Batch(4, 40, 4, 2, 64, dtype, device)
    a = flash.flash_attn_varlen_func(bt.q, bt.k, bt.v, bt.cu_q, bt.cu_k, bt.max_q, bt.max_k,
                                     causal=True)
    b = flash.flash_attn_varlen_func(bt.q, bt.k, bt.v, bt.cu_q, bt.cu_k,
                                     torch.tensor(bt.max_q, device=device),
                                     torch.tensor(bt.max_k, device=device), causal=True)
    hopper = device == "cuda" and torch.cuda.get_device_capability() == (9, 0)
    if not hopper:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    out_ref, _ = varlen_ref(bt.q, bt.k, bt.v, bt.cu_q, bt.cu_k, causal=True)
    out_pt, _ = varlen_ref(bt.q, bt.k, bt.v, bt.cu_q, bt.cu_k, causal=True, **pt_options(dtype))
    tol.check("out (int max_seqlen)", a, out_ref, out_pt, dtype, 2.0)
    tol.check("out (tensor max_seqlen)", b, out_ref, out_pt, dtype, 2.0)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_varlen_equal_lengths_match_batched(flash, device):
    """A varlen batch of equal lengths is the batched call, reshaped."""
    dtype = torch.bfloat16
    b, s, h, d = 3, 50, 4, 32
    q, k, v = (randn(b, s, h, d, dtype=dtype, device=device) for _ in range(3))
    cu = cu_seqlens([s] * b, device)
    out_b, lse_b, _ = flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    out_v, lse_v, _ = flash.flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, s, s, causal=True,
        return_attn_probs=True)
    torch.testing.assert_close(out_v.view(b, s, h, d), out_b, rtol=0,
                               atol=4 * torch.finfo(dtype).eps)
    torch.testing.assert_close(lse_v.view(h, b, s).transpose(0, 1), lse_b, rtol=1e-6, atol=1e-6)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_varlen_packed_variants(flash, tol, device):
    """flash_attn_varlen_qkvpacked_func and flash_attn_varlen_kvpacked_func."""
    dtype = torch.bfloat16
    lens = random_seqlens(4, 30)
    cu = cu_seqlens(lens, device)
    qkv = randn(sum(lens), 3, 2, 32, dtype=dtype, device=device)
    out = flash.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True)
    q, k, v = qkv.unbind(1)
    tol.check("varlen qkvpacked", out, varlen_ref(q, k, v, cu, cu, causal=True)[0],
              varlen_ref(q, k, v, cu, cu, causal=True, **pt_options(dtype))[0], dtype)
    kv = randn(sum(lens), 2, 1, 32, dtype=dtype, device=device)
    out = flash.flash_attn_varlen_kvpacked_func(q.contiguous(), kv, cu, cu, max(lens),
                                                max(lens))
    k, v = kv.unbind(1)
    tol.check("varlen kvpacked", out, varlen_ref(q, k, v, cu, cu)[0],
              varlen_ref(q, k, v, cu, cu, **pt_options(dtype))[0], dtype)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_varlen_max_seqlen_larger_than_needed_is_fine(flash, device):
    """max_seqlen is an upper bound: a generous one changes nothing."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    bt = Batch(4, 20, 2, 2, 32, dtype, device)
    a = flash.flash_attn_varlen_func(bt.q, bt.k, bt.v, bt.cu_q, bt.cu_k, bt.max_q, bt.max_k)
    b = flash.flash_attn_varlen_func(bt.q, bt.k, bt.v, bt.cu_q, bt.cu_k, bt.max_q + 100,
                                     bt.max_k + 7)
    torch.testing.assert_close(a, b, rtol=0, atol=4 * torch.finfo(dtype).eps)
