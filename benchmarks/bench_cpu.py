"""The CPU backend against PyTorch's own CPU attention (`scaled_dot_product_attention`, which on
the CPU runs ATen's flash-attention kernel), in the same process on the same inputs.

Points: forward and forward+backward, fp32 and bf16, head dims 64 and 128, seqlen 512..8k,
causal and not, at each thread count of `--threads` (default: 2 and all cores of the machine).
Shape: batch = max(1, --tokens / seqlen) sequences of `seqlen` tokens, nheads = 1024 / hdim
(16 heads of 64, 8 of 128), MHA.

Timing (docs/benchmarking.md): wall time of one call (forward; or forward then backward of a
fixed random upstream gradient), after one untimed warm-up call of each peer. Peers are
interleaved: each repetition runs ours and SDPA once, the order alternating, so drift and the
other work of a shared machine fall on both alike. Reported: median ms of each, and the median
of the per-repetition time ratios ours / SDPA (< 1: ours is faster). The number of repetitions
adapts to the size of the point (at least 3, at most --reps, about --budget-s seconds a point).

SDPA is given the layout that is fastest for it: the inputs are (batch, seqlen, heads, hdim)
tensors (ours); SDPA gets either their transposed views or contiguous (batch, heads, seqlen,
hdim) copies, whichever ran faster (best of three) at the shortest seqlen of the same op, dtype,
head dim and mask (recorded per row as `sdpa_layout`).

Transformers check (`--hf`, on by default): tokens/s of all-MiniLM-L6-v2 sentence embeddings
(a padded batch: our varlen path) and of a small randomly initialised Llama prefill (one long
sequence, causal, GQA) with attn_implementation = ours and "sdpa" on the same model, fp32 and
bf16 (`--hf-dtypes`), interleaved rounds.

    python benchmarks/bench_cpu.py [--threads 2,16] [--quick] [--out PATH]

JSON: benchmarks/results/<machine>-cpu.json (`--out` overrides), machine = `cpu<cores>`
(the logical CPUs this process may use) unless --machine names it. It is rewritten after every
point with `"incomplete": true` until the run ends, so a run stopped early (e.g. under
`timeout`) keeps the points it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "hf_integration"))
from _measure import command_line, fwd_flops, git_sha, kernel_id, load_flash  # noqa: E402

F = torch.nn.functional.scaled_dot_product_attention
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns, reps_max, budget_s, reps_min=3):
    """fns: {name: callable}. One untimed warm-up each, then repetitions in alternating order.
    Returns {name: [seconds per repetition]}."""
    first = {n: timed(f) for n, f in fns.items()}
    reps = int(budget_s / max(1e-9, sum(first.values())))
    reps = max(reps_min, min(reps_max, reps))
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(timed(fns[n]))
    return times


def make_calls(flash, mode, dtype, batch, seqlen, nheads, hdim, causal):
    """(ours, {layout: sdpa}) zero-argument callables on the same inputs."""
    g = torch.Generator().manual_seed(seqlen * 1000 + hdim)
    q, k, v = (torch.randn(batch, seqlen, nheads, hdim, generator=g).to(dtype) for _ in range(3))
    layouts = {"bhsd_view": [x.transpose(1, 2) for x in (q, k, v)],
               "bhsd_contiguous": [x.transpose(1, 2).contiguous() for x in (q, k, v)]}
    if mode == "fwd":
        def ours():
            flash.flash_attn_func(q, k, v, causal=causal)

        def sdpa_of(t):
            return lambda: F(*t, is_causal=causal)
        return ours, {name: sdpa_of(t) for name, t in layouts.items()}

    dout = torch.randn(batch, seqlen, nheads, hdim, generator=g).to(dtype)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def ours():
        for x in (qg, kg, vg):
            x.grad = None
        flash.flash_attn_func(qg, kg, vg, causal=causal).backward(dout)

    def sdpa_of(t):
        leaves = [x.detach().clone().requires_grad_() for x in t]
        d = dout.transpose(1, 2)
        if t[0].is_contiguous():
            d = d.contiguous()

        def run():
            for x in leaves:
                x.grad = None
            F(*leaves, is_causal=causal).backward(d)
        return run
    return ours, {name: sdpa_of(t) for name, t in layouts.items()}


def pick_layout(sdpas):
    """The SDPA layout that runs faster: one warm-up and then the best of three timed calls each,
    alternating."""
    for f in sdpas.values():
        f()
    best = {n: float("inf") for n in sdpas}
    for _ in range(3):
        for n, f in sdpas.items():
            best[n] = min(best[n], timed(f))
    return min(best, key=best.get)


def attention_points(flash, args, threads, rows, save):
    """Appends each point's row to `rows` and calls save() after it (so that a run stopped
    early, e.g. by `timeout`, leaves the points it finished)."""
    for mode in args.modes:
        for dtype_name in args.dtypes:
            for hdim in args.hdims:
                for causal in (False, True):
                    layout = None  # picked at the shortest seqlen, kept for the longer ones
                    for seqlen in args.seqlens:
                        batch = max(1, args.tokens // seqlen)
                        nheads = max(1, 1024 // hdim)
                        ours, sdpas = make_calls(flash, mode, DTYPES[dtype_name], batch, seqlen,
                                                 nheads, hdim, causal)
                        if layout is None:
                            layout = pick_layout(sdpas)
                        sdpa = sdpas[layout]
                        t = interleaved({"ours": ours, "sdpa": sdpa}, args.reps, args.budget_s)
                        ratios = [a / b for a, b in zip(t["ours"], t["sdpa"])]
                        flops = fwd_flops(batch, nheads, hdim, seqlen, seqlen, causal)
                        if mode == "fwdbwd":
                            flops *= 3.5
                        ms = {n: statistics.median(v) * 1e3 for n, v in t.items()}
                        row = dict(threads=threads, op=mode, dtype=dtype_name, hdim=hdim,
                                   seqlen=seqlen, batch=batch, nheads=nheads, causal=causal,
                                   ms_ours=round(ms["ours"], 3), ms_sdpa=round(ms["sdpa"], 3),
                                   ratio=round(statistics.median(ratios), 4),
                                   gflops_ours=round(flops / ms["ours"] / 1e6, 2),
                                   gflops_sdpa=round(flops / ms["sdpa"] / 1e6, 2),
                                   reps=len(ratios), sdpa_layout=layout)
                        rows.append(row)
                        save()
                        print(json.dumps(row), flush=True)


# ---- Transformers ------------------------------------------------------------------------------


def hf_rounds(model, impls, run, reps):
    """Seconds per round for each implementation, interleaved (one warm-up each)."""
    for impl in impls:
        model.set_attn_implementation(impl)
        run()
    times = {i: [] for i in impls}
    for r in range(reps):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            model.set_attn_implementation(impl)
            times[impl].append(timed(run))
    return times


@torch.no_grad()
def transformers_check(args, threads):
    import flash_attn_hub
    from flash_attn_hub.testing import MINILM_SENTENCES, kernel_source, minilm_dir
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    ours = "flash_hub"
    flash_attn_hub.register(name=ours, source=kernel_source())
    out = {}
    impls = [ours, "sdpa"]

    def summarise(times, tokens, extra):
        tps = {i: tokens / statistics.median(v) for i, v in times.items()}
        res = dict(extra, threads=threads, tokens_per_call=tokens,
                   tokens_per_s={i: round(x, 1) for i, x in tps.items()},
                   ours_over_sdpa=round(tps[ours] / tps["sdpa"], 4),
                   seconds={i: [round(x, 5) for x in v] for i, v in times.items()})
        print(json.dumps({k: v for k, v in res.items() if k != "seconds"}), flush=True)
        return res

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    sentences = (MINILM_SENTENCES * (args.minilm_batch // len(MINILM_SENTENCES) + 1))
    sentences = sentences[:args.minilm_batch]
    batch = tok(sentences, padding=True, truncation=True, return_tensors="pt")
    ntok = int(batch["attention_mask"].sum())
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=8192)
    ids = torch.randint(0, cfg.vocab_size, (1, args.llama_seqlen),
                        generator=torch.Generator().manual_seed(0))
    for dtype_name in args.hf_dtypes:
        dtype = DTYPES[dtype_name]
        # MiniLM: sentence embeddings of a padded batch (varlen through our backend).
        model = AutoModel.from_pretrained(minilm_dir(), attn_implementation="sdpa",
                                          dtype=dtype).eval()
        times = hf_rounds(model, impls, lambda: model(**batch), args.hf_reps)
        out[f"minilm_{dtype_name}"] = summarise(times, ntok, dict(
            model="all-MiniLM-L6-v2", dtype=dtype_name, batch=len(sentences),
            padded_len=batch["input_ids"].shape[1]))
        # Small Llama prefill: one sequence, causal, GQA 8/2, head dim 64, random weights.
        torch.manual_seed(0)
        llama = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                                 dtype=dtype).eval()
        times = hf_rounds(llama, impls, lambda: llama(ids, use_cache=False, logits_to_keep=1),
                          args.hf_reps)
        out[f"llama_prefill_{dtype_name}"] = summarise(times, args.llama_seqlen, dict(
            model="LlamaConfig(hidden 512, 4 layers, 8/2 heads, head dim 64), random weights",
            dtype=dtype_name, batch=1, seqlen=args.llama_seqlen))
    flash_attn_hub.unregister(ours)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts (default: 2 and all cores)")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--hdims", default="64,128")
    ap.add_argument("--seqlens", default="512,2048,8192")
    ap.add_argument("--tokens", type=int, default=4096, help="batch x seqlen per point")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=20.0, help="about this long per point")
    ap.add_argument("--no-hf", dest="hf", action="store_false")
    ap.add_argument("--no-attn", dest="attn", action="store_false")
    ap.add_argument("--hf-reps", type=int, default=7)
    ap.add_argument("--minilm-batch", type=int, default=64)
    ap.add_argument("--llama-seqlen", type=int, default=2048)
    ap.add_argument("--hf-dtypes", default="fp32,bf16")
    ap.add_argument("--quick", action="store_true", help="fp32+bf16, hdim 64, seqlen 2048")
    ap.add_argument("--machine", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.hdims, args.seqlens = "64", "2048"
    args.modes = args.modes.split(",")
    args.dtypes = args.dtypes.split(",")
    args.hdims = [int(x) for x in args.hdims.split(",")]
    args.hf_dtypes = args.hf_dtypes.split(",")
    args.seqlens = [int(x) for x in args.seqlens.split(",")]
    n = cores()
    threads = ([int(x) for x in args.threads.split(",")] if args.threads
               else sorted({min(2, n), n}))
    machine = args.machine or f"cpu{n}"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{machine}-cpu.json"

    flash = load_flash(args.build, "cpu")
    result = dict(machine=machine, cpu=cpu_model(), cores=n, torch=torch.__version__,
                  cpu_capability=torch.backends.cpu.get_cpu_capability(), git_sha=git_sha(),
                  kernel_id=kernel_id(flash), command=command_line(sys.argv),
                  shape_rule="batch = max(1, tokens / seqlen), nheads = 1024 / hdim",
                  tokens=args.tokens, rows=[], transformers=[], incomplete=True)

    def save():
        """The JSON as it stands; `incomplete` stays true until the last point is written."""
        if result["rows"]:
            worst = max(result["rows"], key=lambda r: r["ratio"])
            result["worst_ratio"] = {k: worst[k] for k in ("threads", "op", "dtype", "hdim",
                                                           "seqlen", "causal", "ratio")}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    for nt in threads:
        torch.set_num_threads(nt)
        if args.attn:
            attention_points(flash, args, nt, result["rows"], save)
        if args.hf:
            result["transformers"].append(transformers_check(args, nt))
            save()
    del result["incomplete"]
    save()
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
