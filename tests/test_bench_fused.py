"""benchmarks/bench_fused.py runs without a GPU: tiny shapes on the CPU (--quick --no-compile) in
a fresh process, every op's row with ours and the eager peer timed and a ratio formed. Whether
the numbers mean anything is the GPU run's business; this keeps the script from rotting."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_fused_cpu_smoke(flash, tmp_path):
    out = tmp_path / "fused.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fused.py"), "--device",
                    "cpu", "--quick", "--no-compile", "--out", str(out)],
                   check=True, capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text())
    assert [r["op"] for r in result["rows"]] == ["layer_norm_prenorm", "rms_norm",
                                                  "cross_entropy", "mlp"]
    for row in result["rows"]:
        assert row["ms_fwd_bwd"]["ours"] > 0 and row["ms_fwd_bwd"]["eager"] > 0
        assert row["ratio_fwd_bwd"]["eager"] > 0
    mlp = result["rows"][-1]
    assert set(mlp["ms_fwd_bwd"]) == {"ours", "ours_lvl2", "eager"}
    assert set(mlp["ms"]) == {"ours", "ours_unfused", "eager"}
    assert result["copy_gbps"] > 0
