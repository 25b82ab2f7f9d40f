"""Transformers 5.22.2 loads our kernel through its own hook, `attn_implementation="<repo-id>"`,
and every path it takes gives SDPA's (or eager's) result in fp32 on the CPU.

The kernel is the project's CPU build, loaded the way users load it: from an offline Hub cache
assembled by tools/hub_tree.py (what we upload) or through LOCAL_KERNELS. A spy on the functions
Transformers resolved records which kernel entry point each path reached and with which keyword
arguments, so a feature that silently fell off (window, softcap, dropout) fails the test.
"""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))
sys.path.insert(0, str(ROOT / "tools"))

import hub_tree  # noqa: E402
from flash_attn_hub.testing import (KernelSpy, ensure_cpu_build, kernel_root, kernel_source,  # noqa: E402
                                    tiny_config, twin_models)

REPO_ID = hub_tree.repo_id_of(ROOT)
TOL = dict(rtol=1e-4, atol=2e-5)  # fp32: both sides accumulate in fp32, orders differ


@pytest.fixture(scope="module")
def build_dir():
    return ensure_cpu_build(kernel_root())


@pytest.fixture
def local_kernel(monkeypatch):
    """attn_implementation=REPO_ID resolves to the build through LOCAL_KERNELS (kernels' override)."""
    from transformers import modeling_flash_attention_utils as mfau

    monkeypatch.setenv("LOCAL_KERNELS", f"{REPO_ID}={kernel_source()}")
    monkeypatch.setattr(mfau, "_loaded_implementation", None)  # force a fresh resolution
    return REPO_ID


