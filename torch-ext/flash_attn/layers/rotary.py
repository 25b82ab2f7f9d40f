"""Rotary position embeddings with FlashAttention-2.8's names and signatures
(``flash_attn.layers.rotary``): ``apply_rotary_emb``, ``apply_rotary_emb_qkv_``,
``apply_rotary_emb_kv_`` and the ``RotaryEmbedding`` module.

The rotation is the ``rotary`` custom op of this kernel (CPU and CUDA backends, the same pair
rotation as the in-kernel rotary of ``flash_attn_with_kvcache``), differentiable through its
registered backward (the rotation by -theta). Conventions: cos/sin tables are
(seqlen_ro, rotary_dim / 2); token i of sequence b uses row ``seqlen_offsets[b] + i``; positions
past the table are left unrotated; ``interleaved`` pairs dims (2i, 2i+1) (GPT-J), otherwise
(i, i + rotary_dim / 2) (GPT-NeoX); dims past rotary_dim pass through.

Differences from FlashAttention-2, both widenings: cos/sin of another dtype than x are accepted
and rounded to x's dtype (the module's own tables are already in x's dtype), and
``RotaryEmbedding`` also takes a single (batch, seqlen, nheads, headdim) tensor and returns it
rotated.
"""

import torch

from .. import _ops_meta  # noqa: F401  (registers the op's fake and autograd)
from .._ops import ops

__all__ = ["RotaryEmbedding", "apply_rotary_emb", "apply_rotary_emb_func",
           "apply_rotary_emb_kv_", "apply_rotary_emb_qkv_"]


def _offsets(seqlen_offsets):
    """(tensor or None, int): the op takes per-sequence offsets as a tensor, a shared one as int."""
    if isinstance(seqlen_offsets, torch.Tensor):
        return seqlen_offsets.to(torch.int32), 0
    return None, int(seqlen_offsets)


def _rotate(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen):
    offsets, offset = _offsets(seqlen_offsets)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cu_seqlens is not None and max_seqlen is None:
        raise RuntimeError("flash_attn: max_seqlen must be given with cu_seqlens")
    return ops.rotary(x, cos.to(x.dtype), sin.to(x.dtype), offsets, cu_seqlens, offset,
                      -1 if max_seqlen is None else max_seqlen, interleaved, False)


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                     cu_seqlens=None, max_seqlen=None):
    """
    Arguments:
        x: (batch_size, seqlen, nheads, headdim) if cu_seqlens is None,
            else (total_seqlen, nheads, headdim).
        cos, sin: (seqlen_rotary, rotary_dim / 2), rotary_dim <= headdim.
        interleaved: rotate pairs (2i, 2i+1) (GPT-J) instead of (i, i + rotary_dim / 2).
        inplace: write the result into x (and return x).
        seqlen_offsets: int or (batch_size,) int tensor, the position of each sequence's first
            token (KV-cache decoding).
        cu_seqlens: (batch + 1,) int32 or None; max_seqlen: int, required with cu_seqlens.
    Return:
        x's shape, the first rotary_dim dims of every head rotated and the rest copied.
    """
    out = _rotate(x, cos, sin, interleaved, seqlen_offsets, cu_seqlens, max_seqlen)
    return x.copy_(out) if inplace else out


# FlashAttention-2 exports the autograd-function spelling too; here both are the same function.
apply_rotary_emb_func = apply_rotary_emb


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False,
                          seqlen_offsets=0, num_heads_q=None):
    """
    Rotates q and k of a packed tensor in place and returns it.
        qkv: (batch_size, seqlen, 3, nheads, headdim), or with num_heads_q given
            (batch_size, seqlen, num_heads_q + 2 * nheads_k, headdim).
        cos, sin: (seqlen, rotary_dim / 2) for q; cos_k, sin_k: the same for k (default: cos, sin;
            XPos uses different ones).
    """
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    if num_heads_q is None:
        if qkv.dim() != 5 or qkv.shape[2] != 3:
            raise RuntimeError(f"flash_attn: qkv must be (batch, seqlen, 3, nheads, headdim) when "
                               f"num_heads_q is not given, got {tuple(qkv.shape)}")
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        if qkv.dim() != 4 or (qkv.shape[2] - num_heads_q) % 2 != 0:
            raise RuntimeError(f"flash_attn: qkv must be (batch, seqlen, num_heads_q + 2 * "
                               f"nheads_k, headdim) with num_heads_q = {num_heads_q}, got "
                               f"{tuple(qkv.shape)}")
        nheads_k = (qkv.shape[2] - num_heads_q) // 2
        q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + nheads_k]
    apply_rotary_emb(q, cos, sin, interleaved, True, seqlen_offsets)
    apply_rotary_emb(k, cos_k, sin_k, interleaved, True, seqlen_offsets)
    return qkv


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """Rotates k of kv (batch_size, seqlen, 2, nheads, headdim) in place and returns kv."""
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise RuntimeError(f"flash_attn: kv must be (batch, seqlen, 2, nheads, headdim), got "
                           f"{tuple(kv.shape)}")
    apply_rotary_emb(kv[:, :, 0], cos, sin, interleaved, True, seqlen_offsets)
    return kv


