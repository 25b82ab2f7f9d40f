"""Context parallelism on N GPUs: forward+backward of ring-flash-attn's ring, zigzag ring and
llama3 (varlen, all-gather) attention over this kernel, against the same library over PyTorch's
own FlashAttention-2 in the same run, with scaling efficiency against one GPU and a correctness
check against one GPU (method and fields: docs/benchmarking.md).

    torchrun --nproc-per-node N benchmarks/bench_context_parallel.py --build build
    python benchmarks/bench_context_parallel.py --nproc N --build build      # starts N processes
    python benchmarks/bench_context_parallel.py --device cpu                 # smoke: 2 gloo procs

Points (GPU defaults): total tokens 32k, 128k, 512k in one causal sequence, batch 1, bf16, head
dim 128, 32 query / 8 KV heads; each of the N processes (NCCL, one per GPU) holds total/N tokens
in the layout its function expects (ring: consecutive slices; zigzag: slices r and 2N-1-r of 2N;
llama3: consecutive slices of a one-document varlen batch, K/V all-gathered `--heads-k-stride`
KV heads at a time).

Two `flash_attn` modules, one process: ring-flash-attn binds
`from flash_attn.flash_attn_interface import _flash_attn_forward, ...` into each of its modules at
import time. So the library is imported twice: once with the peer installed as `flash_attn`
(benchmarks/sdpa_flash_attn.py: FlashAttention-2.8's internal functions on SDPA's flash ops),
once with this kernel (flash_attn_hub.as_flash_attn.install); between the imports its modules
are dropped from sys.modules. Each import is a separate set of module objects whose functions
keep their own binding, so both rings live side by side and are timed interleaved (ours, peer,
peer, ours, ...), which keeps clock and temperature drift out of the ratio. The bindings are
asserted after each import.

Timing: one step = forward + backward (torch.autograd.grad) of the function on this process's
shard. Every process runs the same steps; before each, a barrier; each process times its step
with CUDA events (`_measure.event_ms`) and the step's time is the slowest process's. After
`--warmup` steps per implementation, the number of repetitions is fitted to `--budget-s` per
point (between `--min-reps` and `--max-reps`, the same on every process) and the median is kept.
TFLOP/s per GPU = 3.5 x the forward FLOPs of the whole causal sequence (exact attended area,
`_measure.fwd_flops`) / N / median time. The single-GPU baseline (`flash_attn_func` of each
implementation on total/N tokens, same heads, causal) is timed the same way on rank 0's GPU while
the other processes wait; scaling efficiency = per-GPU TFLOP/s of the ring / the baseline's.

Correctness (`--check-length`, default 32k; 0 skips): every process builds the same full
sequence, runs it in one process three ways (PyTorch SDPA in fp32 as the reference: memory-
efficient backend on CUDA, math on the CPU; SDPA's FlashAttention-2 in bf16 as the "same math in
the input dtype"; this kernel's flash_attn_func in bf16), runs each ring function with each
implementation and compares its shard of out, dq, dk, dv with the same shard of those; maxima are
taken over the processes (the same as comparing gathered tensors). Reported: max|ring - single
kernel run| and the suite's rule with an fp32 reference (docs/testing.md): max|ring - ref32| <=
2x (out) or 3x (grads) max|sdpa_bf16 - ref32| + one bf16 rounding step of max|ref32|.

`--device cpu` runs tiny shapes on gloo processes against SDPA's CPU flash kernel: a smoke test
that keeps the script working where there is no GPU (tests/test_bench_context_parallel.py), not a
measurement.

Writes benchmarks/results/<gpu>x<N>-context-parallel.json unless --out is given (`--append`
merges into an existing file: one length or function per run where a run would be too long);
prints a table last.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import socket
import statistics
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import sdpa_flash_attn  # noqa: E402
from _measure import (clocks, command_line, device_slug, event_ms, fwd_flops,  # noqa: E402
                      git_sha, kernel_id, tflops, wall_s)

# ring-flash-attn 0.1.8 calls all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13
# deprecates with a warning at every call.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

FUNCTIONS = ("ring", "zigzag", "llama3")
IMPLS = ("ours", "peer")
QUANTITIES = ("out", "dq", "dk", "dv")
FWD_BWD = 3.5  # forward + backward FLOPs over forward FLOPs (docs/benchmarking.md)
DEFAULTS = {
    "cuda": dict(lengths="32k,128k,512k", heads="32/8", hdim=128, check_length=32768,
                 budget_s=20.0, min_reps=3, max_reps=20, nproc=None),
    "cpu": dict(lengths="128,256", heads="4/2", hdim=32, check_length=128, budget_s=0.5,
                min_reps=2, max_reps=2, nproc=2),
}


def parse_length(text):
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


# ---- ring-flash-attn bound to one `flash_attn` --------------------------------------------------


def import_ring_flash_attn(flash_module):
    """A fresh import of ring_flash_attn whose modules call `flash_module`'s internal functions."""
    from flash_attn_hub.as_flash_attn import install

    for name in [n for n in sys.modules if n.split(".")[0] == "ring_flash_attn"]:
        del sys.modules[name]
    install(flash_module)
    rfa = importlib.import_module("ring_flash_attn")
    api = flash_module.flash_attn_interface
    for sub, fn in (("ring_flash_attn", "_flash_attn_forward"),
                    ("zigzag_ring_flash_attn", "_flash_attn_backward"),
                    ("llama3_flash_attn_varlen", "_flash_attn_varlen_forward")):
        bound = getattr(sys.modules[f"ring_flash_attn.{sub}"], fn)
        assert bound is getattr(api, fn), f"ring_flash_attn.{sub}.{fn} is not {flash_module}'s"
    return rfa