def _left_padded(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    return ids, mask


def _per_sequence_logits(model, ids, mask):
    """Reference: each sequence alone, unpadded."""
    return [model(ids[i, mask[i].bool()][None]).logits[0] for i in range(ids.shape[0])]


# --- loading through the Hub cache and LOCAL_KERNELS --------------------------------------------

def test_from_pretrained_loads_kernel_from_offline_hub_cache(build_dir, tmp_path):
    """The tree we upload, laid out as an HF cache (refs/v1), serves attn_implementation=<repo>
    with HF_HUB_OFFLINE=1 in a fresh process, and a padded batch matches SDPA."""
    tree = hub_tree.assemble(build_dir.parent, tmp_path / "tree")
    snapshot = hub_tree.install_offline_cache(tree, tmp_path / "cache", REPO_ID, version=1)
    cfg = tiny_config("llama")
    (ref,) = twin_models(cfg, ("sdpa",))
    ref.save_pretrained(tmp_path / "model")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        from transformers import modeling_flash_attention_utils as mfau
        d = {str(tmp_path / 'model')!r}
        ours = AutoModelForCausalLM.from_pretrained(d, attn_implementation={REPO_ID!r}).eval()
        ref = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
        ids = torch.randint(3, 128, (3, 9)); mask = torch.ones_like(ids); mask[0, :4] = 0; mask[2, :1] = 0
        with torch.no_grad():
            a, b = ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        fn = mfau._flash_varlen_fn
        print(json.dumps({{"impl": ours.config._attn_implementation,
                          "diff": (a - b)[mask.bool()].abs().max().item(),
                          "kernel_file": sys.modules[fn.__module__].__file__}}))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_KERNELS", "KERNELS_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["impl"] == REPO_ID
    assert Path(res["kernel_file"]).resolve().is_relative_to(snapshot.resolve()), res
    assert res["diff"] <= 1e-4, res


def test_from_pretrained_and_set_attn_implementation_via_local_kernels(local_kernel, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers import modeling_flash_attention_utils as mfau

    (ref,) = twin_models(tiny_config("llama"), ("sdpa",))
    ref.save_pretrained(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=local_kernel).eval()
    assert ours.config._attn_implementation == local_kernel
    ids, mask = _left_padded(128, [9, 5, 7])
    with torch.no_grad():
        expect = ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                                   expect[mask.bool()], **TOL)
        kernel_file = Path(sys.modules[mfau._flash_varlen_fn.__module__].__file__).resolve()
        assert kernel_file.is_relative_to(Path(os.environ["LOCAL_KERNELS"].split("=", 1)[1]).resolve())

        ref.set_attn_implementation(local_kernel)      # switch a loaded model over
        assert ref.config._attn_implementation == local_kernel
        with KernelSpy().watch(local_kernel) as spy:
            torch.testing.assert_close(ref(ids, attention_mask=mask).logits[mask.bool()],
                                       expect[mask.bool()], **TOL)
        assert spy.names() == ["flash_attn_varlen_func"] * 2


# --- every path of Transformers' flash dispatch -------------------------------------------------

@pytest.fixture
def llama_pair(local_kernel):
    ref, ours = twin_models(tiny_config("llama"), ("sdpa", local_kernel))
    return ref, ours, local_kernel


@torch.no_grad()
def test_no_padding_uses_flash_attn_func(llama_pair):
    ref, ours, impl = llama_pair
    ids = torch.randint(3, 128, (2, 17))
    with KernelSpy().watch(impl) as spy:
        got = ours(ids).logits
    assert spy.names() == ["flash_attn_func"] * 2
    assert all(kw["causal"] is True for kw in spy.kwargs_of("flash_attn_func"))
    with KernelSpy().watch(impl) as ref_spy:
        expect = ref(ids).logits
    assert ref_spy.calls == [], "the SDPA reference must not run our kernel"
    torch.testing.assert_close(got, expect, **TOL)


@torch.no_grad()
def test_left_padded_batch_uses_varlen_and_matches_each_sequence_alone(llama_pair):
    ref, ours, impl = llama_pair
    ids, mask = _left_padded(128, [12, 3, 8, 1])
    with KernelSpy().watch(impl) as spy:
        got = ours(ids, attention_mask=mask).logits
    assert spy.names() == ["flash_attn_varlen_func"] * 2
    for i, alone in enumerate(_per_sequence_logits(ref, ids, mask)):
        torch.testing.assert_close(got[i, mask[i].bool()], alone, **TOL)


@torch.no_grad()
def test_packed_position_ids_use_varlen_with_tensor_max_seqlen(llama_pair):
    ref, ours, impl = llama_pair
    lengths = [5, 9, 2]
    ids = torch.randint(3, 128, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with KernelSpy().watch(impl) as spy:
        got = ours(ids, position_ids=pos).logits[0]
    kws = spy.kwargs_of("flash_attn_varlen_func")
    assert len(kws) == 2 and spy.names() == ["flash_attn_varlen_func"] * 2
    assert isinstance(kws[0]["max_seqlen_q"], torch.Tensor) and kws[0]["max_seqlen_q"].dim() == 0
    assert kws[0]["cu_seqlens_q"].tolist() == [0, 5, 14, 16]
    start = 0
    for n in lengths:
        alone = ref(ids[:, start:start + n]).logits[0]
        torch.testing.assert_close(got[start:start + n], alone, **TOL)
        start += n


@torch.no_grad()
def test_explicit_cu_seq_lens_kwargs_use_varlen(llama_pair):
    ref, ours, impl = llama_pair
    lengths = [7, 4, 10]
    ids = torch.randint(3, 128, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 7, 11, 21], dtype=torch.int32)
    with KernelSpy().watch(impl) as spy:
        got = ours(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=10, max_length_k=10).logits[0]
    kws = spy.kwargs_of("flash_attn_varlen_func")
    assert len(kws) == 2 and kws[0]["max_seqlen_q"] == 10 and kws[0]["cu_seqlens_k"] is cu
    start = 0
    for n in lengths:
        torch.testing.assert_close(got[start:start + n], ref(ids[:, start:start + n]).logits[0], **TOL)
        start += n


@torch.no_grad()
def test_generate_greedy_tokens_identical_to_sdpa(llama_pair):
    ref, ours, impl = llama_pair
    ids, mask = _left_padded(128, [6, 11, 3], seed=7)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with KernelSpy().watch(impl) as spy:
        got = ours.generate(ids, **kw)
    expect = ref.generate(ids, **kw)
    assert torch.equal(got, expect)
    # prefill and every decode step went through the kernel (q length 1 decodes are varlen)
    assert len(spy.calls) == 2 * 12


@torch.no_grad()
def test_continuous_batching_generate_batch_matches_sdpa(llama_pair):
    """generate_batch (paged KV cache, requests of different lengths batched together)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    ref, ours, impl = llama_pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 9, 3)]
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=8, max_batch_tokens=64, page_size=16)
    with KernelSpy().watch(impl) as spy:
        out = ours.generate_batch(inputs=prompts, generation_config=gc,
                                  continuous_batching_config=cb, warmup=False)
    assert spy.calls and set(spy.names()) <= {"flash_attn_varlen_func", "flash_attn_with_kvcache"}
    for i, p in enumerate(prompts):
        expect = ref.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        assert out[f"req_{i}"].generated_tokens == expect


# --- sliding window (Mistral, Qwen2) and softcap (Gemma2) reach the kernel and are honoured ------

WINDOW = 4
_WINDOW_CONFIGS = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
}


@pytest.mark.parametrize("family", sorted(_WINDOW_CONFIGS))
@torch.no_grad()
def test_sliding_window_reaches_kernel_and_matches_sdpa(local_kernel, family):
    cfg = tiny_config(family, **_WINDOW_CONFIGS[family])
    ref, ours = twin_models(cfg, ("sdpa", local_kernel))
    ids, mask = _left_padded(128, [16, 11])
    with KernelSpy().watch(local_kernel) as spy:
        got = ours(ids, attention_mask=mask).logits
        got_full = ours(ids).logits
    windows = [kw.get("window_size") for _, kw in spy.calls]
    assert windows == [(WINDOW - 1, WINDOW - 1)] * 4, windows
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref(ids, attention_mask=mask).logits[valid], **TOL)
    expect_full = ref(ids).logits
    torch.testing.assert_close(got_full, expect_full, **TOL)
    # control: the window changes the result at this length, so honouring it is visible
    (no_window,) = twin_models(tiny_config(family), ("sdpa",))
    assert (no_window(ids).logits - expect_full).abs().max() > 1e-3


@torch.no_grad()
def test_gemma2_softcap_and_window_reach_kernel_and_match_eager(local_kernel):
    softcap = 2.0
    # initializer_range 0.2: attention logits of a few units, where a softcap of 2 bites
    cfg = tiny_config("gemma2", sliding_window=WINDOW, attn_logit_softcapping=softcap,
                      initializer_range=0.2)
    ref, ours = twin_models(cfg, ("eager", local_kernel))
    ids, mask = _left_padded(128, [14, 9])
    with KernelSpy().watch(local_kernel) as spy:
        got = ours(ids, attention_mask=mask).logits
    assert [kw.get("softcap") for _, kw in spy.calls] == [softcap] * 2
    assert [kw.get("window_size") for _, kw in spy.calls] == [(WINDOW - 1, WINDOW - 1), None]
    valid = mask.bool()
    expect = ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], expect[valid], **TOL)
    # control: without the softcap the eager result moves, so honouring it is visible
    no_cap_cfg = copy.deepcopy(cfg)
    no_cap_cfg.attn_logit_softcapping = None
    (no_cap,) = twin_models(no_cap_cfg, ("eager",))
    assert (no_cap(ids, attention_mask=mask).logits - expect)[valid].abs().max() > 1e-3


# --- training ----------------------------------------------------------------------------------

def test_dropout_in_training_mode_reaches_kernel(local_kernel):
    p = 0.5
    (model,) = twin_models(tiny_config("llama", attention_dropout=p), (local_kernel,))
    ids, mask = _left_padded(128, [10, 6])
    model.train()
    with KernelSpy().watch(local_kernel) as spy:
        torch.manual_seed(123)
        a = model(ids).logits
        torch.manual_seed(123)
        b = model(ids).logits
        torch.manual_seed(321)
        c = model(ids, attention_mask=mask).logits
    assert [kw.get("dropout_p") for _, kw in spy.calls] == [p] * 6
    torch.testing.assert_close(a, b, rtol=0, atol=0)   # same generator state, same mask
    assert (a - c)[mask.bool()].abs().max() > 1e-3
    c.sum().backward()
    grads = [q.grad for q in model.parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad(), KernelSpy().watch(local_kernel) as spy:
        e1, e2 = model(ids).logits, model(ids).logits
    assert [kw.get("dropout_p") for _, kw in spy.calls] == [0.0] * 4
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    assert (e1 - a).abs().max() > 1e-3
