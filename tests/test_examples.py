"""Every example a user copies runs: the scripts of hf_integration/examples/ and every ```python
block of README.md, each in a fresh process (the extension registers its ops once per process),
offline (HF_HUB_OFFLINE=1), against the local build, from the repository root.

The kernel reaches them the way the README says: LOCAL_KERNELS=<repo-id>=build for the repo-id
routes, `source="build"` for the named backend, and for the lock-file example an offline Hub cache
built from what we ship plus a lock file naming its commit. A README block that cannot run here
is marked on the line before its fence with `<!-- example: skip (reason) -->`; the reason is
reported with the skip.

context_parallel_training.py runs on 2 gloo processes with the run's seed (weights and tokens)
and writes its losses; the test re-applies the rule to them (skipped without ring-flash-attn).
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kernel_loader

ROOT = kernel_loader.REPO_ROOT
EXAMPLES_DIR = ROOT / "hf_integration" / "examples"
SCRIPTS = ("attn_implementation.py", "named_backend.py")
CONTEXT_PARALLEL = "context_parallel_training.py"
HAS_RING_FLASH_ATTN = importlib.util.find_spec("ring_flash_attn") is not None
_BLOCK = re.compile(r"(?:<!-- example: skip \((?P<skip>[^)]*)\) -->\n)?```python\n(?P<code>.*?)```",
                    re.S)


def readme_blocks():
    text = (ROOT / "README.md").read_text()
    params = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code"))
        marks = [pytest.mark.skip(reason=m["skip"])] if m["skip"] else []
        params.append(pytest.param(m["code"], id=f"README.md:{line}", marks=marks))
    return params


def _env():
    e = {k: v for k, v in os.environ.items() if k not in ("KERNELS_CACHE", "HF_HUB_CACHE")}
    e.update(HF_HUB_OFFLINE="1", LOCAL_KERNELS=f"{kernel_loader.repo_id()}={kernel_loader.BUILD_DIR}",
             PYTHONPATH=os.pathsep.join([str(ROOT / "hf_integration"), e.get("PYTHONPATH", "")]),
             OMP_NUM_THREADS="1")
    return e


def _locked_cache(tmp):
    """An offline Hub cache of what we ship and a lock file naming its commit."""
    snapshot = kernel_loader.make_hub_cache(tmp / "hub")
    lock = json.loads((EXAMPLES_DIR / "kernels.lock").read_text())
    lock[0]["lock"]["commit"] = snapshot.name
    (tmp / "kernels.lock").write_text(json.dumps(lock))
    return tmp / "kernels.lock"


@pytest.fixture(scope="module")
def started(tmp_path_factory, pytestconfig):
    """Every case launched at once (each process spends most of its time importing Transformers
    on one core, so together they take about the time of the slowest on a two-core machine);
    a test then waits for its own process."""
    kernel_loader.require_build()
    env = _env()
    lockfile = _locked_cache(tmp_path_factory.mktemp("locked"))
    locked_env = dict(env, HF_HUB_CACHE=str(lockfile.parent / "hub"))
    del locked_env["LOCAL_KERNELS"]
    cases = {script: ([EXAMPLES_DIR / script], env) for script in SCRIPTS}
    cases["load_locked.py"] = ([EXAMPLES_DIR / "load_locked.py", lockfile], locked_env)
    if HAS_RING_FLASH_ATTN:
        losses = tmp_path_factory.mktemp("context_parallel") / "losses.json"
        cases[CONTEXT_PARALLEL] = ([EXAMPLES_DIR / CONTEXT_PARALLEL, "--nproc", "2", "--seed",
                                    str(pytestconfig.option.seed), "--json", losses], env)
    for param in readme_blocks():
        if not param.marks:  # skipped blocks are not run
            cases[param.id] = (["-c", param.values[0]], env)
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=e, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (args, e) in cases.items()}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def finish(started, name, timeout=300):
    p = started[name]
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"{name} failed:\n{out}\n{err}"
    return out


def test_every_example_script_is_tested():
    """A new script under hf_integration/examples/ must get a case below."""
    assert {p.name for p in EXAMPLES_DIR.glob("*.py")} == \
        set(SCRIPTS) | {"load_locked.py", CONTEXT_PARALLEL}


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_generates(started, script):
    """Regression (attn_implementation.py): on Transformers 5.22.2 `from_config(...,
    allow_all_kernels=True)` raised TypeError in LlamaForCausalLM.__init__."""
    assert "tensor(" in finish(started, script)  # generate() printed the token ids


def test_example_load_locked_reads_the_locked_commit_offline(started):
    assert "torch.Size([2, 64, 4, 64])" in finish(started, "load_locked.py")


@pytest.mark.skipif(not HAS_RING_FLASH_ATTN,
                    reason="ring-flash-attn is not installed (tools/requirements.txt pins it)")
def test_context_parallel_training_matches_single_process(started):
    """Ring attention on 2 processes trains to the same losses as one process with the whole
    row: max|ring - fp64| <= 2 * max|eager fp32 - fp64| + one fp32 rounding step over 5 steps."""
    out = finish(started, CONTEXT_PARALLEL)
    args = started[CONTEXT_PARALLEL].args
    result = json.loads(Path(args[args.index("--json") + 1]).read_text())
    losses = result["losses"]
    assert result["dtype"] == "float32" and set(losses) == \
        {"ring (2 proc)", "flash_hub", "eager", "eager fp64"}, out
    ref, eager = losses["eager fp64"], losses["eager"]
    assert len(ref) == 5 and ref[-1] < ref[0]  # it trained
    bound = 2 * max(abs(e - r) for e, r in zip(eager, ref)) + 2**-23 * max(map(abs, ref))
    for name in ("ring (2 proc)", "flash_hub"):
        err = max(abs(o - r) for o, r in zip(losses[name], ref))
        assert err <= bound, f"{name}: max|loss - fp64| = {err:.3e} > {bound:.3e}\n{out}"


@pytest.mark.parametrize("code", readme_blocks())
def test_readme_python_block_runs(started, request, code):
    finish(started, request.node.callspec.id)
