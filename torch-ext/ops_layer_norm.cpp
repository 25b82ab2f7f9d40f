// Owns: the norm ops `dropout_add_ln_fwd` and `dropout_add_ln_bwd` (flash_attn.ops.layer_norm,
// flash_attn.ops.rms_norm): argument checks -> NormFwdParams / NormBwdParams -> the backend of
// the input's device (CPU, or CUDA: kernel_src/launch/norm_cuda.cu, whose column-sum workspace
// is allocated here). Outputs are allocated here. The math and the dropout
// stream are stated in kernel_src/common/fused_params.h; docs/fused_ops.md has the contract.
#include <algorithm>
#include <tuple>
#include <vector>

#include "fused_checks.h"
#include "ops_common.h"
#include "torch_binding.h"

FLASH_NAMESPACE_BEGIN

using namespace binding;

namespace {

constexpr const char* kFwdWhat = "dropout_add_layer_norm / rms_norm (op dropout_add_ln_fwd)";
constexpr const char* kBwdWhat = "the backward of dropout_add_layer_norm / rms_norm "
                                 "(op dropout_add_ln_bwd)";

// gamma (cols) and what must share its dtype; returns gamma's dtype.
DType check_weights(const Tensor& gamma, const OptTensor& beta, const OptTensor& colscale,
                    const Tensor& ref, const char* ref_name, int64_t cols, Tensor* gamma_c,
                    OptTensor* beta_c, OptTensor* colscale_c) {
  check_same_device(gamma, "weight", ref, ref_name);
  const DType w = float_dtype(gamma, "weight");
  *gamma_c = check_vector(gamma, "weight", cols, "(hidden_size,)");
  if (beta) {
    check_same_device(*beta, "bias", ref, ref_name);
    check_dtype_is(*beta, "bias", gamma.scalar_type(), "the dtype of weight");
    *beta_c = check_vector(*beta, "bias", cols, "(hidden_size,)");
  }
  if (colscale) {
    check_same_device(*colscale, "layerscale", ref, ref_name);
    check_dtype_is(*colscale, "layerscale", gamma.scalar_type(), "the dtype of weight");
    *colscale_c = check_vector(*colscale, "layerscale", cols, "(hidden_size,)");
  }
  return w;
}

OptTensor check_rowscale(const OptTensor& rowscale, const Tensor& ref, const char* ref_name,
                         int64_t rows) {
  if (!rowscale) return std::nullopt;
  check_same_device(*rowscale, "rowscale", ref, ref_name);
  check_dtype_is(*rowscale, "rowscale", ref.scalar_type(), "the dtype of x0");
  return check_vector(*rowscale, "rowscale", rows, "(one entry per row of x0)");
}

void check_epsilon_dropout(double epsilon, double dropout_p) {
  FLASH_CHECK(epsilon >= 0.0 && std::isfinite(epsilon), "epsilon must be >= 0 and finite, got ",
              epsilon);
  FLASH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ",
              dropout_p);
}

Tensor empty_of(const Tensor& like, ScalarType dtype) { return alloc_vec(like, {0}, dtype); }

