// Owns: the instruction-set variants of the primitives of simd_cpu.h (tile GEMM, exponentials,
// column max) and the run-time choice between them.
//
// Why several variants: the Hub's CPU build targets baseline x86-64 (SSE2), but most machines
// have AVX2+FMA (worth ~2-4x on these tiles) and servers AVX-512 (twice the lanes again). Each
// variant is the same source (simd_kernels_cpu.inc) compiled under a target pragma in its own
// namespace (no inline function is shared between them, so the linker cannot mix them up), and
// one is picked once per process with __builtin_cpu_supports (see isa()). The choice changes
// rounding slightly (FMA) and nothing else; on one machine results are deterministic.
//
// Why this shape: with B row-major the innermost update is a broadcast of one A element times a
// contiguous vector of B, so no reassociation is needed (we do not build with -ffast-math: masked
// logits are -inf and must stay so).
#include "simd_cpu.h"
#include "simd_vectors_cpu.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FLASH_CPU_HAVE_AVX2_VARIANT 1
#include <immintrin.h>  // GCC/Clang declare every intrinsic; the target pragma below enables them
#endif

// GCC notes that 64-byte vector arguments change the ABI when AVX-512 is not enabled (the wide
// variant): every function here has internal linkage, so no ABI is shared with anything.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

FLASH_NAMESPACE_BEGIN
namespace cpu {
namespace {

// Baseline: 16-byte vectors, SSE2 on x86-64.
namespace base {
FLASH_CPU_GENERIC_VECTORS(16, FLASH_CPU_LANES4, FLASH_CPU_LANES2_LO, FLASH_CPU_LANES2_HI,
                          FLASH_CPU_ZEROS4, FLASH_CPU_ZEROS2)
constexpr int kMR = 6, kNV = 2;
#include "simd_kernels_cpu.inc"
}  // namespace base

// 64-byte vectors without any target: the AVX-512 variant's code lowered to the baseline, so
// that its 16-lane logic (padding, tails, narrowing) is tested on every machine
// (FLASH_ATTN_CPU_WIDE=1 selects it; never chosen otherwise).
namespace wide {
FLASH_CPU_GENERIC_VECTORS(64, FLASH_CPU_LANES16, FLASH_CPU_LANES8_LO, FLASH_CPU_LANES8_HI,
                          FLASH_CPU_ZEROS16, FLASH_CPU_ZEROS8)
constexpr int kMR = 6, kNV = 4;  // the AVX-512 variant's blocking, so that its tails are tested
#include "simd_kernels_cpu.inc"
}  // namespace wide

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
constexpr int kMR = 6, kNV = 2;
#include "simd_kernels_cpu.inc"

}  // namespace avx2
#pragma GCC pop_options

// AVX-512: the wide variant's source compiled for AVX-512F (FMA contraction of a * b + c, the
// compare-selects as mask operations); 32 vector registers, so a 6 x 4 block fits.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
namespace avx512 {
FLASH_CPU_GENERIC_VECTORS(64, FLASH_CPU_LANES16, FLASH_CPU_LANES8_LO, FLASH_CPU_LANES8_HI,
                          FLASH_CPU_ZEROS16, FLASH_CPU_ZEROS8)
// 6 x 4 vectors: 24 accumulators + 4 B vectors + 1 broadcast of the 32 registers; 10 loads per
// 24 FMAs (6 x 2: 8 per 12). About 5% faster than 6 x 2 on 64 x 64 tiles (Sapphire Rapids);
// 4 x 4, 8 x 2, 8 x 3 and 12 x 2 were no faster than 6 x 2.
constexpr int kMR = 6, kNV = 4;
#include "simd_kernels_cpu.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

enum class Isa { kBase, kWide, kAvx2, kAvx512 };

// Decided once per process (thread-safe static init). FLASH_ATTN_CPU_BASELINE=1 forces the
// baseline variant and FLASH_ATTN_CPU_WIDE=1 the portable 16-lane one, so that both stay tested
// on machines that would pick another; FLASH_ATTN_CPU_NO_AVX512=1 keeps AVX2 on an AVX-512
// machine.
Isa isa() {
  static const Isa chosen = [] {
    if (std::getenv("FLASH_ATTN_CPU_BASELINE") != nullptr) return Isa::kBase;
    if (std::getenv("FLASH_ATTN_CPU_WIDE") != nullptr) return Isa::kWide;
#ifdef FLASH_CPU_HAVE_AVX2_VARIANT
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        std::getenv("FLASH_ATTN_CPU_NO_AVX512") == nullptr)
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kBase;
  }();
  return chosen;
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
  void (*ds_rows)(const Acc*, Acc*, int, int, int, const Acc*);
};

template <typename Acc, template <typename> class Impl>
Table<Acc> table_of() {
  return {&Impl<Acc>::gemm, &Impl<Acc>::exp_row, &Impl<Acc>::col_max, &Impl<Acc>::exp_cols,
          &Impl<Acc>::exp_diff, &Impl<Acc>::ds_rows};
}

template <typename Acc>
const Table<Acc>& table() {
  static const Table<Acc> t = [] {
    switch (isa()) {
#ifdef FLASH_CPU_HAVE_AVX2_VARIANT
      case Isa::kAvx512: return table_of<Acc, avx512::Impl>();
      case Isa::kAvx2: return table_of<Acc, avx2::Impl>();
#endif
      case Isa::kWide: return table_of<Acc, wide::Impl>();
      default: return table_of<Acc, base::Impl>();
    }
  }();
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
  }                                                                                             \
  void ds_rows(const Acc* P, Acc* dP, int ld, int rows, int cols, const Acc* D) {               \
    table<Acc>().ds_rows(P, dP, ld, rows, cols, D);                                             \
  }
FLASH_CPU_ENTRY_POINTS(float)
FLASH_CPU_ENTRY_POINTS(double)
#undef FLASH_CPU_ENTRY_POINTS

#ifdef FLASH_CPU_HAVE_AVX2_VARIANT
#define FLASH_CPU_PICK(fn, ...)                                        \
  switch (isa()) {                                                     \
    case Isa::kAvx512: return avx512::fn(__VA_ARGS__);                 \
    case Isa::kAvx2: return avx2::fn(__VA_ARGS__);                     \
    case Isa::kWide: return wide::fn(__VA_ARGS__);                     \
    default: return base::fn(__VA_ARGS__);                             \
  }
#else
#define FLASH_CPU_PICK(fn, ...)                                        \
  switch (isa()) {                                                     \
    case Isa::kWide: return wide::fn(__VA_ARGS__);                     \
    default: return base::fn(__VA_ARGS__);                             \
  }
#endif

double exp_row_f32(const double* x, double* out, int n_pad, double offset) {
  FLASH_CPU_PICK(exp_row_f32, x, out, n_pad, offset)
}

void exp_cols_f32(const double* X, int ldx, double* P, int ldp, int rows, int cols,
                  const double* off, double* sum) {
  FLASH_CPU_PICK(exp_cols_f32, X, ldx, P, ldp, rows, cols, off, sum)
}

void gemm_fold(const float* A, long a_row, long a_depth, const float* B, int ldb, double* C,
               int ldc, int rows, int depth, int cols, const float* f) {
  FLASH_CPU_PICK(gemm_fold, A, a_row, a_depth, B, ldb, C, ldc, rows, depth, cols, f)
}

float exp_row(const double* x, float* out, int n_pad, double offset) {
  FLASH_CPU_PICK(exp_row_narrow, x, out, n_pad, offset)
}
#undef FLASH_CPU_PICK

}  // namespace cpu
FLASH_NAMESPACE_END
