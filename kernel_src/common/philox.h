// Owns: the dropout random stream. Every backend (CPU, sm80, sm90) draws the keep/drop decision for
// an attention element from this function and nothing else, so the same (seed, offset) gives the
// bit-identical mask everywhere, in forward and backward alike.
//
// Specification (normative; tests rely on it):
//   Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), with
//     key     = (lo32(seed), hi32(seed))
//     counter = (col / 4, row, lo32(subsequence), hi32(subsequence))
//     subsequence = offset + (uint64)batch * nheads + head
//   where batch is the sequence index in the batch (varlen: index into cu_seqlens), head the QUERY
//   head, row the query position inside its sequence and col the key position inside its
//   sequence (after left padding is removed, i.e. the same indices the mask uses).
//   The draw for (row, col) is word (col % 4) of the 4-word output.
//   The element is DROPPED iff word < threshold, threshold = dropout_threshold(p) below; kept
//   elements are scaled by 1 / (1 - p).
//   The fused norm ops (common/fused_params.h) draw from the same stream: element (r, c) of their
//   (rows, cols) input uses subsequence = offset, row = r, col = c (batch 0, head 0 above).
#pragma once
#include <cstdint>

#include "namespace.h"

FLASH_NAMESPACE_BEGIN

struct Philox4 {
  uint32_t x, y, z, w;
};

FLASH_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Ten rounds of Philox 4x32 with the constants of the reference implementation (Random123).
FLASH_HOST_DEVICE Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kMul0, ctr.x, &hi0);
    const uint32_t lo1 = mulhilo32(kMul1, ctr.z, &hi1);
    ctr = Philox4{hi1 ^ ctr.y ^ key0, lo1, hi0 ^ ctr.w ^ key1, lo0};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return ctr;
}

// Drop threshold for probability p in [0, 1): round(p * 2^32), saturated to 2^32 - 1.
FLASH_HOST_DEVICE uint32_t dropout_threshold(float p) {
  const double t = static_cast<double>(p) * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// The four draws for key columns [4*(col/4), 4*(col/4)+4) of one (batch, head, row).
FLASH_HOST_DEVICE Philox4 dropout_draws(uint64_t seed, uint64_t subsequence, uint32_t row,
                                        uint32_t col) {
  const Philox4 ctr{col >> 2, row, static_cast<uint32_t>(subsequence),
                    static_cast<uint32_t>(subsequence >> 32)};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FLASH_HOST_DEVICE uint32_t philox_word(const Philox4& r, uint32_t i) {
  return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
}

// Convenience for scalar code (CPU backend, tests): is element (row, col) kept?
FLASH_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t subsequence, uint32_t row,
                                    uint32_t col, uint32_t threshold) {
  return philox_word(dropout_draws(seed, subsequence, row, col), col & 3u) >= threshold;
}

FLASH_NAMESPACE_END
