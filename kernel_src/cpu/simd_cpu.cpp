// Owns: the instruction-set variants of the primitives of simd_cpu.h (tile GEMM, row exp) and the
// run-time choice between them.
//
// Why two variants: the Hub's CPU build targets baseline x86-64 (SSE2), but most machines have
// AVX2+FMA, worth ~2-4x on these tiles. The AVX2 variant is compiled under a target pragma in its
// own namespace (no inline function is shared between the two, so the linker cannot mix them up)
// and picked once per process with __builtin_cpu_supports (FLASH_ATTN_CPU_BASELINE=1 forces the
// baseline). The choice changes rounding slightly (FMA) and nothing else; on one machine results
// are deterministic.
//
// Why this shape: with B row-major the innermost update is a broadcast of one A element times a
// contiguous vector of B, so no reassociation is needed (we do not build with -ffast-math: masked
// logits are -inf and must stay so).
#include "simd_cpu.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FLASH_CPU_HAVE_AVX2_VARIANT 1
#include <immintrin.h>  // GCC/Clang declare every intrinsic; the target pragma below enables them
#endif

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

// Baseline: GCC/Clang vector extensions, lowered to SSE2 on x86-64 (and to NEON elsewhere).
namespace base {
typedef float VF __attribute__((vector_size(16)));
typedef double VD __attribute__((vector_size(16)));
typedef int32_t VI __attribute__((vector_size(16)));
typedef int64_t VL __attribute__((vector_size(16)));
inline VF vzero(const float*) { return VF{}; }
inline VD vzero(const double*) { return VD{}; }
inline VF vload(const float* p) {
  VF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline VD vload(const double* p) {
  VD v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, VF v) { std::memcpy(p, &v, sizeof v); }
inline void vstore(double* p, VD v) { std::memcpy(p, &v, sizeof v); }
inline VF vset1(float x) { return VF{} + x; }
inline VD vset1(double x) { return VD{} + x; }
inline VF vfma(VF a, VF b, VF c) { return a * b + c; }
inline VD vfma(VD a, VD b, VD c) { return a * b + c; }
inline VF vmax(VF a, VF b) { return a > b ? a : b; }
inline VD vmax(VD a, VD b) { return a > b ? a : b; }
inline VF vnarrow(VD lo, VD hi) {
  typedef float VF2 __attribute__((vector_size(8)));
  return __builtin_shufflevector(__builtin_convertvector(lo, VF2),
                                 __builtin_convertvector(hi, VF2), 0, 1, 2, 3);
}
inline void vwiden(VF x, VD* lo, VD* hi) {
  *lo = __builtin_convertvector(__builtin_shufflevector(x, x, 0, 1), VD);
  *hi = __builtin_convertvector(__builtin_shufflevector(x, x, 2, 3), VD);
}
constexpr int kMR = 6;
#include "simd_kernels_cpu.inc"
}  // namespace base

#ifdef FLASH_CPU_HAVE_AVX2_VARIANT
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
typedef __m256 VF;
typedef __m256d VD;
typedef int32_t VI __attribute__((vector_size(32)));
typedef int64_t VL __attribute__((vector_size(32)));
inline __m256 vzero(const float*) { return _mm256_setzero_ps(); }
inline __m256d vzero(const double*) { return _mm256_setzero_pd(); }
inline __m256 vload(const float* p) { return _mm256_loadu_ps(p); }
inline __m256d vload(const double* p) { return _mm256_loadu_pd(p); }
inline void vstore(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void vstore(double* p, __m256d v) { _mm256_storeu_pd(p, v); }
inline __m256 vset1(float x) { return _mm256_set1_ps(x); }
inline __m256d vset1(double x) { return _mm256_set1_pd(x); }
inline __m256 vfma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256d vfma(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
// Inputs are finite or -inf (never NaN), so the operand order of maxps does not matter.
inline __m256 vmax(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
inline __m256d vmax(__m256d a, __m256d b) { return _mm256_max_pd(a, b); }
inline __m256 vnarrow(__m256d lo, __m256d hi) {
  return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
}
inline void vwiden(__m256 x, __m256d* lo, __m256d* hi) {
  *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
  *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
}
constexpr int kMR = 6;
#include "simd_kernels_cpu.inc"

}  // namespace avx2
#pragma GCC pop_options
#endif

bool use_avx2() {
#ifdef FLASH_CPU_HAVE_AVX2_VARIANT
  // Decided once per process (thread-safe static init). FLASH_ATTN_CPU_BASELINE=1 forces the
  // baseline variant, so that it stays testable on AVX2 machines.
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("FLASH_ATTN_CPU_BASELINE") == nullptr;
  return yes;
#else
  return false;
#endif
}

// The entry points: one table of function pointers per accumulation type, chosen once per
// process, so that the float and double entry points cannot pick different variants.
template <typename Acc>
struct Table {
  void (*gemm)(const Acc*, long, long, const Acc*, int, Acc*, int, int, int, int, bool);
  Acc (*exp_row)(const Acc*, Acc*, int, Acc);
  void (*col_max)(const Acc*, int, int, int, Acc*);
  void (*exp_cols)(const Acc*, int, Acc*, int, int, int, const Acc*, Acc*);
  void (*exp_diff)(const Acc*, const Acc*, Acc*, int);
};

template <typename Acc, template <typename> class Impl>
Table<Acc> table_of() {
  return {&Impl<Acc>::gemm, &Impl<Acc>::exp_row, &Impl<Acc>::col_max, &Impl<Acc>::exp_cols,
          &Impl<Acc>::exp_diff};
}

template <typename Acc>
const Table<Acc>& table() {
#ifdef FLASH_CPU_HAVE_AVX2_VARIANT
  static const Table<Acc> t =
      use_avx2() ? table_of<Acc, avx2::Impl>() : table_of<Acc, base::Impl>();
#else
  static const Table<Acc> t = table_of<Acc, base::Impl>();
#endif
  return t;
}

}  // namespace

#define FLASH_CPU_ENTRY_POINTS(Acc)                                                              \
  void gemm(const Acc* A, long ars, long aks, const Acc* B, int ldb, Acc* C, int ldc, int rows, \
            int depth, int cols, bool accumulate) {                                             \
    table<Acc>().gemm(A, ars, aks, B, ldb, C, ldc, rows, depth, cols, accumulate);              \
  }                                                                                             \
  Acc exp_row(const Acc* x, Acc* out, int n_pad, Acc offset) {                                  \
    return table<Acc>().exp_row(x, out, n_pad, offset);                                         \
  }                                                                                             \
  void col_max(const Acc* X, int ld, int rows, int cols, Acc* m) {                              \
    table<Acc>().col_max(X, ld, rows, cols, m);                                                 \
  }                                                                                             \
  void exp_cols(const Acc* X, int ldx, Acc* P, int ldp, int rows, int cols, const Acc* off,    \
                Acc* sum) {                                                                     \
    table<Acc>().exp_cols(X, ldx, P, ldp, rows, cols, off, sum);                                \
  }                                                                                             \
  void exp_diff(const Acc* a, const Acc* b, Acc* out, int n_pad) {                              \
    table<Acc>().exp_diff(a, b, out, n_pad);                                                    \
  }
FLASH_CPU_ENTRY_POINTS(float)
FLASH_CPU_ENTRY_POINTS(double)
#undef FLASH_CPU_ENTRY_POINTS

double exp_row_f32(const double* x, double* out, int n_pad, double offset) {
#ifdef FLASH_CPU_HAVE_AVX2_VARIANT
  if (use_avx2()) return avx2::exp_row_f32(x, out, n_pad, offset);
#endif
  return base::exp_row_f32(x, out, n_pad, offset);
}

void exp_cols_f32(const double* X, int ldx, double* P, int ldp, int rows, int cols,
                  const double* off, double* sum) {
#ifdef FLASH_CPU_HAVE_AVX2_VARIANT
  if (use_avx2()) return avx2::exp_cols_f32(X, ldx, P, ldp, rows, cols, off, sum);
#endif
  base::exp_cols_f32(X, ldx, P, ldp, rows, cols, off, sum);
}

}  // namespace cpu
FLASH_NAMESPACE_END
