"""Forward of flash_attn_func and the packed variants against the fp64 reference."""
import pytest
import torch

import grid
from conftest import device_params, grid_params
from helpers import alibi_for, case_context, names, qkv, randn, window_for
from reference import attention_ref, pt_options

FWD_AXES = {"dtype": grid.DTYPES_CPU, "hdim": grid.HDIMS, "mask": grid.MASKS,
            "heads": grid.HEADS, "seqlens": grid.SEQLENS}
FAST_SEQLENS = {(1, 1), (113, 203), (239, 1), (799, 3)}


def _fwd_axes(config):
    axes = dict(FWD_AXES)
    if config.getoption("--full-grid"):
        axes["seqlens"] = grid.SEQLENS + grid.SEQLENS_SLOW
    return axes


def pytest_generate_tests(metafunc):
    if "fwd_case" in metafunc.fixturenames:
        cfg = metafunc.config
        axes = _fwd_axes(cfg)
        params = grid_params(cfg, axes, cuda_axes={"dtype": grid.DTYPES_CUDA,
                                                   "seqlens": grid.SEQLENS + grid.SEQLENS_SLOW},
                             fast=lambda c: c["seqlens"] in FAST_SEQLENS and c["hdim"] <= 128)
        metafunc.parametrize(("device", "fwd_case"), params)
    if "mod_case" in metafunc.fixturenames:
        axes = {"dtype": grid.DTYPES_CPU, "softcap": [0.0, 2.0], "alibi": ["none", "h", "bh"],
                "mask": grid.MASKS, "seqlens": [(113, 203), (239, 1), (128, 128), (1, 77)]}
        params = grid_params(metafunc.config, axes, cuda_axes={"dtype": grid.DTYPES_CUDA},
                             fast=lambda c: c["seqlens"] != (128, 128))
        metafunc.parametrize(("device", "mod_case"), params)


def _check_fwd(flash, tol, q, k, v, *, dtype, context="", **kw):
    out, lse, s_dmask = flash.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    ref_kw = {key: kw[key] for key in ("softmax_scale", "causal", "window_size", "softcap",
                                       "alibi_slopes") if key in kw}
    out_ref, lse_ref, _ = attention_ref(q, k, v, **ref_kw)
    out_pt, lse_pt, _ = attention_ref(q, k, v, **ref_kw, **pt_options(dtype))
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert s_dmask.numel() == 0, "S_dmask must be empty without dropout (docs/design.md)"
    tol.check("out", out, out_ref, out_pt, dtype, 2.0, context)
    tol.check("lse", lse, lse_ref, lse_pt, dtype, 2.0, context)
    return out


def test_fwd_matches_reference_grid(flash, tol, device, fwd_case):
    """dtype x hdim x {none, causal, local} x {MHA, GQA, MQA} x awkward (seqlen_q, seqlen_k)."""
    c = fwd_case
    sq, sk = c["seqlens"]
    h, hk = grid.head_counts(c["heads"], device)
    b = grid.batch_for(sq, sk, device)
    q, k, v = qkv(b, sq, sk, h, hk, c["hdim"], dtype=c["dtype"], device=device)
    causal, window = window_for(c["mask"], sq, sk)
    _check_fwd(flash, tol, q, k, v, dtype=c["dtype"], causal=causal, window_size=window,
               context=case_context(window=window))


def test_fwd_softcap_alibi(flash, tol, device, mod_case):
    """Softcap (applied before ALiBi) and ALiBi slopes of shape (nheads) and (batch, nheads)."""
    c = mod_case
    sq, sk = c["seqlens"]
    b, h, hk, d = 3, 4, 2, 64
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype=c["dtype"], device=device)
    causal, window = window_for(c["mask"], sq, sk)
    slopes = alibi_for(c["alibi"], b, h, device)
    _check_fwd(flash, tol, q, k, v, dtype=c["dtype"], causal=causal, window_size=window,
               softcap=c["softcap"], alibi_slopes=slopes, context=case_context(window=window))


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_fwd_explicit_softmax_scale_and_strided_inputs(flash, tol, device):
    """Non-default softmax_scale; q/k/v are strided views (only the last dim contiguous)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    b, sq, sk, h, hk, d = 2, 65, 97, 4, 2, 64
    big_q = randn(b, sq, h + 3, d + 16, dtype=dtype, device=device)
    big_kv = randn(b, sk, 2, hk, d, dtype=dtype, device=device)
    q = big_q[:, :, 1:h + 1, 8:d + 8]  # 16-byte aligned: see the misaligned test below
    k, v = big_kv[:, :, 0], big_kv[:, :, 1]
    assert not q.is_contiguous() and q.stride(-1) == 1
    _check_fwd(flash, tol, q, k, v, dtype=dtype, softmax_scale=0.37, causal=True)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_fwd_last_dim_not_contiguous_is_copied_like_fa2(flash, tol, device):
    """FA2's Python layer makes a non-contiguous last dim contiguous (maybe_contiguous)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = qkv(2, 33, 47, 2, 2, 32, dtype=dtype, device=device)
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q_t.stride(-1) != 1
    _check_fwd(flash, tol, q_t, k, v, dtype=dtype)


