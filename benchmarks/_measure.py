"""How the benchmark tools measure: the one timer of kernel calls, the one wall-clock timer of
end-to-end steps, the one FLOP count, the one byte count of decode, and the run metadata every
result file records.

The rules behind them (exact attended area, medians over CUDA events, peers in the same run) are
written out in docs/benchmarking.md; a tool that needs another kind of number adds it here.
"""
import json
import os
from pathlib import Path
import statistics
import subprocess
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


# ---- FLOP count ---------------------------------------------------------------------------------


def visible_pairs(seqlen_q, seqlen_k, causal):
    """(query, key) pairs one head attends to; causal is bottom-right aligned, so row i sees keys
    [0, i + seqlen_k - seqlen_q] (none when that is negative)."""
    if not causal:
        return seqlen_q * seqlen_k
    return sum(min(seqlen_k, max(0, i + seqlen_k - seqlen_q + 1)) for i in range(seqlen_q))


def fwd_flops(batch, nheads, hdim, seqlen_q, seqlen_k, causal):
    """Forward FLOPs over the exact attended area: two matmuls (QK^T and PV) of 2*d FLOPs per
    visible pair. Masked-out pairs are not counted, so causal at seqlen_q == seqlen_k is about half
    of the full square."""
    return 4 * batch * nheads * hdim * visible_pairs(seqlen_q, seqlen_k, causal)


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12 if ms and ms > 0 else None


# ---- decode bytes -------------------------------------------------------------------------------


def kv_bytes(batch, seqlen_k, nheads_k, hdim, dtype):
    """Bytes of K and V a decode step must read: every cached key and value once per KV head.
    Query, output and page-table bytes are negligible beside them and not counted; a peer that
    reads K/V expanded to every query head still gets this count, so its GB/s compare directly."""
    return 2 * batch * seqlen_k * nheads_k * hdim * torch.empty((), dtype=dtype).element_size()


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else None


# ---- timers -------------------------------------------------------------------------------------


def kernel_ms(fn):
    """Median milliseconds of fn() on the current CUDA stream: triton's do_bench (CUDA events,
    25 ms of warm-up, 100 ms of repetitions, the L2 cache flushed before each repetition), after
    one untimed call that absorbs lazy initialisation."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn):
    """Median milliseconds of fn() replayed from a CUDA graph: the device time of its kernels
    without the host's launch work (python, dispatch, argument checks), which kernel_ms includes
    whenever it outlasts the L2 flush before each repetition. Same do_bench protocol around
    graph.replay(); fn is warmed up on a side stream first, as capture requires."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def event_ms(fn):
    """Milliseconds of one call of fn() between two CUDA events on the current stream, the device
    synchronised before and after; no warm-up, repetition or L2 flush. The timer of one step of a
    multi-process run: the caller repeats it the same number of times on every process, behind a
    barrier, and takes the slowest process's time per step (bench_context_parallel.py)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def wall_s(fn):
    """Seconds of one call of fn(), the device synchronised before and after: the end-to-end
    timer, where host work between kernels is part of what is measured."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def wall_s_and_peak_mib(fn, device):
    """(wall_s of one call of fn, the MiB it allocated at its peak beyond what was live before it
    (torch.cuda.max_memory_allocated), None off CUDA)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    seconds = wall_s(fn)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    return seconds, peak


def median_wall_s(fn, reps):
    """Median of `reps` wall_s timings after one untimed warm-up call."""
    fn()
    return statistics.median(wall_s(fn) for _ in range(reps))


# ---- run metadata -------------------------------------------------------------------------------


def git_sha():
    """HEAD of this checkout. FLASH_GIT_SHA (or GIT_SHA) names it where the tree travelled without
    its .git: git there may answer for an enclosing repository, so its answer counts only when its
    top level is this tree."""
    named = os.environ.get("FLASH_GIT_SHA") or os.environ.get("GIT_SHA")
    if named:
        return named
    try:
        top, sha = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=ROOT,
                                  capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError, ValueError):
        return "unknown"
    return sha if os.path.realpath(top) == os.path.realpath(ROOT) else "unknown"


def clocks():
    """nvidia-smi's SM/memory clocks, power and temperature (CSV), or why they are unavailable."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm,"
                               "power.draw,temperature.gpu", "--format=csv"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # no driver tools on this machine: record why
        return str(e)


def device_slug(device="cuda"):
    """The device as result file names spell it: `h200` for "NVIDIA H200", `cpu` off the GPU."""
    if device != "cuda":
        return "cpu"
    return torch.cuda.get_device_name().lower().replace("nvidia ", "").replace(" ", "-")


def command_line(argv):
    """The command that wrote a result file, its script path relative to the repository."""
    return " ".join(["python", repo_relative(argv[0])] + list(argv[1:]))


def load_flash(build, device="cuda"):
    """The kernel as users load it: kernels.get_local_kernel on build/'s CUDA or CPU variant."""
    import kernels
    kind = "cu" if device == "cuda" else "cpu"
    variants = sorted(Path(build).glob(f"torch-stable-abi*-{kind}*"))
    if not variants:
        raise SystemExit(f"no {device} variant under {build}: run tools/build_local.py "
                         f"--variant {device}")
    return kernels.get_local_kernel(variants[-1])


def kernel_id(module):
    """The build id (`metadata.json` "id", e.g. `_flash_attn_cuda_<hash>`) of a kernel module
    loaded through `kernels`: names exactly which build was measured."""
    meta = os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "metadata.json")
    with open(meta) as f:
        return json.load(f)["id"]


def repo_relative(path):
    """A path as result files record it: relative to the repository root."""
    return os.path.relpath(os.path.abspath(path), ROOT)
