// Owns: run_cross_entropy_fwd_cpu and run_cross_entropy_bwd_cpu, the CPU backend of the chunked
// cross-entropy (common/fused_params.h states the math). The vocabulary is walked in chunks of
// kChunk columns converted to fp64: the forward keeps an online max and sum per row (the lse
// never needs more than one chunk in memory), the backward writes each chunk of dlogits from the
// row's lse. One task per block of rows; every task writes its own rows, so the result does not
// depend on the thread count. dlogits may be the logits themselves (in-place backward): each
// chunk is read before it is overwritten.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/fused_params.h"
#include "flash_api_cpu.h"
#include "layout_cpu.h"
#include "parallel_cpu.h"
#include "row_io_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;

struct CeScratch {
  std::vector<double> chunk;
};

int64_t label_of(const CrossEntropyParams& p, int64_t r) {
  return p.labels_int64 ? static_cast<const int64_t*>(p.labels)[r]
                        : static_cast<int64_t>(static_cast<const int32_t*>(p.labels)[r]);
}

// Rows per task: about 256k logits, at least one row.
int64_t rows_per_task(int64_t cols) { return cols >= (int64_t(1) << 18) ? 1 : (int64_t(1) << 18) / cols; }

// lse (natural log) of the scaled logits of row r, and their sum (for label smoothing).
void row_lse(const CrossEntropyParams& p, double* buf, int64_t r, double* lse, double* sum) {
  double m = -std::numeric_limits<double>::infinity(), l = 0.0, total = 0.0;
  for (int64_t c0 = 0; c0 < p.cols; c0 += kChunk) {
    const int64_t n = std::min(kChunk, p.cols - c0);
    load_row(p.logits, p.dtype, r * p.logits_row_stride + c0, n, buf);
    double chunk_max = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      buf[i] *= p.logit_scale;
      chunk_max = std::max(chunk_max, buf[i]);
      total += buf[i];
    }
    const double m_new = std::max(m, chunk_max);
    if (m_new == -std::numeric_limits<double>::infinity()) continue;  // all -inf so far
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += std::exp(buf[i] - m_new);
    l = l * std::exp(m - m_new) + s;
    m = m_new;
  }
  *lse = m == -std::numeric_limits<double>::infinity() ? m : m + std::log(l);
  *sum = total;
}

void fwd_row(const CrossEntropyParams& p, double* buf, int64_t r) {
  double lse, sum = 0.0;
  if (p.precomputed_lse != nullptr) {
    lse = load_stat(p.precomputed_lse, p.lse_f64, r);
  } else {
    row_lse(p, buf, r, &lse, &sum);
  }
  store_stat(p.lse, p.lse_f64, r, lse);
  const int64_t label = label_of(p, r);
  const int64_t y = label - p.class_start_idx;
  const bool here = label != p.ignore_index && y >= 0 && y < p.cols;
  double logit_y = 0.0;
  if (here) load_row(p.logits, p.dtype, r * p.logits_row_stride + y, 1, &logit_y);
  const CrossEntropyRowLoss l =
      cross_entropy_row_loss(p, label, lse, sum, here, p.logit_scale * logit_y);
  store_stat(p.losses, p.stats_f64, r, l.loss);
  store_stat(p.z_losses, p.stats_f64, r, l.z_loss);
}

void bwd_row(const CrossEntropyParams& p, double* buf, int64_t r) {
  const int64_t label = label_of(p, r);
  const bool ignored = label == p.ignore_index;
  const double dloss = ignored ? 0.0 : load_stat(p.dlosses, p.stats_f64, r * p.dlosses_stride);
  const double lse = load_stat(p.lse_in, p.lse_f64, r);
  const int64_t y = label - p.class_start_idx;
  const double eps = p.smoothing;
  const double neg = eps / static_cast<double>(p.total_classes);
  const double zfactor = 1.0 + 2.0 * p.lse_square_scale * lse;
  const double scale = dloss * p.logit_scale;
  for (int64_t c0 = 0; c0 < p.cols; c0 += kChunk) {
    const int64_t n = std::min(kChunk, p.cols - c0);
    if (ignored) {
      std::fill(buf, buf + n, 0.0);
    } else {
      load_row(p.logits, p.dtype, r * p.logits_row_stride + c0, n, buf);
      for (int64_t i = 0; i < n; ++i) {
        double g = std::exp(p.logit_scale * buf[i] - lse) * zfactor - neg;
        if (c0 + i == y) g -= 1.0 - eps;
        buf[i] = scale * g;
      }
    }
    store_row(p.dlogits, p.dtype, r * p.dlogits_row_stride + c0, n, buf);
  }
}

template <typename RowFn>
void for_rows(const CrossEntropyParams& p, RowFn&& row_fn) {
  const int64_t block = rows_per_task(p.cols);
  const int64_t ntasks = (p.rows + block - 1) / block;
  parallel_tasks(ntasks, p.rows * p.cols * 4, [&](int64_t t) {
    CeScratch& s = thread_scratch<CeScratch>();
    grow_to(s.chunk, kChunk);
    const int64_t r1 = std::min(p.rows, (t + 1) * block);
    for (int64_t r = t * block; r < r1; ++r) row_fn(p, s.chunk.data(), r);
  });
}

// Returns false when there is nothing to do (no rows: every pointer may be null).
bool check_common(const CrossEntropyParams& p) {
  if (p.cols < 1) fail("logits", "must have at least one column (vocabulary entry)", p.cols);
  if (p.total_classes < 1) fail("total_classes", "must be >= 1", p.total_classes);
  if (p.rows == 0) return false;
  if (p.logits == nullptr || p.labels == nullptr) fail("logits / labels is null");
  return true;
}

}  // namespace
}  // namespace cpu

void run_cross_entropy_fwd_cpu(const CrossEntropyParams& p) {
  using namespace cpu;
  if (!check_common(p)) return;
  if (p.losses == nullptr || p.z_losses == nullptr || p.lse == nullptr)
    fail("losses / z_losses / lse is null");
  for_rows(p, fwd_row);
}

void run_cross_entropy_bwd_cpu(const CrossEntropyParams& p) {
  using namespace cpu;
  if (!check_common(p)) return;
  if (p.dlosses == nullptr || p.lse_in == nullptr || p.dlogits == nullptr)
    fail("dlosses / lse / dlogits is null");
  for_rows(p, bwd_row);
}

FLASH_NAMESPACE_END
