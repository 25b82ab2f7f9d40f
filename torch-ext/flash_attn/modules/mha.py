"""Attention modules with FlashAttention-2.8's names and signatures (``flash_attn.modules.mha``):
``FlashSelfAttention``, ``FlashCrossAttention``, their plain-PyTorch twins ``SelfAttention`` and
``CrossAttention``, the projection-owning ``MHA`` with GQA/MQA, rotary, ALiBi and KV-cache
decoding through ``InferenceParams``, and (``multihead_attention.py``) a drop-in for
``torch.nn.MultiheadAttention``.

Every module runs on CPU and CUDA tensors through this kernel's ops. ``use_flash_attn=False`` in
``MHA`` selects ``SelfAttention``/``CrossAttention``, explicit softmax(QK^T)V in PyTorch, as in
FlashAttention-2: it is the path that takes a ``key_padding_mask``, and a reference to check the
flash path against. Dropout is applied only in ``train()`` mode.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from ..flash_attn_interface import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from ..layers.rotary import RotaryEmbedding
from .multihead_attention import MultiheadAttention

__all__ = ["CrossAttention", "FlashCrossAttention", "FlashSelfAttention", "InferenceParams", "MHA",
           "MultiheadAttention", "SelfAttention", "get_alibi_slopes"]


def get_alibi_slopes(nheads):
    """ALiBi slopes (Press et al. 2022): the geometric sequence 2^(-8 i / n) for the largest power
    of two n <= nheads, then every other slope of the 2n-head sequence for the remaining heads."""
    def power_of_2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(nheads).is_integer():
        return power_of_2(nheads)
    closest = 2 ** math.floor(math.log2(nheads))
    return power_of_2(closest) + get_alibi_slopes(2 * closest)[0::2][: nheads - closest]


@dataclass
class InferenceParams:
    """The decoding state MHA reads (FlashAttention-2's ``flash_attn.utils.generation``): the
    per-layer KV caches (batch, max_seqlen, 2, nheads_kv, head_dim) keyed by ``layer_idx``, the
    number of tokens already cached (``seqlen_offset``, or per sequence ``lengths_per_sample``)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[torch.Tensor] = None

    def reset(self, max_seqlen, max_batch_size):
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


def _dropout_p(module):
    return module.drop.p if module.training else 0.0


class _InnerAttention(nn.Module):
    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0, window_size=(-1, -1),
                 alibi_slopes=None, deterministic=False):
        super().__init__()
        self.causal = causal
        self.softmax_scale = softmax_scale
        self.drop = nn.Dropout(attention_dropout)
        self.window_size = window_size
        self.deterministic = deterministic
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)

    def _slopes(self):
        return None if self.alibi_slopes is None else self.alibi_slopes.to(torch.float32)


