"""Fixtures shared by the suite: the loaded kernel, devices, fresh inputs, the tolerance rule.

Options:
  --kernel-source local|local-env|hub-cache   how `flash` is loaded (default: local, i.e.
                                              kernels.get_local_kernel(<repo>/build))
  --full-grid       full cartesian grids on the CPU too (also FLASH_FULL_GRID=1); CUDA always
                    runs the full product
  --seed N          reproduce a run: every test seeds torch with hash(N, test id)
  --grid-summary P  write a JSON summary (configs run, worst error ratio per dtype, outcome
                    counts) to P; with pytest-xdist (-n N) the workers' records are gathered
  --shard I/N       run every N-th test (by sorted node id) starting at I: one tier split over
                    several calls or machines

Environment: FLASH_TEST_GPUS=0,1,... pins xdist worker k to GPU k mod len(list) (set before
CUDA starts, at import of this file), so one tier spreads over several GPUs. Under xdist each
worker runs CPU ops on cores // workers threads unless OMP_NUM_THREADS is set.
"""
import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch

import grid
import kernel_loader
from reference import error_ratio

# Before anything touches CUDA: an xdist worker takes its GPU from FLASH_TEST_GPUS.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
if _WORKER and os.environ.get("FLASH_TEST_GPUS"):
    _gpus = os.environ["FLASH_TEST_GPUS"].split(",")
    os.environ["CUDA_VISIBLE_DEVICES"] = _gpus[int(_WORKER[2:]) % len(_gpus)]
# N xdist workers on C cores: each worker's CPU ops (references, error checks) get C // N threads;
# with torch's default of C threads each, N * C threads contend for C cores.
if _WORKER and "OMP_NUM_THREADS" not in os.environ:
    _n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _n))


def pytest_addoption(parser):
    group = parser.getgroup("flash")
    group.addoption("--kernel-source", default=os.environ.get("FLASH_KERNEL_SOURCE", "local"),
                    choices=["local", "local-env", "hub-cache"])
    group.addoption("--full-grid", action="store_true",
                    default=os.environ.get("FLASH_FULL_GRID", "") not in ("", "0"))
    group.addoption("--seed", type=int, default=None)
    group.addoption("--grid-summary", default=None, metavar="PATH")
    group.addoption("--shard", default=None, metavar="I/N")


def pytest_configure(config):
    seed = config.getoption("--seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
        # xdist hands the controller's options to its workers (started later), so every worker
        # draws the same inputs as the printed seed reproduces.
        config.option.seed = seed
    config.stash[SEED_KEY] = seed
    config.stash[RECORD_KEY] = []


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if not shard:
        return
    index, count = (int(x) for x in shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard {shard}: need 0 <= I < N")
    rank = {it.nodeid: r for r, it in enumerate(sorted(items, key=lambda it: it.nodeid))}
    keep = [it for it in items if rank[it.nodeid] % count == index]
    config.hook.pytest_deselected(items=[it for it in items if rank[it.nodeid] % count != index])
    items[:] = keep


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist controller: gather a finished worker's tolerance records (see pytest_sessionfinish)."""
    node.config.stash[RECORD_KEY].extend(getattr(node, "workeroutput", {}).get("flash_records", []))


def pytest_report_header(config):
    full = config.getoption("--full-grid")
    return [f"flash: seed={config.stash[SEED_KEY]} (reproduce with --seed), "
            f"kernel-source={config.getoption('--kernel-source')}, "
            f"grid={'full' if full else 'pairwise on CPU'}, "
            f"cuda={'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}"]


SEED_KEY = pytest.StashKey[int]()
RECORD_KEY = pytest.StashKey[list]()


# ----------------------------------------------------------------------------------------------
# The kernel


@pytest.fixture(scope="session")
def flash(request, tmp_path_factory):
    """The kernel module as users get it from `kernels`."""
    source = request.config.getoption("--kernel-source")
    try:
        if source == "local":
            return kernel_loader.load_local()
        if source == "local-env":
            return kernel_loader.load_local_env()
        return kernel_loader.load_hub_cache(tmp_path_factory.mktemp("hf_hub_cache"))
    except kernel_loader.BuildMissing as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def ops(flash):
    """torch.ops.<namespace> of the loaded kernel (the five custom ops)."""
    return kernel_loader.ops_of(flash)


@pytest.fixture
def fused_cuda(flash, monkeypatch):
    """The fused ops' public functions with their CUDA kernels switched on
    (flash_attn._fused_checks.CUDA_ENABLED, which a release may keep off while a kernel change
    waits for its GPU run)."""
    monkeypatch.setattr(flash._fused_checks, "CUDA_ENABLED", True)
    return flash


# ----------------------------------------------------------------------------------------------
# Devices and grids


def cuda_available():
    return torch.cuda.is_available()


def device_params():
    """'cpu', and 'cuda' (skipped without a CUDA device)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not cuda_available(), reason="needs a CUDA device"))]


def full_grid(config, device):
    return device == "cuda" or config.getoption("--full-grid")


def grid_params(config, axes, *, cpu_axes=None, cuda_axes=None, fast=None):
    """pytest.params of (device, case) for a grid.

    axes: the shared axis dict; cpu_axes/cuda_axes override entries per device (e.g. dtypes).
    CPU: pairwise unless --full-grid; CUDA: full product (one skipped param when no GPU).
    fast: predicate on a CPU case that adds the `fast` marker.
    """
    def slow(case):  # the large shapes: deselect with -m "not slow"
        return [pytest.mark.slow] if case.get("seqlens") in grid.SEQLENS_SLOW else []

    params = []
    cpu = dict(axes, **(cpu_axes or {}))
    for case in grid.combine(cpu, full_grid(config, "cpu")):
        marks = [pytest.mark.fast] if fast is not None and fast(case) else []
        params.append(pytest.param("cpu", case, id="cpu-" + grid.case_id(case),
                                   marks=marks + slow(case)))
    if cuda_available():
        cuda = dict(axes, **(cuda_axes or {}))
        for case in grid.combine(cuda, True):
            params.append(pytest.param("cuda", case, id="cuda-" + grid.case_id(case),
                                       marks=slow(case)))
    else:
        params.append(pytest.param("cuda", None, id="cuda",
                                   marks=pytest.mark.skip(reason="needs a CUDA device")))
    return params


# ----------------------------------------------------------------------------------------------
# Fresh inputs, poisoned allocations


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run, reproducible per test with --seed."""
    digest = hashlib.sha256(f"{request.config.stash[SEED_KEY]}:{request.node.nodeid}".encode())
    torch.manual_seed(int.from_bytes(digest.digest()[:8], "little"))


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Every torch.empty (ours included) comes back filled with NaN, so an output element the
    kernel never writes fails the NaN check instead of passing with stale memory."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("flash", f"random inputs of this run: reproduce with "
                                         f"--seed {item.config.stash[SEED_KEY]} {item.nodeid}"))


