"""Oracles for the test suite: attention written out with explicit masks, nothing fused.

Every function here runs in one of two modes:
* upcast=True: fp64 throughout, the reference ("ref");
* upcast=False: the same math in the input dtype ("pt"), used only to measure how much error
  honest rounding in that dtype produces. For fp64 inputs the "pt" run is the flash algorithm
  itself (reorder_ops: scale on k, tiled online softmax, one division at the end) so that it
  differs from "ref" by the rounding of that algorithm in fp64 instead of 0.

The semantics follow kernel_src/common/params.h and docs/design.md: bottom-right aligned
windows, softcap before ALiBi, lse = +inf and out = 0 for a row that sees no key, dropout applied
to the normalised probabilities and scaled by 1/(1-p).

The tolerance rule (docs/testing.md, after FA2/FA3): ours passes iff
    max|ours - ref| <= factor * max|pt - ref| + eps(dtype) * max|ref|
with factor 2 for outputs and LSE and 3 for gradients (fp64: see error_ratio).
"""
import math

import torch

# ----------------------------------------------------------------------------------------------
# Masks


def visible_mask(seqlen_q, seqlen_k, window_left=-1, window_right=-1, causal=False,
                 device="cpu"):
    """(seqlen_q, seqlen_k) bool: may query row i see key j (bottom-right aligned)?"""
    if causal:
        window_right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    vis = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if window_right >= 0:
        vis &= j <= diag + window_right
    if window_left >= 0:
        vis &= j >= diag - window_left
    return vis


def alibi_bias(slopes_bh, seqlen_q, seqlen_k, dtype):
    """(batch, nheads, seqlen_q, seqlen_k) bias -slope * |i + sk - sq - j|."""
    i = torch.arange(seqlen_q, device=slopes_bh.device)[:, None]
    j = torch.arange(seqlen_k, device=slopes_bh.device)[None, :]
    dist = (i + seqlen_k - seqlen_q - j).abs().to(dtype)
    return -slopes_bh.to(dtype)[:, :, None, None] * dist


# ----------------------------------------------------------------------------------------------
# Batched attention


