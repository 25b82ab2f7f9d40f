"""End-to-end Transformers benchmark on the GPU: our backend vs SDPA (vs flash_attention_2 when the
flash_attn package is importable), measured in the same run on the same model.

Model: a ~1.2B-parameter Llama config (Llama-3.2-1B shapes: hidden 2048, 16 layers, 32 query /
8 KV heads, head dim 64, vocab 128256) with random bf16 weights, built on the GPU (nothing is
downloaded). Backends are switched on the one model with `set_attn_implementation`.

Modes (`--modes`, comma-separated; default `prefill,decode`):
* prefill: batch 8 x 4096 tokens, one forward with `logits_to_keep=1` (the full 8x4096x128k
  logits would dominate time and memory and say nothing about attention); tokens/s = 32768 / t.
* decode: batch 32, a 2048-token context prefilled once (untimed), then `--decode-steps` greedy
  steps with the KV cache (a DynamicCache: what `generate()` uses by default; our kernel is
  reached as `flash_attn_func` with one query row); tokens/s = 32 * steps / t. The cache is
  cropped back to 2048 before each repetition so every repetition decodes at the same length.
* cb: continuous batching, `generate_batch` (paged KV cache, requests scheduled together):
  `--cb` requests with prompts of random length up to the given one, `--cb-new-tokens` greedy
  tokens each; tokens/s = generated tokens / t, the manager (cache, CUDA graphs) built by an
  untimed first call and reused. Transformers 5.22.2 takes its decode fast path
  (`flash_attn_with_kvcache` with a `block_table`) only for an implementation named like
  `flash.*2` or `flash.*3`, so ours runs here under the alias `flash_hub_fa2`; SDPA keeps SDPA
  (`auto_switch_to_flash=False`). The JSON records whether the fast path and CUDA graphs were on.
* compile: `generate()` with a static cache, which Transformers compiles for decoding
  (`CompileConfig()`: inductor, mode reduce-overhead, i.e. CUDA graphs; prefill stays eager).
  Decode tokens/s = batch * steps / (t(steps + 1 new tokens) - t(1 new token)) on one
  preallocated StaticCache, so prefill and setup cancel; the JSON keeps dynamo's graph-break
  count.

Times are medians over `--reps` repetitions after a warm-up, with CUDA synchronisation. Prefill
is timed in interleaved rounds (each backend once per round, rotating order), so drift in clocks
or temperature cannot favour the backend that happens to run first; the JSON keeps every round.
A mode that fails for one backend records its error there and the run goes on.
JSON goes to benchmarks/results/<gpu>-e2e.json for the default modes, else
<gpu>-e2e-<modes>.json (gpu, versions, git SHA, config, results).

    python benchmarks/bench_e2e.py --build build [--modes cb,compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import device_slug, git_sha, kernel_id, median_wall_s, wall_s  # noqa: E402

OURS = "flash_hub"
# Our kernel again, under a name Transformers' continuous batching accepts for its decode fast
# path (generation/continuous_batching/initialization.py: the name must match flash.*2 or
# flash.*3); any other name decodes through flash_attn_varlen_func.
OURS_CB = "flash_hub_fa2"
MODES = ("prefill", "decode", "cb", "compile")


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
def cb_throughput(model, impl, requests, prompt_len, new_tokens, reps, seed, cuda_graphs):
    """Continuous batching: generated tokens/s of `generate_batch` over `requests` prompts of
    random lengths in [prompt_len / 4, prompt_len], each generating exactly `new_tokens`. The
    first call builds the manager (paged cache, CUDA graph warm-up) untimed; the timed calls reuse
    it. cuda_graphs: None lets Transformers decide (on for flash implementations), False turns
    them off. Returns the result dict and the generated tokens keyed by prompt."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_len // 4), prompt_len + 1, (requests,), generator=g)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
               for n in lengths.tolist()]
    # eos -1: no early stop, so both backends generate the same number of tokens.
    gc = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                          pad_token_id=0)
    # By default generate_batch moves an sdpa model to flash_attention_2/3 when it can.
    cb = ContinuousBatchingConfig(auto_switch_to_flash=False, use_cuda_graph=cuda_graphs)
    model.set_attn_implementation(impl)

    def run():
        return model.generate_batch(inputs=prompts, generation_config=gc,
                                    continuous_batching_config=cb, persistent_manager=True)

    try:
        out = run()
        resolved = model._cached_continuous_batching_manager.continuous_batching_config
        t = statistics.median(wall_s(run) for _ in range(reps))
    finally:
        model.destroy_cached_continuous_batching_manager()
    errors = [o.error for o in out.values() if o.error is not None]
    tokens = sum(len(o.generated_tokens) for o in out.values())
    result = {"tokens_per_s": tokens / t, "seconds": t, "generated_tokens": tokens,
              "attn_implementation": impl, "failed_requests": len(errors),
              "decode_fast_path": resolved.max_blocks_per_request > 0,
              "use_cuda_graph": list(resolved.use_cuda_graph),
              "use_async_batching": resolved.use_async_batching,
              "page_size": resolved.page_size, "num_blocks": resolved.num_blocks}
    return result, {tuple(o.prompt_ids): o.generated_tokens for o in out.values()}