# ---- one ring step ------------------------------------------------------------------------------


def shard(x, function, rank, world, dim=1):
    """This process's tokens of a full (batch, seqlen, ...) tensor in `function`'s layout."""
    if function == "zigzag":
        chunks = x.chunk(2 * world, dim=dim)
        return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)
    return x.chunk(world, dim=dim)[rank]


class Point:
    """The ring call of one function at one total length on this process."""

    def __init__(self, rfa, function, total, rank, world, group, heads_k_stride):
        self.rfa, self.function, self.group = rfa, function, group
        self.heads_k_stride = heads_k_stride
        if function == "llama3":
            cu = torch.tensor([0, total], dtype=torch.int32, device=_device())
            self.varlen = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, causal=True, rank=rank,
                                                                     world_size=world)

    def __call__(self, q, k, v, dout):
        """(out, dq, dk, dv) of this shard; q/k/v (1, tokens, heads, dim) leaves."""
        if self.function == "llama3":
            cu_q, cu_k, max_q, max_k, k_slice = self.varlen
            inputs = [x[0] for x in (q, k, v)]  # varlen views (tokens, heads, dim)
            out = self.rfa.llama3_flash_attn_varlen_func(
                *inputs, cu_q, cu_k, max_q, max_k, heads_k_stride=self.heads_k_stride,
                local_k_slice=k_slice, causal=True, group=self.group)[None]
        else:
            fn = {"ring": self.rfa.ring_flash_attn_func,
                  "zigzag": self.rfa.zigzag_ring_flash_attn_func}[self.function]
            out = fn(q, k, v, causal=True, group=self.group)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if _on_cuda() else torch.device("cpu")


def _on_cuda():
    return dist.get_backend() == "nccl"


def random_inputs(tokens, heads, heads_k, hdim, dtype, gen=None):
    """q, k, v (leaves requiring grad) and dout, (1, tokens, heads, hdim), on this device."""
    shapes = [(1, tokens, h, hdim) for h in (heads, heads_k, heads_k, heads)]
    out = [torch.randn(s, generator=gen).to(_device(), dtype) if gen is not None
           else torch.randn(s, device=_device(), dtype=dtype) for s in shapes]
    return [x.requires_grad_() for x in out[:3]] + [out[3]]


# ---- timing -------------------------------------------------------------------------------------


def step_ms(fn, collective):
    """(slowest process's ms, ms of every process) of one fn() started together everywhere."""
    if collective:
        dist.barrier()
    ms = event_ms(fn) if _on_cuda() else 1e3 * wall_s(fn)
    if not collective:
        return ms, [ms]
    t = torch.tensor([ms], dtype=torch.float64, device=_device())
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    per_rank = [p.item() for p in parts]
    return max(per_rank), per_rank


