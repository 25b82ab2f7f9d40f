// Owns: the params of the fused training ops (docs/fused_ops.md): dropout + residual add +
// LayerNorm/RMSNorm forward and backward, and the chunked cross-entropy forward and backward.
// Filled by the torch binding (torch-ext/ops_layer_norm.cpp, torch-ext/ops_cross_entropy.cpp) by
// named assignment; no torch types here. Shared by the CPU backend and the CUDA one
// (kernel_src/launch/norm_cuda.cu, cross_entropy_cuda.cu), which computes in fp32 where the CPU
// uses fp64 (docs/fused_ops.md).
//
// Conventions (normative; docs/fused_ops.md states them for users):
// * Norm rows: x0 (rows, cols); every row stride is given in elements, the last dimension is
//   contiguous. Outputs are contiguous (rows, cols).
// * Norm forward, per element (row r, column c), computed in the backend's accumulation type:
//     x = drop(x0 * rowscale[r]) * colscale[c] + residual      (each factor only when given)
//   x is rounded to its storage dtype first, and the statistics are those of the rounded x, so
//   the backward recomputes exactly the forward's x_hat from the stored x:
//     LayerNorm: mu = mean(x), rsigma = 1 / sqrt(mean((x - mu)^2) + epsilon)
//     RMSNorm:   rsigma = 1 / sqrt(mean(x^2) + epsilon), x_hat = x * rsigma (no mu)
//     z = gamma * x_hat + beta
// * Norm dropout: element (r, c) is kept iff dropout_keep(seed, offset, r, c, threshold) of
//   common/philox.h, i.e. the attention stream with subsequence = offset, row = r, col = c (the
//   attention mask of batch 0, head 0 with seqlen_k = cols). Kept elements are scaled by
//   keep_scale = 1 / (1 - p). The backward redraws the same mask from (seed, offset).
// * Cross-entropy: logits (rows, cols) with a row stride, last dimension contiguous. With s =
//   logit_scale, l = s * logits[r], lse = log(sum_c exp(l_c)) (over this shard's columns when
//   split), label y = labels[r] - class_start_idx, eps = smoothing, n = total_classes:
//     loss = lse - (1 - eps) * l_y - eps * sum_c(l_c) / n + lse_square_scale * lse^2
//   For a label outside [0, cols) (in another shard when split) the l_y term goes and the lse
//   term is eps * lse, as FlashAttention-2 does. Split (tensor parallel): no lse and no z-loss
//   terms, which the caller adds once the shards are combined. z_loss = lse_square_scale * lse^2;
//   loss and z_loss are 0 where labels[r] == ignore_index. The backward:
//     dlogits[r, c] = dloss[r] * s * (exp(l_c - lse) * (1 + 2 lse_square_scale lse)
//                     - (1 - eps) [c == y] - eps / n)     (0 where labels[r] == ignore_index)
#pragma once
#include <cstdint>

#include "params.h"

FLASH_NAMESPACE_BEGIN

// Dropout of the norm ops (see above; p_dropout == 0: off).
struct FusedDropout {
  double p_dropout = 0.0;
  double keep_scale = 1.0;
  uint32_t dropout_threshold = 0;
  uint64_t seed = 0, offset = 0;
};

struct NormFwdParams {
  int64_t rows = 0, cols = 0;
  bool is_rms_norm = false;
  double epsilon = 0.0;
  FusedDropout dropout;

  // Inputs. gamma/beta/colscale share w_dtype; rowscale has x0's dtype.
  DType x0_dtype = DType::kFloat16, residual_dtype = DType::kFloat16, w_dtype = DType::kFloat16;
  const void* x0 = nullptr;
  int64_t x0_row_stride = 0;
  const void* residual = nullptr;  // null: no residual
  int64_t residual_row_stride = 0;
  const void* gamma = nullptr;     // (cols)
  const void* beta = nullptr;      // (cols) or null
  const void* rowscale = nullptr;  // (rows) or null
  const void* colscale = nullptr;  // (cols) or null

  // Outputs, contiguous. z has x0's dtype. x (x_dtype) is null when it equals x0 (no residual,
  // no dropout, no scales, x_dtype == x0_dtype): the caller then uses x0 as x.
  void* z = nullptr;
  DType x_dtype = DType::kFloat16;
  void* x = nullptr;
  uint8_t* dmask = nullptr;  // (rows, cols) keep mask, 1 = kept; null unless asked for
  // Statistics (rows), fp64 when stats_f64 (x_dtype fp32/fp64), else fp32. mu is null for RMS.
  bool stats_f64 = false;
  void* mu = nullptr;
  void* rsigma = nullptr;
};

