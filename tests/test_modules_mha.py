"""flash_attn.modules.mha: FlashSelfAttention / FlashCrossAttention (padded and unpadded), MHA
(MHA/GQA/MQA, rotary, ALiBi, windows, cross-attention, decoding through InferenceParams), the
plain-PyTorch path and the projection form of FlashSelfAttention, forward and backward against
plain PyTorch in fp64 by the 2x/3x rule (tests/reference.py)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import device_params
from helpers import cu_seqlens
from reference import apply_rotary, attention_ref, pt_options, varlen_ref

pytestmark = pytest.mark.fast


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("causal", [False, True])
def test_flash_self_attention_padded_and_unpadded(flash, tol, device, causal):
    mha = flash.modules.mha
    dtype = _dtype(device)
    slopes = torch.rand(4, device=device) * 0.3
    attn = mha.FlashSelfAttention(causal=causal, alibi_slopes=slopes, window_size=(6, -1)).eval()
    qkv = torch.randn(2, 13, 3, 4, 32, device=device).to(dtype).requires_grad_()
    out = attn(qkv)
    kw = dict(causal=causal, window_size=(6, -1), alibi_slopes=slopes)
    ref = attention_ref(*qkv.unbind(2), **kw)[0]
    pt = attention_ref(*qkv.unbind(2), **kw, **pt_options(dtype))[0]
    tol.check("out", out, ref, pt, dtype)
    dout = torch.randn_like(out)
    for name, g, r, p in zip(["dqkv"], _grads(out, qkv, dout), _grads(ref, qkv, dout.double()),
                             _grads(pt, qkv, dout)):
        tol.check(name, g, r, p, dtype, factor=3.0)
    # unpadded: (total, 3, h, d) with cu_seqlens; causal=False overrides the constructor
    lens = [5, 0, 8]
    packed = torch.randn(sum(lens), 3, 4, 32, device=device).to(dtype)
    cu = cu_seqlens(lens, device)
    out = attn(packed, causal=False, cu_seqlens=cu, max_seqlen=8)
    kw = dict(window_size=(6, -1), alibi_slopes=slopes)
    ref = varlen_ref(*packed.unbind(1), cu, cu, **kw)[0]
    pt = varlen_ref(*packed.unbind(1), cu, cu, **kw, **pt_options(dtype))[0]
    tol.check("out varlen", out, ref, pt, dtype)


@pytest.mark.parametrize("device", device_params())
def test_flash_cross_attention_gqa_padded_and_unpadded(flash, tol, device):
    mha = flash.modules.mha
    dtype = _dtype(device)
    attn = mha.FlashCrossAttention(causal=True, softmax_scale=0.3).eval()
    q = torch.randn(2, 7, 6, 16, device=device).to(dtype).requires_grad_()
    kv = torch.randn(2, 19, 2, 2, 16, device=device).to(dtype).requires_grad_()
    out = attn(q, kv)
    ref = attention_ref(q, *kv.unbind(2), causal=True, softmax_scale=0.3)[0]
    pt = attention_ref(q, *kv.unbind(2), causal=True, softmax_scale=0.3, **pt_options(dtype))[0]
    tol.check("out", out, ref, pt, dtype)
    dout = torch.randn_like(out)
    for name, g, r, p in zip(["dq", "dkv"], _grads(out, (q, kv), dout),
                             _grads(ref, (q, kv), dout.double()), _grads(pt, (q, kv), dout)):
        tol.check(name, g, r, p, dtype, factor=3.0)
    lens_q, lens_k = [3, 4], [9, 1]
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    qv = torch.randn(7, 6, 16, device=device).to(dtype)
    kvv = torch.randn(10, 2, 2, 16, device=device).to(dtype)
    out = attn(qv, kvv, cu_seqlens=cu_q, max_seqlen=4, cu_seqlens_k=cu_k, max_seqlen_k=9)
    ref = varlen_ref(qv, *kvv.unbind(1), cu_q, cu_k, causal=True, softmax_scale=0.3)[0]
    pt = varlen_ref(qv, *kvv.unbind(1), cu_q, cu_k, causal=True, softmax_scale=0.3,
                    **pt_options(dtype))[0]
    tol.check("out varlen", out, ref, pt, dtype)


def _mha_ref(m, x, x_kv, upcast, dtype, seqlen_offset=0):
    """MHA written out: projections, rotary on the first rotary_emb_dim dims (the module's own
    cos/sin tables), attention_ref with the module's mask/ALiBi, output projection."""
    dt = torch.float64 if upcast else dtype
    lin = lambda mod, t: F.linear(t.to(dt), mod.weight.to(dt),  # noqa: E731
                                  None if mod.bias is None else mod.bias.to(dt))
    e, d = m.embed_dim, m.head_dim
    if m.cross_attn:
        q, kv = lin(m.Wq, x), lin(m.Wkv, x_kv)
    else:
        qkv = lin(m.Wqkv, x)
        q, kv = qkv[..., :e], qkv[..., e:]
    q = q.unflatten(-1, (m.num_heads, d))
    k, v = kv.unflatten(-1, (2, m.num_heads_kv, d)).unbind(2)
    if m.rotary_emb_dim > 0:
        emb = m.rotary_emb
        pos = torch.arange(x.shape[1], device=x.device) + seqlen_offset
        cos, sin = emb._cos_cached.to(dt), emb._sin_cached.to(dt)
        q = apply_rotary(q, cos, sin, pos, emb.interleaved)
        k = apply_rotary(k, cos, sin, pos, emb.interleaved)
    inner = m.inner_attn
    opts = {} if upcast else pt_options(dtype)
    out = attention_ref(q, k, v, causal=inner.causal, softmax_scale=inner.softmax_scale,
                        window_size=inner.window_size, alibi_slopes=inner.alibi_slopes,
                        **opts)[0]
    return lin(m.out_proj, out.flatten(-2))


