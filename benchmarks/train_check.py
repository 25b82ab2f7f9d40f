"""Training through our kernel, as users train (Transformers models from a config, AdamW):

  llama     a Llama-style model, bf16, N steps on a fixed synthetic corpus, once with
            attn_implementation="sdpa" and once through ours, same seed and data: the loss curves
            must agree within bf16 noise. The measure: the largest |loss_ours - loss_sdpa| over
            the steps after the first 10, against the same quantity between sdpa and eager (two
            correct implementations in bf16 differ by that much); tokens/s of both.
  packed    padding-free training (DataCollatorWithFlattening: one row, position_ids restart per
            sequence, our varlen path) against the padded batch of the same sequences: the same
            loss and gradients (one step, fp32 on the CPU, bf16 on the GPU).
  gemma2    a Gemma2-style model (attention softcap + alternating sliding window; SDPA cannot run
            softcap) trains through ours: the loss curve against eager attention's.

The kernel is loaded as users load it: registered as the Transformers backend "flash_hub" from the
local build (hf_integration/flash_attn_hub). Usage:
  python benchmarks/train_check.py [--device cuda] [--steps 200] [--size 300m|tiny] [--out PATH]
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hf_integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import flash_attn_hub  # noqa: E402
from _measure import git_sha  # noqa: E402

SIZES = {
    # ~270M parameters: embeddings 2 x 32000 x 1024, 16 layers of 4 x 1024^2 + 3 x 1024 x 2816.
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}


def corpus(vocab, n_seqs, seqlen, seed=0):
    """Token sequences with learnable structure (a noisy repeated motif per sequence), fixed by
    the seed, so the loss falls over a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, vocab, (n_seqs, 16), generator=g)
    reps = motif.repeat(1, seqlen // 16 + 1)[:, :seqlen]
    noise = torch.rand(n_seqs, seqlen, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, vocab, (n_seqs, seqlen), generator=g), reps)


def make_model(family, size, impl, device, dtype, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(SIZES[size])
    if family == "gemma2":
        kw.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=64,
                  head_dim=kw["hidden_size"] // kw["num_attention_heads"], layer_types=None)
        kw["num_hidden_layers"] = max(2, kw["num_hidden_layers"])
    config = AutoConfig.for_model(family, max_position_embeddings=4096, **kw)
    torch.manual_seed(seed)
    # from_config stores attn_implementation on the config it gets: each model its own copy.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl,
                                             dtype=dtype)
    if model.config._attn_implementation != impl:
        raise RuntimeError(f"model meant for {impl!r} runs {model.config._attn_implementation!r}")
    return model.to(device)


def train(model, data, steps, batch, device):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    losses, tokens, t_total = [], 0, 0.0
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % data.shape[0]
        x = data[idx].to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 3:  # warm-up steps are not timed
            t_total += time.perf_counter() - t0
            tokens += x.numel()
        losses.append(loss.item())
    return losses, tokens / t_total if t_total else None


def max_gap(a, b, skip=10):
    return max(abs(x - y) for x, y in zip(a[skip:], b[skip:])) if len(a) > skip else None


def check_llama(args, dtype):
    data = corpus(SIZES[args.size]["vocab_size"], 512, args.seqlen)
    runs = {}
    for impl in ("sdpa", "flash_hub", "eager"):
        model = make_model("llama", args.size, impl, args.device, dtype)
        runs[impl] = train(model, data, args.steps, args.batch, args.device)
        del model
    gap = max_gap(runs["flash_hub"][0], runs["sdpa"][0])
    noise = max_gap(runs["eager"][0], runs["sdpa"][0])
    return dict(check="llama", losses={k: v[0] for k, v in runs.items()},
                tokens_per_s={k: v[1] for k, v in runs.items()}, max_gap_ours_sdpa=gap,
                max_gap_eager_sdpa=noise, ok=gap is not None and gap <= 2 * noise + 0.02)