class FlashSelfAttention(_InnerAttention):
    """Self-attention on packed qkv (FlashAttention-2.8), or, with ``embed_dim``, a
    projection-owning self-attention layer.

    Which one is meant is decided by the keywords: ``embed_dim`` given (with ``num_heads``,
    optionally ``use_bias``, default True) builds the qkv and output projections and forward takes
    a batch-first (batch, seqlen, embed_dim) tensor and returns one (the usage of drop-in
    tutorials); otherwise the arguments are FlashAttention-2.8's and forward takes qkv.

    FlashAttention-2.8 form, forward(qkv, causal=None, cu_seqlens=None, max_seqlen=None):
        qkv: (batch, seqlen, 3, nheads, headdim), or (total, 3, nheads, headdim) with cu_seqlens
            (batch + 1,) int32 and max_seqlen. Returns (batch, seqlen, nheads, headdim) or
            (total, nheads, headdim). causal=None uses the constructor's value.
    Projection form, forward(x, causal=None): x (batch, seqlen, embed_dim) -> same shape.
    """

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0,
                 window_size=(-1, -1), alibi_slopes=None, deterministic=False, *,
                 embed_dim=None, num_heads=None, use_bias=True, device=None, dtype=None):
        super().__init__(causal, softmax_scale, attention_dropout, window_size, alibi_slopes,
                         deterministic)
        self.embed_dim = embed_dim
        if embed_dim is None:
            if num_heads is not None:
                raise ValueError("flash_attn: FlashSelfAttention(num_heads=...) needs embed_dim "
                                 "too (the projection form); the FlashAttention-2 form takes "
                                 "neither")
            return
        if num_heads is None or embed_dim % num_heads != 0:
            raise ValueError(f"flash_attn: FlashSelfAttention(embed_dim={embed_dim}) needs "
                             f"num_heads dividing embed_dim, got num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        factory = {"device": device, "dtype": dtype}
        self.Wqkv = nn.Linear(embed_dim, 3 * embed_dim, bias=use_bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=use_bias, **factory)

    def _attend(self, qkv, causal, cu_seqlens, max_seqlen):
        causal = self.causal if causal is None else causal
        common = dict(softmax_scale=self.softmax_scale, causal=causal,
                      window_size=self.window_size, alibi_slopes=self._slopes(),
                      deterministic=self.deterministic)
        if cu_seqlens is not None:
            return flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen,
                                                    _dropout_p(self), **common)
        return flash_attn_qkvpacked_func(qkv, _dropout_p(self), **common)

    def forward(self, qkv, causal=None, cu_seqlens=None, max_seqlen=None):
        if self.embed_dim is None:
            return self._attend(qkv, causal, cu_seqlens, max_seqlen)
        if qkv.dim() != 3 or qkv.shape[-1] != self.embed_dim:
            raise RuntimeError(f"flash_attn: x must be (batch, seqlen, embed_dim={self.embed_dim})"
                               f", got {tuple(qkv.shape)}")
        batch, seqlen, _ = qkv.shape
        packed = self.Wqkv(qkv).view(batch, seqlen, 3, self.num_heads, self.head_dim)
        context = self._attend(packed, causal, cu_seqlens, max_seqlen)
        return self.out_proj(context.reshape(batch, seqlen, self.embed_dim))


class FlashCrossAttention(_InnerAttention):
    """Attention of q over packed kv (FlashAttention-2.8).

    forward(q, kv, causal=None, cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None,
    max_seqlen_k=None): q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k, 2, nheads_k,
    headdim); with cu_seqlens q is (total_q, nheads, headdim) and kv (total_k, 2, nheads_k,
    headdim). Returns q's shape. Causal masks are aligned to the bottom-right corner.
    """

    def forward(self, q, kv, causal=None, cu_seqlens=None, max_seqlen=None, cu_seqlens_k=None,
                max_seqlen_k=None):
        causal = self.causal if causal is None else causal
        common = dict(softmax_scale=self.softmax_scale, causal=causal,
                      window_size=self.window_size, alibi_slopes=self._slopes(),
                      deterministic=self.deterministic)
        if cu_seqlens is not None:
            if cu_seqlens_k is None or max_seqlen is None or max_seqlen_k is None:
                raise RuntimeError("flash_attn: cu_seqlens needs cu_seqlens_k, max_seqlen and "
                                   "max_seqlen_k too")
            return flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens, cu_seqlens_k, max_seqlen,
                                                   max_seqlen_k, _dropout_p(self), **common)
        return flash_attn_kvpacked_func(q, kv, _dropout_p(self), **common)


def _plain_attention(q, k, v, causal, softmax_scale, key_padding_mask, dropout_p):
    # q (b, sq, h, d), k/v (b, sk, hk, d); explicit scores, bottom-right causal mask.
    if k.shape[2] != q.shape[2]:
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        row = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        scores = scores.masked_fill(torch.arange(sk, device=q.device)[None, :] > row,
                                    float("-inf"))
    attn = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    attn = torch.nn.functional.dropout(attn, dropout_p) if dropout_p > 0 else attn
    return torch.einsum("bhts,bshd->bthd", attn, v)


