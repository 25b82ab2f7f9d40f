"""Oracles for the fused training ops, written in plain PyTorch (nothing fused), in the two modes
of tests/reference.py: upcast=True is the fp64 reference ("ref"), upcast=False the same math in
the inputs' dtypes ("pt": the error an honest implementation in that dtype makes). The semantics
are those of kernel_src/common/fused_params.h and docs/fused_ops.md.
"""
import torch
import torch.nn.functional as F


def norm_ref(x0, residual, weight, bias, *, eps, keep=None, dropout_p=0.0, rowscale=None,
             colscale=None, residual_in_fp32=False, is_rms_norm=False, upcast=True):
    """x0, residual (rows, hidden); keep (rows, hidden) bool or None. Returns (z, x).

    pt (upcast=False) works in x's dtype (the residual's, fp32 with residual_in_fp32, else
    x0's), as the kernel stores x, and returns z in x0's dtype."""
    if residual is not None:
        x_dtype = residual.dtype
    else:
        x_dtype = torch.float32 if residual_in_fp32 else x0.dtype
    z_dtype = x0.dtype
    dt = torch.float64 if upcast else x_dtype
    h = x0.to(dt)
    if rowscale is not None:
        h = h * rowscale.to(dt)[:, None]
    if keep is not None:
        h = torch.where(keep, h * (1.0 / (1.0 - dropout_p)), torch.zeros_like(h))
    if colscale is not None:
        h = h * colscale.to(dt)
    if residual is not None:
        h = h + residual.to(dt)
    x = h
    w = weight.to(dt)
    b = bias.to(dt) if bias is not None else None
    if upcast:
        # Written out, so that the fp64 reference is exact where the math is (hidden size 1:
        # x - mean(x) is 0 and so is its derivative; F.layer_norm's backward leaves ~1e-14).
        xc = x if is_rms_norm else x - x.mean(-1, keepdim=True)
        z = xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps) * w
        return (z + b if b is not None else z), x
    # pt: PyTorch's own norms in the working dtype (a different algorithm from the reference,
    # so that in fp64 the two differ by honest rounding).
    if is_rms_norm:
        z = F.rms_norm(x, (x.shape[-1],), w, eps)
        z = z + b if b is not None else z
    else:
        z = F.layer_norm(x, (x.shape[-1],), w, b, eps)
    return z.to(z_dtype), x


def cross_entropy_ref(logits, labels, *, smoothing=0.0, logit_scale=1.0, lse_square_scale=0.0,
                      ignore_index=-100, upcast=True):
    """Per-row (losses, z_losses). ref in fp64; pt in fp32 for fp16/bf16 logits (their losses
    are fp32 by contract), else in the logits' dtype."""
    if upcast:
        dt = torch.float64
    else:
        dt = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    l = logits.to(dt) * logit_scale
    lse = torch.logsumexp(l, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    picked = l.gather(1, safe[:, None]).squeeze(1)
    loss = lse - (1.0 - smoothing) * picked - smoothing * l.mean(-1)
    z_loss = lse_square_scale * lse.square()
    loss = torch.where(valid, loss + z_loss, torch.zeros_like(loss))
    z_loss = torch.where(valid, z_loss, torch.zeros_like(z_loss))
    return loss, z_loss
