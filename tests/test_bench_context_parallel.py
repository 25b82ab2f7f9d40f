"""benchmarks/bench_context_parallel.py keeps working without a GPU, and its peer is right.

* The peer (benchmarks/sdpa_flash_attn.py: FlashAttention-2.8's internal functions on SDPA's
  flash ops; here the CPU op, on the GPU the CUDA one behind the same code) against the fp64
  reference by the suite's rule: dense and varlen, causal (bottom-right, also with fewer queries
  than keys, which it splits into an unmasked prefix and a masked square merged by LSE) and not,
  GQA native and with K/V expanded, the backward from the given out and LSE into the caller's
  buffers.
* The script's CPU mode (2 gloo processes, tiny shapes): the whole run -- both ring-flash-attn
  imports side by side, ring/zigzag/llama3 over ours and the peer, the single-process
  baselines, the correctness check, the JSON -- in a fresh process, with every function's
  check passing the rule for both implementations.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import sdpa_flash_attn as peer  # noqa: E402
from flash_attn_hub.testing import ensure_cpu_build, kernel_root  # noqa: E402
from reference import attention_ref, error_ratio, max_abs, pt_options, varlen_ref  # noqa: E402

H, HK, D = 4, 2, 32
DT = torch.bfloat16


def _dense(q, k, v, dout, causal):
    out, lse, _, _ = peer._flash_attn_forward(q, k, v, 0.0, None, causal, -1, -1, 0.0, None,
                                              False)
    bufs = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    peer._flash_attn_backward(dout, q, k, v, out, lse.transpose(1, 2).contiguous()
                              .transpose(1, 2), *bufs, 0.0, None, causal, -1, -1, 0.0, None,
                              False)
    return [out, lse, *bufs]


def _varlen(q, k, v, dout, causal, cu_q, cu_k):
    mq, mk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
    out, lse, _, _ = peer._flash_attn_varlen_forward(q, k, v, cu_q, cu_k, mq, mk, 0.0, None,
                                                     causal)
    bufs = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    peer._flash_attn_varlen_backward(dout, q, k, v, out, lse, *bufs, cu_q, cu_k, mq, mk, 0.0,
                                     None, causal, -1, -1, 0.0, None, False)
    return [out, lse, *bufs]


def _oracle(fn, inputs, dout, opts):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out, lse = fn(*inputs, **opts)[:2]
    return [out.detach(), lse.detach(), *torch.autograd.grad(out, inputs, dout.to(out.dtype))]


@pytest.mark.fast
@pytest.mark.parametrize("expand", [False, True], ids=["native-gqa", "expanded-kv"])
@pytest.mark.parametrize("case", ["square-causal", "fewer-q-causal", "full", "varlen-causal"])
def test_sdpa_peer_matches_reference(case, expand):
    peer.use_expanded_kv(expand)
    try:
        varlen = case.startswith("varlen")
        causal = "causal" in case
        sq, sk = (40, 40) if case == "square-causal" else (24, 56)
        if varlen:  # three sequences, the middle one with fewer queries than keys
            cu_q = torch.tensor([0, 17, 17 + sq, 17 + sq + 9], dtype=torch.int32)
            cu_k = torch.tensor([0, 17, 17 + sk, 17 + sk + 9], dtype=torch.int32)
            shapes = [(int(cu_q[-1]), H, D), (int(cu_k[-1]), HK, D)]
        else:
            shapes = [(2, sq, H, D), (2, sk, HK, D)]
        q = torch.randn(shapes[0]).to(DT)
        k, v = (torch.randn(shapes[1]).to(DT) for _ in range(2))
        dout = torch.randn(shapes[0]).to(DT)
        if varlen:
            got = _varlen(q, k, v, dout, causal, cu_q, cu_k)

            def oracle(*x, **o):
                return varlen_ref(*x, cu_q, cu_k, causal=causal, **o)
        else:
            got = _dense(q, k, v, dout, causal)

            def oracle(*x, **o):
                return attention_ref(*x, causal=causal, **o)
        ref = _oracle(oracle, (q, k, v), dout, dict(upcast=True))
        pt = _oracle(oracle, (q, k, v), dout, pt_options(DT))
        gscale = max_abs(*ref[2:])
        for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            ratio, msg = error_ratio(got[i], ref[i], pt[i], DT, 2.0 if i < 2 else 3.0,
                                     None if i < 2 else gscale)
            assert ratio <= 1.0, f"{name}: {msg}"
    finally:
        peer.use_expanded_kv(False)


@pytest.mark.fast
def test_sdpa_peer_refuses_what_it_does_not_implement():
    q = torch.randn(1, 8, H, D).to(DT)
    with pytest.raises(NotImplementedError, match="window"):
        peer._flash_attn_forward(q, q, q, 0.0, None, True, 4, 0, 0.0, None, False)
    with pytest.raises(NotImplementedError, match="dropout"):
        peer._flash_attn_forward(q, q, q, 0.1, None, True, -1, -1, 0.0, None, False)
    with pytest.raises(NotImplementedError, match="seqlen_q > seqlen_k"):
        peer._flash_attn_forward(q, q[:, :4], q[:, :4], 0.0, None, True, -1, -1, 0.0, None,
                                 False)


@pytest.mark.skipif(importlib.util.find_spec("ring_flash_attn") is None,
                    reason="ring-flash-attn is not installed (tools/requirements.txt pins it)")
def test_cpu_smoke_run_writes_every_point_and_passes_the_check(tmp_path):
    import bench_context_parallel as bench

    out = tmp_path / "cp.json"
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    # A fresh process: the script spawns its ranks and loads the kernel itself.
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_context_parallel.py"),
                          "--device", "cpu", "--build", str(ensure_cpu_build(kernel_root())),
                          "--seed", str(seed), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["world"] == 2 and doc["backend"] == "gloo" and doc["kernel_id"]
    assert doc["command"].startswith("python benchmarks/bench_context_parallel.py --device cpu")
    assert doc["peer_gqa"] == "native"  # the CPU op takes fewer K/V heads
    lengths = [int(x) for x in bench.DEFAULTS["cpu"]["lengths"].split(",")]
    assert {(r["total_tokens"], r["function"]) for r in doc["rows"]} == {
        (t, f) for t in lengths for f in bench.FUNCTIONS}
    for r in doc["rows"]:
        assert r["per_gpu_tokens"] * 2 == r["total_tokens"]
        for key in ("ours", "peer", "single_ours", "single_peer", "scaling_efficiency",
                    "peer_scaling_efficiency", "ours_over_peer"):
            assert r[key] > 0, (key, r)
        assert (r["check"] is not None) == (r["total_tokens"] == doc["check"]["total_tokens"])
    check = doc["check"]
    assert set(check["functions"]) == set(bench.FUNCTIONS)
    bad = [f"{fn} {impl} {q}: ratio {e['ratio'][q]:.2f}"
           for fn, impls in check["functions"].items() for impl, e in impls.items()
           for q in bench.QUANTITIES if not e["ratio"][q] <= 1.0]
    bad += [f"single {q}: {check['single_ours']['ratio'][q]:.2f}" for q in bench.QUANTITIES
            if not check["single_ours"]["ratio"][q] <= 1.0]
    assert not bad, "\n".join(bad) + f"\n(seed {seed})"
