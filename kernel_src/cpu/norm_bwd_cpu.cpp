// Owns: run_norm_bwd_cpu, the CPU backward of dropout + residual add + LayerNorm/RMSNorm
// (common/fused_params.h). Per row, in fp64, with x_hat from the stored x and the forward's
// statistics, g = dz * gamma:
//   LayerNorm: dx = rsigma * (g - mean(g) - x_hat * mean(g * x_hat))
//   RMSNorm:   dx = rsigma * (g - x_hat * mean(g * x_hat))
//   dx += the gradient of the returned x (prenorm); dresidual = dx
//   dx0 = keep * keep_scale * rowscale * colscale * dx (the dropout mask redrawn from Philox)
// and the column sums dgamma = sum_r dz * x_hat, dbeta = sum_r dz, dcolscale = sum_r dx *
// drop(x0 * rowscale). The rows are cut into a fixed number of chunks that depends on the row
// count only; each chunk sums its rows into its own fp64 partial, and the partials are added in
// chunk order, so the column sums are bitwise the same for any thread count.
#include <algorithm>
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

constexpr int64_t kMaxChunks = 64;

struct NormBwdScratch {
  std::vector<double> x, dz, dx, x0;
};

struct ColumnSums {
  double* dgamma;
  double* dbeta;
  double* dcolscale;
};

void bwd_row(const NormBwdParams& p, const std::vector<double>& gamma,
             const std::vector<double>& colscale, NormBwdScratch& s, ColumnSums sums, int64_t r) {
  const int64_t n = p.cols;
  double* x = s.x.data();
  double* dz = s.dz.data();
  double* dx = s.dx.data();
  load_row(p.x, p.x_dtype, r * p.x_row_stride, n, x);
  load_row(p.dz, p.dz_dtype, r * p.dz_row_stride, n, dz);
  const double mu = p.is_rms_norm ? 0.0 : load_stat(p.mu, p.stats_f64, r);
  const double rsigma = load_stat(p.rsigma, p.stats_f64, r);
  double mean_g = 0.0, mean_gx = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    x[c] = (x[c] - mu) * rsigma;  // x_hat from here on
    const double g = dz[c] * gamma[c];
    mean_g += g;
    mean_gx += g * x[c];
    sums.dgamma[c] += dz[c] * x[c];
    sums.dbeta[c] += dz[c];
  }
  mean_g = p.is_rms_norm ? 0.0 : mean_g / static_cast<double>(n);
  mean_gx /= static_cast<double>(n);
  for (int64_t c = 0; c < n; ++c) {
    dx[c] = rsigma * (dz[c] * gamma[c] - mean_g - x[c] * mean_gx);
  }
  if (p.dx != nullptr) {
    load_row(p.dx, p.x_dtype, r * p.dx_row_stride, n, x);  // x_hat no longer needed
    for (int64_t c = 0; c < n; ++c) dx[c] += x[c];
  }
  if (p.dresidual != nullptr) store_row(p.dresidual, p.x_dtype, r * n, n, dx);

  // dx0 = d x / d x0 * dx; x0's contribution to x is drop(x0 * rowscale) * colscale.
  const FusedDropout& d = p.dropout;
  const double rowscale = p.rowscale != nullptr ? load_one(p.rowscale, p.dz_dtype, r) : 1.0;
  double* x0 = s.x0.data();
  if (p.colscale != nullptr) load_row(p.x0, p.dz_dtype, r * p.x0_row_stride, n, x0);
  for (int64_t c = 0; c < n; ++c) {
    double factor = rowscale;  // d drop(x0 * rowscale) / d x0
    if (d.p_dropout > 0.0) {
      const bool keep = dropout_keep(d.seed, d.offset, static_cast<uint32_t>(r),
                                     static_cast<uint32_t>(c), d.dropout_threshold);
      factor = keep ? rowscale * d.keep_scale : 0.0;
    }
    if (p.colscale != nullptr) {
      sums.dcolscale[c] += dx[c] * (x0[c] * factor);
      dx[c] *= colscale[c];
    }
    dx[c] *= factor;
  }
  store_row(p.dx0, p.dz_dtype, r * n, n, dx);
}

}  // namespace
}  // namespace cpu

void run_norm_bwd_cpu(const NormBwdParams& p) {
  using namespace cpu;
  if (p.cols < 1) fail("cols", "must be >= 1", p.cols);
  if (p.gamma == nullptr || p.dgamma == nullptr) fail("gamma / dgamma is null");
  // Without rows the per-row tensors are empty (null); dgamma/dbeta/dcolscale are then zeros.
  if (p.rows > 0 && (p.x == nullptr || p.dz == nullptr || p.rsigma == nullptr || p.dx0 == nullptr))
    fail("x / dz / rsigma / dx0 is null");
  if (p.rows > 0 && !p.is_rms_norm && p.mu == nullptr) fail("mu is null (LayerNorm needs it)");
  if (p.colscale != nullptr && ((p.rows > 0 && p.x0 == nullptr) || p.dcolscale == nullptr))
    fail("x0 and dcolscale are needed with colscale");
  const int64_t n = p.cols;
  std::vector<double> gamma, colscale;
  load_vector(p.gamma, p.w_dtype, n, gamma);
  load_vector(p.colscale, p.w_dtype, n, colscale);

  const int64_t nchunks = std::max<int64_t>(1, std::min(p.rows, kMaxChunks));
  const int64_t chunk = (p.rows + nchunks - 1) / std::max<int64_t>(nchunks, 1);
  // Partials: 3 columns-sized fp64 rows per chunk (dgamma, dbeta, dcolscale), zero-initialised.
  std::vector<double> partial(static_cast<size_t>(nchunks) * 3 * n, 0.0);
  if (p.rows > 0) {
    parallel_tasks(nchunks, p.rows * n * 12, [&](int64_t t) {
      NormBwdScratch& s = thread_scratch<NormBwdScratch>();
      grow_to(s.x, n);
      grow_to(s.dz, n);
      grow_to(s.dx, n);
      grow_to(s.x0, n);
      double* base = partial.data() + t * 3 * n;
      const ColumnSums sums{base, base + n, base + 2 * n};
      const int64_t r1 = std::min(p.rows, (t + 1) * chunk);
      for (int64_t r = t * chunk; r < r1; ++r) bwd_row(p, gamma, colscale, s, sums, r);
    });
  }
  std::vector<double> total(3 * n, 0.0);
  for (int64_t t = 0; t < nchunks; ++t) {
    const double* base = partial.data() + t * 3 * n;
    for (int64_t i = 0; i < 3 * n; ++i) total[i] += base[i];
  }
  store_row(p.dgamma, p.w_dtype, 0, n, total.data());
  if (p.dbeta != nullptr) store_row(p.dbeta, p.w_dtype, 0, n, total.data() + n);
  if (p.dcolscale != nullptr) store_row(p.dcolscale, p.w_dtype, 0, n, total.data() + 2 * n);
}

FLASH_NAMESPACE_END
