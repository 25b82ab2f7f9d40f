"""Static argument checks of the fused training ops (the norm ops and the cross-entropy ops).

Shared by the public functions (``ops.layer_norm``, ``ops.rms_norm``, ``losses.cross_entropy``)
and by the fake implementations (``_fused_meta``), so eager and traced calls fail with the same
message. They read metadata only; the C++ binding (``torch-ext/ops_layer_norm.cpp``,
``torch-ext/ops_cross_entropy.cpp``) repeats them and also checks label values on the host.
Every failure is a ``RuntimeError`` starting with ``flash_attn:`` that names the argument.
"""

import torch

from ._checks import fail

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LABEL_DTYPES = (torch.int64, torch.int32)


# Whether the public functions take CUDA tensors. The CUDA kernels passed their GPU tests
# (docs/fused_ops.md, "Status"); set it to False to keep a release's fused ops on the CPU, e.g.
# while a kernel change waits for its GPU run (the tests switch it on for themselves).
CUDA_ENABLED = True


def device(t, name, what):
    """The fused ops run on CPU tensors, and on CUDA tensors once CUDA_ENABLED (docs/fused_ops.md)."""
    if t.device.type == "cuda" and not CUDA_ENABLED:
        fail(f"{what} on CUDA tensors ({name} is on {t.device}) is not enabled in this release: "
             "its CUDA kernels are built but have not yet passed their GPU tests; use CPU tensors")
    if t.device.type not in ("cpu", "cuda", "meta"):
        fail(f"{name} is on {t.device}; {what} supports CPU and CUDA tensors")


def cuda_dtype(t, name):
    """On CUDA the fused ops serve fp16/bf16/fp32 (fp64 is CPU only)."""
    if t.device.type == "cuda" and t.dtype == torch.float64:
        fail(f"{name} has dtype torch.float64, which the fused ops support on CPU tensors only; "
             "on CUDA use torch.float16, torch.bfloat16 or torch.float32")


def cuda_pair(t, name, ref, ref_name):
    """On CUDA the residual stream and the weights of the norm have the input's dtype or fp32."""
    if t.device.type == "cuda" and t.dtype not in (ref.dtype, torch.float32):
        fail(f"{name} has dtype {t.dtype} but on CUDA it must have {ref_name}'s dtype "
             f"({ref.dtype}) or torch.float32")


def same_device(t, name, ref, ref_name):
    if t.device != ref.device:
        fail(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on "
             "the same device")


def float_dtype(t, name):
    if t.dtype not in FLOAT_DTYPES:
        fail(f"{name} has dtype {t.dtype}; supported are torch.float16, torch.bfloat16, "
             "torch.float32 and torch.float64")


def dtype_is(t, name, want, why):
    if t.dtype != want:
        fail(f"{name} has dtype {t.dtype} but must have {want} ({why})")


def vector(t, name, n, what):
    if t.dim() != 1 or t.shape[0] != n:
        fail(f"{name} must have shape ({n},) {what}, got {tuple(t.shape)}")


def matrix(t, name, rows, cols, what):
    if t.dim() != 2 or tuple(t.shape) != (rows, cols):
        fail(f"{name} must have shape ({rows}, {cols}) {what}, got {tuple(t.shape)}")
    last_dim_contiguous(t, name)


def last_dim_contiguous(t, name):
    if t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        fail(f"{name} must be contiguous in its last dimension (stride(-1) == 1), got stride "
             f"{t.stride(-1)}")