def time_steps(steps, args, collective=True):
    """{name: {ms, ms_ranks, reps}} for named step functions, interleaved in rotating order."""
    names = list(steps)
    estimate = 0.0
    for name in names:
        for _ in range(args.warmup):
            ms, _ = step_ms(steps[name], collective)
        estimate += ms
    reps = int(args.budget_s * 1e3 * len(names) / max(estimate, 1e-3))
    reps = max(args.min_reps, min(args.max_reps, reps))
    samples = {name: [] for name in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(step_ms(steps[name], collective))
    return {name: dict(ms=statistics.median(s[0] for s in got),
                       ms_ranks=[statistics.median(s[1][i] for s in got)
                                 for i in range(len(got[0][1]))],
                       reps=reps)
            for name, got in samples.items()}


def single_gpu(singles, tokens, args, dtype, rank):
    """Rank 0 times flash_attn_func of each implementation on `tokens` (causal, fwd+bwd) while
    the others wait; every process gets {impl: {ms, reps}}."""
    result = [None]
    if rank == 0:
        q, k, v, dout = random_inputs(tokens, args.nheads, args.nheads_k, args.hdim, dtype)
        steps = {name: (lambda f=f: torch.autograd.grad(f(q, k, v, causal=True), (q, k, v), dout))
                 for name, f in singles.items()}
        result[0] = {n: dict(ms=t["ms"], reps=t["reps"])
                     for n, t in time_steps(steps, args, collective=False).items()}
        del q, k, v, dout
    dist.broadcast_object_list(result, src=0)
    return result[0]


# ---- correctness --------------------------------------------------------------------------------


def full_attention(q, k, v, dout, dtype, backend):
    """out, dq, dk, dv of causal SDPA on the full sequence in `dtype` with one backend; K/V are
    expanded to every query head as leaves and their gradients summed over the group in fp32."""
    group = q.shape[2] // k.shape[2]
    leaves = [x.detach().to(dtype).transpose(1, 2) for x in (q, k, v)]
    leaves[1:] = [x.repeat_interleave(group, dim=1) for x in leaves[1:]]
    leaves = [x.requires_grad_() for x in leaves]
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(*leaves, is_causal=True)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype).transpose(1, 2))
    dq, dk, dv = (g.transpose(1, 2) for g in grads)
    dk, dv = (g.float().unflatten(2, (k.shape[2], group)).sum(3).to(dtype) for g in (dk, dv))
    return [out.detach().transpose(1, 2), dq, dk, dv]


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def check(rings, kernel, args, dtype, rank, world, group):
    """The correctness block of the result file (see the module docstring)."""
    length = args.check_length
    gen = torch.Generator().manual_seed(args.seed)  # the same full tensors on every process
    q, k, v, dout = random_inputs(length, args.nheads, args.nheads_k, args.hdim, dtype, gen)
    cuda = _on_cuda()
    ref_backend = SDPBackend.EFFICIENT_ATTENTION if cuda else SDPBackend.MATH
    ref = full_attention(q, k, v, dout, torch.float32, ref_backend)
    pt = full_attention(q, k, v, dout, dtype, SDPBackend.FLASH_ATTENTION)
    out = kernel.flash_attn_func(q, k, v, causal=True)
    single = [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]
    scale = {"out": ref[0].abs().max().item(),
             **dict.fromkeys(QUANTITIES[1:], max(g.abs().max().item() for g in ref[1:]))}
    step = torch.finfo(dtype).eps
    pt_err = {n: max_diff(pt[i], ref[i]) for i, n in enumerate(QUANTITIES)}
    bound = {n: (2.0 if n == "out" else 3.0) * pt_err[n] + step * scale[n] for n in QUANTITIES}
    single_err = {n: max_diff(single[i], ref[i]) for i, n in enumerate(QUANTITIES)}
    doc = dict(total_tokens=length, per_gpu_tokens=length // world,
               reference="torch SDPA fp32, " + ("memory-efficient" if cuda else "math")
               + " backend, K/V expanded; gradients of K/V summed over the group in fp32",
               pt="torch SDPA flash backend (FlashAttention-2) in bf16",
               rule="max|x - ref32| <= 2 (out) or 3 (grads) * max|pt - ref32| + eps(bf16) * "
                    "max|ref32| (grads: max over dq, dk, dv)",
               pt_err=pt_err, bound=bound,
               single_ours=dict(err=single_err,
                                ratio={n: single_err[n] / bound[n] for n in QUANTITIES}),
               functions={})
    for function in args.functions:
        doc["functions"][function] = {}
        for impl, rfa in rings.items():
            point = Point(rfa, function, length, rank, world, group, args.heads_k_stride)
            local = [shard(x, function, rank, world).detach().clone().requires_grad_()
                     for x in (q, k, v)]
            got = point(*local, shard(dout, function, rank, world))
            errs = torch.tensor([[max_diff(got[i], shard(t[i], function, rank, world))
                                  for i in range(4)] for t in (ref, single)],
                                dtype=torch.float64, device=_device())
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            err = dict(zip(QUANTITIES, errs[0].tolist()))
            doc["functions"][function][impl] = dict(
                err=err, ratio={n: err[n] / bound[n] for n in QUANTITIES},
                diff_vs_single_ours=dict(zip(QUANTITIES, errs[1].tolist())))
            del got, local
    del q, k, v, dout, ref, pt, single
    return doc


