"""A Transformers training step of a ~1.2B Llama with and without our fused ops (issue 18), same
run, same weights, same data:

  hf          the model as Transformers builds it: LlamaRMSNorm, and the loss of
              `model(input_ids, labels=...)` (Transformers' ForCausalLMLoss: the logits upcast
              to fp32, F.cross_entropy).
  rmsnorm     `kernels.kernelize` with our `layers.RMSNorm` mapped to the "RMSNorm" hub hook
              (every LlamaRMSNorm: 2 per layer and the final one), Transformers' loss.
  ce          Transformers' norms, the loss from the logits by our
              `losses.cross_entropy.CrossEntropyLoss(inplace_backward=True)` (no fp32 copy of
              the logits; the gradient overwrites them), labels shifted as Transformers does.
  rmsnorm+ce  both.

Model: LlamaConfig hidden 2048, 16 layers, 32 query / 8 KV heads (head dim 64), intermediate
5632, vocab 128256, untied embeddings (~1.24B parameters), bf16 weights, SDPA attention in every
variant (attention is not what is compared); batch 2 x 2048 tokens, AdamW (lr 1e-4). Every
variant is its own model built from its own copy of the config with the same seed (from_config
writes attn_implementation into the config it is given). The timed steps run in interleaved
rounds (each variant one step per round, the order rotating) so clock and thermal drift fall on
all alike; after --warmup rounds, --steps rounds are timed. Per variant: the median step time
(wall clock around forward + backward + optimizer step, device synchronised), tokens/s =
batch * seqlen / median, the peak memory one step allocates beyond what is live before it
(torch.cuda.max_memory_allocated: activations, gradients, the optimizer's temporaries; the
resident weights and optimizer state are reported apart), the loss of the first step (the
variants must agree to bf16 noise: a check that the swap computes the same model) and how many
norms kernelize swapped.

The fused ops' public functions take CUDA tensors when `_fused_checks.CUDA_ENABLED` (docs/fused_ops.md,
"Status"); this script switches it on for itself, so that a kernel change can be measured before
its release.

    python benchmarks/bench_fused_train.py [--build build] [--out PATH]
    python benchmarks/bench_fused_train.py --smoke          # tiny model on the CPU: a check
                                                            # that the script runs, not a measure

JSON goes to --out, by default benchmarks/results/<gpu>-fused-train.json on the GPU (none with
--smoke unless --out is given).
"""
import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import (clocks, command_line, device_slug, git_sha, kernel_id,  # noqa: E402
                      load_flash, wall_s_and_peak_mib)

VARIANTS = ("hf", "rmsnorm", "ce", "rmsnorm+ce")
FULL = dict(vocab_size=128256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, head_dim=64,
            max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=500000.0)
SMOKE = dict(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=128, tie_word_embeddings=False)


def build_model(config, device, dtype, seed):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        # Each model its own config: from_config stores attn_implementation on the one it gets.
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype,
                                                 attn_implementation="sdpa")
    return model.train()


def kernelize_rmsnorm(model, build, device, flash):
    """Swap our RMSNorm in through `kernels` (a local layer repository on the build); returns how
    many norms now run our forward (`kernels` loads the same module object as `flash`, so the
    CUDA switch set on `flash` holds for the layer too)."""
    import kernels

    repo = kernels.LocalLayerRepository(repo_path=Path(build).resolve(), layer_name="RMSNorm")
    with kernels.use_kernel_mapping({"RMSNorm": {device: repo}}, inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.TRAINING, device=device, use_fallback=True)
    return count_swapped(model, flash)


def count_swapped(model, flash):
    """How many of the model's norms run our RMSNorm forward."""
    ours = flash.layers.RMSNorm.forward
    return sum(1 for m in model.modules() if type(m).__name__.endswith("RMSNorm")
               and getattr(m.forward, "__func__", None) is ours)


def make_step(model, variant, flash, vocab):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ours_ce = "ce" in variant.split("+")
    loss_fn = flash.losses.cross_entropy.CrossEntropyLoss(inplace_backward=True)

    def step(ids):
        if ours_ce:
            logits = model(input_ids=ids).logits
            # Transformers' shift: position t predicts token t + 1, the last position ignored.
            labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
            loss = loss_fn(logits.view(-1, vocab), labels.reshape(-1))
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def resident_mib(device):
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else None