def _einsum(eq, a, b):
    """einsum rounding its result to the operands' dtype once, as a GEMM with fp32
    accumulation does (tensor cores, and our CPU backend). For fp16/bf16 it runs in fp32 and
    rounds: the same numbers as a half-precision GEMM with fp32 accumulation, in both the
    forward and (through the casts) the backward, and 20x faster than CPU fp16 matmuls."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.einsum(eq, a.float(), b.float()).to(a.dtype)
    return torch.einsum(eq, a, b)


def attention_ref(q, k, v, *, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, alibi_slopes=None, keep_mask=None, dropout_p=0.0, upcast=True,
                  reorder_ops=False):
    """q (b, sq, h, d); k, v (b, sk, hk, d). Returns out (b, sq, h, d), lse (b, h, sq), P.

    keep_mask (b, h, sq, sk) bool: which probabilities survive dropout (None: no dropout).
    P is the normalised softmax before dropout (what S_dmask holds up to its sign).
    """
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    k = k.repeat_interleave(h // hk, dim=2)
    v = v.repeat_interleave(h // hk, dim=2)
    if reorder_ops:
        s = _einsum("bthd,bshd->bhts", q, k * scale)
    else:
        s = _einsum("bthd,bshd->bhts", q * scale, k)
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.expand(b, h)
        s = s + alibi_bias(slopes, sq, sk, s.dtype)
    vis = visible_mask(sq, sk, window_size[0], window_size[1], causal, q.device)
    row_any = vis.any(-1)  # (sq,)
    if sk == 0:  # no keys at all: every row is empty (0 * sums keep autograd connected)
        out = q.new_zeros(b, sq, h, v.shape[-1]) + 0 * (q.sum() + v.sum())
        lse = torch.full((b, h, sq), float("inf"), dtype=s.dtype, device=q.device)
        return out, lse, s

    s = s.masked_fill(~vis, float("-inf"))
    # Rows that see nothing: keep them finite so neither softmax nor its gradient makes NaNs;
    # their P is zeroed below and their lse is +inf by contract.
    s = torch.where(row_any[:, None], s, torch.zeros_like(s))
    if upcast:
        lse = torch.logsumexp(s, dim=-1)
        p = torch.where(row_any[:, None], torch.softmax(s, dim=-1), torch.zeros_like(s))
        p_used = p
        if keep_mask is not None:
            p_used = p.masked_fill(~keep_mask, 0.0) * (1.0 / (1.0 - dropout_p))
        out = _einsum("bhts,bshd->bthd", p_used.to(v.dtype), v)
    else:
        out, lse, p = _SoftmaxPV.apply(s, v, row_any, keep_mask, dropout_p, reorder_ops)
    lse = torch.where(row_any, lse, torch.full_like(lse, float("inf")))
    return out, lse, p


def _online_softmax_pv(s, v, keep_scaled, block_n=64):
    """The flash forward: key blocks of block_n, running max and sum, O rescaled per block and
    divided once at the end. Returns out (b, t, h, d) and lse (b, h, t)."""
    b, h, t, sk = s.shape
    row_max = torch.full((b, h, t, 1), float("-inf"), dtype=s.dtype, device=s.device)
    row_sum = torch.zeros((b, h, t, 1), dtype=s.dtype, device=s.device)
    acc = torch.zeros((b, h, t, v.shape[-1]), dtype=s.dtype, device=s.device)
    for n0 in range(0, sk, block_n):
        blk = s[..., n0:n0 + block_n]
        new_max = torch.maximum(row_max, blk.amax(-1, keepdim=True))
        # rows that have seen only masked keys so far: exp(-inf - (-inf)) would be NaN
        new_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        rescale = torch.exp(row_max - new_max)
        e = torch.exp(blk - new_max)
        row_sum = row_sum * rescale + e.sum(-1, keepdim=True)
        if keep_scaled is not None:
            e = e * keep_scaled[..., n0:n0 + block_n]
        acc = acc * rescale + torch.einsum("bhts,bshd->bhtd", e, v[:, n0:n0 + block_n])
        row_max = new_max
    out = (acc / row_sum).transpose(1, 2)
    return out, (row_max + torch.log(row_sum)).squeeze(-1)


class _SoftmaxPV(torch.autograd.Function):
    """softmax -> dropout -> P V in the input dtype, for the "pt" oracle.

    The backward is FlashAttention's: D = rowsum(dO * O) from the stored, rounded O, and
    dS = P * (dP - D). Autograd's softmax backward uses sum(dP * P) instead, which cancels
    exactly where a row has one visible key while the FA form leaves an honest rounding error,
    so the oracle would claim a precision no flash backward has. With reorder_ops (fp64) the
    forward is the tiled online softmax itself (_online_softmax_pv), so that the oracle's
    rounding is that of the flash algorithm, not just of fp64.
    """

    @staticmethod
    def forward(ctx, s, v, row_any, keep_mask, dropout_p, reorder_ops):
        keep_scaled = None
        if keep_mask is not None:
            keep_scaled = keep_mask.to(s.dtype) * (1.0 / (1.0 - dropout_p))
        if reorder_ops:
            out, lse = _online_softmax_pv(s, v, keep_scaled)
            out = torch.where(row_any[None, :, None, None], out, torch.zeros_like(out))
            p = torch.exp(s - lse[..., None])  # P as a flash backward recomputes it
            p = torch.where(row_any[:, None], p, torch.zeros_like(p))
        else:
            row_max = s.amax(dim=-1, keepdim=True)
            e = torch.exp(s - row_max)
            row_sum = e.sum(dim=-1, keepdim=True)
            lse = (row_max + torch.log(row_sum)).squeeze(-1)
            p = torch.where(row_any[:, None], e / row_sum, torch.zeros_like(e))
            p_used = p if keep_scaled is None else p * keep_scaled
            out = _einsum("bhts,bshd->bthd", p_used.to(v.dtype), v)
        ctx.save_for_backward(p, v, out, keep_scaled)
        ctx.mark_non_differentiable(lse, p)
        return out, lse, p

    @staticmethod
    def backward(ctx, dout, _dlse, _dp):
        p, v, out, keep_scaled = ctx.saved_tensors
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        p_used = p if keep_scaled is None else p * keep_scaled
        dv = _einsum("bhts,bthd->bshd", p_used.to(v.dtype), dout)
        dp = _einsum("bthd,bshd->bhts", dout, v)
        if keep_scaled is not None:
            dp = dp * keep_scaled
        d_row = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)[..., None]  # (b, h, t, 1)
        ds = (p.to(acc) * (dp.to(acc) - d_row)).to(p.dtype)
        return ds, dv, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Variable length and paged K/V


def gather_paged(pool, block_table_row, seqlen):
    """Keys 0..seqlen-1 of one sequence from a (num_blocks, page, hk, d) pool."""
    page = pool.shape[1]
    t = torch.arange(seqlen, device=pool.device)
    blocks = block_table_row.long()[t // page]
    return pool[blocks, t % page]


def varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, *, seqused_k=None, block_table=None,
               keep_mask=None, alibi_slopes=None, **kw):
    """q (total_q, h, d); k, v (total_k, hk, d) or paged pools. Returns out, lse (h, total_q).

    With block_table, sequence b's key t lives at block_table[b, t // page], row t % page and
    its length is cu_seqlens_k[b+1]-cu_seqlens_k[b] (or seqused_k[b]). keep_mask is
    (batch, h, max_sq, max_sk) like S_dmask.
    """
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        q_b = q[cu_q[b]:cu_q[b + 1]]
        len_k = cu_k[b + 1] - cu_k[b] if seqused_k is None else int(seqused_k[b])
        if block_table is not None:
            k_b = gather_paged(k, block_table[b], len_k)
            v_b = gather_paged(v, block_table[b], len_k)
        else:
            k_b = k[cu_k[b]:cu_k[b] + len_k]
            v_b = v[cu_k[b]:cu_k[b] + len_k]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        km = None
        if keep_mask is not None:
            km = keep_mask[b:b + 1, :, :q_b.shape[0], :len_k]
        o, l, _ = attention_ref(q_b[None], k_b[None], v_b[None], alibi_slopes=slopes,
                                keep_mask=km, **kw)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, -1)


# ----------------------------------------------------------------------------------------------
# Rotary and the KV cache


def apply_rotary(x, cos, sin, positions, interleaved):
    """x (s, h, d), cos/sin (seqlen_ro, r/2), positions (s,) long: rotate the first r dims.

    interleaved: pairs (2i, 2i+1) (GPT-J); otherwise halves (i, i + r/2) (GPT-NeoX).
    """
    r = cos.shape[1] * 2
    c = cos[positions].to(x.dtype)[:, None, :]
    s = sin[positions].to(x.dtype)[:, None, :]
    rot, rest = x[..., :r], x[..., r:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
        rot = torch.stack([o1, o2], dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :r // 2], rot[..., r // 2:]
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rot, rest], dim=-1)


def kvcache_ref(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, rotary_cos=None,
                rotary_sin=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                alibi_slopes=None, rotary_interleaved=True, upcast=True, reorder_ops=False):
    """flash_attn_with_kvcache per docs/design.md, one sequence at a time.

    Returns out (b, sq, h, d), lse (b, h, sq) and the expected k_cache, v_cache after the call
    (in the compute dtype).
    """
    cdt = torch.float64 if upcast else q.dtype
    q, k_cache, v_cache = q.to(cdt), k_cache.to(cdt).clone(), v_cache.to(cdt).clone()
    if k is not None:
        k, v = k.to(cdt), v.to(cdt)
    if rotary_cos is not None:
        rotary_cos, rotary_sin = rotary_cos.to(cdt), rotary_sin.to(cdt)
    batch, sq = q.shape[0], q.shape[1]
    paged = block_table is not None
    page = k_cache.shape[1]
    seqlen_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        full = k_cache.shape[1] if not paged else block_table.shape[1] * page
        seqlens = [full] * batch
    elif isinstance(cache_seqlens, int):
        seqlens = [cache_seqlens] * batch
    else:
        seqlens = [int(x) for x in cache_seqlens]
    local = window_size[0] >= 0 or window_size[1] >= 0
    outs, lses = [], []
    for b in range(batch):
        row = b if cache_batch_idx is None else int(cache_batch_idx[b])
        t0 = seqlens[b]
        pos_new = torch.arange(t0, t0 + seqlen_new, device=q.device)

        def where(t):  # cache index of position(s) t of sequence b
            if paged:
                return block_table[b].long()[t // page], t % page
            return torch.full_like(t, row), t

        if k is not None:
            k_new = k[b]
            if rotary_cos is not None:
                k_new = apply_rotary(k_new, rotary_cos, rotary_sin, pos_new, rotary_interleaved)
            k_cache[where(pos_new)] = k_new
            v_cache[where(pos_new)] = v[b]
        left = 0 if cache_leftpad is None else int(cache_leftpad[b])
        pos_k = torch.arange(left, t0 + seqlen_new, device=q.device)
        k_b, v_b = k_cache[where(pos_k)], v_cache[where(pos_k)]
        q_b = q[b]
        if rotary_cos is not None:
            if causal or local:
                pos_q = t0 + torch.arange(sq, device=q.device)
            else:
                pos_q = torch.full((sq,), t0, device=q.device, dtype=torch.long)
            q_b = apply_rotary(q_b, rotary_cos, rotary_sin, pos_q, rotary_interleaved)
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes
        o, l, _ = attention_ref(q_b[None], k_b[None], v_b[None], softmax_scale=softmax_scale,
                                causal=causal, window_size=window_size, softcap=softcap,
                                alibi_slopes=slopes, upcast=upcast, reorder_ops=reorder_ops)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses), k_cache, v_cache


# ----------------------------------------------------------------------------------------------
# Tolerance


def pt_options(dtype):
    """Keyword arguments that turn a reference call into the 'same math in dtype' oracle."""
    return {"upcast": False, "reorder_ops": dtype == torch.float64}


def max_abs(*tensors):
    """max |x| over the finite elements of several tensors (a common magnitude)."""
    vals = [t.detach().double().abs()[torch.isfinite(t.detach())].max().item()
            for t in tensors if torch.isfinite(t.detach()).any()]
    return max(vals, default=0.0)


def rounding_step(eps, ref):
    finite = ref[torch.isfinite(ref)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return eps * scale


def error_ratio(ours, ref, pt, dtype, factor, scale=None):
    """(ratio, message): ratio <= 1 passes the rule. Checks inf/NaN placement first.

    The rounding step is eps * scale (scale defaults to max|ref|), with eps of the coarser of
    the input dtype and the output's own dtype: softmax_lse is fp32 by contract even for fp64
    inputs. Gradients pass the common scale of (dq, dk, dv): where a gradient cancels to ~0
    (e.g. dS = P (dP - D) with a single visible key), the kernel's D = rowsum(dO * O) uses the
    rounded O, as every FlashAttention backward does, and max|ref| = 0 would demand exactness.
    """
    eps = max(torch.finfo(dtype).eps, torch.finfo(ours.dtype).eps)
    if eps == torch.finfo(torch.float64).eps:
        # fp64: the fp64 reference is no more precise than an fp64 kernel, so |ours - ref|
        # carries the reference's own rounding and the ratio to |pt - ref| is noise (measured
        # up to 3x). Hold fp64 to twice the factor plus 16 ulps instead: still seven orders of
        # magnitude below an fp32 shortcut (which this catches), and never flaky.
        factor, eps = factor * 2, eps * 16
    ours = ours.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    pt = pt.detach().to("cpu", torch.float64)
    if ours.shape != ref.shape:
        return math.inf, f"shape {tuple(ours.shape)} != expected {tuple(ref.shape)}"
    if torch.isnan(ours).any():
        n = int(torch.isnan(ours).sum())
        return math.inf, f"{n} NaN values (poisoned or unwritten elements?)"
    ref_inf = torch.isinf(ref)
    if not torch.equal(torch.isinf(ours), ref_inf) or not torch.equal(ours[ref_inf],
                                                                       ref[ref_inf]):
        return math.inf, "+-inf placement differs from the reference"
    fin = ~ref_inf
    err = (ours[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
    pt_err = (pt[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0
    step = rounding_step(eps, ref) if scale is None else eps * scale
    bound = factor * pt_err + step
    ratio = err / bound if bound > 0 else (0.0 if err == 0 else math.inf)
    msg = (f"max|ours-ref| = {err:.3e} vs bound {bound:.3e} "
           f"(= {factor} * max|pt-ref| {pt_err:.3e} + rounding step {step:.3e})")
    return ratio, msg
