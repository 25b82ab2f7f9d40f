"""Hub packaging: the tree tools/hub_tree.py assembles is what tools/upload_hub.py uploads (repo
type `kernel`, builds on branch v1, card on main), and a kernels lock file pins it for
`kernels.load_kernel(repo_id, lockfile=...)`. No network: uploads go to a recording fake HfApi.
"""

import filecmp
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "hf_integration"))

import hub_tree  # noqa: E402
import upload_hub  # noqa: E402
from flash_attn_hub.testing import ensure_cpu_build, kernel_root  # noqa: E402

REPO_ID = hub_tree.repo_id_of(ROOT)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    build = ensure_cpu_build(kernel_root())
    return hub_tree.assemble(build.parent, tmp_path_factory.mktemp("hub") / "tree")


def test_tree_holds_every_variant_verbatim_without_bytecode(tree):
    build = kernel_root() / "build"
    variants = hub_tree.variant_dirs(kernel_root())
    assert variants and sorted(p.name for p in (tree / "build").iterdir()) == [v.name for v in variants]
    for v in variants:
        shipped = sorted(str(p.relative_to(tree / "build" / v.name))
                         for p in (tree / "build" / v.name).rglob("*") if p.is_file())
        source = sorted(str(p.relative_to(v)) for p in v.rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
        assert shipped == source
        for rel in source:
            assert filecmp.cmp(v / rel, tree / "build" / v.name / rel, shallow=False)
        assert (tree / "build" / v.name / "metadata.json").is_file()
    assert not list(tree.rglob("__pycache__")) and not list(tree.rglob("*.pyc"))
    assert build.is_dir()


def test_kernel_card_front_matter_and_contents(tree):
    from huggingface_hub.repocard import metadata_load

    meta = metadata_load(tree / "README.md")
    assert meta["library_name"] == "kernels"
    general = hub_tree._build_toml(kernel_root()).get("general", {})
    assert meta["license"] == general.get("license", meta["license"]).lower()
    assert "kernels" in meta["tags"] and "flash-attention" in meta["tags"]
    card = (tree / "README.md").read_text()
    assert REPO_ID in card and "{" + "repo_id}" not in card
    for v in hub_tree.variant_dirs(kernel_root()):
        assert f"`{v.name}`" in card


def test_kernel_card_shows_every_recorded_kernels_benchmark_row(tree, tmp_path):
    """The card renders each `kernels benchmark --output` file of benchmarks/results as a table:
    one row per workload and implementation, SDPA's time over ours where there is an sdpa twin."""
    card = (tree / "README.md").read_text()
    files = sorted((kernel_root() / "benchmarks" / "results").glob("*kernels-benchmark*.json"))
    assert "{" + "kernels_benchmark}" not in card
    for f in files:
        assert f"benchmarks/results/{f.name}" in card
        for r in json.loads(f.read_text())["results"]:
            group, _, impl = r["workload"].partition(".")
            assert f"| {group} | {impl} | {r['timingResults']['mean_ms']:.3f} |" in card
    synthetic = {"kernelCommitSha": "abc", "machineInfo": {"pytorchVersion": "x"}, "results": [
        {"workload": "W.flash", "timingResults": {"mean_ms": 2.0}, "verified": True},
        {"workload": "W.sdpa", "timingResults": {"mean_ms": 3.0}, "verified": False}]}
    (tmp_path / "gpu9-kernels-benchmark.json").write_text(json.dumps(synthetic))
    table = hub_tree.kernels_benchmark_tables(tmp_path)
    assert "| W | flash | 2.000 | 1.50x | yes |" in table and "| W | sdpa | 3.000 | - | no |" in table
    assert "on `gpu9`" in table
    assert "No `kernels benchmark` run" in hub_tree.kernels_benchmark_tables(tmp_path / "none")


def test_tree_carries_benchmark_scripts_and_results(tree):
    bench = kernel_root() / "benchmarks"
    expected = sorted([p.name for p in bench.glob("*.py")]
                      + [f"results/{p.name}" for p in bench.glob("results/*.json")])
    shipped = sorted(str(p.relative_to(tree / "benchmarks"))
                     for p in (tree / "benchmarks").rglob("*") if p.is_file()) \
        if (tree / "benchmarks").is_dir() else []
    assert shipped == expected


def test_assemble_refuses_a_non_empty_out_dir_and_a_missing_build(tree, tmp_path):
    with pytest.raises(FileExistsError):
        hub_tree.assemble(kernel_root(), tree)
    (tmp_path / "repo").mkdir()
    with pytest.raises(FileNotFoundError, match="build_local"):
        hub_tree.assemble(tmp_path / "repo", tmp_path / "out")


def test_dry_run_lists_files_per_branch_without_network(tree):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "upload_hub.py"), "--dry-run",
                          "--tree", str(tree)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"kernel repo {REPO_ID}, branch v1:" in out.stdout
    assert f"kernel repo {REPO_ID}, branch main: 1 files" in out.stdout
    for rel in hub_tree.tree_files(tree):
        assert rel in out.stdout
    assert "dry run: nothing uploaded" in out.stdout


