"""Backward: gradients against the fp64 reference (3x rule), gradcheck in fp64 on the CPU
backend, and bitwise determinism with deterministic=True."""
import pytest
import torch

import grid
from conftest import device_params, grid_params
from helpers import alibi_for, case_context, cu_seqlens, qkv, randn, window_for
from reference import attention_ref, max_abs, pt_options

BWD_AXES = {"dtype": grid.DTYPES_CPU, "hdim": grid.HDIMS, "mask": grid.MASKS,
            "heads": grid.HEADS, "seqlens": grid.SEQLENS}
FAST_SEQLENS = {(1, 1), (113, 203), (239, 1), (799, 3)}


def pytest_generate_tests(metafunc):
    if "bwd_case" in metafunc.fixturenames:
        axes = dict(BWD_AXES)
        if metafunc.config.getoption("--full-grid"):
            axes["seqlens"] = grid.SEQLENS + grid.SEQLENS_SLOW
        params = grid_params(metafunc.config, axes,
                             cuda_axes={"dtype": grid.DTYPES_CUDA,
                                        "seqlens": grid.SEQLENS + grid.SEQLENS_SLOW},
                             fast=lambda c: c["seqlens"] in FAST_SEQLENS and c["hdim"] <= 64)
        metafunc.parametrize(("device", "bwd_case"), params)
    if "mod_case" in metafunc.fixturenames:
        axes = {"dtype": grid.DTYPES_CPU, "softcap": [0.0, 2.0], "alibi": ["none", "h", "bh"],
                "mask": grid.MASKS, "seqlens": [(113, 203), (239, 1), (64, 64)]}
        params = grid_params(metafunc.config, axes, cuda_axes={"dtype": grid.DTYPES_CUDA},
                             fast=lambda c: c["seqlens"] == (64, 64))
        metafunc.parametrize(("device", "mod_case"), params)


def check_grads(tol, fn_ours, ref_fn, inputs, dtype, context=""):
    """Run ours, the fp64 reference and the same-math-in-dtype oracle on `inputs` (leaf tensors
    in `dtype`) with one random dout; check out (2x) and every gradient (3x)."""
    out = fn_ours(*inputs)
    dout = torch.randn_like(out, dtype=torch.float32).to(dtype)
    grads = torch.autograd.grad(out, inputs, dout)

    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    out_ref = ref_fn(*ref_in, upcast=True)
    grads_ref = torch.autograd.grad(out_ref, ref_in, dout.double())

    pt_in = [t.detach().clone().requires_grad_() for t in inputs]
    out_pt = ref_fn(*pt_in, **pt_options(dtype))
    grads_pt = torch.autograd.grad(out_pt, pt_in, dout)

    tol.check("out", out, out_ref, out_pt, dtype, 2.0, context)
    gscale = max_abs(*grads_ref)  # the gradients' common magnitude
    for name, g, g_ref, g_pt in zip(("dq", "dk", "dv"), grads, grads_ref, grads_pt):
        assert g.dtype == dtype and g.shape == g_ref.shape
        tol.check(name, g, g_ref, g_pt, dtype, 3.0, context, scale=gscale)


def test_bwd_matches_reference_grid(flash, tol, device, bwd_case):
    """Gradients over dtype x hdim x mask x MHA/GQA/MQA x awkward seqlens."""
    c = bwd_case
    sq, sk = c["seqlens"]
    h, hk = grid.head_counts(c["heads"], device)
    b = grid.batch_for(sq, sk, device)
    inputs = qkv(b, sq, sk, h, hk, c["hdim"], dtype=c["dtype"], device=device,
                 requires_grad=True)
    causal, window = window_for(c["mask"], sq, sk)
    kw = dict(causal=causal, window_size=window)
    check_grads(tol, lambda q, k, v: flash.flash_attn_func(q, k, v, **kw),
                lambda q, k, v, **o: attention_ref(q, k, v, **kw, **o)[0], inputs, c["dtype"],
                case_context(window=window))


