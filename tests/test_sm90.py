"""The Hopper (sm90a) forward: shapes that exercise its persistent grid, its pipeline across row
blocks and its tile edges, and agreement with the sm80 kernels on the same GPU.

The grid tests (test_fwd.py) already run every served case through it on an H100/H200 (its head
dims, fp16/bf16, no mask or causal); these add what small grids do not reach: more row
blocks than SMs (each CTA walks several, the K/V ring carries over), seqlen_q != seqlen_k around
the tile sizes (192 or 128 rows, 128 or 64 keys), causal row blocks anchored at the last row (the
first block starts above row 0: its missing rows must be neither computed into O nor written),
rows without keys, varlen batches (tiles that read the neighbouring sequences' rows), and
FLASH_ATTN_DISABLE_SM90=1 (the sm80 path, read once per process, so checked in a subprocess).
Each case also checks, through the profiler, that the sm90 kernel is the one that ran.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grid
from helpers import cu_seqlens, qkv, randn
from reference import attention_ref, pt_options, varlen_ref

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="needs an H100/H200 (compute capability 9.0)")

def on_sm90(call):
    """Runs call() under the profiler and checks that the Hopper kernel served it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = call()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    assert any("fwd_kernel_sm90" in n for n in names), f"not the sm90 kernel: {names}"
    return result


SHAPES = [  # (batch, seqlen_q, seqlen_k, nheads, nheads_k)
    (4, 2000, 2000, 16, 4),   # 352-704 row blocks: several per CTA
    (3, 193, 1000, 6, 6),     # one row past the 192-row tile; keys past 7 full tiles
    (2, 1000, 129, 8, 2),     # causal: top rows see no key (O = 0, LSE = +inf)
    (1, 1, 4097, 4, 1),       # decode-like row against a long K
    (2, 4097, 4097, 3, 1),    # causal: the first row block holds 65 (hdim 256: 1) of its rows
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("hdim", grid.SM90_HDIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sm90_matches_reference(flash, tol, shape, causal, hdim, dtype):
    b, sq, sk, h, hk = shape
    q, k, v = qkv(b, sq, sk, h, hk, hdim, dtype=dtype, device="cuda")
    out, lse, _ = on_sm90(lambda: flash.flash_attn_func(q, k, v, causal=causal,
                                                        return_attn_probs=True))
    out_ref, lse_ref, _ = attention_ref(q, k, v, causal=causal)
    out_pt, lse_pt, _ = attention_ref(q, k, v, causal=causal, **pt_options(dtype))
    tol.check("out", out, out_ref, out_pt, dtype, 2.0)
    tol.check("lse", lse, lse_ref, lse_pt, dtype, 2.0)


_SUBPROCESS = """
import sys, torch, kernels
from pathlib import Path
flash = kernels.get_local_kernel(Path(sys.argv[1]))
q, k, v = torch.load(sys.argv[2])
out, lse, _ = flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
torch.save((out, lse), sys.argv[3])
"""


def test_sm80_path_agrees_when_sm90_is_disabled(flash, tol, tmp_path):
    """Both paths pass the error rule against the fp64 reference, and they differ (the switch
    really changes the kernel: different tiles round differently)."""
    from kernel_loader import BUILD_DIR

    dtype = torch.bfloat16
    q, k, v = qkv(2, 1500, 1500, 8, 2, 128, dtype=dtype, device="cuda")
    torch.save((q, k, v), tmp_path / "in.pt")
    env = dict(os.environ, FLASH_ATTN_DISABLE_SM90="1")
    subprocess.run([sys.executable, "-c", _SUBPROCESS, str(BUILD_DIR), str(tmp_path / "in.pt"),
                    str(tmp_path / "out.pt")], env=env, check=True,
                   cwd=Path(__file__).resolve().parent)
    out80, lse80 = torch.load(tmp_path / "out.pt")
    out90, lse90, _ = flash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    out_ref, lse_ref, _ = attention_ref(q, k, v, causal=True)
    out_pt, lse_pt, _ = attention_ref(q, k, v, causal=True, **pt_options(dtype))
    for name, out, lse in (("sm80", out80, lse80), ("sm90", out90, lse90)):
        tol.check(f"{name} out", out, out_ref, out_pt, dtype, 2.0)
        tol.check(f"{name} lse", lse, lse_ref, lse_pt, dtype, 2.0)
    assert not torch.equal(out80, out90), "FLASH_ATTN_DISABLE_SM90=1 did not change the kernel"


VARLEN_LENS = [  # (lens_q, lens_k): empty and 1-row sequences, tile edges, one long sequence
    ([0, 1, 193, 1000, 129, 64, 4097], [5, 0, 193, 1000, 130, 65, 4097]),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("hdim", grid.SM90_HDIMS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv", ["packed", "seqused_k"])
def test_sm90_varlen_matches_reference(flash, tol, kv, causal, hdim, dtype):
    """Varlen on the Hopper path: each tile may read rows of the neighbouring sequences (TMA over
    the packed tensor). K/V rows that belong to no sequence's keys (past seqused_k, past the last
    cu_seqlens_k) are NaN: a V row left unzeroed would turn the output NaN."""
    lens_q, lens_k = VARLEN_LENS[0]
    h, hk = 6, 2
    extra = [3 if kv == "seqused_k" else 0 for _ in lens_k]  # unused rows after each sequence
    alloc = [n + e for n, e in zip(lens_k, extra)]
    cu_q = cu_seqlens(lens_q, "cuda")
    cu_k = cu_seqlens(alloc, "cuda")
    q = randn(sum(lens_q), h, hdim, dtype=dtype, device="cuda")
    k = torch.full((sum(alloc) + 70, hk, hdim), float("nan"), dtype=dtype, device="cuda")
    v = torch.full_like(k, float("nan"))
    for b, n in enumerate(lens_k):
        start = int(cu_k[b])
        k[start:start + n] = randn(n, hk, hdim, dtype=dtype, device="cuda")
        v[start:start + n] = randn(n, hk, hdim, dtype=dtype, device="cuda")
    seqused = (torch.tensor(lens_k, dtype=torch.int32, device="cuda") if kv == "seqused_k"
               else None)
    out, lse, _ = on_sm90(lambda: flash.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(alloc), seqused_k=seqused, causal=causal,
        return_attn_probs=True))
    rkw = dict(seqused_k=seqused, causal=causal)
    out_ref, lse_ref = varlen_ref(q, k, v, cu_q, cu_k, **rkw)
    out_pt, lse_pt = varlen_ref(q, k, v, cu_q, cu_k, **rkw, **pt_options(dtype))
    assert torch.isfinite(out).all()
    tol.check("out", out, out_ref, out_pt, dtype, 2.0)
    tol.check("lse", lse, lse_ref, lse_pt, dtype, 2.0)
