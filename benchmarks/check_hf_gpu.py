"""Transformers paths on the GPU: a small Llama-style model (random bf16 weights, GQA, head dim 64,
so the Hopper kernel serves it on an H100/H200) through our backend and through SDPA, each
compared with fp32 SDPA at the valid positions (packed sequences: each sequence run alone); ours
must be within 2x SDPA-bf16's error plus one bf16 rounding step of the logits' scale.

* no padding (flash_attn_func), left-padded batch (varlen via _upad_input), packed sequences via
  position_ids (varlen), greedy generate() on the left-padded batch (token agreement reported).

    python benchmarks/check_hf_gpu.py --build build     # exit 1 on a failed check
"""
import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))
import flash_attn_hub  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", type=Path, default=ROOT / "build")
    args = ap.parse_args()
    from flash_attn_hub.testing import tiny_config, twin_models

    flash_attn_hub.register(name="flash_hub", source=args.build)
    cfg = tiny_config("llama", vocab_size=1000, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=4096)
    sdpa, ours = twin_models(cfg, dtype=torch.bfloat16, device="cuda")
    ref = copy.deepcopy(sdpa).float()  # the same (bf16) weights in fp32, sdpa
    models = {"sdpa": sdpa, "flash_hub": ours}
    lens = [700, 1000, 333, 1]
    ids = torch.randint(0, cfg.vocab_size, (len(lens), max(lens)), device="cuda")
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, -n:] = 1
    packed = torch.cat([ids[i, -n:] for i, n in enumerate(lens)])[None]
    pos = torch.cat([torch.arange(n, device="cuda") for n in lens])[None]
    cases = {"no padding": dict(input_ids=ids[:2, -333:]),
             "left-padded": dict(input_ids=ids, attention_mask=mask),
             "packed position_ids": dict(input_ids=packed, position_ids=pos)}
    bad = 0
    with torch.no_grad():
        def alone(m):  # the packed sequences' meaning: each sequence run by itself
            return torch.cat([m(input_ids=ids[i:i + 1, -n:]).logits.float()
                              for i, n in enumerate(lens)], 1)

        for name, kw in cases.items():
            packed_case = "position_ids" in kw
            want = alone(ref) if packed_case else ref(**kw).logits.float()
            valid = kw["attention_mask"].bool() if "attention_mask" in kw else torch.ones_like(
                want[..., 0], dtype=torch.bool)
            got = {}
            for impl, model in models.items():
                if packed_case and impl == "sdpa":
                    got[impl] = alone(model)  # the bf16 yardstick, sequence by sequence
                else:
                    got[impl] = model(**kw).logits.float()
            err = {k: (v - want)[valid].abs().max().item() for k, v in got.items()}
            bound = 2 * err["sdpa"] + 2.0 ** -8 * want[valid].abs().max().item()
            ok = err["flash_hub"] <= bound
            bad += not ok
            print(f"{name:20s} max |logits - fp32 sdpa|: ours {err['flash_hub']:.3e}, sdpa bf16 "
                  f"{err['sdpa']:.3e}, bound {bound:.3e}  {'OK' if ok else 'FAIL'}")
        toks = {}
        for impl, model in models.items():
            toks[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                                        do_sample=False)[:, ids.shape[1]:]
        agree = (toks["sdpa"] == toks["flash_hub"]).float().mean().item()
        print(f"generate (left-padded, greedy, bf16): tokens identical to sdpa {agree:.1%}")
    print("failures:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
