"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` on this kernel's ops
(FlashAttention itself has none).

Same constructor, same forward signature, same parameter names (``in_proj_weight`` or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when kdim/vdim differ from embed_dim,
``in_proj_bias``, ``out_proj``, ``bias_k``/``bias_v``), so an ``nn.MultiheadAttention`` state dict
loads unchanged. Returns ``(attn_output, None)``, as ``nn.MultiheadAttention`` does with
``need_weights=False``.

What the flash kernels serve, and what is refused (never a silently different result):
* ``key_padding_mask`` (batch, S), True or -inf = ignore: the varlen path, padded keys are packed
  away, not computed. A sequence whose keys are all masked gets zeros (nn.MultiheadAttention
  returns NaN there).
* ``is_causal=True`` or an ``attn_mask`` that is exactly the causal mask (bool True above the
  diagonal, or float -inf above and 0 elsewhere): ``causal=True``. The causal mask is aligned to
  the bottom-right corner; with L == S that is ``nn.Transformer.generate_square_subsequent_mask``.
  ``is_causal=True`` without a mask is accepted too.
* ``need_weights=True`` raises: the kernels never form the attention matrix. nn.MultiheadAttention
  defaults to True, so call with ``need_weights=False`` (as its own fast path requires).
* any other ``attn_mask``, and causal masking together with ``add_bias_kv``/``add_zero_attn``
  (whose extra keys every query sees) raise.
Dropout (on the attention probabilities) applies only in ``train()`` mode.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..flash_attn_interface import flash_attn_func, flash_attn_varlen_func

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention`` (module docstring: what is served, what
    raises). forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, None)."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads "
                             f"({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self):
        # nn.MultiheadAttention's initialisation scheme.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _project(self, query, key, value):
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None,) * 3 if b is None else (b[:e], b[e:2 * e], b[2 * e:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _causal_from_mask(self, attn_mask, is_causal, tgt_len, src_len):
        if attn_mask is None:
            return is_causal
        expected = torch.ones(tgt_len, src_len, dtype=torch.bool, device=attn_mask.device).triu(
            src_len - tgt_len + 1)
        if attn_mask.dtype == torch.bool:
            matches = attn_mask.shape == expected.shape and torch.equal(attn_mask, expected)
        else:
            matches = (attn_mask.shape == expected.shape
                       and bool(((attn_mask == float("-inf")) == expected).all())
                       and bool((attn_mask[~expected] == 0).all()))
        if not matches:
            raise RuntimeError(
                "flash_attn MultiheadAttention: only the causal attn_mask (True / -inf above the "
                "diagonal, bottom-right aligned, shape (L, S)) is supported; pass is_causal=True "
                "for causal attention and key_padding_mask for padding, or use "
                "torch.nn.MultiheadAttention for arbitrary masks")
        return True

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        if need_weights:
            raise RuntimeError(
                "flash_attn MultiheadAttention does not compute attention weights; call it with "
                "need_weights=False (it then returns (attn_output, None), like "
                "torch.nn.MultiheadAttention)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        # Work batch-first throughout: (batch, len, embed), so the projections give contiguous
        # (batch, len, heads, head_dim) tensors for the kernel.
        if not self.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, tgt_len, _ = query.shape
        causal = self._causal_from_mask(attn_mask, is_causal, tgt_len, key.shape[1])
        extra_keys = self.bias_k is not None or self.add_zero_attn
        if causal and extra_keys:
            raise RuntimeError("flash_attn MultiheadAttention: causal masking together with "
                               "add_bias_kv/add_zero_attn is not supported")
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, v.new_zeros(batch, 1, self.embed_dim)], dim=1)
        # (batch, len, embed) -> (batch, len, heads, head_dim)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if key_padding_mask is None:
            out = flash_attn_func(q, k, v, dropout_p, causal=causal)
        else:
            out = self._varlen(q, k, v, key_padding_mask, dropout_p, causal, extra_keys)
        out = self.out_proj(out.flatten(-2))  # (batch, len, embed)
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _varlen(self, q, k, v, key_padding_mask, dropout_p, causal, extra_keys):
        batch, tgt_len, src_len = q.shape[0], q.shape[1], k.shape[1]
        if key_padding_mask.dtype == torch.bool:
            keep = ~key_padding_mask
        else:
            keep = key_padding_mask != float("-inf")
        if extra_keys:  # the bias / zero keys are never padding
            keep = F.pad(keep, (0, src_len - keep.shape[1]), value=True)
        if keep.shape != (batch, src_len):
            raise RuntimeError(f"key_padding_mask must have shape ({batch}, "
                               f"{src_len - (src_len - key_padding_mask.shape[-1])}), got "
                               f"{tuple(key_padding_mask.shape)}")
        lens_k = keep.sum(dim=1, dtype=torch.int32)
        cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (batch + 1) * tgt_len, tgt_len, dtype=torch.int32,
                            device=q.device)
        flat = keep.flatten()
        k_packed, v_packed = k.flatten(0, 1)[flat], v.flatten(0, 1)[flat]
        out = flash_attn_varlen_func(q.flatten(0, 1), k_packed, v_packed, cu_q, cu_k, tgt_len,
                                     src_len, dropout_p, causal=causal)
        return out.unflatten(0, (batch, tgt_len))