# ---- the run ------------------------------------------------------------------------------------


def run(rank, world, args):
    on_cuda = args.device == "cuda"
    options = dict(timeout=timedelta(minutes=30))  # rank 0's single-GPU phase: minutes at 512k
    if on_cuda:
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(local)
        options["device_id"] = local
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if on_cuda else "gloo", rank=rank, world_size=world,
                            **options)
    group = dist.group.WORLD
    dtype = torch.bfloat16
    for total in args.lengths:
        if total % (2 * world):
            raise SystemExit(f"total length {total} is not a multiple of 2 x {world} processes")

    import flash_attn_hub

    kernel, _ = flash_attn_hub.load(args.build)
    singles = {"ours": kernel.flash_attn_func}
    rings, peer_gqa = {}, None
    if not args.no_peer:
        if args.peer_gqa == "auto":
            native, why = sdpa_flash_attn.probe_native_gqa(_device(), dtype)
            peer_gqa = "native" if native else f"expanded ({why})"
        else:
            native, peer_gqa = args.peer_gqa == "native", args.peer_gqa
        sdpa_flash_attn.use_expanded_kv(not native)
        rings["peer"] = import_ring_flash_attn(sdpa_flash_attn)
        singles["peer"] = sdpa_flash_attn.flash_attn_func
    rings["ours"] = import_ring_flash_attn(kernel)  # last: `flash_attn` is the kernel from here
    rings = {impl: rings[impl] for impl in IMPLS if impl in rings}
    singles = {impl: singles[impl] for impl in IMPLS if impl in singles}

    name = torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu"
    gpus = [None] * world
    dist.all_gather_object(gpus, name)
    if rank == 0:
        print(f"# {world} x {name}, torch {torch.__version__}, kernel {kernel_id(kernel)}, "
              f"peer GQA {peer_gqa}", flush=True)
    clocks_before = clocks() if on_cuda and rank == 0 else None

    checked = check(rings, kernel, args, dtype, rank, world, group) if args.check_length else None
    if checked and rank == 0:
        print(json.dumps(dict(check=checked), indent=None)[:4000], flush=True)
    if on_cuda:
        torch.cuda.empty_cache()

    rows, baselines = [], {}
    for total in args.lengths:
        tokens = total // world
        if tokens not in baselines:
            baselines[tokens] = single_gpu(singles, tokens, args, dtype, rank)
            if on_cuda:
                torch.cuda.empty_cache()
        base = baselines[tokens]
        flops = FWD_BWD * fwd_flops(1, args.nheads, args.hdim, total, total, True)
        flops_single = FWD_BWD * fwd_flops(1, args.nheads, args.hdim, tokens, tokens, True)
        q, k, v, dout = random_inputs(tokens, args.nheads, args.nheads_k, args.hdim, dtype)
        for function in args.functions:
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            points = {impl: Point(rfa, function, total, rank, world, group, args.heads_k_stride)
                      for impl, rfa in rings.items()}
            timed = time_steps({impl: (lambda p=p: p(q, k, v, dout)) for impl, p in
                                points.items()}, args)
            peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if on_cuda else 0.0],
                                device=_device(), dtype=torch.float64)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            row = dict(total_tokens=total, per_gpu_tokens=tokens, function=function,
                       flops_per_gpu=flops / world, single_gpu_flops=flops_single)
            for impl in IMPLS:
                t, b = timed.get(impl), base.get(impl)
                row[impl] = tflops(flops / world, t["ms"]) if t else None
                row[f"single_{impl}"] = tflops(flops_single, b["ms"]) if b else None
                eff = (row[impl] / row[f"single_{impl}"]
                       if row[impl] and row[f"single_{impl}"] else None)
                row["scaling_efficiency" if impl == "ours" else "peer_scaling_efficiency"] = eff
                row[f"ms_{impl}"] = t["ms"] if t else None
                row[f"ms_{impl}_ranks"] = t["ms_ranks"] if t else None
                row[f"ms_single_{impl}"] = b["ms"] if b else None
            row["ours_over_peer"] = (row["ours"] / row["peer"]) if row["peer"] else None
            row["reps"] = timed["ours"]["reps"]
            row["peak_gib"] = peak.item() if on_cuda else None
            row["check"] = (checked["functions"][function]
                            if checked and total == args.check_length else None)
            rows.append(row)
            if rank == 0:
                print(json.dumps({key: round(val, 4) if isinstance(val, float) else val
                                  for key, val in row.items() if key != "check"}), flush=True)
        del q, k, v, dout
        if on_cuda:
            torch.cuda.empty_cache()

    if rank == 0:
        doc = {
            "gpu": name, "gpus": gpus, "world": world, "device": args.device,
            "backend": "nccl" if on_cuda else "gloo", "torch": torch.__version__,
            "cuda": torch.version.cuda, "kernels": _version("kernels"),
            "ring_flash_attn": _version("ring-flash-attn"), "kernel_id": kernel_id(kernel),
            "git_sha": git_sha(), "command": args.command, "dtype": "bfloat16", "batch": 1,
            "nheads": args.nheads, "nheads_k": args.nheads_k, "hdim": args.hdim, "causal": True,
            "heads_k_stride": args.heads_k_stride,
            "peer": None if args.no_peer else (
                "ring-flash-attn over benchmarks/sdpa_flash_attn.py: FlashAttention-2.8's "
                "internal functions on torch's SDPA flash ops"),
            "peer_gqa": peer_gqa,
            "timing": ("per step: barrier, CUDA events around forward+backward on every "
                       "process, the slowest process's time; median over interleaved steps "
                       "after warm-up" if on_cuda else "wall time (smoke run)"),
            "units": "TFLOP/s per GPU: 3.5 x causal forward FLOPs of the whole sequence / "
                     "world / median step time; single_*: flash_attn_func on per_gpu_tokens "
                     "on rank 0's GPU",
            "clocks_before": clocks_before, "clocks_after": clocks() if on_cuda else None,
            "check": checked, "rows": rows,
        }
        out = args.out or (ROOT / "benchmarks" / "results"
                           / f"{device_slug(args.device)}x{world}-context-parallel.json")
        if args.append and Path(out).exists():
            doc = merged(json.loads(Path(out).read_text()), doc)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")
        table(doc)
        print(f"wrote {out}")
    dist.destroy_process_group()


