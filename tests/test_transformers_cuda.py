"""Transformers' flash paths on the GPU, in bf16: a Llama-style model (GQA, head dim 64, so the
Hopper kernel serves it on an H100/H200) through our backend and through SDPA, each compared with
fp32 SDPA on the same weights at the valid positions. Ours passes iff its logits error is within
2x SDPA-bf16's plus one bf16 rounding step of the logits' scale (the tolerance rule of
docs/testing.md, at the model's output). The CPU suite checks the same paths in fp32
(tests/test_transformers.py); this file is its GPU tier.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))

import flash_attn_hub  # noqa: E402
from flash_attn_hub.testing import kernel_source, tiny_config, twin_models  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LENS = [700, 1000, 333, 1]  # left-padded to 1000; the 1-token sequence is a single row


@pytest.fixture(scope="module")
def models():
    flash_attn_hub.register(name="flash_hub", source=kernel_source())
    cfg = tiny_config("llama", vocab_size=1000, hidden_size=512, intermediate_size=1024,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=4096)
    sdpa, ours = twin_models(cfg, dtype=torch.bfloat16, device="cuda")
    ref = copy.deepcopy(sdpa).float()  # the same (bf16) weights in fp32, through SDPA
    yield {"ref": ref, "sdpa": sdpa, "ours": ours}
    flash_attn_hub.unregister("flash_hub")


@pytest.fixture(scope="module")
def batch(models):
    vocab = models["ref"].config.vocab_size
    ids = torch.randint(0, vocab, (len(LENS), max(LENS)), device="cuda")
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENS):
        mask[i, -n:] = 1
    return ids, mask


def _alone(model, ids):
    """What packed sequences mean: each sequence run by itself, logits concatenated."""
    return torch.cat([model(input_ids=ids[i:i + 1, -n:]).logits.float() for i, n in enumerate(LENS)], 1)


def _case(name, ids, mask):
    if name == "no padding":
        return dict(input_ids=ids[:2, -333:])
    if name == "left-padded":
        return dict(input_ids=ids, attention_mask=mask)
    packed = torch.cat([ids[i, -n:] for i, n in enumerate(LENS)])[None]
    pos = torch.cat([torch.arange(n, device="cuda") for n in LENS])[None]
    return dict(input_ids=packed, position_ids=pos)


@torch.no_grad()
@pytest.mark.parametrize("name", ["no padding", "left-padded", "packed position_ids"])
def test_bf16_logits_within_twice_sdpa_error(models, batch, name):
    """no padding: flash_attn_func; left padding and packed position_ids: flash_attn_varlen_func."""
    ids, mask = batch
    kw = _case(name, ids, mask)
    packed = "position_ids" in kw
    want = _alone(models["ref"], ids) if packed else models["ref"](**kw).logits.float()
    valid = kw["attention_mask"].bool() if "attention_mask" in kw else torch.ones_like(
        want[..., 0], dtype=torch.bool)
    # SDPA has no packed-sequence path: its bf16 yardstick runs the sequences one by one.
    sdpa = _alone(models["sdpa"], ids) if packed else models["sdpa"](**kw).logits.float()
    ours = models["ours"](**kw).logits.float()
    err_sdpa = (sdpa - want)[valid].abs().max().item()
    err_ours = (ours - want)[valid].abs().max().item()
    bound = 2 * err_sdpa + 2.0 ** -8 * want[valid].abs().max().item()
    assert err_ours <= bound, f"{name}: ours {err_ours:.3e}, sdpa bf16 {err_sdpa:.3e}, bound {bound:.3e}"


@torch.no_grad()
def test_generate_left_padded_runs_and_mostly_agrees_with_sdpa(models, batch):
    """Greedy bf16 generation from left-padded prompts. Tokens may part ways once two bf16
    backends round a near-tie differently, so only gross disagreement fails."""
    ids, mask = batch
    toks = {impl: models[impl].generate(input_ids=ids, attention_mask=mask, max_new_tokens=16,
                                        do_sample=False)[:, ids.shape[1]:]
            for impl in ("sdpa", "ours")}
    agree = (toks["sdpa"] == toks["ours"]).float().mean().item()
    assert agree >= 0.5, f"tokens identical to sdpa: {agree:.1%}"
