"""The kernel-hub rotary layer: `kernels.kernelize` swaps our `apply_rotary_transformers` layer
into Transformers' `@use_kernel_forward_from_hub("rotary_pos_emb")` hook of a small Llama, and
the logits (and gradients) agree with the unkernelized model by the 2x/3x rule against fp64."""
import copy

import pytest
import torch

import kernel_loader

transformers = pytest.importorskip("transformers")
kernels = pytest.importorskip("kernels")

pytestmark = pytest.mark.fast


def _llama(dtype):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _kernelize(model, mapping):
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.TRAINING, device="cpu", use_fallback=True)


def _logits_and_grad(model, ids, position_ids):
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=position_ids).logits
    logits.square().sum().backward()
    return logits.detach(), model.model.embed_tokens.weight.grad.clone()


def test_kernelize_swaps_rotary_into_llama_and_keeps_logits(flash, tol):
    layer = flash.layers.apply_rotary_transformers
    assert layer.has_backward and layer.can_torch_compile
    ids = torch.randint(0, 97, (2, 11))
    position_ids = torch.stack([torch.arange(11), torch.arange(11) + 5])  # per-row positions
    ref_model = _llama(torch.float64)
    pt_model = copy.deepcopy(ref_model).float()
    ref = _logits_and_grad(ref_model, ids, position_ids)
    pt = _logits_and_grad(pt_model, ids, position_ids)

    repo = kernels.LocalLayerRepository(repo_path=kernel_loader.BUILD_DIR,
                                        layer_name="apply_rotary_transformers")
    ours_model = copy.deepcopy(pt_model)
    _kernelize(ours_model, {"rotary_pos_emb": {"cpu": repo}})
    try:
        attn = ours_model.model.layers[0].self_attn
        (hook,) = attn._kernel_funcs.values()
        assert hook.forward.__func__ is layer.forward, "kernelize did not swap our layer in"
        ours = _logits_and_grad(ours_model, ids, position_ids)
    finally:
        _kernelize(ours_model, {})  # the hook is shared by every Llama: put the original back
    tol.check("logits", ours[0], ref[0], pt[0], torch.float32)
    tol.check("d embed", ours[1], ref[1], pt[1], torch.float32, factor=3.0)