@pytest.mark.fast
def test_fwd_fp64_keeps_fp64_accuracy(flash, tol):
    """Regression: FwdParams held softmax_scale, softcap and the dropout p as float, so fp64
    problems with a scale that is not a power of two came out fp32-accurate (errors ~3e-8;
    fixed in b1abd1c by making those fields double)."""
    dtype = torch.float64
    q, k, v = qkv(2, 113, 203, 2, 2, 32, dtype=dtype, device="cpu")  # scale 1/sqrt(32)
    _check_fwd(flash, tol, q, k, v, dtype=dtype, softcap=1.7, causal=True)
    out = flash.flash_attn_func(q, k, v, softmax_scale=0.3)
    assert (out - attention_ref(q, k, v, softmax_scale=0.3)[0]).abs().max() < 1e-13


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_fwd_returns_out_only_by_default_and_leaves_inputs_alone(flash, device):
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = qkv(2, 17, 19, 2, 1, 64, dtype=dtype, device=device)
    before = [t.clone() for t in (q, k, v)]
    out = flash.flash_attn_func(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    for t, t0 in zip((q, k, v), before):
        assert torch.equal(t, t0), "inputs must not be modified"
        assert out.data_ptr() != t.data_ptr(), "outputs never alias inputs"


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_packed_variants_match_unpacked(flash, tol, device, causal):
    """flash_attn_qkvpacked_func / flash_attn_kvpacked_func against the reference."""
    dtype = torch.bfloat16
    b, s, h, hk, d = 2, 77, 4, 2, 64
    qkv_packed = randn(b, s, 3, h, d, dtype=dtype, device=device)
    q, k, v = qkv_packed.unbind(2)
    out = flash.flash_attn_qkvpacked_func(qkv_packed, causal=causal)
    tol.check("qkvpacked out", out, attention_ref(q, k, v, causal=causal)[0],
              attention_ref(q, k, v, causal=causal, **pt_options(dtype))[0], dtype)
    q = randn(b, s, h, d, dtype=dtype, device=device)
    kv = randn(b, s + 5, 2, hk, d, dtype=dtype, device=device)
    out = flash.flash_attn_kvpacked_func(q, kv, causal=causal)
    k, v = kv.unbind(2)
    tol.check("kvpacked out", out, attention_ref(q, k, v, causal=causal)[0],
              attention_ref(q, k, v, causal=causal, **pt_options(dtype))[0], dtype)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_fwd_window_covering_everything_equals_no_window(flash, device):
    """A window of >= seqlen_k on both sides is the same as unbounded (docs/design.md)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = qkv(2, 40, 50, 2, 2, 32, dtype=dtype, device=device)
    a = flash.flash_attn_func(q, k, v)
    b = flash.flash_attn_func(q, k, v, window_size=(50, 50))
    torch.testing.assert_close(a, b, rtol=0, atol=8 * torch.finfo(dtype).eps)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_fwd_rows_that_see_no_key_give_zero_and_inf_lse(flash, device):
    """Causal with seqlen_q > seqlen_k: the first rows see nothing (out 0, lse +inf)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = qkv(1, 9, 4, 2, 2, 32, dtype=dtype, device=device)
    out, lse, _ = flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :5] == 0)
    assert torch.all(lse[:, :, :5] == float("inf"))
    assert torch.isfinite(lse[:, :, 5:]).all()


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_fwd_misaligned_base_pointer_is_right_or_refused(flash, tol, device):
    """q starting 4 elements (8 bytes) into a row: the CPU backend must be right; a GPU kernel
    built on 16-byte loads must either be right or refuse with an error naming q, never crash
    with a misaligned address."""
    dtype = torch.float16
    big_q = randn(2, 40, 2, 64 + 8, dtype=dtype, device=device)
    q = big_q[..., 4:68]
    _, k, v = qkv(2, 40, 50, 2, 2, 64, dtype=dtype, device=device)
    try:
        out = flash.flash_attn_func(q, k, v, causal=True)
    except (RuntimeError, ValueError) as e:
        assert device != "cpu", f"the CPU backend has no alignment constraint: {e}"
        assert names("q").search(str(e)), str(e)
        return
    if device == "cuda":
        torch.cuda.synchronize()
    tol.check("out", out, attention_ref(q, k, v, causal=True)[0],
              attention_ref(q, k, v, causal=True, **pt_options(dtype))[0], dtype)


