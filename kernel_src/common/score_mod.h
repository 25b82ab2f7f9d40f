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

// Softcap applied to a scaled logit s. Returns cap * tanh(s / cap); *tanh_out receives the tanh
// (the backward's chain-rule factor is 1 - tanh^2).
template <typename T>
FLASH_HOST_DEVICE T softcap_apply(T s, T cap, T inv_cap, T* tanh_out) {
  const T t = score_math::tanh_(s * inv_cap);
  *tanh_out = t;
  return cap * t;
}

// ALiBi bias of query row `row` and key `col` of a sequence with shift = seqlen_k - seqlen_q
// (bottom-right aligned, like the mask): -slope * |row + shift - col|.
template <typename T>
FLASH_HOST_DEVICE T alibi_bias(T slope, int row, int col, int shift) {
  const long long dist = static_cast<long long>(row) + shift - col;
  return -slope * static_cast<T>(dist < 0 ? -dist : dist);
}

FLASH_NAMESPACE_END
