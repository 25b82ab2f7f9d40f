"""yunchang (the PyPI release, unchanged) on this kernel, on the CPU over gloo.

yunchang's unified sequence parallelism splits a sequence over ulysses x ring processes:
`LongContextAttention` exchanges heads for tokens with an all-to-all inside each Ulysses group
and runs ring attention (its own copies of the ring, zigzag and stripe functions, calling
FlashAttention-2.8's `_flash_attn_forward` / `_flash_attn_backward`) across the ring group;
`UlyssesAttention` runs `flash_attn_func` between two all-to-alls. Processes spawned here run
`LongContextAttention` with ring_impl_type "basic" (causal and not), "zigzag" and "strip"
(causal) and `UlyssesAttention` (causal and not) on 2 processes (ulysses 1 x ring 2 for the
former, ulysses 2 for the latter), forward and backward, in bf16 and fp32, GQA; on 4 processes
(ulysses 2 x ring 2) `LongContextAttention` again in bf16. Each rank takes its shard with yunchang's own `EXTRACT_FUNC_DICT` and compares out, dq, dk,
dv with single-process attention by the suite's rule (fp64 reference, 2x for out, 3x for
gradients; tests/reference.py).

Worked around here, not in the package: yunchang imports `flash_attn` and
`flash_attn.flash_attn_interface`, so the kernel module stands in for them in each process, and
it compares `flash_attn.__version__` with '2.6.3' to pick the 2.8 signatures, so the stand-in
gets `__version__ = "2.8.3"` (the API level this kernel follows; the package has no version
attribute of its own).

Not checked:
* the fp32 backward of `LongContextAttention`: yunchang 0.6.4's ring functions carry
  ring-flash-attn's fp32 aliasing bug (`dq = block_dq_buffer.to(torch.float32)`, then the buffer
  is reused; tests/test_ring_flash_attn.py) and its basic ring returns dq in bf16 whatever the
  input dtype. The fp32 output is checked; `UlyssesAttention`, which has no ring, is checked in
  full in fp32.
* ulysses degree 2 with ring degree 1 on 2 processes: yunchang's ring backward sends dK/dV to
  the next ring rank even when the ring has one process, and gloo cannot send to the process
  itself (`Pair is not connected`); NCCL can, so this is a gloo limit, not the kernel's.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

# flash_attn_hub (hf_integration/): the kernel as `flash_attn` for the library under test
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf_integration"))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("yunchang") is None,
    reason="yunchang is not installed (tools/requirements.txt pins it)")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (layer, ring_impl_type, causal)
CASES = [("hybrid", "basic", True), ("hybrid", "basic", False), ("hybrid", "zigzag", True),
         ("hybrid", "strip", True), ("ulysses", "basic", True), ("ulysses", "basic", False)]
QUANTITIES = ("out", "dq", "dk", "dv")
H, HK, D = 8, 4, 32


def _cases(world):
    """(dtype name, dtype, layer, impl, causal) run on `world` processes. 4 processes add only
    what 2 cannot reach: Ulysses and ring together (bf16, so every quantity is checked)."""
    return [(dn, dt, *c) for dn, dt in DTYPES.items() for c in CASES
            if world == 2 or (c[0] == "hybrid" and dt == torch.bfloat16)]


def _checked(layer, dtype):
    # The fp32 backward of yunchang's ring functions is wrong upstream (above).
    if dtype == torch.float32 and layer == "hybrid":
        return ("out",)
    return QUANTITIES


def _import_yunchang():
    import kernel_loader
    from flash_attn_hub.as_flash_attn import install
    install(kernel_loader.load_local())
    import yunchang
    assert yunchang.globals.HAS_FLASH_ATTN
    return yunchang


def _run_case(yc, layer, impl, causal, dtype, rank, world):
    """(quantity -> (ours, ref, pt) local shards, quantity -> common scale)."""
    import torch.distributed as dist
    from yunchang.kernels import AttnType

    from reference import attention_ref, max_abs, pt_options

    seqlen = 16 * world
    full = [torch.randn(2, seqlen, h, D).to(dtype) for h in (H, HK, HK)]
    dout = torch.randn(2, seqlen, H, D).to(dtype)

    results = {}
    for key, opts in (("ref", dict(upcast=True)), ("pt", pt_options(dtype))):
        inputs = [(t.double() if key == "ref" else t.clone()).requires_grad_() for t in full]
        out = attention_ref(*inputs, causal=causal, **opts)[0]
        grads = torch.autograd.grad(out, inputs, dout.to(out.dtype))
        results[key] = [out.detach(), *grads]

    extract = yc.EXTRACT_FUNC_DICT[impl]
    ud, rd = (world // 2, 2) if layer == "hybrid" else (world, 1)

    def shard(t):
        return extract(t, rank, world_size=world, rd=rd, ud=ud).detach().contiguous()

    local = [shard(t).requires_grad_() for t in full]
    if layer == "hybrid":
        attn = yc.LongContextAttention(ring_impl_type=impl, attn_type=AttnType.FA)
    else:
        attn = yc.UlyssesAttention(dist.group.WORLD, attn_type=AttnType.FA)
    out = attn(*local, causal=causal)
    ours = [out.detach(), *torch.autograd.grad(out, local, shard(dout))]

    shards = {n: (ours[i], shard(results["ref"][i]), shard(results["pt"][i]))
              for i, n in enumerate(QUANTITIES) if n in _checked(layer, dtype)}
    gscale = max_abs(*results["ref"][1:])
    scales = {"out": max_abs(results["ref"][0]), "dq": gscale, "dk": gscale, "dv": gscale}
    return shards, scales


def _worker(rank, world, port, out_path, seed):
    from gloo_ranks import finish_rank, init_rank
    from reference import error_ratio

    init_rank(rank, world, port)
    yc = _import_yunchang()
    # Ulysses inside, ring across: ranks (0, 1) and (2, 3) are Ulysses groups on 4 processes.
    yc.set_seq_parallel_pg(world // 2, 2, rank, world)
    rows = []
    for dname, dtype, layer, impl, causal in _cases(world):
        torch.manual_seed(seed)  # the same full tensors on every rank
        shards, scales = _run_case(yc, layer, impl, causal, dtype, rank, world)
        for q, (ours, ref, pt) in shards.items():
            ratio, msg = error_ratio(ours, ref, pt, dtype, 2.0 if q == "out" else 3.0, scales[q])
            rows.append(dict(case=f"{layer}-{impl}-{'causal' if causal else 'full'}-{dname}",
                             quantity=q, rank=rank, ratio=ratio, msg=msg))
    finish_rank(rows, rank, world, out_path)


@pytest.mark.parametrize("world", [2, 4])
def test_yunchang_on_gloo(flash, tmp_path, world):
    from gloo_ranks import run_ranks

    per_rank = sum(len(_checked(layer, dt)) for _, dt, layer, _, _ in _cases(world))
    run_ranks(_worker, world, tmp_path, world * per_rank)