# ---------------------------------------------------------------------------------------------
# CUDA only


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", grid.DTYPES_CUDA, ids=grid.dtype_name)
@pytest.mark.parametrize("mask", grid.MASKS)
def test_fwd_cuda_agrees_with_cpu_backend(flash, tol, dtype, mask):
    """Same inputs through both backends of one loaded kernel: each within the rule of the
    reference, and the two within the rule of each other."""
    b, sq, sk, h, hk, d = 2, 300, 517, 6, 2, 128
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype=dtype, device="cpu")
    causal, window = window_for(mask, sq, sk)
    slopes = alibi_for("bh", b, h, "cpu")
    kw = dict(causal=causal, window_size=window, softcap=3.0, alibi_slopes=slopes)
    out_cpu, lse_cpu, _ = flash.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    kw_cuda = dict(kw, alibi_slopes=slopes.cuda())
    out_gpu, lse_gpu, _ = flash.flash_attn_func(q.cuda(), k.cuda(), v.cuda(),
                                                return_attn_probs=True, **kw_cuda)
    out_ref, lse_ref, _ = attention_ref(q, k, v, **kw)
    out_pt, lse_pt, _ = attention_ref(q, k, v, **kw, **pt_options(dtype))
    ctx = case_context(window=window)
    tol.check("out cuda", out_gpu, out_ref, out_pt, dtype, context=ctx)
    tol.check("out cpu", out_cpu, out_ref, out_pt, dtype, context=ctx)
    tol.check("out cuda vs cpu", out_gpu, out_cpu.double(), out_pt, dtype, context=ctx)
    tol.check("lse cuda vs cpu", lse_gpu, lse_cpu.double(), lse_pt, dtype, context=ctx)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fwd_cuda_tensor_over_2_pow_31_elements(flash, tol):
    """64-bit offsets: q and out hold more than 2^31 elements; batches past the 2^31 boundary
    must be right (a 32-bit index wraps around and reads the first batches instead)."""
    b, s, h, d = 16400, 1024, 1, 128
    need = 2 * b * s * h * d * 2 + (2 << 30)
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} free")
    dtype = torch.float16
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype)
    assert q.numel() > 2**31
    k1, v1 = (torch.randn(1, s, h, d, device="cuda", dtype=dtype) for _ in range(2))
    k, v = k1.expand(b, s, h, d), v1.expand(b, s, h, d)  # batch stride 0 keeps memory small
    out = flash.flash_attn_func(q, k, v, causal=True)
    for bi in (0, b // 2, b - 1):
        qb = q[bi:bi + 1].cpu()
        ref = attention_ref(qb, k1.cpu(), v1.cpu(), causal=True)[0]
        pt = attention_ref(qb, k1.cpu(), v1.cpu(), causal=True, **pt_options(dtype))[0]
        tol.check(f"out batch {bi}", out[bi:bi + 1], ref, pt, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fwd_cuda_causal_grid_in_l2_sections(flash, tol):
    """The masked sm80 grid walks the (sequence, head) pairs in L2 sections (fwd_launch_sm80.h):
    head dim 192 (the sm80 kernels on every GPU) at 4k keys has 3 MB of K/V per pair, so the 15
    pairs take two sections of 8 on a 108- or 132-SM GPU, one of them spanning two sequences and
    the last CTA column spare. Every pair must come out right, none twice or not at all."""
    b, sq, sk, h, d = 3, 4000, 4096, 5, 192
    dtype = torch.bfloat16
    q, k, v = qkv(b, sq, sk, h, h, d, dtype=dtype, device="cuda")
    out, lse, _ = flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    out_ref, lse_ref, _ = attention_ref(q, k, v, causal=True)
    out_pt, lse_pt, _ = attention_ref(q, k, v, causal=True, **pt_options(dtype))
    tol.check("out", out, out_ref, out_pt, dtype, 2.0)
    tol.check("lse", lse, lse_ref, lse_pt, dtype, 2.0)
