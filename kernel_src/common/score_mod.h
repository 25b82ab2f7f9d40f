// Owns: the score modifiers of params.h that are not masks, shared by every backend: softcap
// (Gemma-2) and ALiBi (Press et al. 2022), forward value and what the backward needs.
//
// Order (params.h): s = softmax_scale * (q . k); softcap: s = cap * tanh(s / cap);
// ALiBi: s -= slope * |i + (seqlen_k - seqlen_q) - j|. ALiBi is additive, so it has no effect on
// the gradient; softcap's chain-rule factor is d s_capped / d s = 1 - tanh^2(s / cap).
#pragma once
#include <cmath>

#include "namespace.h"

FLASH_NAMESPACE_BEGIN

namespace score_math {
FLASH_HOST_DEVICE float tanh_(float x) { return tanhf(x); }
FLASH_HOST_DEVICE double tanh_(double x) { return tanh(x); }
}  // namespace score_math

// Softcap applied to a logit s: cap * tanh(s * inv_cap), inv_cap = 1 / cap. A caller holding the
// unscaled q.k passes inv_cap = softmax_scale / cap instead, which is the same value with the
// scale folded in (one multiply per element instead of two). *tanh_out receives the tanh (the
// backward's chain-rule factor is 1 - tanh^2).
template <typename T>
FLASH_HOST_DEVICE T softcap_apply(T s, T cap, T inv_cap, T* tanh_out) {
  const T t = score_math::tanh_(s * inv_cap);
  *tanh_out = t;
  return cap * t;
}
template <typename T>
FLASH_HOST_DEVICE T softcap_apply(T s, T cap, T inv_cap) {
  T unused;
  return softcap_apply(s, cap, inv_cap, &unused);
}

// ALiBi bias of query row `row` and key `col` of a sequence with shift = seqlen_k - seqlen_q
// (bottom-right aligned, like the mask): -slope * |row + shift - col|. For row in
// [0, seqlen_q] and col in [0, seqlen_k] the distance lies in [-seqlen_q, seqlen_k], so int
// arithmetic cannot overflow (64-bit integer math would cost the GPU loops several instructions
// per element).
template <typename T>
FLASH_HOST_DEVICE T alibi_bias(T slope, int row, int col, int shift) {
  const int dist = row + shift - col;
  return -slope * static_cast<T>(dist < 0 ? -dist : dist);
}

FLASH_NAMESPACE_END