class SelfAttention(_InnerAttention):
    """Plain-PyTorch self-attention: forward(qkv (batch, seqlen, 3, nheads, headdim),
    causal=None, key_padding_mask=None (batch, seqlen) bool, True = keep)."""

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0):
        super().__init__(causal, softmax_scale, attention_dropout)

    def forward(self, qkv, causal=None, key_padding_mask=None):
        q, k, v = qkv.unbind(dim=2)
        return _plain_attention(q, k, v, self.causal if causal is None else causal,
                                self.softmax_scale, key_padding_mask, _dropout_p(self))


class CrossAttention(_InnerAttention):
    """Plain-PyTorch cross-attention: forward(q (batch, seqlen_q, nheads, headdim),
    kv (batch, seqlen_k, 2, nheads_k, headdim), causal=None, key_padding_mask=None)."""

    def __init__(self, causal=False, softmax_scale=None, attention_dropout=0.0):
        super().__init__(causal, softmax_scale, attention_dropout)

    def forward(self, q, kv, causal=None, key_padding_mask=None):
        k, v = kv.unbind(dim=2)
        return _plain_attention(q, k, v, self.causal if causal is None else causal,
                                self.softmax_scale, key_padding_mask, _dropout_p(self))


def _update_kv_cache(kv, inference_params, layer_idx):
    """Writes kv (batch, seqlen, 2, nheads_kv, head_dim) at the cache position and returns the
    cache up to the new end (the cache is allocated on first use)."""
    cache = inference_params.key_value_memory_dict.get(layer_idx)
    if cache is None:
        cache = torch.empty(inference_params.max_batch_size, inference_params.max_seqlen, 2,
                            *kv.shape[-2:], dtype=kv.dtype, device=kv.device)
        inference_params.key_value_memory_dict[layer_idx] = cache
    b0 = inference_params.batch_size_offset
    s0 = inference_params.seqlen_offset
    b1, s1 = b0 + kv.shape[0], s0 + kv.shape[1]
    cache[b0:b1, s0:s1] = kv
    return cache[b0:b1, :s1]