def merged(old, new):
    """`new` with the rows of `old` at points it did not run (same GPUs, world and shapes)."""
    for key in ("gpu", "world", "nheads", "nheads_k", "hdim", "heads_k_stride"):
        if old.get(key) != new[key]:
            raise SystemExit(f"--append: {key} {old.get(key)!r} in the file, {new[key]!r} here")
    ran = {(r["total_tokens"], r["function"]) for r in new["rows"]}
    new["rows"] = sorted([r for r in old["rows"] if (r["total_tokens"], r["function"]) not in ran]
                         + new["rows"], key=lambda r: (r["total_tokens"],
                                                       FUNCTIONS.index(r["function"])))
    new["check"] = new["check"] or old.get("check")
    new["previous_runs"] = old.get("previous_runs", []) + [
        dict(command=old["command"], git_sha=old["git_sha"])]
    return new


def _version(dist_name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None


def table(doc):
    def f(x, fmt="8.1f"):
        return format(x, fmt) if x is not None else format("-", ">" + fmt.split(".")[0] + "s")
    print(f"\n{doc['world']} x {doc['gpu']}: TFLOP/s per GPU (fwd+bwd, causal); eff = over one "
          "GPU at the same per-GPU length (target >= 0.85 at 4 GPUs, 128k; ours/peer >= 1.1)")
    print(f"{'total':>8} {'per-gpu':>8} {'function':>8} {'ours':>8} {'peer':>8} {'o/p':>6} "
          f"{'1gpu-o':>8} {'eff-o':>6} {'1gpu-p':>8} {'eff-p':>6}")
    for r in doc["rows"]:
        print(f"{r['total_tokens']:>8} {r['per_gpu_tokens']:>8} {r['function']:>8} "
              f"{f(r['ours'])} {f(r['peer'])} {f(r['ours_over_peer'], '6.3f')} "
              f"{f(r['single_ours'])} {f(r['scaling_efficiency'], '6.3f')} "
              f"{f(r['single_peer'])} {f(r['peer_scaling_efficiency'], '6.3f')}")
    c = doc.get("check")
    if c:
        print(f"\ncheck at {c['total_tokens']} tokens: ratio to the bound (<= 1 passes), "
              "max|ring - single-GPU kernel|")
        for function, impls in c["functions"].items():
            for impl, e in impls.items():
                print(f"  {function:>7} {impl:>5}: " + "  ".join(
                    f"{n} {e['ratio'][n]:.2f} ({e['diff_vs_single_ours'][n]:.2e})"
                    for n in QUANTITIES))
        print("  single-GPU kernel: " + "  ".join(
            f"{n} {c['single_ours']['ratio'][n]:.2f}" for n in QUANTITIES))


def worker(rank, world, args, port=None):
    if port is not None:  # started by this script, not by torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    run(rank, world, args)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda: NCCL, one process per GPU; cpu: gloo smoke run")
    ap.add_argument("--build", type=Path, default=ROOT / "build",
                    help="the kernel to measure: repository root, build/ or one variant")
    ap.add_argument("--nproc", type=int, help="processes to start (ignored under torchrun; "
                    "default: every visible GPU, or 2 on the CPU)")
    ap.add_argument("--lengths", help="total tokens, comma separated (32k = 32768)")
    ap.add_argument("--functions", default=",".join(FUNCTIONS),
                    help=f"subset of {','.join(FUNCTIONS)}")
    ap.add_argument("--heads", help="query/KV heads, e.g. 32/8")
    ap.add_argument("--hdim", type=int)
    ap.add_argument("--heads-k-stride", type=int, default=1,
                    help="llama3: KV heads all-gathered per step")
    ap.add_argument("--check-length", type=int,
                    help="total tokens of the correctness check (0: none)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation")
    ap.add_argument("--budget-s", type=float, help="timed seconds per implementation and point")
    ap.add_argument("--min-reps", type=int)
    ap.add_argument("--max-reps", type=int)
    ap.add_argument("--no-peer", action="store_true", help="time only ours")
    ap.add_argument("--peer-gqa", choices=["auto", "native", "expand"], default="auto",
                    help="peer GQA: native if the op takes it (auto), or K/V expanded per call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing --out file (rows of other points are kept)")
    args = ap.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.lengths = [parse_length(x) for x in str(args.lengths).split(",")]
    args.functions = [x.strip() for x in args.functions.split(",")]
    if not set(args.functions) <= set(FUNCTIONS):
        ap.error(f"--functions: choose from {FUNCTIONS}")
    args.nheads, args.nheads_k = (int(x) for x in args.heads.split("/"))
    args.warmup = max(1, args.warmup)
    args.command = command_line([__file__] + list(argv))
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_context_parallel.py --device cuda needs CUDA GPUs (--device cpu: smoke run)",
              file=sys.stderr)
        return 2
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return 0
    nproc = args.nproc or torch.cuda.device_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(nproc, args, port), nprocs=nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
