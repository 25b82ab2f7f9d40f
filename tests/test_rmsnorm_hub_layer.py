"""The kernel-hub RMSNorm layer: `kernels.kernelize` swaps our `RMSNorm` into Transformers'
`@use_kernel_forward_from_hub("RMSNorm")` modules of a small Llama and a small Qwen2 on the CPU,
and the logits and gradients agree with the unswapped model by the 2x/3x rule against fp64; the
layer alone matches LlamaRMSNorm's dtype semantics (fp32 statistics, cast back, weight promotion).
"""
import copy

import pytest
import torch

import kernel_loader

transformers = pytest.importorskip("transformers")
kernels = pytest.importorskip("kernels")

pytestmark = [pytest.mark.fast, pytest.mark.usefixtures("fused_cuda")]


def _model(family, dtype):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-5)
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    with torch.no_grad():  # non-trivial norm weights (they start at 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.to(dtype).eval()


def _mapping():
    repo = kernels.LocalLayerRepository(repo_path=kernel_loader.BUILD_DIR, layer_name="RMSNorm")
    return {"RMSNorm": {"cpu": repo}}  # these models run on the CPU here


def _kernelize(model, mapping):
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.TRAINING, device="cpu", use_fallback=True)


def _logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.square().sum().backward()
    norm_w = model.model.layers[0].input_layernorm.weight.grad.clone()
    return logits.detach(), model.model.embed_tokens.weight.grad.clone(), norm_w


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kernelize_swaps_rmsnorm_and_keeps_logits(flash, tol, family):
    layer = flash.layers.RMSNorm
    assert layer.has_backward and layer.can_torch_compile
    ids = torch.randint(0, 97, (2, 13))
    ref_model = _model(family, torch.float64)
    pt_model = copy.deepcopy(ref_model).float()
    ref = _logits_and_grads(ref_model, ids)
    pt = _logits_and_grads(pt_model, ids)

    ours_model = copy.deepcopy(pt_model)
    _kernelize(ours_model, _mapping())
    norms = [m for m in ours_model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 5  # 2 per decoder layer and the final norm
    for m in norms:
        assert m.forward.__func__ is layer.forward, "kernelize did not swap our layer in"
    ours = _logits_and_grads(ours_model, ids)
    tol.check("logits", ours[0], ref[0], pt[0], torch.float32)
    tol.check("d embed", ours[1], ref[1], pt[1], torch.float32, factor=3.0)
    tol.check("d norm weight", ours[2], ref[2], pt[2], torch.float32, factor=3.0)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32)])
def test_layer_matches_llama_rmsnorm_semantics(flash, tol, x_dtype, w_dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.5 * torch.randn(48))
    hf = hf.to(w_dtype)
    ours = copy.deepcopy(hf)
    ours.forward = flash.layers.RMSNorm.forward.__get__(ours)  # what kernelize does
    x = (3 * torch.randn(4, 7, 48)).to(x_dtype)
    out = ours(x)
    want = hf(x)
    assert out.dtype == want.dtype  # Transformers' promotion: fp32 weight on bf16 gives fp32
    ref_mod = copy.deepcopy(hf).double()
    xd = x.double()
    ref = ref_mod.weight * (xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-6))
    tol.check("rmsnorm", out, ref, want, x_dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_on_cuda_matches_llama_rmsnorm(flash, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(40).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(40))
    x = torch.randn(3, 5, 40, device="cuda").to(dtype)
    want = norm(x)
    norm.forward = flash.layers.RMSNorm.forward.__get__(norm)
    out = norm(x)
    assert out.dtype == want.dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)