def test_bwd_softcap_alibi(flash, tol, device, mod_case):
    """Gradients through softcap's tanh and with ALiBi (no gradient to the slopes)."""
    c = mod_case
    sq, sk = c["seqlens"]
    b, h, hk, d = 2, 4, 2, 32
    inputs = qkv(b, sq, sk, h, hk, d, dtype=c["dtype"], device=device, requires_grad=True)
    causal, window = window_for(c["mask"], sq, sk)
    kw = dict(causal=causal, window_size=window, softcap=c["softcap"],
              alibi_slopes=alibi_for(c["alibi"], b, h, device))
    check_grads(tol, lambda q, k, v: flash.flash_attn_func(q, k, v, **kw),
                lambda q, k, v, **o: attention_ref(q, k, v, **kw, **o)[0], inputs, c["dtype"],
                case_context(window=window))


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_bwd_packed_variants(flash, tol, device):
    """Gradients flow back into qkv / kv of the packed APIs."""
    dtype = torch.bfloat16
    b, s, h, d = 2, 37, 2, 32
    qkv_packed = randn(b, s, 3, h, d, dtype=dtype, device=device, requires_grad=True)
    check_grads(tol, lambda x: flash.flash_attn_qkvpacked_func(x, causal=True),
                lambda x, **o: attention_ref(*x.unbind(2), causal=True, **o)[0],
                [qkv_packed], dtype)
    q = randn(b, s, h, d, dtype=dtype, device=device, requires_grad=True)
    kv = randn(b, s + 3, 2, 1, d, dtype=dtype, device=device, requires_grad=True)
    check_grads(tol, lambda q, kv: flash.flash_attn_kvpacked_func(q, kv),
                lambda q, kv, **o: attention_ref(q, *kv.unbind(2), **o)[0], [q, kv], dtype)


# fp32 calls of at least 2^26 multiply-adds take the CPU backend's fp32 tiles (logits in fp64 in
# the backward, every other product in fp32, sums across tiles in fp64; docs/cpu_backend.md,
# "Numerics"); the grid reaches them only at 1023 x 1024. These cases are the ones that path is
# most exposed on: a decode over 64k keys (each dK/dV row a sum over one query's 8 heads, P
# carrying its logit's error unaveraged), softcap and ALiBi, and dropout.
FP32_TILE_CASES = {
    "decode_64k": dict(shape=(1, 1, 65536, 16, 2, 64)),
    "softcap_alibi_local": dict(shape=(1, 1024, 1024, 4, 2, 64), softcap=3.0, alibi="bh",
                                window_size=(300, 40)),
    "dropout_causal": dict(shape=(1, 1024, 1024, 4, 2, 64), causal=True, dropout_p=0.17),
}


@pytest.mark.parametrize("name", list(FP32_TILE_CASES))
def test_bwd_fp32_tiles_large_calls(flash, tol, name):
    c = dict(FP32_TILE_CASES[name])
    b, sq, sk, h, hk, d = c.pop("shape")
    assert h * sq * sk * d >= 2**26  # the fp32-tile path
    dtype = torch.float32
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype=dtype, device="cpu", requires_grad=True)
    c["alibi_slopes"] = alibi_for(c.pop("alibi", "none"), b, h, "cpu")
    p = c.get("dropout_p", 0.0)
    out = flash.flash_attn_func(q, k, v, return_attn_probs=p > 0, **c)
    if p > 0:  # the forward's keep mask, from S_dmask's sign
        out, c["keep_mask"] = out[0], out[2] >= 0

    def ours(q, k, v):  # the output above: a second call would draw another dropout mask
        return out
    check_grads(tol, ours, lambda q, k, v, **o: attention_ref(q, k, v, **c, **o)[0], [q, k, v],
                dtype, name)


def _determinism_params():
    """(device, dtype, repeats): the CPU's widest and narrowest types, both CUDA types; on CUDA
    the dQ accumulation order is what deterministic=True pins down, so it repeats 50 times."""
    cases = [("cpu", torch.float32, 3), ("cpu", torch.bfloat16, 3)]
    cases += [("cuda", dt, 50) for dt in grid.DTYPES_CUDA]
    return [pytest.param(dev, dt, n, id=f"{dev}-{grid.dtype_name(dt)}",
                         marks=[] if dev == "cpu" else [pytest.mark.skipif(
                             not torch.cuda.is_available(), reason="needs a CUDA device")])
            for dev, dt, n in cases]


@pytest.mark.parametrize(("device", "dtype", "repeats"), _determinism_params())
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(40, 7)), dict()],
                         ids=["causal", "local", "none"])
def test_bwd_deterministic_is_bitwise_repeatable(flash, device, dtype, repeats, opts):
    """deterministic=True: repeated backward passes give bitwise equal gradients (GQA, ragged
    lengths, more keys than queries)."""
    q, k, v = qkv(2, 257, 300, 6, 2, 64, dtype=dtype, device=device, requires_grad=True)
    out = flash.flash_attn_func(q, k, v, deterministic=True, **opts)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout)
    for _ in range(repeats - 1):
        out = flash.flash_attn_func(q, k, v, deterministic=True, **opts)
        again = torch.autograd.grad(out, (q, k, v), dout)
        for g0, g1 in zip(first, again):
            assert torch.equal(g0, g1)


# ---------------------------------------------------------------------------------------------
# gradcheck in fp64 on the CPU backend

GRADCHECK_CASES = {
    "causal": dict(causal=True),
    "local": dict(window_size=(2, 1)),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi="bh"),
    "gqa": dict(nheads_k=1),
    "sq_gt_sk_causal": dict(causal=True, seqlens=(7, 4)),
}


