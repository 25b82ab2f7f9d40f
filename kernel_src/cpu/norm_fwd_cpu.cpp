// Owns: run_norm_fwd_cpu, the CPU forward of dropout + residual add + LayerNorm/RMSNorm
// (common/fused_params.h states the math). One task per block of rows; a row is converted once to
// fp64 (row_io_cpu.h), x is formed, rounded to its storage dtype, normalised and written. Every
// task writes its own rows, so the result does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/fused_params.h"
#include "../common/philox.h"
#include "flash_api_cpu.h"
#include "layout_cpu.h"
#include "parallel_cpu.h"
#include "row_io_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

// The weights in fp64, converted once per call and only read by the tasks.
struct NormWeights {
  std::vector<double> gamma, beta, colscale;
};

struct NormFwdScratch {
  std::vector<double> x, tmp;
};

// Rows per task: about 64k elements, at least one row.
int64_t rows_per_task(int64_t cols) { return cols >= 65536 ? 1 : 65536 / cols; }

// The row's x, formed as common/fused_params.h says and, when x is stored, rounded to x_dtype
// (the fp64 row then holds the rounded values).
void form_x(const NormFwdParams& p, const std::vector<double>& colscale, int64_t r, double* x,
            double* tmp, uint8_t* dmask_row) {
  const int64_t n = p.cols;
  load_row(p.x0, p.x0_dtype, r * p.x0_row_stride, n, x);
  const double rowscale = p.rowscale != nullptr ? load_one(p.rowscale, p.x0_dtype, r) : 1.0;
  const FusedDropout& d = p.dropout;
  if (d.p_dropout > 0.0) {
    for (int64_t c = 0; c < n; ++c) {
      const bool keep = dropout_keep(d.seed, d.offset, static_cast<uint32_t>(r),
                                     static_cast<uint32_t>(c), d.dropout_threshold);
      x[c] = keep ? x[c] * rowscale * d.keep_scale : 0.0;
      if (dmask_row != nullptr) dmask_row[c] = keep ? 1 : 0;
    }
  } else if (p.rowscale != nullptr) {
    for (int64_t c = 0; c < n; ++c) x[c] *= rowscale;
  }
  if (p.colscale != nullptr) {
    for (int64_t c = 0; c < n; ++c) x[c] *= colscale[c];
  }
  if (p.residual != nullptr) {
    load_row(p.residual, p.residual_dtype, r * p.residual_row_stride, n, tmp);
    for (int64_t c = 0; c < n; ++c) x[c] += tmp[c];
  }
  if (p.x != nullptr) {
    // Round to the stored dtype; the statistics below are those of the stored x.
    store_row(p.x, p.x_dtype, r * n, n, x);
    load_row(p.x, p.x_dtype, r * n, n, x);
  }
}

void norm_row(const NormFwdParams& p, const NormWeights& w, NormFwdScratch& s, int64_t r) {
  const int64_t n = p.cols;
  double* x = s.x.data();
  form_x(p, w.colscale, r, x, s.tmp.data(), p.dmask != nullptr ? p.dmask + r * n : nullptr);
  double mu = 0.0;
  if (!p.is_rms_norm) {
    for (int64_t c = 0; c < n; ++c) mu += x[c];
    mu /= static_cast<double>(n);
  }
  double m2 = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    const double v = x[c] - mu;
    m2 += v * v;
  }
  const double rsigma = 1.0 / std::sqrt(m2 / static_cast<double>(n) + p.epsilon);
  if (p.mu != nullptr) store_stat(p.mu, p.stats_f64, r, mu);
  store_stat(p.rsigma, p.stats_f64, r, rsigma);
  double* z = s.tmp.data();
  for (int64_t c = 0; c < n; ++c) {
    z[c] = w.gamma[c] * ((x[c] - mu) * rsigma) + w.beta[c];
  }
  store_row(p.z, p.x0_dtype, r * n, n, z);
}

}  // namespace
}  // namespace cpu

void run_norm_fwd_cpu(const NormFwdParams& p) {
  using namespace cpu;
  if (p.cols < 1) fail("cols", "must be >= 1", p.cols);
  if (p.rows == 0) return;
  if (p.x0 == nullptr || p.gamma == nullptr || p.z == nullptr || p.rsigma == nullptr)
    fail("x0 / gamma / z / rsigma is null");
  if (!p.is_rms_norm && p.mu == nullptr) fail("mu is null (LayerNorm needs it)");
  NormWeights w;  // beta and colscale read as zeros / are unused when not given
  load_vector(p.gamma, p.w_dtype, p.cols, w.gamma);
  load_vector(p.beta, p.w_dtype, p.cols, w.beta);
  load_vector(p.colscale, p.w_dtype, p.cols, w.colscale);
  const int64_t block = rows_per_task(p.cols);
  const int64_t ntasks = (p.rows + block - 1) / block;
  parallel_tasks(ntasks, p.rows * p.cols * 8, [&](int64_t t) {
    NormFwdScratch& s = thread_scratch<NormFwdScratch>();
    grow_to(s.x, p.cols);
    grow_to(s.tmp, p.cols);
    const int64_t r1 = std::min(p.rows, (t + 1) * block);
    for (int64_t r = t * block; r < r1; ++r) norm_row(p, w, s, r);
  });
}

FLASH_NAMESPACE_END
