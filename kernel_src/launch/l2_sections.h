// Owns: the L2 sections of the masked (causal) forward grids, for both CUDA paths. The grid walks
// its (sequence, head) pairs section by section, longest row blocks first within a section, so
// that the K/V the CTAs of a section read stay in L2 while the section runs (sm80: GridOrder in
// fwd_kernel_sm80.h; sm90: the persistent scheduler's make_tile). docs/tuning.md has the
// measurements behind the budget and the wave count.
#pragma once
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN

// K/V bytes a section may read: two thirds of the H100/H200's 50 MB L2.
constexpr int64_t kL2SectionBytes = int64_t(32) << 20;
// Row-block waves (one CTA per SM) a section holds at least, so that the CTAs still balance the
// long and short row blocks inside it (with 2 waves, head dim 256 lost 10-15% at 2k-16k keys on
// the H200).
constexpr int kL2SectionMinWaves = 4;

// Bytes of K and V (2-byte elements) that one (sequence, head) pair reads, when `group` query
// heads share one K/V head and so count a 1/group share of it.
inline int64_t l2_kv_bytes(int64_t seqlen_k, int head_dim, int group) {
  return std::max<int64_t>(1, int64_t(4) * seqlen_k * head_dim / std::max(1, group));
}

// Pairs per section: as many as have their K/V within kL2SectionBytes, but at least
// kL2SectionMinWaves waves of `row_blocks`-row-block pairs on `num_sms` SMs, and at most `pairs`;
// then spread evenly over the sections, of which there are at most `max_sections`.
inline int l2_section_pairs(int64_t pairs, int64_t kv_bytes, int row_blocks, int num_sms,
                            int64_t max_sections) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  pairs = std::max<int64_t>(1, pairs);
  const int64_t min_pairs =
      ceil_div(int64_t(kL2SectionMinWaves) * std::max(1, num_sms), std::max(1, row_blocks));
  const int64_t per_section =
      std::min(std::max(kL2SectionBytes / std::max<int64_t>(1, kv_bytes), min_pairs), pairs);
  const int64_t sections = std::min(ceil_div(pairs, per_section), max_sections);
  const int64_t even = ceil_div(pairs, sections);
  if (even > INT32_MAX) {
    throw std::runtime_error("flash_attn CUDA: batch x nheads = " + std::to_string(pairs) +
                             " exceeds what the grid can address");
  }
  return static_cast<int>(even);
}

FLASH_NAMESPACE_END