@pytest.mark.fast
@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_fp64(flash, name):
    opts = dict(GRADCHECK_CASES[name])
    sq, sk = opts.pop("seqlens", (5, 6))
    hk = opts.pop("nheads_k", 2)
    alibi = alibi_for(opts.pop("alibi", None), 1, 2, "cpu")  # slopes stay fp32 by contract
    q, k, v = qkv(1, sq, sk, 2, hk, 8, dtype=torch.float64, device="cpu", requires_grad=True)
    fn = lambda q, k, v: flash.flash_attn_func(q, k, v, alibi_slopes=alibi, **opts)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.fast
def test_gradcheck_fp64_dropout_fixed_rng_state(flash):
    """Dropout with the generator reseeded before each call, so every evaluation of the
    function draws the same mask (rng_state is taken from torch's default CPU generator)."""
    q, k, v = qkv(1, 6, 7, 2, 1, 8, dtype=torch.float64, device="cpu", requires_grad=True)

    def fn(q, k, v):
        torch.manual_seed(1234)
        return flash.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.fast
def test_gradcheck_fp64_varlen(flash):
    lens_q, lens_k = [3, 0, 1, 4], [5, 2, 0, 3]
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    q = randn(sum(lens_q), 2, 8, dtype=torch.float64, device="cpu", requires_grad=True)
    k = randn(sum(lens_k), 1, 8, dtype=torch.float64, device="cpu", requires_grad=True)
    v = randn(sum(lens_k), 1, 8, dtype=torch.float64, device="cpu", requires_grad=True)

    def fn(q, k, v):
        return flash.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                            causal=True, softcap=2.0)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", grid.DTYPES_CUDA, ids=grid.dtype_name)
@pytest.mark.parametrize("mask", grid.MASKS)
def test_bwd_cuda_agrees_with_cpu_backend(flash, tol, dtype, mask):
    """Same inputs and dout through both backends of one loaded kernel (GQA, softcap, ALiBi):
    each backend's gradients within the 3x rule of the fp64 reference, and the two within the
    rule of each other."""
    b, sq, sk, h, hk, d = 2, 200, 333, 6, 2, 128
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype=dtype, device="cpu", requires_grad=True)
    causal, window = window_for(mask, sq, sk)
    slopes = alibi_for("bh", b, h, "cpu")
    kw = dict(causal=causal, window_size=window, softcap=3.0)
    out_cpu = flash.flash_attn_func(q, k, v, alibi_slopes=slopes, **kw)
    dout = torch.randn_like(out_cpu, dtype=torch.float32).to(dtype)
    grads_cpu = torch.autograd.grad(out_cpu, (q, k, v), dout)
    qc, kc, vc = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    out_gpu = flash.flash_attn_func(qc, kc, vc, alibi_slopes=slopes.cuda(), **kw)
    grads_gpu = torch.autograd.grad(out_gpu, (qc, kc, vc), dout.cuda())

    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    grads_ref = torch.autograd.grad(attention_ref(*ref_in, alibi_slopes=slopes, upcast=True,
                                                  **kw)[0], ref_in, dout.double())
    pt_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grads_pt = torch.autograd.grad(attention_ref(*pt_in, alibi_slopes=slopes, **kw,
                                                 **pt_options(dtype))[0], pt_in, dout)
    gscale = max_abs(*grads_ref)
    ctx = case_context(window=window)
    for name, g_gpu, g_cpu, g_ref, g_pt in zip(("dq", "dk", "dv"), grads_gpu, grads_cpu,
                                               grads_ref, grads_pt):
        tol.check(name + " cuda", g_gpu, g_ref, g_pt, dtype, 3.0, ctx, scale=gscale)
        tol.check(name + " cpu", g_cpu, g_ref, g_pt, dtype, 3.0, ctx, scale=gscale)
        tol.check(name + " cuda vs cpu", g_gpu, g_cpu.double(), g_pt, dtype, 3.0, ctx,
                  scale=gscale)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("causal", [False, True])
def test_bwd_cuda_memory_is_linear_at_16k(flash, causal):
    """Beyond the gradients the backward allocates only linear workspace (the fp32 dQ
    accumulator and one fp32 per row and head): at 16k tokens the peak stays within a small
    multiple of q's size, where one head's score matrix alone would be 16k^2 x 2 bytes."""
    s, h, d = 16384, 8, 128
    q, k, v = qkv(1, s, s, h, h, d, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out = flash.flash_attn_func(q, k, v, causal=causal)
    dout = torch.randn_like(out)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    qkv_bytes = q.numel() * q.element_size()
    # dq, dk, dv (3x) + fp32 dQ accumulator (2x) + LSE-sized D + allocator rounding.
    assert extra <= 6 * qkv_bytes, (extra, qkv_bytes)
    assert extra < s * s * 2  # far below a single head's score matrix
    assert all(torch.isfinite(g).all() for g in grads)
