"""Continuous batching (`generate_batch`, Transformers 5.22.2) through our kernel on its decode
fast path: `flash_attn_with_kvcache` on the paged cache with a `block_table`, greedy tokens equal
to SDPA's in fp32.

Transformers takes that path only when `ensure_decode_fast_path_is_available`
(generation/continuous_batching/initialization.py) finds both
* an attention implementation whose name matches `flash.*2` or `flash.*3`
  (`is_flash_attention_requested(version=[2, 3])`, meant for FlashAttention-2/3 and their Hub
  kernels): `flash_hub` and our repo id do not match, so a model must name our kernel like
  `flash_hub_fa2` for the fast path; any other name decodes through `flash_attn_varlen_func`
  (tests/test_transformers.py covers that path);
* CUDA (or XPU). On the CPU these tests run Transformers' own gate with `torch.cuda.is_available`
  answering True for that one call; everything after it (scheduler, paged cache, kernel) is the
  real CPU path.
"""

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))

import flash_attn_hub  # noqa: E402
from flash_attn_hub.testing import KernelSpy, kernel_source, tiny_config, twin_models  # noqa: E402

FAST_PATH_NAME = "flash_hub_fa2"
PAGE_SIZE = 16
MAX_BLOCKS = 4


@pytest.fixture
def register(monkeypatch):
    """Register our kernel under the given names (Hub unreachable); unregister afterwards."""
    import huggingface_hub.constants as hfc
    from transformers import modeling_flash_attention_utils as mfau

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    monkeypatch.setattr(mfau, "_loaded_implementation", None)
    names = []

    def reg(name):
        names.append(name)
        return flash_attn_hub.register(name=name, source=kernel_source())

    yield reg
    for n in names:
        flash_attn_hub.unregister(n)


@pytest.fixture
def gate_as_on_cuda(monkeypatch):
    """Transformers' fast-path gate, run as if CUDA were present. The kernel functions are
    resolved first, on the CPU: under the patched answer, `kernels` would pick a CUDA build."""
    from transformers import modeling_flash_attention_utils as mfau
    from transformers.generation.continuous_batching import initialization as cbi

    gate = cbi.ensure_decode_fast_path_is_available

    def on_cuda(config, *args, **kwargs):
        mfau.lazy_import_flash_attention(config._attn_implementation)
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            return gate(config, *args, **kwargs)

    monkeypatch.setattr(cbi, "ensure_decode_fast_path_is_available", on_cuda)
    return on_cuda


@pytest.mark.parametrize("name, fast_path", [(FAST_PATH_NAME, True), ("flash_hub", False)])
def test_fast_path_gate_needs_a_flash2_or_flash3_name(register, gate_as_on_cuda, name, fast_path):
    """Why the e2e benchmark registers our kernel as flash_hub_fa2 for continuous batching."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    register(name)
    config = tiny_config("llama")
    config._attn_implementation = name
    cb = ContinuousBatchingConfig(page_size=PAGE_SIZE, max_blocks_per_request=MAX_BLOCKS)
    gate_as_on_cuda(config, cb, True)
    assert cb.max_blocks_per_request == (MAX_BLOCKS if fast_path else 0)


@pytest.mark.fast
@torch.no_grad()
def test_generate_batch_decodes_through_kvcache_with_block_table_and_matches_sdpa(
        register, gate_as_on_cuda):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    register(FAST_PATH_NAME)
    ref, ours = twin_models(tiny_config("llama"), ("sdpa", FAST_PATH_NAME))
    g = torch.Generator().manual_seed(5)
    # Prompt + new tokens cross page boundaries (16) in some requests and not in others.
    lengths, new = (5, 14, 3, 17), 8
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in lengths]
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # No CUDA graphs: the model is on the CPU, also on a machine that has a GPU (where
    # Transformers would otherwise turn them on for a flash implementation).
    cb = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64, page_size=PAGE_SIZE,
                                  max_blocks_per_request=MAX_BLOCKS, use_cuda_graph=False)
    with KernelSpy().watch(FAST_PATH_NAME) as spy:
        out = ours.generate_batch(inputs=prompts, generation_config=gc,
                                  continuous_batching_config=cb, warmup=False)

    decode = spy.kwargs_of("flash_attn_with_kvcache")
    layers = ours.config.num_hidden_layers
    assert set(spy.names()) == {"flash_attn_varlen_func", "flash_attn_with_kvcache"}
    # Every request decodes new - 1 tokens after its prefill, batched: at least that many steps.
    assert len(decode) >= (new - 1) * layers
    for kw in decode:
        table, seqlens = kw["block_table"], kw["cache_seqlens"]
        assert table.dtype == torch.int32 and table.shape[1] == MAX_BLOCKS, table.shape
        assert seqlens.shape == (table.shape[0],) and kw["causal"] is True
    for i, p in enumerate(prompts):
        expect = ref.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
        assert out[f"req_{i}"].generated_tokens == expect, i
