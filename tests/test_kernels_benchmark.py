"""`kernels benchmark` (the Hub's benchmark command, kernels 0.17) on our repository: it finds
benchmarks/benchmark*.py, every workload runs on the local build and passes its verification (on
the CPU in CI; on a GPU machine the runner takes the CUDA variant and the real shapes), and a
workload whose operation the backend does not implement is skipped with its reason instead of
failing the whole run (the runner itself has no skip).
"""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))

from flash_attn_hub.testing import ensure_cpu_build, kernel_root  # noqa: E402

KERNELS_CLI = Path(sys.executable).with_name("kernels")
NOT_IMPLEMENTED = ("bwd is not implemented for CUDA yet (q is on cuda:0); use CPU tensors for "
                   "this op")


def benchmark_scripts(root: Path) -> list[Path]:
    """The scripts the command runs: benchmarks/benchmark*.py."""
    return sorted((root / "benchmarks").glob("benchmark*.py"))


def load_script(path: Path):
    """Import a benchmark script by its path, as the runner does."""
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_classes(module):
    from kernels.benchmark import Benchmark

    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Benchmark) and obj is not Benchmark
            and obj.__module__ == module.__name__]


def expected_workloads(root: Path) -> list[str]:
    """`<Class>.<workload>` for every benchmark_<workload> method, as the JSON names them."""
    names = []
    for script in benchmark_scripts(root):
        for cls in benchmark_classes(load_script(script)):
            names += [f"{cls.__name__}.{m[len('benchmark_'):]}" for m in dir(cls)
                      if m.startswith("benchmark_") and callable(getattr(cls, m))]
    return sorted(names)


def scripts_sha(root: Path) -> str:
    """The runner's `benchmarkScriptSha`: sha256 over the scripts' bytes, in name order."""
    h = hashlib.sha256()
    for script in benchmark_scripts(root):
        h.update(script.read_bytes())
    return h.hexdigest()


def run_kernels_benchmark(target: str, cwd: Path, env: dict | None = None, *, iterations=2,
                          warmup=1):
    """`kernels benchmark <target> --json`: (exit code, parsed JSON or None, stderr)."""
    out = subprocess.run([str(KERNELS_CLI), "benchmark", target, "--iterations", str(iterations),
                          "--warmup", str(warmup), "--json"], cwd=cwd, env=env or os.environ,
                         capture_output=True, text=True, timeout=600)
    payload = json.loads(out.stdout) if out.returncode == 0 else None
    return out.returncode, payload, out.stderr


def skipped_workloads(stderr: str) -> set[str]:
    """`<Class>.<workload>` of the workloads the scripts reported as not implemented."""
    return set(re.findall(r"^  skipped (\S+): \S", stderr, flags=re.MULTILINE))


def assert_all_verified(payload, stderr, root: Path):
    """Every workload of the scripts ran and verified, except those skipped with a reason (they
    carry no verification at all). The CPU backend implements everything: nothing is skipped."""
    results = {r["workload"]: r for r in payload["results"]}
    assert sorted(results) == expected_workloads(root)
    skipped = skipped_workloads(stderr)
    if payload["machineInfo"]["backend"] == "CPU":
        assert not skipped
    unverified = [name for name, r in results.items()
                  if r.get("verified") is not (None if name in skipped else True)]
    assert not unverified, f"not verified: {unverified}"
    assert payload["benchmarkScriptSha"] == scripts_sha(root)


@pytest.fixture(scope="module")
def local_run():
    root = kernel_root()
    ensure_cpu_build(root)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "KERNELS_CACHE")}
    env["HF_HUB_OFFLINE"] = "1"  # a local path needs no network
    return root, run_kernels_benchmark("./", root, env)


