"""benchmarks/bench_fused_train.py --smoke: the training-step benchmark on a tiny Llama on the CPU
in a fresh process (so the script cannot rot): every variant trained, kernelize swapped exactly
the norms of the variants that ask for it (and none of their twins'), and the first step's loss
(same weights, same batch) agrees across variants: the swapped norm and our cross-entropy compute
the same model. Whether the times mean anything is the GPU run's business."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.fast
pytest.importorskip("transformers")
pytest.importorskip("kernels")


def test_bench_fused_train_smoke(flash, tmp_path):
    out = tmp_path / "train.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fused_train.py"), "--smoke",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["hf", "rmsnorm", "ce", "rmsnorm+ce"]
    layers = result["model"]["num_hidden_layers"]
    for name, row in rows.items():
        assert row["rmsnorm_swapped"] == (2 * layers + 1 if "rmsnorm" in name else 0)
        assert row["step_ms_median"] > 0 and row["tokens_per_s"] > 0
        assert len(row["step_s"]) == result["timed_rounds"]
        # fp32 model: our fp64-accumulating ops against Transformers' fp32 ones.
        assert abs(row["first_loss_minus_hf"]) < 1e-4, (name, row["losses"][0])
