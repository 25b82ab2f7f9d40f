"""flash_attn.bert_padding against explicit loops: the five helpers of FlashAttention-2.8, their
return tuples (unpad_input's seqused included), gradients through the index helpers, and the
round trip padded -> packed -> padded."""
import pytest
import torch

pytestmark = pytest.mark.fast


def _mask(lens, seqlen):
    return torch.arange(seqlen)[None, :] < torch.tensor(lens)[:, None]


def test_unpad_input_returns_tokens_indices_cu_seqlens_max_and_seqused(flash):
    bp = flash.bert_padding
    lens, seqlen = [3, 0, 5, 1], 6
    hidden = torch.randn(4, seqlen, 2, 3)
    packed, indices, cu, max_s, seqused = bp.unpad_input(hidden, _mask(lens, seqlen))
    rows = [hidden[b, i] for b in range(4) for i in range(lens[b])]
    torch.testing.assert_close(packed, torch.stack(rows), rtol=0, atol=0)
    assert indices.tolist() == [b * seqlen + i for b in range(4) for i in range(lens[b])]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8, 9]
    assert max_s == 5 and isinstance(max_s, int)
    assert seqused.dtype == torch.int32 and seqused.tolist() == lens


def test_unpad_input_unused_mask_keeps_tokens_but_not_in_seqused(flash):
    bp = flash.bert_padding
    mask = _mask([2, 3], 5)
    unused = _mask([4, 3], 5) & ~mask  # two allocated-but-unused slots in row 0
    packed, _, cu, max_s, seqused = bp.unpad_input(torch.randn(2, 5, 4), mask, unused)
    assert packed.shape == (7, 4)
    assert cu.tolist() == [0, 4, 7] and max_s == 4 and seqused.tolist() == [2, 3]


def test_pad_input_inverts_unpad_input_with_zero_padding(flash):
    bp = flash.bert_padding
    lens, seqlen = [4, 1, 0], 4
    mask = _mask(lens, seqlen)
    hidden = torch.randn(3, seqlen, 5)
    packed, indices, *_ = bp.unpad_input(hidden, mask)
    padded = bp.pad_input(packed, indices, 3, seqlen)
    torch.testing.assert_close(padded, hidden * mask[..., None], rtol=0, atol=0)


def test_index_helpers_are_differentiable(flash):
    bp = flash.bert_padding
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([4, 0, 2])
    torch.autograd.gradcheck(lambda t: bp.index_first_axis(t, idx), (x,))
    v = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: bp.index_put_first_axis(t, idx, 6), (v,))
    out = bp.index_put_first_axis(v.detach(), idx, 6)
    assert out[[1, 3, 5]].abs().sum() == 0 and torch.equal(out[idx], v.detach())


def test_unpad_input_for_concatenated_sequences_splits_each_row_into_samples(flash):
    bp = flash.bert_padding
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    hidden = torch.randn(2, 6, 4)
    packed, indices, cu, max_s = bp.unpad_input_for_concatenated_sequences(hidden, lengths)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    torch.testing.assert_close(packed, hidden.reshape(12, 4)[indices], rtol=0, atol=0)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 11] and max_s == 6