def test_local_checkout_runs_every_workload_and_all_verify(local_run):
    root, (rc, payload, stderr) = local_run
    assert rc == 0, stderr[-3000:]
    on_gpu = torch.cuda.is_available()  # then the runner takes CUDA and its shapes
    assert payload["machineInfo"]["backend"] == (f"CUDA {torch.version.cuda}" if on_gpu else "CPU")
    assert_all_verified(payload, stderr, root)
    for r in payload["results"]:
        assert r["timingResults"]["iterations"] == 2 and r["timingResults"]["min_ms"] > 0


@pytest.mark.fast
def test_scripts_define_workloads_the_runner_can_find():
    """Every benchmark*.py defines Benchmark classes (the runner fails the whole run on a script
    without one), and the workload families of benchmark_attention.py are all there."""
    scripts = benchmark_scripts(ROOT)
    assert "benchmark_attention.py" in [s.name for s in scripts]
    for script in scripts:
        assert benchmark_classes(load_script(script)), f"{script.name} defines no Benchmark"
    workloads = expected_workloads(ROOT)
    # Every family is there, each with this kernel's workload, and the SDPA twins where they exist.
    for family in ("Fwd", "FwdBwd", "Varlen", "Decode"):
        assert any(w.startswith(family) and w.endswith(".flash") for w in workloads), family
    assert any(w.endswith(".sdpa") for w in workloads)


# --- skipping what a backend does not implement -------------------------------------------------

class _BackwardNotImplemented(torch.autograd.Function):
    """A forward that works and a backward that raises as our CUDA build did before its
    backward landed."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q.clone()

    @staticmethod
    def backward(ctx, dout):
        raise RuntimeError(NOT_IMPLEMENTED)


def _fake_kernel(flash_attn_func):
    return types.SimpleNamespace(__name__="_flash_attn_fake_0000000",
                                 flash_attn_func=flash_attn_func)


def _run_class(monkeypatch, cls, kernel):
    """The runner's own loop over one class's workloads, with `kernel` as the loaded kernel."""
    import kernels
    from kernels.cli.benchmark import run_benchmark_class

    monkeypatch.setattr(kernels, "get_local_kernel", lambda path: kernel)
    results, _ = run_benchmark_class(cls, iterations=1, warmup=0, repo_id=str(ROOT),
                                     is_local=True, revision="local")
    return results


@pytest.mark.fast
def test_unimplemented_workload_is_skipped_with_its_reason(monkeypatch, capsys):
    """A workload that raises 'not implemented' keeps its row without a verification; the other
    workloads of the class still run and verify."""
    module = load_script(ROOT / "benchmarks" / "benchmark_attention.py")
    kernel = _fake_kernel(lambda q, k, v, causal: _BackwardNotImplemented.apply(q, k, v))
    results = _run_class(monkeypatch, module.FwdBwdHdim64, kernel)
    assert results["flash"].verified is None
    assert results["sdpa"].verified is True
    err = capsys.readouterr().err
    assert f"skipped FwdBwdHdim64.flash: {NOT_IMPLEMENTED}" in err
    assert skipped_workloads(err) == {"FwdBwdHdim64.flash"}
    assert "FwdBwdHdim64.sdpa" in err and "skipped FwdBwdHdim64.sdpa" not in err


@pytest.mark.fast
def test_other_errors_fail_the_run(monkeypatch):
    def broken(q, k, v, causal):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    module = load_script(ROOT / "benchmarks" / "benchmark_attention.py")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run_class(monkeypatch, module.FwdHdim64, _fake_kernel(broken))


@pytest.mark.fast
def test_wrong_result_fails_verification(monkeypatch):
    """The check is not vacuous: a kernel that ignores the causal mask fails it."""
    import torch.nn.functional as F

    def no_mask(q, k, v, causal):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2))
        return out.transpose(1, 2)

    module = load_script(ROOT / "benchmarks" / "benchmark_attention.py")
    with pytest.raises(RuntimeError, match="Verification failed for flash"):
        _run_class(monkeypatch, module.FwdHdim128Causal, _fake_kernel(no_mask))