class MHA(nn.Module):
    """Multi-head attention with projections (FlashAttention-2.8's ``MHA``).

    num_heads_kv < num_heads gives GQA/MQA; rotary_emb_dim > 0 rotates the first rotary_emb_dim
    dims of q and k (self-attention only); use_alibi adds FA2's ALiBi slopes; window_size is
    local attention. use_flash_attn=True runs this kernel's ops (the only path for ALiBi, windows
    and cu_seqlens); False runs the plain-PyTorch ``SelfAttention``/``CrossAttention`` (the path
    for key_padding_mask). Decoding: pass an ``InferenceParams``; the cache of layer ``layer_idx``
    is written in place and, after the prefill, each step runs ``flash_attn_with_kvcache``
    (rotary applied inside it when rotary_emb_dim is a multiple of 16).

    Not supported (clear errors): dwconv, fused_bias_fc. Widenings for the usage FlashAttention's
    API reference shows: ``bias`` sets both projection biases, ``alibi_slopes`` gives custom
    (nheads,) slopes (implies ALiBi).

    forward(x, x_kv=None, key_padding_mask=None, cu_seqlens=None, max_seqlen=None,
    mixer_subset=None, inference_params=None): x (batch, seqlen, embed_dim), or (total, embed_dim)
    with cu_seqlens; returns x's shape, or (out, x) with return_residual.
    """

    def __init__(self, embed_dim, num_heads, num_heads_kv=None, cross_attn=False,
                 qkv_proj_bias=True, out_proj_bias=True, dropout=0.0, softmax_scale=None,
                 causal=False, layer_idx=None, dwconv=False, rotary_emb_dim=0,
                 rotary_emb_base=10000.0, rotary_emb_scale_base=None,
                 rotary_emb_interleaved=False, use_alibi=False, window_size=(-1, -1),
                 fused_bias_fc=False, use_flash_attn=False, return_residual=False,
                 checkpointing=False, device=None, dtype=None, *, bias=None, alibi_slopes=None):
        super().__init__()
        if dwconv:
            raise NotImplementedError("flash_attn: MHA(dwconv=True) (depthwise convolution on "
                                      "q/k/v) is not implemented; use dwconv=False")
        if fused_bias_fc:
            raise NotImplementedError("flash_attn: MHA(fused_bias_fc=True) needs FlashAttention's "
                                      "fused dense CUDA extension, which this package does not "
                                      "ship; use fused_bias_fc=False (nn.Linear)")
        if bias is not None:
            qkv_proj_bias = out_proj_bias = bias
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        if embed_dim % num_heads != 0 or num_heads % self.num_heads_kv != 0:
            raise ValueError(f"flash_attn: num_heads={num_heads} must divide embed_dim="
                             f"{embed_dim}, and num_heads_kv={self.num_heads_kv} num_heads")
        self.cross_attn, self.causal, self.layer_idx = cross_attn, causal, layer_idx
        self.rotary_emb_dim = rotary_emb_dim
        self.use_flash_attn = use_flash_attn
        self.return_residual, self.checkpointing = return_residual, checkpointing
        self.head_dim = embed_dim // num_heads
        if alibi_slopes is None and use_alibi:
            alibi_slopes = torch.tensor(get_alibi_slopes(num_heads), device=device)
        if (alibi_slopes is not None or tuple(window_size) != (-1, -1)) and not use_flash_attn:
            raise ValueError("flash_attn: ALiBi and window_size need use_flash_attn=True")
        if rotary_emb_dim > 0:
            if cross_attn:
                raise ValueError("flash_attn: rotary embedding is for self-attention only")
            self.rotary_emb = RotaryEmbedding(rotary_emb_dim, base=rotary_emb_base,
                                              scale_base=rotary_emb_scale_base,
                                              interleaved=rotary_emb_interleaved, device=device)
        kv_dim = 2 * self.head_dim * self.num_heads_kv
        if cross_attn:
            self.Wq = nn.Linear(embed_dim, embed_dim, bias=qkv_proj_bias, **factory)
            self.Wkv = nn.Linear(embed_dim, kv_dim, bias=qkv_proj_bias, **factory)
        else:
            self.Wqkv = nn.Linear(embed_dim, embed_dim + kv_dim, bias=qkv_proj_bias, **factory)
        if use_flash_attn:
            flash = dict(causal=causal, softmax_scale=softmax_scale, attention_dropout=dropout,
                         window_size=window_size, alibi_slopes=alibi_slopes)
            self.inner_attn = FlashSelfAttention(**flash)
            self.inner_cross_attn = FlashCrossAttention(**flash)
        else:
            plain = dict(causal=causal, softmax_scale=softmax_scale, attention_dropout=dropout)
            self.inner_attn = SelfAttention(**plain)
            self.inner_cross_attn = CrossAttention(**plain)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_proj_bias, **factory)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None):
        weight = self.out_proj.weight
        return torch.empty(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim,
                           dtype=weight.dtype if dtype is None else dtype, device=weight.device)

    def _cache_seqlens(self, inference_params, batch):
        if inference_params.lengths_per_sample is not None:
            return inference_params.lengths_per_sample[:batch]
        return inference_params.seqlen_offset

    def _decode_step(self, q, kv, inference_params, rotary):
        """After the prefill: append kv to the cache and attend in one flash_attn_with_kvcache
        call, rotating q and the new k inside it when `rotary`."""
        batch = q.shape[0]
        b0 = inference_params.batch_size_offset
        cache = inference_params.key_value_memory_dict[self.layer_idx][b0:b0 + batch]
        cos = sin = None
        if rotary:
            self.rotary_emb._update_cos_sin_cache(inference_params.max_seqlen, device=q.device,
                                                  dtype=q.dtype)
            cos, sin = self.rotary_emb._cos_cached, self.rotary_emb._sin_cached
        inner = self.inner_cross_attn
        return flash_attn_with_kvcache(
            q, cache[:, :, 0], cache[:, :, 1], kv[:, :, 0], kv[:, :, 1], rotary_cos=cos,
            rotary_sin=sin, cache_seqlens=self._cache_seqlens(inference_params, batch),
            softmax_scale=inner.softmax_scale, causal=inner.causal,
            window_size=inner.window_size, alibi_slopes=inner._slopes(),
            rotary_interleaved=self.rotary_emb.interleaved if rotary else False)

    def _attend_cached(self, q, kv, inference_params):
        if inference_params.seqlen_offset == 0 or not self.use_flash_attn:
            return self.inner_cross_attn(q, _update_kv_cache(kv, inference_params,
                                                             self.layer_idx))
        return self._decode_step(q, kv, inference_params, rotary=False)

    def _inner(self, module, *args, **kwargs):
        if self.checkpointing:
            return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False, **kwargs)
        return module(*args, **kwargs)

    def forward(self, x, x_kv=None, key_padding_mask=None, cu_seqlens=None, max_seqlen=None,
                mixer_subset=None, inference_params=None, **kwargs):
        if mixer_subset is not None:
            raise NotImplementedError("flash_attn: MHA mixer_subset is not implemented")
        if cu_seqlens is not None and (max_seqlen is None or key_padding_mask is not None
                                       or not self.use_flash_attn or self.rotary_emb_dim > 0):
            raise RuntimeError("flash_attn: cu_seqlens needs max_seqlen, use_flash_attn=True, no "
                               "key_padding_mask and no rotary embedding")
        if key_padding_mask is not None and self.use_flash_attn:
            raise RuntimeError("flash_attn: key_padding_mask is served by use_flash_attn=False; "
                               "with use_flash_attn=True unpad the batch (bert_padding."
                               "unpad_input) and pass cu_seqlens/max_seqlen")
        if inference_params is not None and (key_padding_mask is not None
                                             or cu_seqlens is not None):
            raise RuntimeError("flash_attn: inference_params takes neither key_padding_mask nor "
                               "cu_seqlens")
        if self.use_flash_attn:
            kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, **kwargs}
        else:
            kwargs = {"key_padding_mask": key_padding_mask, **kwargs}
        seqlen_offset, rotary_max_seqlen = 0, None
        if inference_params is not None:
            seqlen_offset = (inference_params.lengths_per_sample
                             if inference_params.lengths_per_sample is not None
                             else inference_params.seqlen_offset)
            rotary_max_seqlen = inference_params.max_seqlen
        fused_rotary_step = (inference_params is not None and inference_params.seqlen_offset > 0
                             and self.use_flash_attn and self.rotary_emb_dim > 0
                             and self.rotary_emb_dim % 16 == 0)
        residual = x
        d = self.head_dim
        if self.cross_attn:
            q = self.Wq(x)
            kv = self.Wkv(x_kv if x_kv is not None else x)
        else:
            if x_kv is not None:
                raise RuntimeError("flash_attn: x_kv is for cross_attn=True")
            qkv = self.Wqkv(x)
            q, kv = qkv[..., :self.embed_dim], qkv[..., self.embed_dim:]
        q = q.unflatten(-1, (self.num_heads, d))
        kv = kv.unflatten(-1, (2, self.num_heads_kv, d))
        if fused_rotary_step:
            context = self._decode_step(q, kv, inference_params, rotary=True)
        else:
            if self.rotary_emb_dim > 0:
                q, kv = q.contiguous(), kv.contiguous()
                q, kv = self.rotary_emb(q, kv, seqlen_offset=seqlen_offset,
                                        max_seqlen=rotary_max_seqlen)
            if inference_params is not None:
                context = self._attend_cached(q, kv, inference_params)
            elif not self.cross_attn and self.num_heads_kv == self.num_heads:
                qkv = torch.cat([q.unsqueeze(-3), kv], dim=-3)
                context = self._inner(self.inner_attn, qkv, **kwargs)
            else:
                if cu_seqlens is not None:
                    kwargs.update(cu_seqlens_k=cu_seqlens, max_seqlen_k=max_seqlen)
                context = self._inner(self.inner_cross_attn, q, kv, **kwargs)
        out = self.out_proj(context.flatten(-2))
        return (out, residual) if self.return_residual else out
