"""flash_attn.layers.rotary on the `rotary` op: apply_rotary_emb (padded and varlen, int and
per-sequence offsets, GPT-NeoX and GPT-J pairs, partial rotary_dim, in place), the packed
qkv/kv helpers and RotaryEmbedding (cache growth, XPos), forward and backward against the fp64
oracle of tests/reference.py by the 2x/3x rule."""
import pytest
import torch

from conftest import device_params
from reference import apply_rotary

pytestmark = pytest.mark.fast


def _dtypes(device):
    return [torch.float32, torch.bfloat16] if device == "cpu" else [torch.bfloat16, torch.float16]


def _tables(seqlen_ro, rotary_dim, dtype, device):
    angle = torch.rand(seqlen_ro, rotary_dim // 2, device=device, dtype=torch.float64) * 6
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _ref(x, cos, sin, positions_per_seq, interleaved, upcast):
    """Per sequence (list of (s, h, d) tensors and their (s,) positions), the oracle rotation;
    positions past the table stay unrotated."""
    dt = torch.float64 if upcast else x[0].dtype
    c, s = cos.to(dt), sin.to(dt)
    outs = []
    for xs, pos in zip(x, positions_per_seq):
        inside = pos < c.shape[0]
        rotated = apply_rotary(xs.to(dt), c, s, pos.clamp(max=c.shape[0] - 1), interleaved)
        outs.append(torch.where(inside[:, None, None], rotated, xs.to(dt)))
    return outs


def _check(tol, name, ours, x_list, cos, sin, positions, interleaved, dtype, grad_out):
    ref = torch.cat(_ref(x_list, cos, sin, positions, interleaved, True))
    pt = torch.cat(_ref(x_list, cos, sin, positions, interleaved, False))
    tol.check(name, ours.reshape(ref.shape), ref, pt, dtype)
    return ref, pt


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout", ["padded", "varlen"])
@pytest.mark.parametrize("offsets", ["int", "tensor"])
def test_apply_rotary_emb_matches_reference_fwd_bwd(flash, tol, device, interleaved, layout,
                                                     offsets):
    rotary = flash.layers.rotary
    for dtype in _dtypes(device):
        batch, seqlen, nheads, d, rotary_dim = 3, 9, 2, 40, 24
        lens = [9, 0, 5] if layout == "varlen" else [seqlen] * batch
        cos, sin = _tables(20, rotary_dim, dtype, device)
        off = [3, 11, 15] if offsets == "tensor" else [4] * batch  # 15 + 5 runs past the table
        seqlen_offsets = (torch.tensor(off, dtype=torch.int32, device=device)
                          if offsets == "tensor" else off[0])
        if layout == "varlen":
            x = torch.randn(sum(lens), nheads, d, device=device).to(dtype).requires_grad_()
            cu = torch.tensor([0, 9, 9, 14], dtype=torch.int32, device=device)
            out = rotary.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=seqlen_offsets,
                                          cu_seqlens=cu, max_seqlen=max(lens))
            x_list = list(x.detach().split(lens))
        else:
            x = torch.randn(batch, seqlen, nheads, d, device=device).to(dtype).requires_grad_()
            out = rotary.apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=seqlen_offsets)
            x_list = list(x.detach().unbind(0))
        positions = [torch.arange(n, device=device) + o for n, o in zip(lens, off)]
        _check(tol, "out", out, x_list, cos, sin, positions, interleaved, dtype, None)
        # backward: the transpose (conjugate) rotation of dout
        dout = torch.randn_like(out)
        (dx,) = torch.autograd.grad(out, x, dout)
        dout_list = list(dout.split(lens)) if layout == "varlen" else list(dout.unbind(0))
        neg = -sin
        _check(tol, "dx", dx, dout_list, cos, neg, positions, interleaved, dtype, None)


def test_apply_rotary_emb_gradcheck_fp64(flash):
    rotary = flash.layers.rotary
    x = torch.randn(2, 5, 3, 10, dtype=torch.float64, requires_grad=True)
    cos, sin = _tables(8, 6, torch.float64, "cpu")
    torch.autograd.gradcheck(
        lambda t: rotary.apply_rotary_emb(t, cos, sin, True, seqlen_offsets=2), (x,))