def check_packed(args, dtype):
    """One step on the same sequences, padded (attention_mask) and packed (position_ids)."""
    from transformers import DataCollatorWithFlattening
    lens = [args.seqlen // 2, args.seqlen // 3, 17, 1, args.seqlen]
    data = corpus(SIZES[args.size]["vocab_size"], len(lens), args.seqlen, seed=1)
    seqs = [data[i, :n] for i, n in enumerate(lens)]
    model = make_model("llama", args.size, "flash_hub", args.device, dtype)
    ids = torch.zeros(len(seqs), max(lens), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)], labels[i, 1:len(s)] = s, 1, s[1:]
    out_pad = model(input_ids=ids.to(args.device), attention_mask=mask.to(args.device))
    # The per-token loss summed over real tokens, the same normalisation for both layouts.
    logp = torch.log_softmax(out_pad.logits.float(), -1)
    nll_pad = -logp[:, :-1].gather(-1, labels[:, 1:, None].clamp(min=0).to(args.device))[..., 0]
    loss_pad = (nll_pad * (labels[:, 1:] >= 0).to(args.device)).sum()
    flat = DataCollatorWithFlattening(return_position_ids=True)(
        [{"input_ids": s.tolist()} for s in seqs])
    pos = flat["position_ids"].to(args.device)
    out_flat = model(input_ids=flat["input_ids"].to(args.device), position_ids=pos)
    fl = torch.log_softmax(out_flat.logits.float(), -1)[0]
    tok = flat["input_ids"][0].to(args.device)
    nxt_ok = (pos[0, 1:] != 0)  # the next token belongs to the same sequence
    loss_flat = (-fl[:-1].gather(-1, tok[1:, None])[:, 0] * nxt_ok).sum()
    g_pad = torch.autograd.grad(loss_pad, list(model.parameters()))
    g_flat = torch.autograd.grad(loss_flat, list(model.parameters()))
    rel_loss = abs(loss_pad.item() - loss_flat.item()) / abs(loss_pad.item())
    rel_grad = max((a - b).abs().max().item() / (a.abs().max().item() + 1e-12)
                   for a, b in zip(g_pad, g_flat))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return dict(check="packed", loss_padded=loss_pad.item(), loss_packed=loss_flat.item(),
                rel_loss_diff=rel_loss, max_rel_grad_diff=rel_grad, ok=rel_loss <= tol)


def check_gemma2(args, dtype):
    data = corpus(SIZES[args.size]["vocab_size"], 512, args.seqlen, seed=2)
    runs = {}
    for impl in ("eager", "flash_hub"):
        model = make_model("gemma2", args.size, impl, args.device, dtype)
        runs[impl] = train(model, data, args.steps, args.batch, args.device)
        del model
    gap = max_gap(runs["flash_hub"][0], runs["eager"][0])
    ours = runs["flash_hub"][0]
    falls = ours[-1] < ours[0]
    return dict(check="gemma2", losses={k: v[0] for k, v in runs.items()},
                tokens_per_s={k: v[1] for k, v in runs.items()}, max_gap_ours_eager=gap,
                ok=falls and all(map(math.isfinite, ours)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default=None, choices=list(SIZES))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--checks", default="llama,packed,gemma2")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gpu = args.device == "cuda"
    args.size = args.size or ("300m" if gpu else "tiny")
    args.steps = args.steps or (200 if gpu else 30)
    args.batch = args.batch or (8 if gpu else 4)
    args.seqlen = args.seqlen or (1024 if gpu else 128)
    dtype = torch.bfloat16 if gpu else torch.float32
    flash_attn_hub.register(name="flash_hub", source=str(ROOT / "build"))
    results = []
    for name in args.checks.split(","):
        r = {"llama": check_llama, "packed": check_packed, "gemma2": check_gemma2}[name](args, dtype)
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
        results.append(r)
    meta = dict(device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
                git_sha=git_sha(), size=args.size, steps=args.steps, batch=args.batch,
                seqlen=args.seqlen, dtype=str(dtype), results=results)
    if args.out:
        Path(args.out).write_text(json.dumps(meta, indent=1))
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