def timed_step(step, ids, device):
    """(seconds, MiB the step allocated at its peak beyond what was live before it, loss)."""
    out = {}
    seconds, peak = wall_s_and_peak_mib(lambda: out.setdefault("loss", step(ids)), device)
    return seconds, peak, float(out["loss"])


def run(args):
    from transformers import LlamaConfig

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    cfg_kw = SMOKE if args.smoke else FULL
    batch, seqlen = (2, 32) if args.smoke else (args.batch, args.seqlen)
    steps, warmup = (1, 1) if args.smoke else (args.steps, args.warmup)
    flash = load_flash(args.build, device)
    flash._fused_checks.CUDA_ENABLED = True  # also where a release keeps it off (docstring)
    config = LlamaConfig(**cfg_kw)
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        raise SystemExit(f"--variants: {sorted(set(variants) - set(VARIANTS))} not in {VARIANTS}")

    models, steps_fn, rows = {}, {}, {}
    for v in variants:
        before = resident_mib(device)
        models[v] = build_model(config, device, dtype, seed=0)
        swapped = kernelize_rmsnorm(models[v], args.build, device, flash) if "rmsnorm" in v else 0
        steps_fn[v] = make_step(models[v], v, flash, config.vocab_size)
        rows[v] = dict(variant=v, rmsnorm_swapped=swapped, step_s=[], step_peak_mib=[],
                       losses=[], weights_mib=None if before is None
                       else resident_mib(device) - before)
    n_params = sum(p.numel() for p in models[variants[0]].parameters())
    expected = 2 * config.num_hidden_layers + 1
    for v in variants:  # counted again after every kernelize: the twins must be untouched
        got, want = count_swapped(models[v], flash), expected if "rmsnorm" in v else 0
        if got != want:
            raise RuntimeError(f"{v}: {got} norms run our RMSNorm, expected {want}")

    gen = torch.Generator().manual_seed(1)
    for r in range(warmup + steps):
        ids = torch.randint(0, config.vocab_size, (batch, seqlen), generator=gen).to(device)
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            seconds, peak, loss = timed_step(steps_fn[v], ids, device)
            rows[v]["losses"].append(loss)
            if r >= warmup:
                rows[v]["step_s"].append(seconds)
                rows[v]["step_peak_mib"].append(peak)
        print(f"round {r}: " + ", ".join(f"{v} loss {rows[v]['losses'][-1]:.4f}"
                                         for v in variants), flush=True)

    base = rows.get("hf")
    for v in variants:
        row = rows[v]
        row["step_ms_median"] = 1e3 * statistics.median(row["step_s"])
        row["tokens_per_s"] = batch * seqlen / (row["step_ms_median"] / 1e3)
        peaks = [p for p in row["step_peak_mib"] if p is not None]
        row["step_peak_mib_max"] = max(peaks) if peaks else None
        if base is not None:
            row["speedup_vs_hf"] = base["step_ms_median"] / row["step_ms_median"]
            row["first_loss_minus_hf"] = row["losses"][0] - base["losses"][0]
            if peaks and base["step_peak_mib_max"]:
                row["step_peak_ratio_hf_over_this"] = base["step_peak_mib_max"] / max(peaks)
        print(json.dumps({k: row[k] for k in ("variant", "step_ms_median", "tokens_per_s",
                                              "step_peak_mib_max", "rmsnorm_swapped")}),
              flush=True)
    import transformers

    return dict(
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        smoke=args.smoke, torch=torch.__version__, transformers=transformers.__version__,
        git_sha=git_sha(), kernel_id=kernel_id(flash), command=command_line(sys.argv),
        model=dict(cfg_kw, parameters=n_params, dtype=str(dtype).removeprefix("torch."),
                   attn_implementation="sdpa"),
        batch=batch, seqlen=seqlen, optimizer="AdamW(lr=1e-4)", warmup_rounds=warmup,
        timed_rounds=steps, clocks=clocks() if device == "cuda" else None,
        rows=[rows[v] for v in variants])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=str(HERE.parent / "build"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (a check)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_fused_train.py measures on a CUDA GPU; --smoke runs on the CPU")
    result = run(args)
    out = args.out
    if out is None and not args.smoke:
        out = HERE / "results" / f"{device_slug()}-fused-train.json"
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
