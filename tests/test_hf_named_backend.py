"""`flash_attn_hub.register(name, source)`: our kernel as a named Transformers backend, no Hub.

The failure this guards against: an attention function registered without its mask function gets
`attention_mask=None`, so a padded batch attends to its padding and nothing raises. The control
test shows that failure really happens (so the padding test can fail), and `register` makes it
impossible by installing both and checking both.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))

import flash_attn_hub  # noqa: E402
from flash_attn_hub.testing import KernelSpy, kernel_source, tiny_config, twin_models  # noqa: E402

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture
def named(monkeypatch):
    """Register under a fresh name, with the Hub unreachable; unregister afterwards."""
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    names = []

    def register(name, source=None):
        source = source or kernel_source()
        names.append(name)
        return flash_attn_hub.register(name=name, source=source)

    yield register
    for n in names:
        flash_attn_hub.unregister(n)


def _padded(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, ids.shape[1] - n:] = 1
    return ids, mask


@torch.no_grad()
def test_register_installs_attention_and_mask_and_padding_matches_unpadded(named):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    module = named("flash_hub")
    assert callable(module.flash_attn_varlen_func)
    assert flash_attn_hub.is_registered("flash_hub")
    assert AttentionMaskInterface._global_mapping["flash_hub"] is flash_attention_mask
    assert "flash_hub" in AttentionInterface._global_mapping

    ref, ours = twin_models(tiny_config("llama"), ("sdpa", "flash_hub"))
    ids, mask = _padded([10, 4, 7])
    with KernelSpy().watch("flash_hub") as spy:
        got = ours(ids, attention_mask=mask).logits
    assert spy.names() == ["flash_attn_varlen_func"] * 2
    for i in range(ids.shape[0]):
        alone = ref(ids[i, mask[i].bool()][None]).logits[0]
        torch.testing.assert_close(got[i, mask[i].bool()], alone, **TOL)


@torch.no_grad()
def test_control_without_mask_registration_padding_silently_breaks(named):
    """What register() prevents: drop the mask entry and the padded row comes out wrong."""
    from transformers.masking_utils import AttentionMaskInterface

    named("flash_nomask")
    AttentionMaskInterface._global_mapping.pop("flash_nomask")
    assert not flash_attn_hub.is_registered("flash_nomask")
    ref, broken = twin_models(tiny_config("llama"), ("sdpa", "flash_nomask"))
    ids, mask = _padded([10, 4])
    got = broken(ids, attention_mask=mask).logits        # no error is raised ...
    alone = ref(ids[1, mask[1].bool()][None]).logits[0]
    assert (got[1, mask[1].bool()] - alone).abs().max() > 1e-3   # ... but the result is wrong


@torch.no_grad()
def test_named_backend_generate_and_set_attn_implementation(named):
    named("flash_hub")
    ref, ours = twin_models(tiny_config("llama"), ("sdpa", "flash_hub"))
    ids, mask = _padded([5, 9], seed=11)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expect_logits = ref(ids, attention_mask=mask).logits[mask.bool()]
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))
    ref.set_attn_implementation("flash_hub")
    assert ref.config._attn_implementation == "flash_hub"
    with KernelSpy().watch("flash_hub") as spy:
        got = ref(ids, attention_mask=mask).logits[mask.bool()]
    assert spy.names() == ["flash_attn_varlen_func"] * 2
    torch.testing.assert_close(got, expect_logits, **TOL)


@torch.no_grad()
def test_name_without_flash_and_re_registration(named):
    module = named("hub_attn")             # not preloaded as flash by Transformers: still works
    named("hub_attn", source=Path(module.__file__).parent)    # re-point at the variant dir
    ref, ours = twin_models(tiny_config("llama"), ("sdpa", "hub_attn"))
    ids, mask = _padded([6, 3])
    torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                               ref(ids, attention_mask=mask).logits[mask.bool()], **TOL)


def test_register_rejects_bad_names_and_sources(named, tmp_path):
    for bad in ("sdpa", "flash_attention_2", "org/name", "a:b", ""):
        with pytest.raises(ValueError, match="name"):
            flash_attn_hub.register(name=bad, source=tmp_path)
    with pytest.raises(ValueError, match="source"):
        flash_attn_hub.register(name="flash_x", source="not-a-path-nor-repo")
    with pytest.raises(FileNotFoundError):
        flash_attn_hub.register(name="flash_x", source=tmp_path)      # a dir with no build
    assert not flash_attn_hub.is_registered("flash_x")
