"""flash_attn.modules.mha.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention: swapped
into a model built with nn.MultiheadAttention by load_state_dict (same parameter names), it gives
that model's outputs and gradients by the 2x/3x rule against the fp64 model; key_padding_mask,
is_causal / a causal attn_mask, batch_first, kdim/vdim, add_bias_kv and add_zero_attn included.
What it cannot serve raises with a message saying how to call it."""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import device_params

pytestmark = pytest.mark.fast


class Block(nn.Module):
    """A model written against nn.MultiheadAttention."""

    def __init__(self, embed_dim, num_heads, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, **kw)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, key=None, value=None, **kw):
        key = x if key is None else key
        out, weights = self.attn(x, key, key if value is None else value, need_weights=False,
                                 **kw)
        assert weights is None
        return self.proj(out)


CASES = {
    "self-seq-first": dict(kw={}, call="plain"),
    "self-batch-first-causal-mask": dict(kw=dict(batch_first=True), call="float-mask"),
    "self-bool-causal-mask-no-bias": dict(kw=dict(batch_first=True, bias=False),
                                          call="bool-mask"),
    "padding-bias-kv-zero-attn": dict(kw=dict(add_bias_kv=True, add_zero_attn=True),
                                      call="padding"),
    "cross-kdim-vdim-padding": dict(kw=dict(kdim=24, vdim=40, batch_first=True),
                                    call="padding"),
}


def _inputs(case, e=32, tgt=9, batch=3):
    """(x, key, value) in fp64 in the module's layout (key/value None: self-attention) and the
    call's keyword arguments."""
    kw = case["kw"]
    cross = "kdim" in kw
    src = 13 if cross else tgt
    x = torch.randn(batch, tgt, e, dtype=torch.float64)
    key = torch.randn(batch, src, kw["kdim"], dtype=torch.float64) if cross else None
    value = torch.randn(batch, src, kw["vdim"], dtype=torch.float64) if cross else None
    if not kw.get("batch_first", False):
        x = x.transpose(0, 1)
    call = {}
    if case["call"] == "padding":
        lens = torch.tensor([src, 4, 1])
        call["key_padding_mask"] = torch.arange(src)[None, :] >= lens[:, None]  # True = ignore
    elif case["call"] == "float-mask":
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(tgt,
                                                                           dtype=torch.float64)
        call["is_causal"] = True
    elif case["call"] == "bool-mask":
        call["attn_mask"] = torch.ones(tgt, tgt, dtype=torch.bool).triu(1)
    return (x, key, value), call


def _to(obj, dtype, device="cpu"):
    if torch.is_tensor(obj):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    return obj


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("name", list(CASES))
def test_swapped_into_nn_multihead_attention_model_matches(flash, tol, name, device):
    """CPU: the models in fp32 (pt: nn.MultiheadAttention in fp32); CUDA: in bf16 (the CUDA
    kernels take fp16/bf16), pt = nn.MultiheadAttention in bf16 on the GPU."""
    case = CASES[name]
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    ref_model = Block(32, 4, **case["kw"]).double()
    with torch.no_grad():  # nonzero biases so the bias paths are exercised
        for p in ref_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pt_model = copy.deepcopy(ref_model).to(device, dt)
    ours_model = copy.deepcopy(pt_model)
    ours_model.attn = flash.modules.mha.MultiheadAttention(32, 4, **case["kw"]).to(device, dt)
    ours_model.load_state_dict(pt_model.state_dict())  # strict: the same parameter names
    inputs, call = _inputs(case)
    weight = "q_proj_weight" if "kdim" in case["kw"] else "in_proj_weight"
    results = {}
    for label, model, dtype, dev in (("ours", ours_model, dt, device),
                                     ("ref", ref_model, torch.float64, "cpu"),
                                     ("pt", pt_model, dt, device)):
        x, key, value = (_to(t, dtype, dev) for t in inputs)
        x = x.clone().requires_grad_()
        out = model(x, key, value, **{k: _to(v, dtype, dev) for k, v in call.items()})
        results[label] = (out, x, getattr(model.attn, weight))
    dout = torch.randn_like(results["ref"][0])
    tol.check("out", *(results[k][0] for k in ("ours", "ref", "pt")), dt)
    grads = {k: torch.autograd.grad(out, (x, w), dout.to(out.device, out.dtype))
             for k, (out, x, w) in results.items()}
    for i, gname in enumerate(["dx", "d" + weight]):
        tol.check(gname, *(grads[k][i] for k in ("ours", "ref", "pt")), dt, factor=3.0)


def test_state_dict_keys_are_nn_multihead_attentions(flash):
    for kw in ({}, dict(kdim=8, vdim=12), dict(bias=False, add_bias_kv=True)):
        ours = flash.modules.mha.MultiheadAttention(16, 2, **kw)
        theirs = nn.MultiheadAttention(16, 2, **kw)
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
            {k: v.shape for k, v in theirs.state_dict().items()}


def test_unsupported_calls_raise_with_how_to_call(flash):
    m = flash.modules.mha.MultiheadAttention(16, 2)
    x = torch.randn(5, 2, 16)
    with pytest.raises(RuntimeError, match="need_weights=False"):
        m(x, x, x)
    with pytest.raises(RuntimeError, match="only the causal attn_mask"):
        m(x, x, x, need_weights=False, attn_mask=torch.zeros(5, 5).tril(-1).bool())
    out, weights = m(x, x, x, need_weights=False)
    assert out.shape == x.shape and weights is None
