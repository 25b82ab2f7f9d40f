"""FLASH_ATTN_CPU_BASELINE=1 forces the CPU backend's baseline (SSE2) variant, the one machines
without AVX2+FMA run, so that it stays tested on the machines that have them. The switch is read
once per process, so the baseline runs in a subprocess on the same inputs as the default variant
here. Both must pass the error rule against the fp64 reference (2x for out and LSE, 3x for the
gradients), and they must differ (FMA rounds differently), which shows that the switch really
changed the code path. FLASH_ATTN_CPU_WIDE=1 is tested the same way: the AVX-512 variant's
16-lane source lowered to the baseline (no FMA), so that its padding and tails are checked on
machines without AVX-512. On CPUs with AMX, bf16 runs on AMX tiles (kernel_src/cpu/amx_cpu.cpp);
FLASH_ATTN_CPU_NO_AMX=1 keeps it on the fp32-tile path that CPUs without AMX run, tested the same
way (and BASELINE/WIDE imply it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import qkv
from reference import attention_ref, max_abs, pt_options

pytestmark = pytest.mark.fast


def _cpu_flags():
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def _has_avx2_fma():
    return {"avx2", "fma"} <= _cpu_flags()


def _has_amx_bf16():
    return {"amx_bf16", "amx_tile", "avx512_bf16"} <= _cpu_flags()


# Runs the forward (with the LSE) and the backward with a given dout; saves the results.
_SUBPROCESS = """
import sys, torch, kernels
from pathlib import Path
flash = kernels.get_local_kernel(Path(sys.argv[1]))
q, k, v, dout = torch.load(sys.argv[2])
q, k, v = (t.requires_grad_() for t in (q, k, v))
out, lse, _ = flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
grads = torch.autograd.grad(out, (q, k, v), dout)
torch.save((out.detach(), lse, *grads), sys.argv[3])
"""


def _run(flash, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    return (out.detach(), lse, *torch.autograd.grad(out, (q, k, v), dout))


# fp16 computes in fp32 (the float primitives), fp64 in fp64 (the double ones). fp32 runs a call
# large enough (>= 2^26 multiply-adds) for its fp32 tiles: fp32 tile products folded into fp64
# sums in the micro-kernel (gemm_fold), fp64 logits and fp32 probabilities in the backward.
@pytest.mark.skipif(not _has_avx2_fma(), reason="without AVX2+FMA the default is the baseline")
@pytest.mark.parametrize("switch", ["FLASH_ATTN_CPU_BASELINE", "FLASH_ATTN_CPU_WIDE"],
                         ids=["baseline", "wide"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.float32],
                         ids=["fp16", "fp64", "fp32-tiles"])
def test_baseline_cpu_variant_matches_reference_and_differs_from_avx2(flash, tol, tmp_path, dtype,
                                                                       switch):
    shape = (1, 1024, 1024, 4, 2, 64) if dtype == torch.float32 else (2, 150, 170, 4, 2, 64)
    _check_switch(flash, tol, tmp_path, dtype, switch, shape)


# bf16: AMX tiles by default (bf16 operands, fp32 accumulation); the switch gives the fp32 tiles.
# 1023 x 1024 with GQA: several 128-key forward steps, key tails, key splits in the backward.
@pytest.mark.skipif(not _has_amx_bf16(), reason="the CPU has no AMX-BF16: bf16 is on fp32 tiles")
@pytest.mark.parametrize("shape", [(2, 150, 170, 4, 2, 64), (1, 1023, 1024, 6, 2, 80)],
                         ids=["small", "1k-gqa-hdim80"])
def test_no_amx_switch_matches_reference_and_differs_from_amx(flash, tol, tmp_path, shape):
    _check_switch(flash, tol, tmp_path, torch.bfloat16, "FLASH_ATTN_CPU_NO_AMX", shape)


def _check_switch(flash, tol, tmp_path, dtype, switch, shape):
    from kernel_loader import BUILD_DIR

    q, k, v = qkv(*shape, dtype=dtype, device="cpu")
    dout = torch.randn(q.shape).to(dtype)
    torch.save((q, k, v, dout), tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASH_ATTN_CPU_")}
    env[switch] = "1"
    subprocess.run([sys.executable, "-c", _SUBPROCESS, str(BUILD_DIR), str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], env=env, check=True,
                   cwd=Path(__file__).resolve().parent)
    baseline = torch.load(tmp_path / "out.pt")
    default = _run(flash, q, k, v, dout)

    def reference(**opts):
        ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if opts.get("upcast", True):
            ins = [t.detach().double().requires_grad_() for t in ins]
        out, lse, _ = attention_ref(*ins, causal=True, **opts)
        grads = torch.autograd.grad(out, ins, dout.to(out.dtype))
        return (out.detach(), lse.detach(), *grads)

    ref, pt = reference(), reference(**pt_options(dtype))
    gscale = max_abs(*ref[2:])
    names = ("out", "lse", "dq", "dk", "dv")
    for variant, results in ((switch, baseline), ("default", default)):
        for i, name in enumerate(names):
            factor, scale = (2.0, None) if i < 2 else (3.0, gscale)
            tol.check(f"{variant} {name}", results[i], ref[i], pt[i], dtype, factor, scale=scale)
    assert any(not torch.equal(a, b) for a, b in zip(baseline, default)), \
        f"{switch}=1 did not change the CPU variant"
