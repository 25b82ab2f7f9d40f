"""End-to-end Transformers benchmark on the GPU: our backend vs SDPA (vs flash_attention_2 when the
flash_attn package is importable), measured in the same run on the same model.

Model: a ~1.2B-parameter Llama config (Llama-3.2-1B shapes: hidden 2048, 16 layers, 32 query /
8 KV heads, head dim 64, vocab 128256) with random bf16 weights, built on the GPU (nothing is
downloaded). Backends are switched on the one model with `set_attn_implementation`.

* prefill: batch 8 x 4096 tokens, one forward with `logits_to_keep=1` (the full 8x4096x128k
  logits would dominate time and memory and say nothing about attention); tokens/s = 32768 / t.
* decode: batch 32, a 2048-token context prefilled once (untimed), then `--decode-steps` greedy
  steps with the KV cache; tokens/s = 32 * steps / t. The cache is cropped back to 2048 before
  each repetition so every repetition decodes at the same context length.

Times are medians over `--reps` repetitions after a warm-up, with CUDA synchronisation. Prefill
is timed in interleaved rounds (each backend once per round, rotating order), so drift in clocks
or temperature cannot favour the backend that happens to run first; the JSON keeps every round.
JSON goes to benchmarks/results/<gpu>-e2e.json (gpu, versions, git SHA, config, results).

    python benchmarks/bench_e2e.py --build build
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import git_sha, median_wall_s, wall_s  # noqa: E402

OURS = "flash_hub"


def llama_1b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                       num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
                       rope_theta=500000.0)


@torch.no_grad()
def prefill_rounds(model, impls, batch, seqlen, reps, gen):
    """Prefill wall times per backend, interleaved: every round times each backend once (the
    order rotating), so clock and thermal drift fall on all of them alike. Returns the times
    (seconds) per backend, round by round."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=model.device,
                        generator=gen)
    for impl in impls:                     # warm-up (also triggers lazy kernel loading)
        model.set_attn_implementation(impl)
        model(ids, use_cache=False, logits_to_keep=1)
    times = {impl: [] for impl in impls}
    for r in range(reps):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            model.set_attn_implementation(impl)
            times[impl].append(wall_s(lambda: model(ids, use_cache=False, logits_to_keep=1)))
    return times


@torch.no_grad()
def decode_tps(model, batch, context, steps, reps, gen):
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=model.device,
                        generator=gen)
    cache = DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:].argmax(-1)

    def run():
        extra = cache.get_seq_length() - context      # drop the previous repetition's steps
        if extra:
            cache.crop(-extra)
        nxt = first
        for _ in range(steps):
            logits = model(nxt, past_key_values=cache, use_cache=True).logits
            nxt = logits[:, -1:].argmax(-1)

    t = median_wall_s(run, reps)
    return batch * steps / t


@torch.no_grad()
def prefill_profile(model, batch, seqlen, gen, top=8):
    """CUDA time of one prefill by kernel (torch.profiler): where the time goes, per backend."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), device=model.device,
                        generator=gen)
    model(ids, use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()
            if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return {"total_ms": sum(r[1] for r in rows),
            "top": [{"kernel": k[:120], "ms": ms, "calls": n} for k, ms, n in rows[:top]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, default=ROOT / "build")
    ap.add_argument("--prefill", default="8x4096", help="batch x seqlen")
    ap.add_argument("--decode", default="32x2048", help="batch x context")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also record the CUDA time of one prefill by kernel for each backend")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_e2e.py needs a CUDA GPU", file=sys.stderr)
        return 2

    import kernels
    import transformers
    from transformers import AutoModelForCausalLM

    import flash_attn_hub

    module = flash_attn_hub.register(name=OURS, source=args.build)
    kernel_id = Path(module.__file__).resolve().parent.joinpath("metadata.json")
    kernel_id = json.loads(kernel_id.read_text())["id"]
    impls = ["sdpa", OURS]
    if importlib.util.find_spec("flash_attn") is not None:
        impls.append("flash_attention_2")
    cfg = llama_1b()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").eval()
    params = sum(p.numel() for p in model.parameters())
    pb, ps = map(int, args.prefill.split("x"))
    db, dc = map(int, args.decode.split("x"))
    print(f"{torch.cuda.get_device_name()}: Llama {params / 1e9:.2f}B bf16; "
          f"prefill {pb}x{ps}, decode {db}x{dc} ({args.decode_steps} steps)")

    results, profiles = {}, {}
    pre_times = prefill_rounds(model, impls, pb, ps, args.reps,
                               torch.Generator(device="cuda").manual_seed(0))
    for impl in impls:
        model.set_attn_implementation(impl)
        gen = torch.Generator(device="cuda").manual_seed(1)
        pre = pb * ps / statistics.median(pre_times[impl])
        dec = decode_tps(model, db, dc, args.decode_steps, args.reps, gen)
        results[impl] = {"prefill_tokens_per_s": pre, "decode_tokens_per_s": dec,
                         "prefill_seconds_by_round": pre_times[impl]}
        print(f"  {impl:<18} prefill {pre:>12,.0f} tok/s   decode {dec:>10,.0f} tok/s", flush=True)
        if args.profile:
            prof = prefill_profile(model, pb, ps, gen)
            profiles[impl] = prof
            print(f"    one prefill: {prof['total_ms']:.1f} ms of CUDA time")
            for r in prof["top"]:
                print(f"    {r['ms']:8.2f} ms {r['calls']:5d}x  {r['kernel']}")
        torch.cuda.empty_cache()

    ratios = {k: results[OURS][k] / results["sdpa"][k]
              for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    # The same comparison round by round (one sdpa and one ours prefill each, back to back).
    ratios["prefill_median_of_round_ratios"] = statistics.median(
        s / o for s, o in zip(pre_times["sdpa"], pre_times[OURS]))
    print(f"  ours / sdpa: prefill {ratios['prefill_tokens_per_s']:.3f}x (round by round "
          f"{ratios['prefill_median_of_round_ratios']:.3f}x), "
          f"decode {ratios['decode_tokens_per_s']:.3f}x")
    gpu = torch.cuda.get_device_name()
    doc = {
        "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
        "transformers": transformers.__version__, "kernels": kernels.__version__,
        "git_sha": git_sha(), "kernel_id": kernel_id,
        "model": {"family": "llama", "params": params, "dtype": "bfloat16",
                  **{k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "head_dim",
                                                  "vocab_size")}},
        "prefill": {"batch": pb, "seqlen": ps, "logits_to_keep": 1},
        "decode": {"batch": db, "context": dc, "steps": args.decode_steps, "greedy": True},
        "reps": args.reps,
        "timing": "median wall time, torch.cuda.synchronize around each rep; prefill interleaved "
                  "(each round times every backend once, rotating order)",
        "results": results, "ours_over_sdpa": ratios,
    }
    if profiles:
        doc["prefill_profile"] = profiles
    out = args.out or ROOT / "benchmarks" / "results" / (
        gpu.lower().replace("nvidia ", "").replace(" ", "-") + "-e2e.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
