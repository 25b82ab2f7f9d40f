"""The oracle itself, checked against independent code (PyTorch SDPA, hand-written masks), so
that a bug in tests/reference.py cannot make a wrong kernel pass or a right one fail."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import qkv
from reference import apply_rotary, attention_ref, kvcache_ref, pt_options, visible_mask


@pytest.mark.fast
def test_visible_mask_is_bottom_right_aligned():
    """FA2's docstring example: seqlen_q = 2, seqlen_k = 5, causal -> rows see 4 and 5 keys;
    seqlen_q = 5, seqlen_k = 2 -> the first three rows see nothing."""
    assert visible_mask(2, 5, causal=True).tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert visible_mask(5, 2, causal=True).tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    # local (1, 0) on a square: the diagonal and one key to the left
    assert visible_mask(3, 3, 1, 0).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert visible_mask(2, 3, 0, 1).tolist() == [[0, 1, 1], [0, 0, 1]]


@pytest.mark.fast
@pytest.mark.parametrize("mask", ["none", "causal", "local"])
def test_reference_matches_sdpa_with_an_explicit_mask(mask):
    """GQA, ALiBi as an additive bias, custom scale; rows that see nothing excluded (SDPA
    gives NaN there, the contract says 0)."""
    b, sq, sk, h, hk, d = 2, 37, 53, 6, 2, 16
    q, k, v = qkv(b, sq, sk, h, hk, d, dtype=torch.float64, device="cpu")
    window = {"none": (-1, -1), "causal": (-1, 0), "local": (7, 3)}[mask]
    slopes = torch.rand(b, h, dtype=torch.float32)
    out, lse, _ = attention_ref(q, k, v, softmax_scale=0.3, window_size=window,
                                alibi_slopes=slopes)
    vis = visible_mask(sq, sk, *window)
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    bias = -slopes.double()[:, :, None, None] * (i + sk - sq - j).abs()
    bias = bias.masked_fill(~vis, float("-inf"))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), attn_mask=bias, scale=0.3,
                                         enable_gqa=True).transpose(1, 2)
    rows = vis.any(-1)
    torch.testing.assert_close(out[:, rows], ref[:, rows], rtol=1e-12, atol=1e-12)
    assert torch.all(out[:, ~rows] == 0) and torch.all(lse[:, :, ~rows] == math.inf)
    kk = k.repeat_interleave(3, 2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * 0.3 + bias
    torch.testing.assert_close(lse[:, :, rows], torch.logsumexp(s, -1)[:, :, rows])


@pytest.mark.fast
def test_reference_softcap_and_dropout_by_hand():
    q, k, v = qkv(1, 4, 6, 1, 1, 8, dtype=torch.float64, device="cpu")
    keep = torch.rand(1, 1, 4, 6) > 0.4
    out, _, p = attention_ref(q, k, v, softcap=0.7, keep_mask=keep, dropout_p=0.4)
    s = (q[0, :, 0] @ k[0, :, 0].T) / math.sqrt(8)
    s = 0.7 * torch.tanh(s / 0.7)
    p_hand = torch.softmax(s, -1)
    torch.testing.assert_close(p[0, 0], p_hand)
    torch.testing.assert_close(out[0, :, 0], (p_hand * keep[0, 0] / 0.6) @ v[0, :, 0])


@pytest.mark.fast
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_pt_oracle_is_close_but_not_identical(dtype):
    """The 'same math in dtype' oracle differs from the fp64 reference by honest rounding:
    small, and not zero (a zero would make the 2x rule demand bit-exactness)."""
    q, k, v = qkv(2, 50, 60, 2, 2, 64, dtype=dtype, device="cpu")
    ref = attention_ref(q, k, v, causal=True)[0]
    pt = attention_ref(q, k, v, causal=True, **pt_options(dtype))[0]
    err = (pt.double() - ref).abs().max().item()
    assert 0 < err < 50 * torch.finfo(dtype).eps


@pytest.mark.fast
def test_rotary_styles_by_hand():
    x = torch.arange(1.0, 7.0, dtype=torch.float64).view(1, 1, 6)  # (s, h, d), rotary_dim 4
    cos = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    sin = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    pos = torch.tensor([0])
    # interleaved pairs (x0, x1) rotated by 90 degrees, (x2, x3) by 0
    assert apply_rotary(x, cos, sin, pos, True).flatten().tolist() == [-2, 1, 3, 4, 5, 6]
    # half-split pairs (x0, x2) rotated by 90 degrees, (x1, x3) by 0
    assert apply_rotary(x, cos, sin, pos, False).flatten().tolist() == [-3, 2, 1, 4, 5, 6]


@pytest.mark.fast
def test_kvcache_reference_appends_and_attends_like_plain_attention():
    q, kc, vc = (torch.randn(1, n, 2, 8, dtype=torch.float64) for n in (2, 10, 10))
    k, v = (torch.randn(1, 2, 2, 8, dtype=torch.float64) for _ in range(2))
    out, _, kc2, vc2 = kvcache_ref(q, kc, vc, k, v, cache_seqlens=[5], cache_leftpad=[1],
                                   causal=True)
    assert torch.equal(kc2[0, 5:7], k[0]) and torch.equal(vc2[0, 5:7], v[0])
    assert torch.equal(kc2[0, :5], kc[0, :5]) and torch.equal(kc2[0, 7:], kc[0, 7:])
    ref = attention_ref(q, kc2[:, 1:7], vc2[:, 1:7], causal=True)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.fast
def test_fp64_oracle_survives_fully_masked_key_blocks():
    """Regression: the tiled fp64 oracle computed exp(-inf - (-inf)) = NaN for rows whose
    first key blocks were all masked (local windows), making every bound NaN."""
    q, k, v = qkv(1, 5, 300, 1, 1, 16, dtype=torch.float64, device="cpu")
    kw = dict(window_size=(3, 0))  # rows see only the last ~8 keys: blocks 0..3 fully masked
    out_pt, lse_pt, _ = attention_ref(q, k, v, **kw, **pt_options(torch.float64))
    out, lse, _ = attention_ref(q, k, v, **kw)
    assert torch.isfinite(out_pt).all() and torch.isfinite(lse_pt).all()
    torch.testing.assert_close(out_pt, out, rtol=1e-12, atol=1e-12)
