"""PyTorch's own FlashAttention-2 behind FlashAttention-2.8's internal API: the peer that
benchmarks/bench_context_parallel.py installs as `flash_attn`, so that ring-flash-attn runs the
same ring over PyTorch's kernels as over ours.

ring-flash-attn calls `flash_attn.flash_attn_interface._flash_attn_forward` and
`_flash_attn_backward` (and the varlen pair for llama3) once per K/V block and merges the blocks
by their log-sum-exp; the backward gets the merged out and LSE. This module implements those four
functions with 2.8's signatures and return values, plus `flash_attn_func` (autograd) for the
single-GPU baseline, on the ops behind `F.scaled_dot_product_attention`'s flash backend, which
return and consume the LSE:

* CUDA: `aten._scaled_dot_product_flash_attention` / `..._backward`: PyTorch's vendored
  FlashAttention-2 kernels;
* CPU: `aten._scaled_dot_product_flash_attention_for_cpu` / `..._backward`: PyTorch's CPU flash
  kernel (the smoke run only; nothing is measured there).

What this module adds around the ops (all of it part of the peer's timed step):

* layout: FlashAttention's (batch, seqlen, heads, dim) is passed as transposed (b, h, s, d)
  views, no copies; 2.8's backward fills the caller's dq/dk/dv, so the op's gradients are copied
  into them; the LSE is made contiguous before the backward (ring-flash-attn hands a transposed
  view of its merged LSE).
* GQA: native (the ops take fewer K/V heads, as FlashAttention-2 does) unless `EXPAND_KV` is set
  (`use_expanded_kv`), which repeats K/V to every query head inside each call and sums dK/dV
  over the group; bench_context_parallel.py sets it only when the op refuses native GQA.
* causal with seqlen_q < seqlen_k (FlashAttention's bottom-right aligned mask; SDPA's is_causal
  is top-left): the keys before the diagonal square are attended without a mask, the square with
  one, and the two results merged by their LSE; the backward runs both parts against the merged
  out and LSE. Causal with seqlen_q > seqlen_k raises NotImplementedError.
* varlen: a loop over the sequences (cu_seqlens read to the host), each a dense call on
  contiguous copies of the sequence's rows (llama3 hands head slices of q).

Unsupported (NotImplementedError): dropout, local windows, softcap, ALiBi, returning the
softmax, paged K/V, seqused_k, leftpad_k.
"""

import sys

import torch

__version__ = "2.8.3"  # the API it imitates (yunchang and others compare it)
flash_attn_interface = sys.modules[__name__]  # `flash_attn.flash_attn_interface` is this module

EXPAND_KV = False  # GQA by repeating K/V per query head (set by use_expanded_kv)
_RNG = {}  # device -> (philox seed, offset) the CUDA forward returned; unused without dropout


def use_expanded_kv(expand: bool) -> None:
    global EXPAND_KV
    EXPAND_KV = bool(expand)


def _unsupported(**options):
    for name, value in options.items():
        if value:
            raise NotImplementedError(f"sdpa_flash_attn: {name}={value!r} is not supported")


def _check(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes,
           return_softmax=False):
    _unsupported(dropout_p=float(dropout_p or 0.0), softcap=float(softcap or 0.0),
                 alibi_slopes=alibi_slopes is not None, return_softmax=bool(return_softmax),
                 window_size=(window_size_left not in (-1, None)
                              or window_size_right not in (-1, None)))


# ---- one dense call: (b, s, h, d) in, (b, s, h, d) out, LSE (b, h, s) fp32 ----------------------


def _op_fwd(q, k, v, scale, causal):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False,
                                                                 scale=scale)
        out, lse = res[0], res[1]
        _RNG[q.device] = (res[6], res[7])
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, causal, scale=scale)
    return out.transpose(1, 2), lse


def _op_bwd(dout, q, k, v, out, lse, scale, causal):
    dt, qt, kt, vt, ot = (x.transpose(1, 2) for x in (dout, q, k, v, out))
    lse = lse.contiguous()
    if q.is_cuda:
        seed, offset = _RNG.get(q.device) or (
            torch.zeros(2, dtype=torch.uint64, device=q.device),
            torch.zeros((), dtype=torch.uint64, device=q.device))
        # cum_seq_q/k None: the dense (not nested) problem, as the forward returns them.
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dt, qt, kt, vt, ot, lse, None, None, q.shape[1], k.shape[1], 0.0, causal, seed,
            offset, scale=scale)
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dt, qt, kt, vt, ot, lse, 0.0, causal, scale=scale)
    return [g.transpose(1, 2) for g in grads]


def _expand(x, nheads):
    group = nheads // x.shape[2]
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def _prefix(sq, sk, causal):
    """Keys [0, p) every query row sees in full when the causal mask is bottom-right aligned."""
    if not causal or sq == sk:
        return 0
    if sq > sk:
        raise NotImplementedError("sdpa_flash_attn: causal with seqlen_q > seqlen_k")
    return sk - sq


def _attn_fwd(q, k, v, scale, causal):
    if EXPAND_KV:
        k, v = _expand(k, q.shape[2]), _expand(v, q.shape[2])
    p = _prefix(q.shape[1], k.shape[1], causal)
    if p == 0:
        return _op_fwd(q, k, v, scale, causal)
    o1, l1 = _op_fwd(q, k[:, :p], v[:, :p], scale, False)
    o2, l2 = _op_fwd(q, k[:, p:], v[:, p:], scale, True)
    lse = torch.logaddexp(l1, l2)
    w1, w2 = (torch.exp(lx - lse).transpose(1, 2).unsqueeze(-1) for lx in (l1, l2))
    return (o1.float() * w1 + o2.float() * w2).to(q.dtype), lse