def stats_dtype(dtype):
    """Per-row statistics of the norm: fp64 for an fp32/fp64 stream (the CPU backend's
    accumulation type for them), else fp32."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def norm_x_dtype(x0, residual, residual_in_fp32):
    """The dtype of x = drop(x0) + residual: the residual's, else fp32 with residual_in_fp32,
    else x0's (FlashAttention-2's rule)."""
    if residual is not None:
        return residual.dtype
    return torch.float32 if residual_in_fp32 else x0.dtype


def norm_stores_x(x0, residual, rowscale, colscale, dropout_p, x_dtype):
    """Whether the forward writes x; otherwise x equals x0 and the op returns it empty."""
    return (residual is not None or dropout_p > 0 or rowscale is not None
            or colscale is not None or x_dtype != x0.dtype)


_LN_FWD = "dropout_add_layer_norm / rms_norm (op dropout_add_ln_fwd)"
_LN_BWD = "the backward of dropout_add_layer_norm / rms_norm (op dropout_add_ln_bwd)"
_CE_FWD = "CrossEntropyLoss (op cross_entropy_fwd)"
_CE_BWD = "the backward of CrossEntropyLoss (op cross_entropy_bwd)"


def _weights(gamma, beta, colscale, ref, ref_name, cols):
    same_device(gamma, "weight", ref, ref_name)
    float_dtype(gamma, "weight")
    vector(gamma, "weight", cols, "(hidden_size,)")
    if beta is not None:
        same_device(beta, "bias", ref, ref_name)
        dtype_is(beta, "bias", gamma.dtype, "the dtype of weight")
        vector(beta, "bias", cols, "(hidden_size,)")
    if colscale is not None:
        same_device(colscale, "layerscale", ref, ref_name)
        dtype_is(colscale, "layerscale", gamma.dtype, "the dtype of weight")
        vector(colscale, "layerscale", cols, "(hidden_size,)")


def _rowscale(rowscale, ref, ref_name, rows):
    if rowscale is not None:
        same_device(rowscale, "rowscale", ref, ref_name)
        dtype_is(rowscale, "rowscale", ref.dtype, "the dtype of x0")
        vector(rowscale, "rowscale", rows, "(one entry per row of x0)")


def _dropout(dropout_p, rng_state):
    if not 0.0 <= dropout_p < 1.0:
        fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0:
        if rng_state is None:
            fail("rng_state is required when dropout_p > 0 (an int64 CPU tensor [seed, offset])")
        if (rng_state.device.type != "cpu" or rng_state.dtype != torch.int64
                or tuple(rng_state.shape) != (2,)):
            fail(f"rng_state must be an int64 CPU tensor of shape (2,) holding [seed, offset], "
                 f"got {rng_state.dtype} {tuple(rng_state.shape)} on {rng_state.device}")


def ln_fwd(x0, residual, gamma, beta, rowscale, colscale, dropout_p, epsilon, rng_state):
    device(x0, "x0", _LN_FWD)
    if x0.dim() != 2:
        fail(f"x0 must have 2 dimensions (rows, hidden_size), got shape {tuple(x0.shape)}")
    float_dtype(x0, "x0")
    cuda_dtype(x0, "x0")
    last_dim_contiguous(x0, "x0")
    rows, cols = x0.shape
    if cols < 1:
        fail("x0 has hidden size 0; the norm needs at least one column")
    if residual is not None:
        same_device(residual, "residual", x0, "x0")
        float_dtype(residual, "residual")
        cuda_pair(residual, "residual", x0, "x0")
        matrix(residual, "residual", rows, cols, "(the shape of x0)")
    _weights(gamma, beta, colscale, x0, "x0", cols)
    cuda_pair(gamma, "weight", x0, "x0")
    _rowscale(rowscale, x0, "x0", rows)
    if not (epsilon >= 0.0 and epsilon != float("inf")):
        fail(f"epsilon must be >= 0 and finite, got {epsilon}")
    _dropout(dropout_p, rng_state)


def ln_bwd(dz, dx, x, x0, mu, rsigma, gamma, rowscale, colscale, dropout_p, rng_state,
           is_rms_norm):
    device(x, "x", _LN_BWD)
    if x.dim() != 2:
        fail(f"x must have 2 dimensions (rows, hidden_size), got shape {tuple(x.shape)}")
    float_dtype(x, "x")
    last_dim_contiguous(x, "x")
    rows, cols = x.shape
    if cols < 1:
        fail("x has hidden size 0; the norm needs at least one column")
    same_device(dz, "dz", x, "x")
    float_dtype(dz, "dz")
    cuda_dtype(dz, "dz")
    cuda_pair(x, "x", dz, "dz")
    matrix(dz, "dz", rows, cols, "(the shape of x)")
    if dx is not None:
        same_device(dx, "dx", x, "x")
        dtype_is(dx, "dx", x.dtype, "the dtype of x")
        matrix(dx, "dx", rows, cols, "(the shape of x)")
    if x0 is not None:
        same_device(x0, "x0", x, "x")
        dtype_is(x0, "x0", dz.dtype, "the dtype of dz")
        matrix(x0, "x0", rows, cols, "(the shape of x)")
    if colscale is not None and x0 is None:
        fail("x0 is required with layerscale (for its gradient)")
    stats = stats_dtype(x.dtype)
    for t, name in ((rsigma, "rsigma"),) + (() if is_rms_norm else ((mu, "mu"),)):
        same_device(t, name, x, "x")
        dtype_is(t, name, stats, "the statistics dtype of x")
        vector(t, name, rows, "(one entry per row)")
    _weights(gamma, None, colscale, x, "x", cols)
    cuda_pair(gamma, "weight", dz, "dz")
    _rowscale(rowscale, dz, "dz", rows)
    _dropout(dropout_p, rng_state)


def _ce_common(logits, labels, what):
    device(logits, "logits", what)
    if logits.dim() != 2:
        fail(f"logits must have 2 dimensions (batch, vocab_size), got shape {tuple(logits.shape)}")
    float_dtype(logits, "logits")
    cuda_dtype(logits, "logits")
    last_dim_contiguous(logits, "logits")
    rows, cols = logits.shape
    if cols < 1:
        fail("logits has vocab_size 0; it needs at least one class")
    same_device(labels, "labels", logits, "logits")
    if labels.dtype not in _LABEL_DTYPES:
        fail(f"labels must have dtype torch.int64 or torch.int32, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != rows:
        fail(f"labels must have shape ({rows},) (one per row of logits), got "
             f"{tuple(labels.shape)}")
    return rows, cols


def ce_row_dtype(logits):
    """losses, z_losses, lse (and their gradients): fp64 for fp64 logits, else fp32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def ce_lse_dtype(logits):
    """The per-row lse: fp64 for fp32/fp64 logits (the CPU accumulation type), else fp32."""
    return stats_dtype(logits.dtype)


