// Owns: the online-softmax state of one query row and the merge of two partial states, shared
// by every backend (the CPU tiles, the CUDA main loops, split-KV decode and its combine step).
//
// Algorithm (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; FA2 Softmax,
// FlashInfer state_t): a row keeps row_max m and row_sum l = sum_j exp(s_j - m) over the logits
// seen so far; the output accumulator O = sum_j exp(s_j - m) v_j stays unnormalised and is
// multiplied by the rescale factor whenever m moves, then divided by l once at the end.
//
// Policies and forms for the GPU main loops (all branch-free: per-row branches split a tile's
// softmax into basic blocks the scheduler cannot interleave):
// * Exp: every member that exponentiates takes the exponential as a functor, so a CUDA kernel
//   passes its one-instruction exp2 (cuda_primitives.h) and the CPU the libm one (the default).
// * rescale() moves the reference to the running max on every tile (FA2); rescale_lazy() only
//   when a tile's max exceeds it by more than a threshold (FA4): P = exp(s - reference) is then
//   at most exp(threshold), and the O rescale becomes rare. Either way row_max is the reference
//   point of row_sum and O, and lse() = reference + log(row_sum) is exact.
// * kRowSum: RowSum::kInState keeps row_sum here (add() per tile, scaled by the rescales);
//   RowSum::kBesideO is for a backend that accumulates the row sum beside O and rescales it with
//   O (sm80: P times a column of ones on the tensor cores), so the state neither adds nor scales
//   it and only receives the total at the end (set_row_sum()).
//
// Invariants:
// * The EMPTY state (no key seen) is row_max = -inf, row_sum = 0. Every function accepts it and
//   never produces NaN from it: rescale() of a still-empty row returns 0 (the accumulator is 0
//   too), the reference point offset() is 0 (so exp(-inf - offset) = 0, not exp(-inf + inf) =
//   NaN).
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
// fmax: one max instruction on the GPU (a > b ? a : b is a compare and a select).
FLASH_HOST_DEVICE float max_(float a, float b) { return fmaxf(a, b); }
FLASH_HOST_DEVICE double max_(double a, double b) { return fmax(a, b); }
}  // namespace softmax_math

enum class RowSum : int {
  kInState = 0,  // row_sum is kept here: add() per tile, scaled by every rescale
  kBesideO = 1,  // the backend accumulates it beside O; set_row_sum() at the end
};

template <typename T, bool kBase2 = false, RowSum kRowSum = RowSum::kInState>
struct SoftmaxState {
  T row_max;  // reference point of row_sum and O: the max logit seen so far (rescale_lazy: up to
              // the threshold below it); -inf while empty
  T row_sum;  // sum of exp(logit - row_max) over the logits seen so far

  static FLASH_HOST_DEVICE T exp_(T x) {
    return kBase2 ? softmax_math::exp_2(x) : softmax_math::exp_e(x);
  }
  // The default Exp policy: the libm exponential of the state's base.
  struct StdExp {
    FLASH_HOST_DEVICE T operator()(T x) const { return exp_(x); }
  };

  static FLASH_HOST_DEVICE SoftmaxState empty() {
    return SoftmaxState{-softmax_math::inf<T>(), T(0)};
  }
  FLASH_HOST_DEVICE bool is_empty() const { return !(row_sum > T(0)); }

  // A new block of logits whose maximum is block_max (-inf if all masked) arrives: moves row_max
  // to the running max and rescales row_sum; returns the factor the caller applies to its output
  // accumulator (0 while the row is still empty: the accumulator is 0 as well).
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
  template <typename Exp = StdExp>
  FLASH_HOST_DEVICE T rescale(T block_max, Exp exp = Exp()) {
    const T new_max = softmax_math::max_(row_max, block_max);
    const T factor = exp(row_max - (new_max == -softmax_math::inf<T>() ? T(0) : new_max));
    row_max = new_max;
    if constexpr (kRowSum == RowSum::kInState) row_sum *= factor;
    return factor;
  }

  // Lazy form: the reference moves only when block_max exceeds it by more than `threshold`, so
  // every exp(logit - offset()) of the row stays <= exp(threshold) (with threshold 8 in base 2,
  // 256: harmless in fp32 accumulators and in fp16/bf16 range). The result is the same softmax
  // (numerator and row_sum share the reference). Returns whether the reference moved; *factor
  // is the accumulator's factor (1 when it did not; an empty row moves to the first finite max
  // with factor exp(-inf) = 0).
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
  template <typename Exp = StdExp>
  FLASH_HOST_DEVICE bool rescale_lazy(T block_max, T threshold, T* factor, Exp exp = Exp()) {
    const bool move = block_max > row_max + threshold;  // false while block_max = -inf
    const T new_max = move ? block_max : row_max;
    *factor = move ? exp(row_max - new_max) : T(1);
    row_max = new_max;
    if constexpr (kRowSum == RowSum::kInState) row_sum *= *factor;
    return move;
  }

  // What the caller subtracts from each logit of the block before exp: the current row_max, or 0
  // while empty (every logit is then -inf and exp gives 0 instead of NaN).
  FLASH_HOST_DEVICE T offset() const {
    return row_max == -softmax_math::inf<T>() ? T(0) : row_max;
  }

  // The block's sum of exp(logit - offset()).
  FLASH_HOST_DEVICE void add(T block_sum) {
    static_assert(kRowSum == RowSum::kInState, "RowSum::kBesideO: the sum is kept beside O");
    row_sum += block_sum;
  }

  // The row's complete sum, for a backend that kept partial sums (one per thread of a row) or
  // accumulated it beside O (RowSum::kBesideO); before lse() and inv_sum().
  FLASH_HOST_DEVICE void set_row_sum(T total) { row_sum = total; }

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