class RotaryEmbedding(torch.nn.Module):
    """Rotary embedding (RoFormer) with an on-demand cos/sin cache and optional XPos.

    dim: the number of rotated dims (rotary_dim); base: the frequency base; interleaved: GPT-J
    pairs; scale_base: enables XPos (Sun et al. 2022): q rows are scaled by
    scale ** ((pos - seqlen // 2) / scale_base) and k rows by its inverse, with
    scale = (2i + 0.4 dim) / (1.4 dim); pos_idx_in_fp32: build positions in fp32 even when
    inv_freq is another dtype (exact integer positions in bf16/fp16 models).

    forward(qkv, kv=None, seqlen_offset=0, max_seqlen=None, num_heads_q=None):
      * kv None: qkv is (batch, seqlen, 3, nheads, headdim) (or the num_heads_q layout); q and k
        are rotated in place and qkv is returned;
      * kv given: qkv is q (batch, seqlen, nheads, headdim), kv (batch, seqlen, 2, nheads_k,
        headdim); both rotated in place, returns (q, kv);
      * a single (batch, seqlen, nheads, headdim) tensor (no kv, no num_heads_q): returned
        rotated, out of place.
    seqlen_offset: int or (batch,) tensor (then give max_seqlen, which sizes the cache).
    """

    def __init__(self, dim, base=10000.0, interleaved=False, scale_base=None,
                 pos_idx_in_fp32=True, device=None):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved
        self.scale_base = scale_base
        self.pos_idx_in_fp32 = pos_idx_in_fp32
        self.register_buffer("inv_freq", self._compute_inv_freq(device), persistent=False)
        scale = None
        if scale_base is not None:
            scale = ((torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim)
                     / (1.4 * dim))
        self.register_buffer("scale", scale, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = None
        self._cos_k_cached = self._sin_k_cached = None

    def _compute_inv_freq(self, device=None):
        exponent = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        return 1.0 / (self.base ** exponent)

    def _update_cos_sin_cache(self, seqlen, device=None, dtype=None):
        stale = (self._cos_cached is None or seqlen > self._seq_len_cached
                 or self._cos_cached.device != device or self._cos_cached.dtype != dtype
                 or (self.training and self._cos_cached.is_inference()))
        if not stale:
            return
        self._seq_len_cached = seqlen
        if self.pos_idx_in_fp32:
            t = torch.arange(seqlen, device=device, dtype=torch.float32)
            inv_freq = (self.inv_freq if self.inv_freq.dtype == torch.float32
                        else self._compute_inv_freq(device))
        else:
            t = torch.arange(seqlen, device=device, dtype=self.inv_freq.dtype)
            inv_freq = self.inv_freq
        freqs = torch.outer(t, inv_freq.to(device))
        if self.scale is None:
            self._cos_cached = torch.cos(freqs).to(dtype)
            self._sin_cached = torch.sin(freqs).to(dtype)
            return
        power = ((torch.arange(seqlen, dtype=self.scale.dtype, device=self.scale.device)
                  - seqlen // 2) / self.scale_base)
        scale = (self.scale.to(device=power.device) ** power[:, None]).to(freqs.device)
        self._cos_cached = (torch.cos(freqs) * scale).to(dtype)
        self._sin_cached = (torch.sin(freqs) * scale).to(dtype)
        self._cos_k_cached = (torch.cos(freqs) / scale).to(dtype)
        self._sin_k_cached = (torch.sin(freqs) / scale).to(dtype)

    def forward(self, qkv, kv=None, seqlen_offset=0, max_seqlen=None, num_heads_q=None):
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif isinstance(seqlen_offset, int):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device,
                                       dtype=qkv.dtype)
        else:
            raise RuntimeError("flash_attn: max_seqlen must be given when seqlen_offset is a "
                               "tensor (it sizes the cos/sin cache)")
        xpos = self.scale is not None
        cos_k = self._cos_k_cached if xpos else self._cos_cached
        sin_k = self._sin_k_cached if xpos else self._sin_cached
        if kv is None and num_heads_q is None and qkv.dim() == 4:
            return apply_rotary_emb(qkv, self._cos_cached, self._sin_cached, self.interleaved,
                                    seqlen_offsets=seqlen_offset)
        if kv is None:
            return apply_rotary_emb_qkv_(qkv, self._cos_cached, self._sin_cached, cos_k, sin_k,
                                         self.interleaved, seqlen_offset, num_heads_q)
        q = apply_rotary_emb(qkv, self._cos_cached, self._sin_cached, self.interleaved,
                             inplace=True, seqlen_offsets=seqlen_offset)
        kv = apply_rotary_emb_kv_(kv, cos_k, sin_k, self.interleaved, seqlen_offset)
        return q, kv