MHA_CASES = {
    "mha-rotary-causal": dict(num_heads_kv=None, rotary_emb_dim=8, causal=True),
    "gqa-alibi": dict(num_heads_kv=2, use_alibi=True),
    "mqa-rotary16-interleaved-local": dict(num_heads_kv=1, rotary_emb_dim=16,
                                           rotary_emb_interleaved=True, window_size=(3, 0)),
    "cross-gqa": dict(num_heads_kv=2, cross_attn=True, qkv_proj_bias=False),
}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_matches_reference_fwd_bwd(flash, tol, device, case):
    dtype = _dtype(device)
    m = flash.modules.mha.MHA(64, 4, use_flash_attn=True, device=device, dtype=dtype,
                              **MHA_CASES[case]).eval()
    x = torch.randn(2, 11, 64, device=device).to(dtype).requires_grad_()
    x_kv = torch.randn(2, 6, 64, device=device).to(dtype) if m.cross_attn else None
    out = m(x, x_kv=x_kv)
    ref = _mha_ref(m, x, x_kv, True, dtype)
    pt = _mha_ref(m, x, x_kv, False, dtype)
    tol.check("out", out, ref, pt, dtype)
    dout = torch.randn_like(out)
    w = m.Wq.weight if m.cross_attn else m.Wqkv.weight
    for name, g, r, p in zip(["dx", "dW"], _grads(out, (x, w), dout),
                             _grads(ref, (x, w), dout.double()), _grads(pt, (x, w), dout)):
        tol.check(name, g, r, p, dtype, factor=3.0)


def test_mha_alibi_slopes_are_fa2s(flash):
    """The slopes of the ALiBi paper (geometric from 2^(-8/n); non powers of two interleave)."""
    mha = flash.modules.mha
    assert mha.get_alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    s6 = mha.get_alibi_slopes(6)
    assert s6[:4] == [2.0 ** -(2 * (i + 1)) for i in range(4)]
    assert s6[4:] == [2.0 ** -1, 2.0 ** -3]