def _attn_bwd(dout, q, k, v, out, lse, scale, causal):
    """(dq, dk, dv), dk/dv with k's heads."""
    nheads_k = k.shape[2]
    expand = EXPAND_KV and nheads_k != q.shape[2]
    if expand:
        k, v = _expand(k, q.shape[2]), _expand(v, q.shape[2])
    p = _prefix(q.shape[1], k.shape[1], causal)
    if p == 0:
        dq, dk, dv = _op_bwd(dout, q, k, v, out, lse, scale, causal)
    else:
        dq1, dk1, dv1 = _op_bwd(dout, q, k[:, :p], v[:, :p], out, lse, scale, False)
        dq2, dk2, dv2 = _op_bwd(dout, q, k[:, p:], v[:, p:], out, lse, scale, True)
        dq = (dq1.float() + dq2).to(q.dtype)
        dk, dv = torch.cat([dk1, dk2], dim=1), torch.cat([dv1, dv2], dim=1)
    if expand:
        dk, dv = (g.float().unflatten(2, (nheads_k, -1)).sum(3).to(g.dtype) for g in (dk, dv))
    return dq, dk, dv


# ---- FlashAttention-2.8's internal functions ----------------------------------------------------


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1,
                        window_size_right=-1, softcap=0.0, alibi_slopes=None,
                        return_softmax=False):
    """-> (out, softmax_lse, S_dmask, rng_state): out (b, s, h, d), softmax_lse (b, h, s) fp32;
    S_dmask and rng_state are None (no dropout)."""
    _check(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes, return_softmax)
    out, lse = _attn_fwd(q, k, v, softmax_scale, bool(causal))
    return out, lse, None, None


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale,
                         causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                         alibi_slopes=None, deterministic=False, rng_state=None):
    """Writes the gradients into dq, dk, dv (allocated when None); returns None (2.8 returns
    softmax_d, which ring-flash-attn does not read)."""
    _check(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    grads = _attn_bwd(dout, q, k, v, out, softmax_lse, softmax_scale, bool(causal))
    for buf, g in zip((dq, dk, dv), grads):
        if buf is not None:
            buf.copy_(g)
    return None


def _seq_bounds(cu_seqlens_q, cu_seqlens_k):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        if cq[i + 1] > cq[i]:
            if ck[i + 1] == ck[i]:
                raise NotImplementedError("sdpa_flash_attn: a sequence without keys")
            yield slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p, softmax_scale, causal, window_size_left=-1,
                               window_size_right=-1, softcap=0.0, alibi_slopes=None,
                               return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None, zero_tensors=False):
    """-> (out, softmax_lse, None, None): out (total_q, h, d), softmax_lse (h, total_q) fp32."""
    _check(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes, return_softmax)
    _unsupported(block_table=block_table is not None, leftpad_k=leftpad_k is not None,
                 seqused_k=seqused_k is not None)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=torch.float32,
                     device=q.device)
    for sq, sk in _seq_bounds(cu_seqlens_q, cu_seqlens_k):
        # contiguous copies: llama3 hands head slices of q (a copy is small beside the call)
        o, l = _attn_fwd(*(x[None, s].contiguous() for x, s in ((q, sq), (k, sk), (v, sk))),
                         softmax_scale, bool(causal))
        out[sq], lse[:, sq] = o[0], l[0]
    return out, lse, None, None


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                softmax_scale, causal, window_size_left=-1,
                                window_size_right=-1, softcap=0.0, alibi_slopes=None,
                                deterministic=False, rng_state=None, zero_tensors=False):
    """Writes the gradients into dq, dk, dv (rows of no sequence: zero); returns None."""
    _check(dropout_p, window_size_left, window_size_right, softcap, alibi_slopes)
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    for buf in (dq, dk, dv):
        buf.zero_()
    for sq, sk in _seq_bounds(cu_seqlens_q, cu_seqlens_k):
        gq, gk, gv = _attn_bwd(*(x[None, s].contiguous() for x, s in (
            (dout, sq), (q, sq), (k, sk), (v, sk), (out, sq))), softmax_lse[None, :, sq],
            softmax_scale, bool(causal))
        dq[sq].copy_(gq[0])
        dk[sk].add_(gk[0])
        dv[sk].add_(gv[0])
    return None


# ---- the public function the single-GPU baseline calls ------------------------------------------


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal):
        out, lse = _attn_fwd(q, k, v, softmax_scale, causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(dout.contiguous(), q, k, v, out, lse, ctx.softmax_scale,
                               ctx.causal)
        return dq, dk, dv, None, None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """FlashAttention-2's flash_attn_func (q (b, s, h, d), k/v (b, s, h_k, d)) on SDPA's flash
    ops, differentiable."""
    _check(dropout_p, window_size[0], window_size[1], softcap, alibi_slopes, return_attn_probs)
    return _Attention.apply(q, k, v, softmax_scale, bool(causal))


def probe_native_gqa(device, dtype=torch.bfloat16):
    """Whether the op takes fewer K/V heads than query heads on `device` (forward and backward
    of a tiny call; a refusal raises RuntimeError). Returns (ok, reason)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 16, 4, 64, generator=gen).to(device, dtype)
    k, v = (torch.randn(1, 16, 2, 64, generator=gen).to(device, dtype) for _ in range(2))
    saved = EXPAND_KV
    try:
        use_expanded_kv(False)
        out, lse = _attn_fwd(q, k, v, None, True)
        _attn_bwd(torch.ones_like(out), q, k, v, out, lse, None, True)
        return True, None
    except RuntimeError as e:
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    finally:
        use_expanded_kv(saved)