class _FakeApi:
    calls: list = []

    def __init__(self, token=None):
        pass

    def __getattr__(self, name):
        def record(*args, **kwargs):
            _FakeApi.calls.append((name, args, kwargs))
            return type("Info", (), {"oid": "ab" * 20})()
        return record


def test_upload_sends_builds_to_v1_and_card_to_main_and_writes_lock(tree, tmp_path, monkeypatch):
    import huggingface_hub
    from kernels._rust import KernelLocks

    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    lock = tmp_path / "kernels.lock"
    assert upload_hub.main(["--tree", str(tree), "--lockfile", str(lock)]) == 0
    by_name = {name: (args, kw) for name, args, kw in _FakeApi.calls}
    assert [c[0] for c in _FakeApi.calls] == ["create_repo", "upload_file", "create_branch",
                                              "upload_folder"]
    assert all(kw.get("repo_type") == "kernel" for _, _, kw in _FakeApi.calls)
    assert by_name["upload_file"][1]["revision"] == "main"
    assert by_name["upload_file"][1]["path_in_repo"] == "README.md"
    assert by_name["create_branch"][1]["branch"] == "v1"
    folder = by_name["upload_folder"][1]
    assert folder["revision"] == "v1" and folder["folder_path"] == str(tree)
    assert folder["delete_patterns"] == ["build/**"]          # no stale variant survives
    locks = KernelLocks.from_json(lock.read_text())
    (dep, pinned), = locks.items()
    assert dep.repo_id == REPO_ID and pinned.commit == "ab" * 20


def test_example_lock_file_parses():
    from kernels._rust import KernelLocks

    text = (ROOT / "hf_integration" / "examples" / "kernels.lock").read_text()
    (dep, _), = KernelLocks.from_json(text).items()
    assert dep.repo_id == REPO_ID
    assert json.loads(text)[0]["dependency"]["version"] == 1


def test_load_kernel_with_lock_file_from_offline_cache(tree, tmp_path):
    """The shipped tree in an HF cache + a lock file naming its commit: load_kernel finds it
    without any network, and the kernel it returns computes attention."""
    snapshot = hub_tree.install_offline_cache(tree, tmp_path / "cache", REPO_ID)
    lock = tmp_path / "kernels.lock"
    lock.write_text(upload_hub.lock_json(REPO_ID, 1, hub_tree.tree_commit(tree)))
    script = textwrap.dedent(f"""
        import json, sys, torch
        from pathlib import Path
        import kernels
        fa = kernels.load_kernel({REPO_ID!r}, lockfile=Path({str(lock)!r}))
        q = torch.randn(1, 5, 2, 32)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), is_causal=True).transpose(1, 2)
        out = fa.flash_attn_func(q, q, q, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        print(json.dumps({{"file": fa.__file__, "diff": (out - ref).abs().max().item()}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "KERNELS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(res["file"]).resolve().is_relative_to(snapshot.resolve())
    assert res["diff"] < 1e-5


def test_kernels_benchmark_runs_from_offline_hub_cache(tree, tmp_path):
    """`kernels benchmark <repo-id>@v1` as a user runs it against the Hub: the scripts and the
    kernel both come from the shipped tree in an HF cache (run from an empty directory, no
    network), and every workload verifies."""
    from test_kernels_benchmark import assert_all_verified, run_kernels_benchmark

    version = hub_tree.version_of(ROOT)
    hub_tree.install_offline_cache(tree, tmp_path / "cache", REPO_ID, version)
    (tmp_path / "cwd").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "KERNELS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    rc, payload, stderr = run_kernels_benchmark(f"{REPO_ID}@v{version}", tmp_path / "cwd", env,
                                                iterations=1, warmup=0)
    assert rc == 0, stderr[-3000:]
    assert_all_verified(payload, stderr, tree)
