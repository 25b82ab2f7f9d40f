// Owns: the online-softmax state of one query row and the merge of two partial states, shared
// by every backend (the CPU tiles, the CUDA main loops, split-KV decode and its combine step).
//
// Algorithm (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; FA2 Softmax,
// FlashInfer state_t): a row keeps row_max m and row_sum l = sum_j exp(s_j - m) over the logits
// seen so far; the output accumulator O = sum_j exp(s_j - m) v_j stays unnormalised and is
// multiplied by the rescale factor whenever m moves, then divided by l once at the end.
//
// Invariants:
// * The EMPTY state (no key seen) is row_max = -inf, row_sum = 0. Every function accepts it and
//   never produces NaN from it: rescale() of an empty row returns 1 while nothing is seen, the
//   reference point offset() is 0 (so exp(-inf - offset) = 0, not exp(-inf + inf) = NaN).
// * kBase2 = true means the caller feeds logits already multiplied by log2(e) (CUDA: exp2 is one
//   MUFU op); lse() is returned in natural log either way, as params.h requires.
// * Output convention (params.h): a row that saw no key has lse = +inf and O = 0, so inv_sum()
//   is 0 for it. Partial results that get merged use lse = -inf for "empty" instead (a partial
//   with no keys must weigh nothing): see merge_lse().
#pragma once
#include <cmath>

#include "namespace.h"

FLASH_NAMESPACE_BEGIN

namespace softmax_math {
FLASH_HOST_DEVICE float exp_e(float x) { return expf(x); }
FLASH_HOST_DEVICE double exp_e(double x) { return exp(x); }
FLASH_HOST_DEVICE float exp_2(float x) { return exp2f(x); }
FLASH_HOST_DEVICE double exp_2(double x) { return exp2(x); }
FLASH_HOST_DEVICE float log_e(float x) { return logf(x); }
FLASH_HOST_DEVICE double log_e(double x) { return log(x); }
FLASH_HOST_DEVICE float log_2(float x) { return log2f(x); }
FLASH_HOST_DEVICE double log_2(double x) { return log2(x); }
template <typename T>
FLASH_HOST_DEVICE T inf() {
  return static_cast<T>(INFINITY);
}
template <typename T>
FLASH_HOST_DEVICE T max_(T a, T b) {
  return a > b ? a : b;
}
}  // namespace softmax_math

template <typename T, bool kBase2 = false>
struct SoftmaxState {
  T row_max;  // max logit seen so far; -inf while empty
  T row_sum;  // sum of exp(logit - row_max) over the logits seen so far

  static FLASH_HOST_DEVICE T exp_(T x) {
    return kBase2 ? softmax_math::exp_2(x) : softmax_math::exp_e(x);
  }

  static FLASH_HOST_DEVICE SoftmaxState empty() {
    return SoftmaxState{-softmax_math::inf<T>(), T(0)};
  }
  FLASH_HOST_DEVICE bool is_empty() const { return !(row_sum > T(0)); }

  // A new block of logits whose maximum is block_max (-inf if all masked) arrives: moves row_max
  // and rescales row_sum; returns the factor the caller applies to its output accumulator.
  FLASH_HOST_DEVICE T rescale(T block_max) {
    const T new_max = softmax_math::max_(row_max, block_max);
    if (new_max == -softmax_math::inf<T>()) return T(1);  // still empty: accumulator is 0 anyway
    const T factor = exp_(row_max - new_max);             // exp(-inf) = 0 when it was empty
    row_max = new_max;
    row_sum *= factor;
    return factor;
  }

  // What the caller subtracts from each logit of the block before exp: the current row_max, or 0
  // while empty (every logit is then -inf and exp gives 0 instead of NaN).
  FLASH_HOST_DEVICE T offset() const {
    return row_max == -softmax_math::inf<T>() ? T(0) : row_max;
  }

  // The block's sum of exp(logit - offset()).
  FLASH_HOST_DEVICE void add(T block_sum) { row_sum += block_sum; }

  // Natural-log LSE in the output convention: +inf for a row that saw no key.
  FLASH_HOST_DEVICE T lse() const {
    if (is_empty()) return softmax_math::inf<T>();
    return kBase2 ? (row_max + softmax_math::log_2(row_sum)) * T(0.69314718055994530942)
                  : row_max + softmax_math::log_e(row_sum);
  }

  // Factor turning the accumulator into the output: 1 / row_sum, 0 for an empty row (O = 0).
  FLASH_HOST_DEVICE T inv_sum() const { return is_empty() ? T(0) : T(1) / row_sum; }
};

// Merge two partial states over disjoint key sets (split-KV): returns the state of the union and
// the factors by which each partial's UNNORMALISED accumulator is multiplied before adding them.
// Either or both may be empty.
template <typename T, bool kBase2>
FLASH_HOST_DEVICE SoftmaxState<T, kBase2> merge(const SoftmaxState<T, kBase2>& a,
                                                const SoftmaxState<T, kBase2>& b, T* scale_a,
                                                T* scale_b) {
  using S = SoftmaxState<T, kBase2>;
  if (a.is_empty() && b.is_empty()) {
    *scale_a = T(0);
    *scale_b = T(0);
    return S::empty();
  }
  const T m = softmax_math::max_(a.row_max, b.row_max);
  *scale_a = a.is_empty() ? T(0) : S::exp_(a.row_max - m);
  *scale_b = b.is_empty() ? T(0) : S::exp_(b.row_max - m);
  return S{m, a.row_sum * *scale_a + b.row_sum * *scale_b};
}

// Merge two NORMALISED partials (O_a, lse_a), (O_b, lse_b) over disjoint key sets (the combine
// step of split-KV decode): O = w_a O_a + w_b O_b, returns the merged natural-log lse. A partial
// with no keys has lse = -inf and gets weight 0; if both are empty the result is lse = -inf with
// both weights 0 (the caller maps that to the +inf output convention at the very end).
template <typename T>
FLASH_HOST_DEVICE T merge_lse(T lse_a, T lse_b, T* w_a, T* w_b) {
  const T ninf = -softmax_math::inf<T>();
  if (lse_a == ninf && lse_b == ninf) {
    *w_a = T(0);
    *w_b = T(0);
    return ninf;
  }
  const T m = softmax_math::max_(lse_a, lse_b);
  const T ea = lse_a == ninf ? T(0) : softmax_math::exp_e(lse_a - m);
  const T eb = lse_b == ninf ? T(0) : softmax_math::exp_e(lse_b - m);
  const T sum = ea + eb;
  *w_a = ea / sum;
  *w_b = eb / sum;
  return m + softmax_math::log_e(sum);
}

FLASH_NAMESPACE_END
