// Owns: the cross-entropy ops `cross_entropy_fwd`, `cross_entropy_bwd` and
// `cross_entropy_bwd_inplace` (flash_attn.losses.cross_entropy): argument checks ->
// CrossEntropyParams -> the backend of the logits' device (CPU, or CUDA:
// kernel_src/launch/cross_entropy_cuda.cu). The math is stated
// in kernel_src/common/fused_params.h; docs/fused_ops.md has the contract. Labels are checked
// (ignore_index or in [0, total_classes)) here, on the host.
#include <tuple>
#include <vector>

#include "fused_checks.h"
#include "ops_common.h"
#include "torch_binding.h"

FLASH_NAMESPACE_BEGIN

using namespace binding;

namespace {

constexpr const char* kFwdWhat = "CrossEntropyLoss (op cross_entropy_fwd)";
constexpr const char* kBwdWhat = "the backward of CrossEntropyLoss (op cross_entropy_bwd)";

struct CeShape {
  int64_t rows, cols;
  ScalarType stats;  // losses, z_losses, dlosses
  ScalarType lse;    // lse, precomputed_lse
};

CeShape check_logits_labels(const Tensor& logits, const Tensor& labels, const char* what) {
  check_fused_device(logits, "logits", what);
  check_rank(logits, "logits", 2, "(batch, vocab_size)");
  float_dtype(logits, "logits");
  check_fused_cuda_dtype(logits, "logits");
  check_last_dim_contiguous(logits, "logits");
  // fp64 logits keep fp64 losses (gradcheck precision), others fp32; the lse is fp64 for
  // fp32 logits too (kernel_src/common/fused_params.h).
  const CeShape s{logits.size(0), logits.size(1),
                  logits.scalar_type() == ScalarType::Double ? ScalarType::Double
                                                             : ScalarType::Float,
                  stats_dtype_for(logits.scalar_type())};
  FLASH_CHECK(s.cols >= 1, "logits has vocab_size 0; it needs at least one class");
  check_same_device(labels, "labels", logits, "logits");
  FLASH_CHECK(labels.scalar_type() == ScalarType::Long || labels.scalar_type() == ScalarType::Int,
              "labels must have dtype torch.int64 or torch.int32, got ",
              dtype_name(labels.scalar_type()));
  FLASH_CHECK(labels.dim() == 1 && labels.size(0) == s.rows,
              "labels must have shape (", s.rows, ",) (one per row of logits), got ",
              shape_str(labels));
  return s;
}

void check_scalars_ce(double smoothing, double logit_scale, double lse_square_scale,
                      int64_t total_classes, int64_t class_start_idx, int64_t cols) {
  FLASH_CHECK(smoothing >= 0.0 && smoothing <= 1.0, "label_smoothing must be in [0, 1], got ",
              smoothing);
  FLASH_CHECK(logit_scale > 0.0 && std::isfinite(logit_scale),
              "logit_scale must be > 0 and finite, got ", logit_scale);
  FLASH_CHECK(std::isfinite(lse_square_scale), "lse_square_scale must be finite, got ",
              lse_square_scale);
  FLASH_CHECK(class_start_idx >= 0 && total_classes >= class_start_idx + cols,
              "this shard's classes [", class_start_idx, ", ", class_start_idx + cols,
              ") must lie in [0, total_classes = ", total_classes, ")");
}

// On the host: every label is ignore_index or a class in [0, total_classes).
void check_label_values(const Tensor& labels, int64_t ignore_index, int64_t total_classes) {
  if (!labels.is_cpu()) return;
  const Tensor l = torch::stable::contiguous(labels);
  const bool i64 = l.scalar_type() == ScalarType::Long;
  for (int64_t r = 0; r < l.size(0); ++r) {
    const int64_t y = i64 ? l.const_data_ptr<int64_t>()[r]
                          : static_cast<int64_t>(l.const_data_ptr<int32_t>()[r]);
    FLASH_CHECK(y == ignore_index || (y >= 0 && y < total_classes), "labels[", r, "] = ", y,
                " is neither ignore_index (", ignore_index, ") nor a class in [0, ",
                total_classes, ")");
  }
}

Tensor check_row_values(const Tensor& t, const char* name, const Tensor& logits,
                        const CeShape& s, bool is_lse) {
  check_same_device(t, name, logits, "logits");
  if (is_lse) {
    check_dtype_is(t, name, s.lse, "torch.float64 for fp32/fp64 logits, else torch.float32");
  } else {
    check_dtype_is(t, name, s.stats, "torch.float64 for fp64 logits, else torch.float32");
  }
  FLASH_CHECK(t.dim() == 1 && t.size(0) == s.rows, name, " must have shape (", s.rows,
              ",) (one per row of logits), got ", shape_str(t));
  return t;
}

void fill_common(CrossEntropyParams& p, const Tensor& logits, const Tensor& labels,
                 const CeShape& s, double smoothing, double logit_scale, double lse_square_scale,
                 int64_t ignore_index, int64_t total_classes, int64_t class_start_idx) {
  p.dtype = float_dtype(logits, "logits");
  p.rows = s.rows;
  p.cols = s.cols;
  p.logits = logits.const_data_ptr();
  p.logits_row_stride = logits.stride(0);
  p.labels = labels.const_data_ptr();
  p.labels_int64 = labels.scalar_type() == ScalarType::Long;
  p.smoothing = smoothing;
  p.logit_scale = logit_scale;
  p.lse_square_scale = lse_square_scale;
  p.ignore_index = ignore_index;
  p.total_classes = total_classes;
  p.class_start_idx = class_start_idx;
  p.stats_f64 = s.stats == ScalarType::Double;
  p.lse_f64 = s.lse == ScalarType::Double;
}

void run_ce_bwd(const CrossEntropyParams& p, const Tensor& logits) {
  if (logits.is_cpu()) {
    run_cross_entropy_bwd_cpu(p);
  } else {
    FLASH_RUN_CUDA(run_cross_entropy_bwd_cuda, p, logits);
  }
}

// The backward's checks and params (both the out-of-place and the in-place op).
CrossEntropyParams bwd_params(const Tensor& dlosses, const Tensor& logits, const Tensor& lse,
                              const Tensor& labels, double smoothing, double logit_scale,
                              double lse_square_scale, int64_t ignore_index,
                              int64_t total_classes, int64_t class_start_idx, Tensor* labels_c,
                              Tensor* lse_c) {
  const CeShape s = check_logits_labels(logits, labels, kBwdWhat);
  check_scalars_ce(smoothing, logit_scale, lse_square_scale, total_classes, class_start_idx,
                   s.cols);
  check_row_values(dlosses, "dlosses", logits, s, false);
  check_row_values(lse, "lse", logits, s, true);
  *labels_c = torch::stable::contiguous(labels);
  CrossEntropyParams p;
  fill_common(p, logits, *labels_c, s, smoothing, logit_scale, lse_square_scale, ignore_index,
              total_classes, class_start_idx);
  p.dlosses = dlosses.const_data_ptr();
  p.dlosses_stride = dlosses.stride(0);
  *lse_c = torch::stable::contiguous(lse);
  p.lse_in = lse_c->const_data_ptr();
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> cross_entropy_fwd(
    const Tensor& logits, const Tensor& labels, const OptTensor& precomputed_lse,
    double smoothing, double logit_scale, double lse_square_scale, int64_t ignore_index,
    int64_t total_classes, int64_t class_start_idx, bool split,
    bool /*inplace_backward: read by the autograd backward from the saved inputs*/) {
  // Checks.
  const CeShape s = check_logits_labels(logits, labels, kFwdWhat);
  check_scalars_ce(smoothing, logit_scale, lse_square_scale, total_classes, class_start_idx,
                   s.cols);
  FLASH_CHECK(split || (class_start_idx == 0 && total_classes == s.cols),
              "without a process group total_classes (", total_classes,
              ") must equal vocab_size (", s.cols, ") and class_start_idx (", class_start_idx,
              ") must be 0");
  check_label_values(labels, ignore_index, total_classes);
  OptTensor pre;
  if (precomputed_lse) {
    FLASH_CHECK(smoothing == 0.0 && logit_scale == 1.0 && !split,
                "precomputed_lse can only be used with label_smoothing = 0, logit_scale = 1 and "
                "no process group");
    pre = torch::stable::contiguous(check_row_values(*precomputed_lse, "precomputed_lse", logits, s, true));
  }
  const Tensor labels_c = torch::stable::contiguous(labels);

  // Outputs.
  Tensor losses = alloc_vec(logits, {s.rows}, s.stats);
  Tensor z_losses = alloc_vec(logits, {s.rows}, s.stats);
  Tensor lse = alloc_vec(logits, {s.rows}, s.lse);

  // Params.
  CrossEntropyParams p;
  fill_common(p, logits, labels_c, s, smoothing, logit_scale, lse_square_scale, ignore_index,
              total_classes, class_start_idx);
  p.split = split;
  p.losses = losses.mutable_data_ptr();
  p.z_losses = z_losses.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  p.precomputed_lse = pre ? pre->const_data_ptr() : nullptr;

  if (logits.is_cpu()) {
    run_cross_entropy_fwd_cpu(p);
  } else {
    FLASH_RUN_CUDA(run_cross_entropy_fwd_cuda, p, logits);
  }
  return {losses, z_losses, lse};
}

Tensor cross_entropy_bwd(const Tensor& dlosses, const Tensor& logits, const Tensor& lse,
                         const Tensor& labels, double smoothing, double logit_scale,
                         double lse_square_scale, int64_t ignore_index, int64_t total_classes,
                         int64_t class_start_idx) {
  Tensor labels_c, lse_c;
  CrossEntropyParams p = bwd_params(dlosses, logits, lse, labels, smoothing, logit_scale,
                                    lse_square_scale, ignore_index, total_classes,
                                    class_start_idx, &labels_c, &lse_c);
  Tensor dlogits = alloc_vec(logits, {p.rows, p.cols}, logits.scalar_type());
  p.dlogits = dlogits.mutable_data_ptr();
  p.dlogits_row_stride = p.cols;
  run_ce_bwd(p, logits);
  return dlogits;
}

void cross_entropy_bwd_inplace(const Tensor& dlosses, Tensor logits, const Tensor& lse,
                               const Tensor& labels, double smoothing, double logit_scale,
                               double lse_square_scale, int64_t ignore_index,
                               int64_t total_classes, int64_t class_start_idx) {
  Tensor labels_c, lse_c;
  CrossEntropyParams p = bwd_params(dlosses, logits, lse, labels, smoothing, logit_scale,
                                    lse_square_scale, ignore_index, total_classes,
                                    class_start_idx, &labels_c, &lse_c);
  p.dlogits = logits.mutable_data_ptr();  // each chunk is read before it is overwritten
  p.dlogits_row_stride = logits.stride(0);
  run_ce_bwd(p, logits);
}

FLASH_NAMESPACE_END