@torch.no_grad()
def static_compile_tps(model, batch, context, steps, reps, gen):
    """`generate()` with a static cache under Transformers' own torch.compile of the decode step:
    decode tokens/s from the difference of a (steps + 1)-token and a 1-token generate on one
    StaticCache, so prefill and setup cancel. Returns the result dict and the tokens."""
    from transformers import GenerationConfig, StaticCache
    from transformers.generation.configuration_utils import CompileConfig

    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=model.device,
                        generator=gen)
    cache = StaticCache(config=model.config, max_cache_len=context + steps + 1)
    model.__dict__.pop("_compiled_call", None)     # compile afresh for this backend
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    def generate(n):
        cache.reset()
        gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, compile_config=CompileConfig())
        return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                              past_key_values=cache)

    out = generate(steps + 1)                       # compiles
    if not hasattr(model, "_compiled_call"):
        raise RuntimeError("generate() did not compile the decode step")
    full = median_wall_s(lambda: generate(steps + 1), reps)
    prefill = median_wall_s(lambda: generate(1), reps)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return ({"decode_tokens_per_s": batch * steps / (full - prefill), "seconds_full": full,
             "seconds_prefill_only": prefill, "graph_breaks": breaks},
            out[:, context:].tolist())


def guarded(fn):
    """Run one mode for one backend; a failure (the mode does not work through this backend) is
    recorded as the result instead of ending the run, since it is itself what the run reports."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:1000]}, None


def agreement(tokens_a, tokens_b):
    """Fraction of sequences whose greedy tokens are identical under two backends (bf16: rounding
    may flip a near-tie, so below 1 is expected and informative, not a failure)."""
    if isinstance(tokens_a, dict):
        tokens_a, tokens_b = [tokens_a[k] for k in tokens_a], [tokens_b.get(k) for k in tokens_a]
    return sum(a == b for a, b in zip(tokens_a, tokens_b)) / max(1, len(tokens_a))


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
    ap.add_argument("--modes", default="prefill,decode", help=f"comma-separated, of {MODES}")
    ap.add_argument("--prefill", default="8x4096", help="batch x seqlen")
    ap.add_argument("--decode", default="32x2048", help="batch x context (decode and compile)")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--cb", default="128x1024", help="requests x longest prompt")
    ap.add_argument("--cb-new-tokens", type=int, default=128)
    ap.add_argument("--cb-cuda-graphs", choices=["auto", "off"], default="auto",
                    help="auto: Transformers' choice (on for flash implementations, off for sdpa)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profile", action="store_true",
                    help="also record the CUDA time of one prefill by kernel for each backend")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: {sorted(set(modes) - set(MODES))} not in {MODES}")
    if not torch.cuda.is_available():
        print("bench_e2e.py needs a CUDA GPU", file=sys.stderr)
        return 2

    import kernels
    import transformers
    from transformers import AutoModelForCausalLM

    import flash_attn_hub

    module = flash_attn_hub.register(name=OURS, source=args.build)
    if "cb" in modes:
        flash_attn_hub.register(name=OURS_CB, source=args.build)
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
    cbr, cbp = map(int, args.cb.split("x"))
    print(f"{torch.cuda.get_device_name()}: Llama {params / 1e9:.2f}B bf16; modes {modes}")

    results = {impl: {} for impl in impls}
    tokens = {"cb": {}, "compile": {}}
    profiles = {}
    if "prefill" in modes:
        pre_times = prefill_rounds(model, impls, pb, ps, args.reps,
                                   torch.Generator(device="cuda").manual_seed(0))
        for impl in impls:
            results[impl].update(prefill_tokens_per_s=pb * ps / statistics.median(pre_times[impl]),
                                 prefill_seconds_by_round=pre_times[impl])
    for impl in impls:
        model.set_attn_implementation(impl)
        gen = torch.Generator(device="cuda").manual_seed(1)
        if "decode" in modes:
            results[impl]["decode_tokens_per_s"] = decode_tps(model, db, dc, args.decode_steps,
                                                              args.reps, gen)
        if "cb" in modes:
            results[impl]["continuous_batching"], tokens["cb"][impl] = guarded(
                lambda: cb_throughput(model, OURS_CB if impl == OURS else impl, cbr, cbp,
                                      args.cb_new_tokens, args.reps, seed=2,
                                      cuda_graphs=None if args.cb_cuda_graphs == "auto" else False))
            model.set_attn_implementation(impl)
        if "compile" in modes:
            results[impl]["static_compile"], tokens["compile"][impl] = guarded(
                lambda: static_compile_tps(model, db, dc, args.decode_steps, args.reps,
                                           torch.Generator(device="cuda").manual_seed(3)))
        print(f"  {impl:<18} {json.dumps(summary(results[impl]))}", flush=True)
        if args.profile and "prefill" in modes:
            prof = prefill_profile(model, pb, ps, gen)
            profiles[impl] = prof
            print(f"    one prefill: {prof['total_ms']:.1f} ms of CUDA time")
            for r in prof["top"]:
                print(f"    {r['ms']:8.2f} ms {r['calls']:5d}x  {r['kernel']}")
        torch.cuda.empty_cache()

    ratios = ours_over_sdpa(results)
    if "prefill" in modes:
        # The same comparison round by round (one sdpa and one ours prefill each, back to back).
        ratios["prefill_median_of_round_ratios"] = statistics.median(
            s / o for s, o in zip(pre_times["sdpa"], pre_times[OURS]))
    for mode, by_impl in tokens.items():
        if by_impl.get("sdpa") is not None and by_impl.get(OURS) is not None:
            ratios[f"{mode}_greedy_token_agreement"] = agreement(by_impl[OURS], by_impl["sdpa"])
    print(f"  ours / sdpa: {json.dumps(ratios)}")
    doc = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "kernels": kernels.__version__, "git_sha": git_sha(), "kernel_id": kernel_id(module),
        "modes": modes,
        "model": {"family": "llama", "params": params, "dtype": "bfloat16",
                  **{k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "head_dim",
                                                  "vocab_size")}},
        "prefill": {"batch": pb, "seqlen": ps, "logits_to_keep": 1},
        "decode": {"batch": db, "context": dc, "steps": args.decode_steps, "greedy": True},
        "cb": {"requests": cbr, "max_prompt": cbp, "new_tokens": args.cb_new_tokens,
               "cuda_graphs": args.cb_cuda_graphs, "ours_attn_implementation": OURS_CB},
        "reps": args.reps,
        "timing": "median wall time, torch.cuda.synchronize around each rep; prefill interleaved "
                  "(each round times every backend once, rotating order)",
        "results": results, "ours_over_sdpa": ratios,
    }
    if profiles:
        doc["prefill_profile"] = profiles
    suffix = "" if modes == ["prefill", "decode"] else "-" + "-".join(modes)
    out = args.out or ROOT / "benchmarks" / "results" / f"{device_slug()}-e2e{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def summary(result):
    """The headline numbers of one backend's results, for the log."""
    flat = {k: v for k, v in result.items() if k.endswith("per_s")}
    for mode in ("continuous_batching", "static_compile"):
        if mode in result:
            r = result[mode]
            flat[mode] = r.get("error") or r.get("tokens_per_s") or r.get("decode_tokens_per_s")
    return {k: round(v) if isinstance(v, float) else v for k, v in flat.items()}


def ours_over_sdpa(results):
    """ours / sdpa for every tokens/s both backends have, nested modes included."""
    def rates(r, prefix=""):
        out = {}
        for k, v in r.items():
            if isinstance(v, dict):
                out.update(rates(v, f"{k}."))
            elif k.endswith("per_s") and isinstance(v, float):
                out[prefix + k] = v
        return out
    ours, sdpa = rates(results[OURS]), rates(results["sdpa"])
    return {k: ours[k] / sdpa[k] for k in ours if k in sdpa}


if __name__ == "__main__":
    sys.exit(main())
