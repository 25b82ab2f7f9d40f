"""Padding helpers with FlashAttention-2's names and signatures: move between padded
(batch, seqlen, ...) tensors and the packed (total_tokens, ...) layout of the varlen functions.
Plain torch indexing, so autograd and torch.compile need nothing special.
"""

import torch
import torch.nn.functional as F

__all__ = [
    "index_first_axis",
    "index_put_first_axis",
    "pad_input",
    "unpad_input",
    "unpad_input_for_concatenated_sequences",
]


def index_first_axis(input, indices):
    """input[indices] along the first axis; input (n, ...), indices (k,) -> (k, ...)."""
    if input.dim() < 2:
        raise RuntimeError(f"flash_attn: input must have at least 2 dimensions, got {tuple(input.shape)}")
    return input[indices]


def index_put_first_axis(values, indices, first_axis_dim):
    """A zero tensor (first_axis_dim, ...) with values (k, ...) written at rows indices (k,)."""
    if indices.dim() != 1:
        raise RuntimeError(f"flash_attn: indices must have 1 dimension, got {tuple(indices.shape)}")
    if values.dim() < 2:
        raise RuntimeError(f"flash_attn: values must have at least 2 dimensions, got {tuple(values.shape)}")
    output = values.new_zeros((first_axis_dim, *values.shape[1:]))
    output[indices] = values
    return output


def _cu_seqlens(seqlens):
    return F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """
    Arguments:
        hidden_states: (batch, seqlen, ...)
        attention_mask: (batch, seqlen), bool or int, 1 for valid tokens, 0 for padding.
        unused_mask: (batch, seqlen), bool or int, 1 for tokens that are allocated but unused
            (they are kept in the packed tensor but excluded from seqused); optional.
    Return:
        hidden_states: (total_nnz, ...), the selected tokens (attention_mask | unused_mask).
        indices: (total_nnz,), their positions in the flattened (batch * seqlen) input.
        cu_seqlens: (batch + 1,) int32, cumulative lengths of the selected tokens.
        max_seqlen_in_batch: int.
        seqused: (batch,) int32, the number of valid (attention_mask) tokens of each sequence.
    """
    all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return (
        index_first_axis(flat, indices),
        indices,
        _cu_seqlens(seqlens_in_batch),
        max_seqlen_in_batch,
        used_seqlens_in_batch,
    )


def unpad_input_for_concatenated_sequences(hidden_states, attention_mask_in_length):
    """
    Packs several short samples per row. attention_mask_in_length (batch, seqlen) holds, per row,
    the lengths of its samples followed by zeros: e.g. [[2, 3, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]] is
    a row with samples of length 2 and 3 (one padding token) and a row with one sample of 6.
    Returns (hidden_states (total_nnz, ...), indices, cu_seqlens (num_samples + 1,) int32,
    max_seqlen_in_batch), as unpad_input without seqused.
    """
    length = attention_mask_in_length.sum(dim=-1)
    seqlen = attention_mask_in_length.size(-1)
    positions = torch.arange(seqlen, device=length.device, dtype=length.dtype)
    attention_mask_2d = positions.expand(len(length), seqlen) < length.unsqueeze(1)
    sample_lengths = attention_mask_in_length.flatten()
    seqlens_in_batch = sample_lengths[sample_lengths != 0]
    indices = torch.nonzero(attention_mask_2d.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, _cu_seqlens(seqlens_in_batch), max_seqlen_in_batch


def pad_input(hidden_states, indices, batch, seqlen):
    """
    Arguments:
        hidden_states: (total_nnz, ...), the packed tokens.
        indices: (total_nnz,), their positions in the flattened (batch * seqlen) padded layout.
        batch: int, seqlen: int, the padded shape.
    Return:
        hidden_states: (batch, seqlen, ...), zero at padding positions.
    """
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.reshape(batch, seqlen, *hidden_states.shape[1:])
