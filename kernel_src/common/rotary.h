// Owns: the rotary position embedding (Su et al. 2021, RoFormer) of one pair of elements, and the
// params of the standalone `rotary` op. Shared, host and device, by the CPU backend (the KV cache
// append, the query rotation of flash_attn_with_kvcache, the rotary op) and the CUDA rotary
// kernel, so every path rotates with the same arithmetic.
//
// Pair m of a head (m < rotary_dim / 2) is (2m, 2m+1) when interleaved (GPT-J) and
// (m, m + rotary_dim / 2) otherwise (GPT-NeoX); it becomes (x0 cos - x1 sin, x0 sin + x1 cos)
// with cos/sin = table[position, m]. The conjugate rotation (sin -> -sin) is the inverse, which is
// also the rotation's backward: the rotation is orthogonal, so its vector-Jacobian product is the
// rotation by -theta.
#pragma once
#include <cstdint>

#include "params.h"

FLASH_NAMESPACE_BEGIN

// The element indices of rotary pair m.
FLASH_HOST_DEVICE void rotary_pair_index(int m, int rotary_dim, bool interleaved, int* i0,
                                         int* i1) {
  *i0 = interleaved ? 2 * m : m;
  *i1 = interleaved ? 2 * m + 1 : m + rotary_dim / 2;
}

// (x0, x1) rotated by the angle whose cosine and sine are (c, s), in the accumulation type.
template <typename Acc>
FLASH_HOST_DEVICE void rotate_pair(Acc x0, Acc x1, Acc c, Acc s, Acc* y0, Acc* y1) {
  *y0 = x0 * c - x1 * s;
  *y1 = x0 * s + x1 * c;
}

// The `rotary` op (flash_attn.layers.rotary.apply_rotary_emb): out = x with the first rotary_dim
// dims of every head rotated. Token i of sequence b sits at position seqlen_offset(b) + i, where
// seqlen_offset(b) is seqlen_offsets[b] when given, else seqlen_offset. Positions at or past
// seqlen_ro are left unrotated (the identity rotation), as FA2's kernel does with its masked table
// loads; the dims past rotary_dim are copied.
struct RotaryParams {
  DType dtype = DType::kFloat16;
  int batch = 0;
  int seqlen = 0;  // rows per sequence; with cu_seqlens the longest sequence (max_seqlen)
  int nheads = 0, head_dim = 0, rotary_dim = 0;
  const void* x_ptr = nullptr;  // (batch, seqlen, nheads, head_dim) or (total, nheads, head_dim)
  int64_t x_batch_stride = 0, x_row_stride = 0, x_head_stride = 0;  // batch stride unused (varlen)
  void* out_ptr = nullptr;  // x's shape, contiguous
  const void* cos_ptr = nullptr;  // (seqlen_ro, rotary_dim / 2) contiguous, x's dtype
  const void* sin_ptr = nullptr;  // (seqlen_ro, rotary_dim / 2) contiguous, x's dtype
  int seqlen_ro = 0;
  const int32_t* cu_seqlens = nullptr;      // (batch + 1) or null (padded layout)
  const int32_t* seqlen_offsets = nullptr;  // (batch) or null
  int64_t seqlen_offset = 0;                // used when seqlen_offsets is null
  bool interleaved = false;
  bool conjugate = false;  // rotate by -theta (the inverse, and the backward)
};

FLASH_NAMESPACE_END
