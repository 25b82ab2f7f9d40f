"""benchmarks/bench_decode.py keeps working without a GPU: its tiny CPU mode runs the whole sweep
machinery (paged and contiguous caches, the peer, the copy rate, the JSON) through the local
build, loaded by `kernels` as users load it, and every layout gives the peer's output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_decode  # noqa: E402
from flash_attn_hub.testing import ensure_cpu_build, kernel_root  # noqa: E402

# Ours and SDPA's math backend both accumulate in fp32 and round the output to bf16 once: they
# differ by a rounding step or two (2**-7 at outputs of magnitude 2..4, which randn values over a
# few dozen keys stay under). A wrong page mapping or cache row gives errors of order one.
BF16_OUTPUT_TOL = 2 * 2.0**-7


@pytest.mark.fast
def test_cpu_smoke_run_writes_every_row_and_matches_peer(tmp_path):
    out = tmp_path / "decode.json"
    # A fresh process: the script loads the kernel itself, which may clash with the suite's.
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode.py"),
                          "--device", "cpu", "--quick", "--build", str(ensure_cpu_build(kernel_root())),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["copy_gbps"] > 0 and doc["device"] == "cpu" and doc["kernel_id"]
    assert doc["command"].startswith("python benchmarks/bench_decode.py --device cpu --quick")
    expected = {(b, sk, h, hk, d, ps or None, sq)
                for b, sk, h, hk, d in bench_decode.points("cpu", quick=True)
                for ps in bench_decode.PAGE_SIZES for sq in bench_decode.SEQLENS_Q}
    got = {(r["batch"], r["seqlen_k"], r["nheads"], r["nheads_k"], r["hdim"], r["page_size"],
            r["seqlen_q"]) for r in doc["rows"]}
    assert got == expected and len(doc["rows"]) == len(expected)
    for r in doc["rows"]:
        assert r["ours"] > 0 and r["sdpa_math"] > 0, r
        assert r["sdpa_flash"] is None and r["sdpa_cudnn"] is None, r
        assert r["max_diff_vs_sdpa"] <= BF16_OUTPUT_TOL, r
        assert (r["seqlen_q"] > 1) == ("ours_causal" in r), r
