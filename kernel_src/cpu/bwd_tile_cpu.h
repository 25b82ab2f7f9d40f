// Owns: what the CPU backward's fp32-tile path (flash_bwd_cpu.cpp) and its bf16 AMX path
// (flash_bwd_amx_cpu.cpp) share: how many splits the keys get, D = rowsum(dO o O) with the lse
// rows of a query tile (phase 1), and the dQ write from the key splits' sums (phase 3).
#pragma once
#include <algorithm>
#include <cstdint>

#include "attn_tile_cpu.h"
#include "dtype_cpu.h"
#include "layout_cpu.h"
#include "parallel_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// Key splits per (sequence, K/V head): 1 (the result then does not depend on the thread count)
// unless the pairs are too few to occupy the threads; at most the longest sequence's key tiles.
inline int bwd_key_splits(const Problem& pr, int64_t pairs, int max_key_tiles) {
  const int threads = max_threads();
  if (pr.work < kParallelMinWork || pairs >= 2 * threads) return 1;
  return static_cast<int>(std::min<int64_t>(max_key_tiles, (2 * threads + pairs - 1) / pairs));
}

// Phase 1, one query tile of (b, hk): D = rowsum(dO * O) (also written out as softmax_d; summed
// in Sum, rounded once) and the given lse of each packed row (fp64 when the caller passes one,
// fp64 inputs).
template <typename T, typename Sum = sum_t<T>>
void bwd_stats_tile(const AttnCtx<T>& c, const BwdParams& p, int b, int hk, int m_block,
                    acc_t<T>* lse, acc_t<T>* dsum) {
  using Acc = acc_t<T>;
  const SeqInfo& s = c.pr.seqs[b];
  const BwdOffsets off = bwd_offsets(p, b);
  const int group = c.pr.group, d = c.pr.d;
  const int packed = s.seqlen_q * group;
  const int pr0 = m_block * kBlockM;
  const int nrows = packed - pr0 < kBlockM ? packed - pr0 : kBlockM;
  const T* dout = static_cast<const T*>(p.do_ptr) + off.dout;
  const T* out = static_cast<const T*>(p.o_ptr) + s.o_off;
  for (int pi = pr0; pi < pr0 + nrows; ++pi) {
    const int i = pi / group, h = hk * group + pi % group;
    const T* dorow = dout + i * p.do_row_stride + h * p.do_head_stride;
    const T* orow = out + i * p.o_row_stride + h * p.o_head_stride;
    Sum acc = 0;
    for (int col = 0; col < d; ++col)
      acc += static_cast<Sum>(Traits<T>::load(dorow[col])) * Traits<T>::load(orow[col]);
    dsum[pi] = static_cast<Acc>(acc);
    const int64_t lse_idx = s.lse_off + h * c.pr.lse_head_stride + i;
    if (p.dsoftmax_sum_ptr != nullptr) p.dsoftmax_sum_ptr[lse_idx] = static_cast<float>(acc);
    lse[pi] = p.softmax_lse_f64_ptr != nullptr
                  ? static_cast<Acc>(p.softmax_lse_f64_ptr[lse_idx])
                  : static_cast<Acc>(p.softmax_lse_ptr[lse_idx]);
  }
}

// Phase 3, one query tile of (b, hk): dQ = softmax_scale * the splits' sums, added in split
// order.
template <typename T>
void bwd_write_dq(const AttnCtx<T>& c, const BwdParams& p, int b, int hk, int m_block,
                  const sum_t<T>* dq, int64_t split_stride, int nsplit) {
  using Acc = sum_t<T>;
  const SeqInfo& s = c.pr.seqs[b];
  const int group = c.pr.group, d = c.pr.d, dpad = c.pr.dpad;
  const int packed = s.seqlen_q * group;
  const int pr0 = m_block * kBlockM;
  const int pr1 = packed - pr0 < kBlockM ? packed : pr0 + kBlockM;
  T* dq_out = static_cast<T*>(p.dq_ptr) + bwd_offsets(p, b).dq;
  Acc row[256];
  for (int pi = pr0; pi < pr1; ++pi) {
    const int i = pi / group, h = hk * group + pi % group;
    const Acc* src = dq + static_cast<int64_t>(pi) * dpad;
    for (int col = 0; col < d; ++col) row[col] = src[col];
    for (int k = 1; k < nsplit; ++k)
      for (int col = 0; col < d; ++col) row[col] += src[k * split_stride + col];
    T* dst = dq_out + i * p.dq_row_stride + h * p.dq_head_stride;
    for (int col = 0; col < d; ++col) dst[col] = Traits<T>::store(row[col] * c.scale);
  }
}

}  // namespace cpu
FLASH_NAMESPACE_END