struct NormBwdParams {
  int64_t rows = 0, cols = 0;
  bool is_rms_norm = false;
  FusedDropout dropout;

  DType dz_dtype = DType::kFloat16;  // z's dtype, which is x0's; dx0 gets it too
  DType x_dtype = DType::kFloat16;   // the stored x (or x0 when x was not stored); dx, dresidual
  DType w_dtype = DType::kFloat16;   // gamma, colscale, dgamma, dbeta, dcolscale
  const void* dz = nullptr;
  int64_t dz_row_stride = 0;
  const void* dx = nullptr;  // gradient of the returned x (prenorm), or null
  int64_t dx_row_stride = 0;
  const void* x = nullptr;
  int64_t x_row_stride = 0;
  const void* x0 = nullptr;  // needed (and only read) with colscale, for dcolscale
  int64_t x0_row_stride = 0;
  bool stats_f64 = false;
  const void* mu = nullptr;  // null for RMS
  const void* rsigma = nullptr;
  const void* gamma = nullptr;
  const void* rowscale = nullptr;  // dz_dtype
  const void* colscale = nullptr;

  // Outputs, contiguous; the optional ones are null when not wanted.
  void* dx0 = nullptr;
  void* dresidual = nullptr;
  void* dgamma = nullptr;
  void* dbeta = nullptr;
  void* dcolscale = nullptr;
  // CUDA only: fp32 scratch for the per-CTA column sums, norm_bwd_cuda_workspace_floats(params)
  // entries, uninitialised (launch/norm_cuda.cu). Unused by the CPU backend.
  float* workspace = nullptr;
};

struct CrossEntropyParams {
  DType dtype = DType::kFloat16;  // logits (and dlogits)
  int64_t rows = 0, cols = 0;
  const void* logits = nullptr;
  int64_t logits_row_stride = 0;
  const void* labels = nullptr;  // (rows), int64 or int32
  bool labels_int64 = true;
  double smoothing = 0.0, logit_scale = 1.0, lse_square_scale = 0.0;
  int64_t ignore_index = -100, total_classes = 0, class_start_idx = 0;
  bool split = false;  // tensor parallel: losses without the lse and z-loss terms
  // Per-row values. losses, z_losses and dlosses: fp64 when stats_f64 (fp64 logits), else fp32
  // (FlashAttention-2's dtype). The lse (written, precomputed or read back): fp64 when lse_f64
  // (fp32 or fp64 logits: the CPU accumulation type for them; an fp32 lse would cost the
  // backward's exp(l - lse) a relative error of |lse| * 2^-24), else fp32.
  bool stats_f64 = false;
  bool lse_f64 = false;
  // Forward.
  void* losses = nullptr;
  void* z_losses = nullptr;
  void* lse = nullptr;                    // written by the forward
  const void* precomputed_lse = nullptr;  // forward: use it instead of computing the lse
  // Backward.
  const void* lse_in = nullptr;
  const void* dlosses = nullptr;
  int64_t dlosses_stride = 0;  // may be 0 (an expanded scalar gradient)
  void* dlogits = nullptr;     // may be the logits themselves (in-place backward)
  int64_t dlogits_row_stride = 0;
};

// The loss and z-loss of one row (FlashAttention-2.8's formula, docs/fused_ops.md), from its lse,
// the sum of its scaled logits and, when the label is one of this shard's columns, the label's
// scaled logit; in fp64, the same on the CPU and CUDA. An ignored row has loss 0.
struct CrossEntropyRowLoss {
  double loss = 0.0, z_loss = 0.0;
};
FLASH_HOST_DEVICE CrossEntropyRowLoss cross_entropy_row_loss(const CrossEntropyParams& p,
                                                             int64_t label, double lse,
                                                             double scaled_sum, bool label_here,
                                                             double scaled_logit_y) {
  CrossEntropyRowLoss r;
  if (label == p.ignore_index) return r;
  const double lse_term = p.split ? 0.0 : lse;
  const double eps = p.smoothing;
  const double smooth = eps > 0.0 ? eps * scaled_sum / static_cast<double>(p.total_classes) : 0.0;
  r.loss = label_here ? lse_term - smooth - (1.0 - eps) * scaled_logit_y
                      : eps * lse_term - smooth;  // the label lives in another shard (split)
  if (!p.split) {
    r.z_loss = p.lse_square_scale * lse * lse;
    r.loss += r.z_loss;
  }
  return r;
}

FLASH_NAMESPACE_END