// The backward on x's device; on CUDA with its fp32 column-sum workspace, allocated on x's
// stream and alive until the call returns (the caching allocator orders its reuse).
void run_norm_bwd(NormBwdParams& p, const Tensor& x) {
  if (x.is_cpu()) return run_norm_bwd_cpu(p);
#ifdef CUDA_KERNEL
  const torch::stable::accelerator::DeviceGuard guard(x.get_device_index());
  const int64_t floats = norm_bwd_cuda_workspace_floats(p);
  Tensor workspace = alloc_vec(x, {std::max<int64_t>(floats, 1)}, ScalarType::Float);
  p.workspace = static_cast<float*>(workspace.mutable_data_ptr());
  run_norm_bwd_cuda(p, current_stream(x));
#else
  fail("x is on ", device_str(x), " but this build of flash_attn has no CUDA backend");
#endif
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dropout_add_ln_fwd(
    const Tensor& x0, const OptTensor& residual, const Tensor& gamma, const OptTensor& beta,
    const OptTensor& rowscale, const OptTensor& colscale, double dropout_p, double epsilon,
    const OptTensor& rng_state, bool residual_in_fp32, bool is_rms_norm,
    bool return_dropout_mask) {
  // Tensor checks.
  check_fused_device(x0, "x0", kFwdWhat);
  check_rank(x0, "x0", 2, "(rows, hidden_size)");
  const DType x0_dtype = float_dtype(x0, "x0");
  check_fused_cuda_dtype(x0, "x0");
  check_last_dim_contiguous(x0, "x0");
  const int64_t rows = x0.size(0), cols = x0.size(1);
  FLASH_CHECK(cols >= 1, "x0 has hidden size 0; the norm needs at least one column");
  DType residual_dtype = x0_dtype;
  if (residual) {
    check_same_device(*residual, "residual", x0, "x0");
    residual_dtype = float_dtype(*residual, "residual");
    check_fused_cuda_pair(*residual, "residual", x0, "x0");
    check_matrix(*residual, "residual", rows, cols, "(the shape of x0)");
  }
  Tensor gamma_c;
  OptTensor beta_c, colscale_c;
  const DType w_dtype =
      check_weights(gamma, beta, colscale, x0, "x0", cols, &gamma_c, &beta_c, &colscale_c);
  check_fused_cuda_pair(gamma, "weight", x0, "x0");
  const OptTensor rowscale_c = check_rowscale(rowscale, x0, "x0", rows);
  check_epsilon_dropout(epsilon, dropout_p);
  const Dropout drop = check_dropout(dropout_p, rng_state);

  // Outputs. x is stored unless it equals x0 (docs/fused_ops.md).
  const ScalarType x_type = residual ? residual->scalar_type()
                                     : (residual_in_fp32 ? ScalarType::Float : x0.scalar_type());
  const bool store_x = residual || dropout_p > 0.0 || rowscale || colscale ||
                       x_type != x0.scalar_type();
  const ScalarType stats_type = stats_dtype_for(x_type);
  Tensor z = alloc_vec(x0, {rows, cols}, x0.scalar_type());
  Tensor x = store_x ? alloc_vec(x0, {rows, cols}, x_type) : empty_of(x0, x_type);
  const bool want_mask = return_dropout_mask && dropout_p > 0.0;
  Tensor dmask = want_mask ? alloc_vec(x0, {rows, cols}, ScalarType::Byte)
                           : empty_of(x0, ScalarType::Byte);
  Tensor mu = is_rms_norm ? empty_of(x0, stats_type) : alloc_vec(x0, {rows}, stats_type);
  Tensor rsigma = alloc_vec(x0, {rows}, stats_type);

  // Params.
  NormFwdParams p;
  p.rows = rows;
  p.cols = cols;
  p.is_rms_norm = is_rms_norm;
  p.epsilon = epsilon;
  p.dropout = fused_dropout(drop, rows, cols);
  p.x0_dtype = x0_dtype;
  p.residual_dtype = residual_dtype;
  p.w_dtype = w_dtype;
  p.x0 = x0.const_data_ptr();
  p.x0_row_stride = x0.stride(0);
  if (residual) {
    p.residual = residual->const_data_ptr();
    p.residual_row_stride = residual->stride(0);
  }
  p.gamma = gamma_c.const_data_ptr();
  p.beta = beta_c ? beta_c->const_data_ptr() : nullptr;
  p.rowscale = rowscale_c ? rowscale_c->const_data_ptr() : nullptr;
  p.colscale = colscale_c ? colscale_c->const_data_ptr() : nullptr;
  p.z = z.mutable_data_ptr();
  p.x_dtype = float_dtype(x, "x");
  p.x = store_x ? x.mutable_data_ptr() : nullptr;
  p.dmask = want_mask ? static_cast<uint8_t*>(dmask.mutable_data_ptr()) : nullptr;
  p.stats_f64 = stats_type == ScalarType::Double;
  p.mu = is_rms_norm ? nullptr : mu.mutable_data_ptr();
  p.rsigma = rsigma.mutable_data_ptr();

  if (x0.is_cpu()) {
    run_norm_fwd_cpu(p);
  } else {
    FLASH_RUN_CUDA(run_norm_fwd_cuda, p, x0);
  }
  return {z, x, dmask, mu, rsigma, drop.rng_out};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dropout_add_ln_bwd(
    const Tensor& dz, const OptTensor& dx, const Tensor& x, const OptTensor& x0, const Tensor& mu,
    const Tensor& rsigma, const Tensor& gamma, const OptTensor& rowscale,
    const OptTensor& colscale, double dropout_p, const OptTensor& rng_state, bool has_residual,
    bool has_beta, bool is_rms_norm) {
  // Tensor checks.
  check_fused_device(x, "x", kBwdWhat);
  check_rank(x, "x", 2, "(rows, hidden_size)");
  const DType x_dtype = float_dtype(x, "x");
  check_last_dim_contiguous(x, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  FLASH_CHECK(cols >= 1, "x has hidden size 0; the norm needs at least one column");
  check_same_device(dz, "dz", x, "x");
  const DType dz_dtype = float_dtype(dz, "dz");
  check_fused_cuda_dtype(dz, "dz");
  check_fused_cuda_pair(x, "x", dz, "dz");
  check_matrix(dz, "dz", rows, cols, "(the shape of x)");
  if (dx) {
    check_same_device(*dx, "dx", x, "x");
    check_dtype_is(*dx, "dx", x.scalar_type(), "the dtype of x");
    check_matrix(*dx, "dx", rows, cols, "(the shape of x)");
  }
  if (x0) {
    check_same_device(*x0, "x0", x, "x");
    check_dtype_is(*x0, "x0", dz.scalar_type(), "the dtype of dz");
    check_matrix(*x0, "x0", rows, cols, "(the shape of x)");
  }
  FLASH_CHECK(!colscale || x0, "x0 is required with layerscale (for its gradient)");
  const ScalarType stats_type = stats_dtype_for(x.scalar_type());
  check_same_device(rsigma, "rsigma", x, "x");
  check_dtype_is(rsigma, "rsigma", stats_type, "the statistics dtype of x");
  const Tensor rsigma_c = check_vector(rsigma, "rsigma", rows, "(one entry per row)");
  OptTensor mu_c;
  if (!is_rms_norm) {
    check_same_device(mu, "mu", x, "x");
    check_dtype_is(mu, "mu", stats_type, "the statistics dtype of x");
    mu_c = check_vector(mu, "mu", rows, "(one entry per row)");
  }
  Tensor gamma_c;
  OptTensor beta_unused, colscale_c;
  const DType w_dtype = check_weights(gamma, std::nullopt, colscale, x, "x", cols, &gamma_c,
                                      &beta_unused, &colscale_c);
  check_fused_cuda_pair(gamma, "weight", dz, "dz");
  const OptTensor rowscale_c = check_rowscale(rowscale, dz, "dz", rows);
  check_epsilon_dropout(0.0, dropout_p);
  const Dropout drop = check_dropout(dropout_p, rng_state);

  // Outputs.
  Tensor dx0 = alloc_vec(x, {rows, cols}, dz.scalar_type());
  Tensor dresidual =
      has_residual ? alloc_vec(x, {rows, cols}, x.scalar_type()) : empty_of(x, x.scalar_type());
  Tensor dgamma = alloc_vec(x, {cols}, gamma.scalar_type());
  Tensor dbeta = has_beta ? alloc_vec(x, {cols}, gamma.scalar_type())
                          : empty_of(x, gamma.scalar_type());
  Tensor dcolscale = colscale ? alloc_vec(x, {cols}, gamma.scalar_type())
                              : empty_of(x, gamma.scalar_type());

  // Params.
  NormBwdParams p;
  p.rows = rows;
  p.cols = cols;
  p.is_rms_norm = is_rms_norm;
  p.dropout = fused_dropout(drop, rows, cols);
  p.dz_dtype = dz_dtype;
  p.x_dtype = x_dtype;
  p.w_dtype = w_dtype;
  p.dz = dz.const_data_ptr();
  p.dz_row_stride = dz.stride(0);
  if (dx) {
    p.dx = dx->const_data_ptr();
    p.dx_row_stride = dx->stride(0);
  }
  p.x = x.const_data_ptr();
  p.x_row_stride = x.stride(0);
  if (x0) {
    p.x0 = x0->const_data_ptr();
    p.x0_row_stride = x0->stride(0);
  }
  p.stats_f64 = stats_type == ScalarType::Double;
  p.mu = mu_c ? mu_c->const_data_ptr() : nullptr;
  p.rsigma = rsigma_c.const_data_ptr();
  p.gamma = gamma_c.const_data_ptr();
  p.rowscale = rowscale_c ? rowscale_c->const_data_ptr() : nullptr;
  p.colscale = colscale_c ? colscale_c->const_data_ptr() : nullptr;
  p.dx0 = dx0.mutable_data_ptr();
  p.dresidual = has_residual ? dresidual.mutable_data_ptr() : nullptr;
  p.dgamma = dgamma.mutable_data_ptr();
  p.dbeta = has_beta ? dbeta.mutable_data_ptr() : nullptr;
  p.dcolscale = colscale ? dcolscale.mutable_data_ptr() : nullptr;

  run_norm_bwd(p, x);
  return {dx0, dresidual, dgamma, dbeta, dcolscale};
}

FLASH_NAMESPACE_END