def test_inplace_and_packed_helpers_rotate_q_and_k_only(flash):
    rotary = flash.layers.rotary
    cos, sin = _tables(6, 8, torch.float64, "cpu")
    qkv = torch.randn(2, 6, 3, 2, 8, dtype=torch.float64)
    expect = [rotary.apply_rotary_emb(qkv[:, :, i], cos, sin) for i in range(2)]
    v = qkv[:, :, 2].clone()
    out = rotary.apply_rotary_emb_qkv_(qkv, cos, sin)
    assert out is qkv
    torch.testing.assert_close(qkv[:, :, 0], expect[0], rtol=0, atol=0)
    torch.testing.assert_close(qkv[:, :, 1], expect[1], rtol=0, atol=0)
    assert torch.equal(qkv[:, :, 2], v)
    kv = torch.randn(2, 6, 2, 2, 8, dtype=torch.float64)
    k_rot, v = rotary.apply_rotary_emb(kv[:, :, 0], cos, sin), kv[:, :, 1].clone()
    rotary.apply_rotary_emb_kv_(kv, cos, sin)
    torch.testing.assert_close(kv[:, :, 0], k_rot, rtol=0, atol=0)
    assert torch.equal(kv[:, :, 1], v)
    x = torch.randn(2, 6, 2, 8, dtype=torch.float64)
    expect = rotary.apply_rotary_emb(x, cos, sin)
    assert rotary.apply_rotary_emb(x, cos, sin, inplace=True) is x
    torch.testing.assert_close(x, expect, rtol=0, atol=0)


def _rope_tables(dim, base, positions):
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = positions.double()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("scale_base", [None, 64.0])
def test_rotary_embedding_module_matches_formula(flash, scale_base):
    """cos/sin from base ** (-2i / dim); XPos scales q by scale ** ((pos - seqlen // 2) /
    scale_base) and k by its inverse; the cache grows to seqlen + seqlen_offset."""
    rotary = flash.layers.rotary
    dim, seqlen, offset = 16, 7, 5
    emb = rotary.RotaryEmbedding(dim, base=500.0, scale_base=scale_base)
    qkv = torch.randn(2, seqlen, 3, 2, 24, dtype=torch.float64)
    q0, k0 = qkv[:, :, 0].clone(), qkv[:, :, 1].clone()
    emb(qkv, seqlen_offset=offset)
    assert emb._seq_len_cached == seqlen + offset
    pos = torch.arange(seqlen + offset)
    cos, sin = _rope_tables(dim, 500.0, pos)
    cos_k, sin_k = cos, sin
    if scale_base is not None:
        scale = (torch.arange(0, dim, 2, dtype=torch.float64) + 0.4 * dim) / (1.4 * dim)
        power = (pos.double() - (seqlen + offset) // 2) / scale_base
        s = scale[None, :] ** power[:, None]
        cos, sin, cos_k, sin_k = cos * s, sin * s, cos_k / s, sin_k / s
    positions = torch.arange(seqlen) + offset
    for b in range(2):
        q_ref = apply_rotary(q0[b], cos.float().double(), sin.float().double(), positions, False)
        k_ref = apply_rotary(k0[b], cos_k.float().double(), sin_k.float().double(), positions,
                             False)
        torch.testing.assert_close(qkv[b, :, 0], q_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(qkv[b, :, 1], k_ref, rtol=1e-6, atol=1e-6)


def test_rotary_embedding_single_tensor_and_q_kv_forms(flash):
    rotary = flash.layers.rotary
    emb = rotary.RotaryEmbedding(8)
    q = torch.randn(2, 5, 4, 8)
    q_rot = emb(q)
    assert q_rot.shape == q.shape and not torch.equal(q_rot, q)
    kv = torch.randn(2, 5, 2, 4, 8)
    q2, kv2 = emb(q.clone(), kv.clone())
    torch.testing.assert_close(q2, q_rot, rtol=0, atol=0)
    torch.testing.assert_close(kv2[:, :, 0], emb(kv[:, :, 0].contiguous()), rtol=0, atol=0)


def test_rotary_op_errors_name_the_argument(flash):
    rotary = flash.layers.rotary
    cos, sin = _tables(4, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="rotary_dim = 8 exceeds the head dimension 6"):
        rotary.apply_rotary_emb(torch.randn(1, 4, 2, 6), cos, sin)
    with pytest.raises(RuntimeError, match="seqlen_ro >= seqlen"):
        rotary.apply_rotary_emb(torch.randn(1, 5, 2, 8), cos, sin)
    with pytest.raises(RuntimeError, match="max_seqlen must be given"):
        rotary.apply_rotary_emb(torch.randn(4, 2, 8), cos, sin,
                                cu_seqlens=torch.tensor([0, 4], dtype=torch.int32))