@pytest.mark.parametrize("use_flash_attn", [True, False])
@pytest.mark.parametrize("rotary_emb_dim", [0, 8, 16])
def test_mha_incremental_decoding_matches_full_forward(flash, use_flash_attn, rotary_emb_dim):
    """Prefill then one token at a time through InferenceParams (flash_attn_with_kvcache after the
    prefill; rotary inside it when rotary_emb_dim % 16 == 0) reproduces the causal forward."""
    mha = flash.modules.mha
    m = mha.MHA(64, 4, num_heads_kv=2, causal=True, layer_idx=3, rotary_emb_dim=rotary_emb_dim,
                use_flash_attn=use_flash_attn, dtype=torch.float64).eval()
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    full = m(x)
    params = mha.InferenceParams(max_seqlen=16, max_batch_size=2)
    steps = [m(x[:, :5], inference_params=params)]
    params.seqlen_offset = 5
    for t in range(5, 9):
        steps.append(m(x[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    assert 3 in params.key_value_memory_dict
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_mha_dropout_only_in_train_mode(flash):
    m = flash.modules.mha.MHA(32, 4, dropout=0.5, use_flash_attn=True)
    x = torch.randn(2, 8, 32)
    train = m(x)
    m.eval()
    assert torch.equal(m(x), m(x))
    assert not torch.allclose(train, m(x))


def test_mha_plain_path_with_key_padding_mask_matches_flash_varlen(flash):
    """use_flash_attn=False serves key_padding_mask with explicit math; the flash path serves the
    same batch unpadded (bert_padding + cu_seqlens): same values on the kept tokens."""
    mha, bp = flash.modules.mha, flash.bert_padding
    plain = mha.MHA(32, 4, num_heads_kv=2, causal=True, dtype=torch.float64)
    fast = mha.MHA(32, 4, num_heads_kv=2, causal=True, use_flash_attn=True, dtype=torch.float64)
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 5])[:, None]
    out_plain = plain(x, key_padding_mask=mask)
    x_unpad, indices, cu, max_s, _ = bp.unpad_input(x, mask)
    out_fast = bp.pad_input(fast(x_unpad, cu_seqlens=cu, max_seqlen=max_s), indices, 3, 7)
    torch.testing.assert_close(out_fast[mask], out_plain[mask], rtol=1e-10, atol=1e-10)


def test_mha_unsupported_options_raise_clearly(flash):
    MHA = flash.modules.mha.MHA
    with pytest.raises(NotImplementedError, match="dwconv"):
        MHA(32, 4, dwconv=True)
    with pytest.raises(NotImplementedError, match="fused_bias_fc"):
        MHA(32, 4, fused_bias_fc=True)
    with pytest.raises(RuntimeError, match="unpad"):
        MHA(32, 4, use_flash_attn=True)(torch.randn(1, 3, 32),
                                        key_padding_mask=torch.ones(1, 3, dtype=torch.bool))


class TutorialStyleBlock(torch.nn.Module):
    """The drop-in tutorial's shape of use, in our own words: a seq-first (seq, batch, embed)
    input turned batch-first, FlashSelfAttention(embed_dim=..., num_heads=..., use_bias=...)
    called as attention(x, causal=True), a linear layer and a residual, back to seq-first."""

    def __init__(self, flash, embed_dim, num_heads, use_bias=False):
        super().__init__()
        self.attention = flash.FlashSelfAttention(embed_dim=embed_dim, num_heads=num_heads,
                                                  use_bias=use_bias)
        self.linear = torch.nn.Linear(embed_dim, embed_dim)

    def forward(self, x):
        x = x.permute(1, 0, 2)
        return (self.linear(self.attention(x, causal=True)) + x).permute(1, 0, 2)


@pytest.mark.parametrize("use_bias", [False, True])
def test_flash_self_attention_projection_form_as_in_drop_in_tutorials(flash, tol, use_bias):
    """The projection-owning form: values and gradients of the tutorial-style block against the
    projections + causal attention written out in fp64."""
    embed_dim, num_heads, seq, batch = 512, 8, 40, 2
    block = TutorialStyleBlock(flash, embed_dim, num_heads, use_bias)
    attn = block.attention
    x = torch.randn(seq, batch, embed_dim, requires_grad=True)
    y = block(x)
    assert y.shape == (seq, batch, embed_dim)

    def ref_fn(upcast):
        dt = torch.float64 if upcast else torch.float32
        bias = lambda lin: None if lin.bias is None else lin.bias.to(dt)  # noqa: E731
        xb = x.to(dt).permute(1, 0, 2)
        qkv = F.linear(xb, attn.Wqkv.weight.to(dt), bias(attn.Wqkv))
        q, k, v = qkv.unflatten(-1, (3, num_heads, embed_dim // num_heads)).unbind(2)
        o = attention_ref(q, k, v, causal=True, **({} if upcast else pt_options(dt)))[0]
        o = F.linear(o.flatten(-2), attn.out_proj.weight.to(dt), bias(attn.out_proj))
        return (F.linear(o, block.linear.weight.to(dt), block.linear.bias.to(dt))
                + xb).permute(1, 0, 2)

    ref, pt = ref_fn(True), ref_fn(False)
    tol.check("out", y, ref, pt, torch.float32)
    dout = torch.randn_like(y)
    tol.check("dx", *[torch.autograd.grad(o, x, g)[0] for o, g in
                      ((y, dout), (ref, dout.double()), (pt, dout))], torch.float32, factor=3.0)
    # the FlashAttention-2.8 form still takes packed qkv
    assert flash.FlashSelfAttention(causal=True)(torch.randn(1, 4, 3, 2, 8)).shape == (1, 4, 2, 8)
    with pytest.raises(ValueError, match="needs embed_dim"):
        flash.FlashSelfAttention(num_heads=4)
