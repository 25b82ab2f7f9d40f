// Driver for tests/test_common_numerics.py: runs common/softmax_state.h's online softmax, merge()
// and merge_lse() on the cases read from stdin and prints the results; the test compares them
// with an fp64 reference computed in Python (so the check does not share code with the header).
//
// Input: the number of cases, then per case "na nb d", the na logits of part A, its na x d
// values, then the same for part B ("-inf" for a masked key). Output, per case and variant, one
// line "variant lse o_0 .. o_{d-1}" for each of the two combine paths:
//   state  partial SoftmaxStates with unnormalised accumulators, merge(), then lse()/inv_sum()
//          (output convention: a row without keys has lse = +inf, O = 0)
//   lse    normalised partials (O_x, lse_x with -inf for an empty part), merge_lse()
// Variants: f32 and f64 in base e (eager rescale), f32 in base 2 with the lazy rescale of the
// GPU loops (threshold 8). Each part is fed in blocks of 3 keys, so rescales happen.
#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "kernel_src/common/softmax_state.h"

using namespace FLASH_NAMESPACE;

namespace {

struct Part {
  std::vector<double> logits;  // natural units
  std::vector<double> values;  // n x d
};

double read_double(std::istream& in) {
  std::string tok;
  in >> tok;
  return std::stod(tok);  // accepts "-inf"
}

Part read_part(std::istream& in, int n, int d) {
  Part p;
  for (int i = 0; i < n; ++i) p.logits.push_back(read_double(in));
  for (int i = 0; i < n * d; ++i) p.values.push_back(read_double(in));
  return p;
}

// The online softmax over one part in blocks of 3 keys: the state and the unnormalised O.
template <typename T, bool kBase2, bool kLazy>
SoftmaxState<T, kBase2> run_part(const Part& p, int d, std::vector<T>* o) {
  using S = SoftmaxState<T, kBase2>;
  const T to_base = kBase2 ? T(1.4426950408889634) : T(1);
  S st = S::empty();
  o->assign(d, T(0));
  const int n = static_cast<int>(p.logits.size());
  for (int b0 = 0; b0 < n; b0 += 3) {
    const int b1 = b0 + 3 < n ? b0 + 3 : n;
    T block_max = -INFINITY;
    for (int j = b0; j < b1; ++j) block_max = std::fmax(block_max, T(p.logits[j]) * to_base);
    T factor;
    if constexpr (kLazy) {
      st.rescale_lazy(block_max, T(8), &factor);
    } else {
      factor = st.rescale(block_max);
    }
    for (T& x : *o) x *= factor;
    T sum = 0;
    for (int j = b0; j < b1; ++j) {
      const T e = S::exp_(T(p.logits[j]) * to_base - st.offset());
      sum += e;
      for (int c = 0; c < d; ++c) (*o)[c] += e * T(p.values[j * d + c]);
    }
    st.add(sum);
  }
  return st;
}

void print(const char* variant, const char* path, double lse, const std::vector<double>& o) {
  std::printf("%s %s %.17g", variant, path, lse);
  for (double x : o) std::printf(" %.17g", x);
  std::printf("\n");
}

template <typename T, bool kBase2, bool kLazy>
void run_case(const char* variant, const Part& a, const Part& b, int d) {
  std::vector<T> oa, ob;
  const SoftmaxState<T, kBase2> sa = run_part<T, kBase2, kLazy>(a, d, &oa);
  const SoftmaxState<T, kBase2> sb = run_part<T, kBase2, kLazy>(b, d, &ob);

  T wa, wb;
  SoftmaxState<T, kBase2> m = merge(sa, sb, &wa, &wb);
  std::vector<double> o(d);
  for (int c = 0; c < d; ++c) o[c] = double((wa * oa[c] + wb * ob[c]) * m.inv_sum());
  print(variant, "state", double(m.lse()), o);

  // Normalised partials; an empty part has lse = -inf in the partial convention.
  auto partial_lse = [](const SoftmaxState<T, kBase2>& s) {
    return s.is_empty() ? -softmax_math::inf<T>() : s.lse();
  };
  const T lse = merge_lse(partial_lse(sa), partial_lse(sb), &wa, &wb);
  for (int c = 0; c < d; ++c) o[c] = double(wa * oa[c] * sa.inv_sum() + wb * ob[c] * sb.inv_sum());
  print(variant, "lse", double(lse), o);
}

}  // namespace

int main() {
  int cases;
  std::cin >> cases;
  for (int i = 0; i < cases; ++i) {
    int na, nb, d;
    std::cin >> na >> nb >> d;
    const Part a = read_part(std::cin, na, d);
    const Part b = read_part(std::cin, nb, d);
    run_case<float, false, false>("f32", a, b, d);
    run_case<double, false, false>("f64", a, b, d);
    run_case<float, true, true>("f32_base2_lazy", a, b, d);
  }
  return 0;
}