def _ce_row_values(t, name, logits, rows, is_lse=False):
    same_device(t, name, logits, "logits")
    if is_lse:
        dtype_is(t, name, ce_lse_dtype(logits),
                 "torch.float64 for fp32/fp64 logits, else torch.float32")
    else:
        dtype_is(t, name, ce_row_dtype(logits),
                 "torch.float64 for fp64 logits, else torch.float32")
    if t.dim() != 1 or t.shape[0] != rows:
        fail(f"{name} must have shape ({rows},) (one per row of logits), got {tuple(t.shape)}")


def _ce_scalars(smoothing, logit_scale, lse_square_scale, total_classes, class_start_idx, cols):
    if not 0.0 <= smoothing <= 1.0:
        fail(f"label_smoothing must be in [0, 1], got {smoothing}")
    if not (logit_scale > 0.0 and logit_scale != float("inf")):
        fail(f"logit_scale must be > 0 and finite, got {logit_scale}")
    if lse_square_scale != lse_square_scale or abs(lse_square_scale) == float("inf"):
        fail(f"lse_square_scale must be finite, got {lse_square_scale}")
    if class_start_idx < 0 or total_classes < class_start_idx + cols:
        fail(f"this shard's classes [{class_start_idx}, {class_start_idx + cols}) must lie in "
             f"[0, total_classes = {total_classes})")


def ce_fwd(logits, labels, precomputed_lse, smoothing, logit_scale, lse_square_scale,
           total_classes, class_start_idx, split):
    rows, cols = _ce_common(logits, labels, _CE_FWD)
    _ce_scalars(smoothing, logit_scale, lse_square_scale, total_classes, class_start_idx, cols)
    if not split and (class_start_idx != 0 or total_classes != cols):
        fail(f"without a process group total_classes ({total_classes}) must equal vocab_size "
             f"({cols}) and class_start_idx ({class_start_idx}) must be 0")
    if precomputed_lse is not None:
        if smoothing != 0.0 or logit_scale != 1.0 or split:
            fail("precomputed_lse can only be used with label_smoothing = 0, logit_scale = 1 and "
                 "no process group")
        _ce_row_values(precomputed_lse, "precomputed_lse", logits, rows, is_lse=True)


def ce_bwd(dlosses, logits, lse, labels, smoothing, logit_scale, lse_square_scale,
           total_classes, class_start_idx):
    rows, cols = _ce_common(logits, labels, _CE_BWD)
    _ce_scalars(smoothing, logit_scale, lse_square_scale, total_classes, class_start_idx, cols)
    _ce_row_values(dlosses, "dlosses", logits, rows)
    _ce_row_values(lse, "lse", logits, rows, is_lse=True)