# ----------------------------------------------------------------------------------------------
# Tolerance rule and grid summary


class Tolerance:
    """Applies the tolerance rule (tests/reference.py, docs/testing.md) and records the error ratio for --grid-summary."""

    def __init__(self, request):
        self.records = request.config.stash[RECORD_KEY]
        self.nodeid = request.node.nodeid
        callspec = getattr(request.node, "callspec", None)
        self.device = callspec.params.get("device", "cpu") if callspec else "cpu"

    def check(self, name, ours, ref, pt, dtype, factor=2.0, context="", scale=None):
        ratio, msg = error_ratio(ours, ref, pt, dtype, factor, scale)
        self.records.append({"test": self.nodeid, "quantity": name, "device": self.device,
                             "dtype": grid.dtype_name(dtype), "ratio": ratio})
        assert ratio <= 1.0, f"{name}: {msg} {context}"
        return ratio


@pytest.fixture
def tol(request):
    return Tolerance(request)


def _git_sha():
    # FLASH_GIT_SHA names the revision where the tree travelled without its .git (the GPU
    # machine; git there may answer for another repository).
    if os.environ.get("FLASH_GIT_SHA"):
        return os.environ["FLASH_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=kernel_loader.REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the records over
        session.config.workeroutput["flash_records"] = session.config.stash[RECORD_KEY]
        return
    path = session.config.getoption("--grid-summary")
    if not path:
        return
    records = session.config.stash[RECORD_KEY]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    outcomes = {k: len(v) for k, v in (reporter.stats.items() if reporter else [])
                if k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    worst = {}
    for r in records:
        key = f"{r['device']}/{r['dtype']}"
        if key not in worst or r["ratio"] > worst[key]["ratio"]:
            worst[key] = dict(r)
    configs = sorted({r["test"] for r in records})
    summary = {
        "device": torch.cuda.get_device_name() if cuda_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_sha": _git_sha(),
        "seed": session.config.stash[SEED_KEY],
        "full_grid": session.config.getoption("--full-grid"),
        "exitstatus": int(exitstatus),
        "outcomes": outcomes,
        "shard": session.config.getoption("--shard"),
        "checks": len(records),
        "configs_run": len(configs),
        "worst_ratio_per_device_dtype": worst,
        "rule": "ratio = max|ours-ref| / (factor*max|pt-ref| + eps*max|ref|); pass iff <= 1",
        "configs": configs,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(summary, indent=1, default=str))
