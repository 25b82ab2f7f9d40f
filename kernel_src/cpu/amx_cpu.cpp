// Owns: the implementation of amx_cpu.h: the run-time test for AMX (CPUID, the Linux permission
// request for the tile data state), the tile GEMM, the bf16 operand packing and the element-wise
// steps of the bf16 attention paths. Everything that executes AMX or AVX-512 instructions is in
// this file, under one target pragma; the rest of the backend stays baseline x86-64.
//
// Sources: Intel 64 and IA-32 Architectures Software Developer's Manual (vol. 1 ch. 18
// "Programming with Intel AMX", vol. 2 TILELOADD/TDPBF16PS/LDTILECFG, the CPUID leaf 7 feature
// bits) and the Intel Architecture Instruction Set Extensions Programming Reference (AVX512-BF16:
// VCVTNE2PS2BF16, VCVTNEPS2BF16); the Linux kernel's Documentation/arch/x86/xstate.rst for
// ARCH_REQ_XCOMP_PERM; the GCC manual for the intrinsics and target pragmas.
#include "amx_cpu.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FLASH_CPU_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include "simd_vectors_cpu.h"
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

FLASH_NAMESPACE_BEGIN
namespace cpu {

#ifdef FLASH_CPU_HAVE_AMX

namespace {

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
  const bool avx512f = (b >> 16) & 1u, avx512bw = (b >> 30) & 1u, avx512vl = (b >> 31) & 1u;
  if (!(amx_bf16 && amx_tile && avx512f && avx512bw && avx512vl)) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  const bool avx512_bf16 = (a >> 5) & 1u;
  if (!avx512_bf16) return false;
  // The OS must enable the AVX-512 state (XCR0 bits 5-7) besides the tile state asked for below.
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & 0xe6u) == 0xe6u;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
}

// Linux keeps the 8 KiB tile data state off until the process asks for it (kernel 5.16+).
bool os_grants_tile_data() {
#ifdef __linux__
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace

bool amx_usable() {
  static const bool usable = [] {
    if (std::getenv("FLASH_ATTN_CPU_NO_AMX") != nullptr) return false;
    if (std::getenv("FLASH_ATTN_CPU_BASELINE") != nullptr) return false;
    if (std::getenv("FLASH_ATTN_CPU_WIDE") != nullptr) return false;
    return cpu_has_amx_bf16() && os_grants_tile_data();
  }();
  return usable;
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")

namespace amx {
FLASH_CPU_GENERIC_VECTORS(64, FLASH_CPU_LANES16, FLASH_CPU_LANES8_LO, FLASH_CPU_LANES8_HI,
                          FLASH_CPU_ZEROS16, FLASH_CPU_ZEROS8)
constexpr int kMR = 6, kNV = 4;
#include "simd_kernels_cpu.inc"

// The tile unit's operands as asm with memory clobbers: the compiler must not move ordinary loads
// and stores of the same buffers across them (the <immintrin.h> macros declare no memory use).
#define FLASH_AMX_LOAD(t, base, stride) \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define FLASH_AMX_STORE(t, base, stride) \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(base), "r"(static_cast<long>(stride)) : "memory")
#define FLASH_AMX_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define FLASH_AMX_DP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

// One block of MR x NR C tiles (16 x 16 each): tiles 0-3 C, 4-5 A, 6-7 B.
template <int MR, int NR>
inline void block(const uint16_t* A, int lda, const uint16_t* B, int ldb, float* C, int ldc,
                  int K, bool accumulate) {
  const long sa = lda * 2L, sb = ldb * 2L, sc = ldc * 4L;
  float* c10 = C + 16L * ldc;
  if (accumulate) {
    FLASH_AMX_LOAD(0, C, sc);
    if constexpr (NR == 2) FLASH_AMX_LOAD(1, C + 16, sc);
    if constexpr (MR == 2) FLASH_AMX_LOAD(2, c10, sc);
    if constexpr (MR == 2 && NR == 2) FLASH_AMX_LOAD(3, c10 + 16, sc);
  } else {
    FLASH_AMX_ZERO(0);
    if constexpr (NR == 2) FLASH_AMX_ZERO(1);
    if constexpr (MR == 2) FLASH_AMX_ZERO(2);
    if constexpr (MR == 2 && NR == 2) FLASH_AMX_ZERO(3);
  }
  for (int k = 0; k < K; k += 32) {
    const uint16_t* a = A + k;
    const uint16_t* b = B + static_cast<long>(k / 2) * ldb;
    FLASH_AMX_LOAD(4, a, sa);
    FLASH_AMX_LOAD(6, b, sb);
    FLASH_AMX_DP(0, 4, 6);
    if constexpr (NR == 2) {
      FLASH_AMX_LOAD(7, b + 32, sb);
      FLASH_AMX_DP(1, 4, 7);
    }
    if constexpr (MR == 2) {
      FLASH_AMX_LOAD(5, a + 16L * lda, sa);
      FLASH_AMX_DP(2, 5, 6);
      if constexpr (NR == 2) FLASH_AMX_DP(3, 5, 7);
    }
  }
  FLASH_AMX_STORE(0, C, sc);
  if constexpr (NR == 2) FLASH_AMX_STORE(1, C + 16, sc);
  if constexpr (MR == 2) FLASH_AMX_STORE(2, c10, sc);
  if constexpr (MR == 2 && NR == 2) FLASH_AMX_STORE(3, c10 + 16, sc);
}

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline float hmax(__m512 v) { return _mm512_reduce_max_ps(v); }
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
inline __m512 exp16(__m512 x) { return (__m512)vexp((VF)x); }
// 2^t for the forward's probabilities, lanes outside mk (and t below -126, where the result is
// below the smallest normal) 0: t = k + f with k = round(t), |f| <= 1/2, 2^f by its Taylor
// polynomial in f ln2 (degree 7, truncation < 2e-8 relative, as vexp), scaled by 2^k (VSCALEFPS,
// which needs no exponent-bit arithmetic). t = -inf (masked) gives 0.
inline __m512 exp2_poly(__m512 t, __mmask16 mk) {
  mk = _mm512_mask_cmp_ps_mask(mk, t, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  const __m512 tc = _mm512_max_ps(t, _mm512_set1_ps(-127.f));
  const __m512 k = _mm512_roundscale_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 x = _mm512_mul_ps(_mm512_sub_ps(tc, k), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(mk, p, k);
}

// Lanes [0, n) of a 16-lane chunk.
inline __mmask16 lanes(int n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}

}  // namespace amx

void amx_begin() {
  amx::TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // Our own asm: the <immintrin.h> macro declares only 8 of the 64 bytes as read, so the compiler
  // may drop the stores of the rest.
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

void amx_end() { __asm__ volatile("tilerelease" ::); }

void amx_gemm(const uint16_t* A, int lda, const uint16_t* B, int ldb, float* C, int ldc, int M,
              int N, int K, bool accumulate) {
  for (int m = 0; m < M; m += 32) {
    const bool m2 = M - m >= 32;
    for (int n = 0; n < N; n += 32) {
      const bool n2 = N - n >= 32;
      const uint16_t* a = A + static_cast<long>(m) * lda;
      const uint16_t* b = B + 2 * n;
      float* c = C + static_cast<long>(m) * ldc + n;
      if (m2 && n2)
        amx::block<2, 2>(a, lda, b, ldb, c, ldc, K, accumulate);
      else if (m2)
        amx::block<2, 1>(a, lda, b, ldb, c, ldc, K, accumulate);
      else if (n2)
        amx::block<1, 2>(a, lda, b, ldb, c, ldc, K, accumulate);
      else
        amx::block<1, 1>(a, lda, b, ldb, c, ldc, K, accumulate);
    }
  }
}

void amx_pack_transposed(const uint16_t* X, int ldx, int rows, int rows_pad, int cols,
                         uint16_t* dst, int ldd) {
  // 32-bit pairs: dst32[p][j] = X32[j][p], 16 rows j at a time by a gather.
  const int pairs = cols / 2;
  const __m512i step = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                            12, 13, 14, 15),
                                          _mm512_set1_epi32(ldx / 2));
  for (int j = 0; j < rows_pad; j += 16) {
    const __mmask16 mk = amx::lanes(rows - j);
    const int* base = reinterpret_cast<const int*>(X + static_cast<long>(j) * ldx);
    for (int p = 0; p < pairs; ++p) {
      const __m512i v = mk == 0 ? _mm512_setzero_si512()
                                : _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, step,
                                                              base + p, 4);
      _mm512_storeu_si512(dst + static_cast<long>(p) * ldd + 2 * j, v);
    }
  }
}

void amx_pack_pairs(const uint16_t* X, int ldx, int rows, int rows_pad, int cols, uint16_t* dst,
                    int ldd) {
  const __m512i lo = _mm512_setr_epi32(0x00200000, 0x00210001, 0x00220002, 0x00230003,
                                       0x00240004, 0x00250005, 0x00260006, 0x00270007,
                                       0x00280008, 0x00290009, 0x002a000a, 0x002b000b,
                                       0x002c000c, 0x002d000d, 0x002e000e, 0x002f000f);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int k = 0; k < rows_pad; k += 2) {
    const uint16_t* x0 = X + static_cast<long>(k) * ldx;
    uint16_t* out = dst + static_cast<long>(k / 2) * ldd;
    for (int c = 0; c < cols; c += 32) {
      const __mmask32 mc = cols - c >= 32 ? ~0u : (1u << (cols - c)) - 1u;
      const __m512i a = k < rows ? _mm512_maskz_loadu_epi16(mc, x0 + c) : _mm512_setzero_si512();
      const __m512i b =
          k + 1 < rows ? _mm512_maskz_loadu_epi16(mc, x0 + ldx + c) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + 2 * c, _mm512_permutex2var_epi16(a, lo, b));
      if (cols - c > 16) _mm512_storeu_si512(out + 2 * c + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

void amx_pack_pairs(const float* X, int ldx, int rows, int rows_pad, int cols, uint16_t* dst,
                    int ldd) {
  // cvtne2ps(b, a) puts a's 16 values in the low half and b's in the high half; the permutation
  // interleaves them: a0 b0 a1 b1 ...
  const __m512i idx = _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003,
                                        0x00140004, 0x00150005, 0x00160006, 0x00170007,
                                        0x00180008, 0x00190009, 0x001a000a, 0x001b000b,
                                        0x001c000c, 0x001d000d, 0x001e000e, 0x001f000f);
  for (int k = 0; k < rows_pad; k += 2) {
    const float* x0 = X + static_cast<long>(k) * ldx;
    uint16_t* out = dst + static_cast<long>(k / 2) * ldd;
    for (int c = 0; c < cols; c += 16) {
      const __m512 a = k < rows ? _mm512_loadu_ps(x0 + c) : _mm512_setzero_ps();
      const __m512 b = k + 1 < rows ? _mm512_loadu_ps(x0 + ldx + c) : _mm512_setzero_ps();
      const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);
      _mm512_storeu_si512(out + 2 * c, _mm512_permutexvar_epi16(idx, ab));
    }
  }
}

void amx_to_bf16(const float* X, int ldx, int rows, int cols, int cols_pad, uint16_t* dst,
                 int ldd) {
  for (int r = 0; r < rows; ++r) {
    const float* x = X + static_cast<long>(r) * ldx;
    uint16_t* out = dst + static_cast<long>(r) * ldd;
    for (int c = 0; c < cols_pad; c += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(amx::lanes(cols - c), x + c);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

void amx_copy_row(const uint16_t* src, int d, int width, uint16_t* dst) {
  for (int c = 0; c < width; c += 32) {
    const int left = d - c;
    const __mmask32 mk = left >= 32 ? ~0u : left <= 0 ? 0u : (1u << left) - 1u;
    const int wl = width - c;
    const __mmask32 ms = wl >= 32 ? ~0u : (1u << wl) - 1u;
    _mm512_mask_storeu_epi16(dst + c, ms, _mm512_maskz_loadu_epi16(mk, src + c));
  }
}

void amx_store_bf16(const float* src, int n, float f, uint16_t* dst) {
  const __m512 vf = _mm512_set1_ps(f);
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  for (int c = 0; c < n; c += 16) {
    const __mmask16 mk = amx::lanes(n - c);
    const __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, src + c), vf));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias), lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16(dst + c, mk, _mm512_cvtepi32_epi16(r));
  }
}

void amx_softmax_tile(const float* S, int lds, int rows, int n, int n_pad, float scale, float* m,
                      float* l, float* O, int ldo, int dpad, const uint8_t* keep, int ldk,
                      uint16_t* P, int ldp) {
  // In phases, so that the per-row reductions of one row overlap the work of the others and the
  // per-row scalars (reference, rescale factor, sum) are vectors across rows (kBlockM <= 64 rows).
  const float ninf = -INFINITY;
  alignas(64) float off[64], factor[64], tsum[64];
  for (int r = 0; r < rows; ++r) {
    const float* s = S + static_cast<long>(r) * lds;
    __m512 mx = _mm512_set1_ps(ninf);
    for (int j = 0; j < n; j += 16)
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, amx::lanes(n - j), s + j));
    off[r] = amx::hmax(mx) * scale;
  }
  for (int r = 0; r < rows; r += 16) {
    const __mmask16 mk = amx::lanes(rows - r);
    const __m512 m_old = _mm512_maskz_loadu_ps(mk, m + r);
    const __m512 m_new = _mm512_max_ps(_mm512_maskz_loadu_ps(mk, off + r), m_old);
    const __m512 o = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_new, _mm512_set1_ps(ninf), _CMP_NEQ_OQ), m_new);
    _mm512_mask_storeu_ps(m + r, mk, m_new);
    _mm512_storeu_ps(off + r, o);
    // exp(m_old - off): 0 for a row empty so far (-inf), exactly 1 when the max did not move
    _mm512_storeu_ps(factor + r, amx::exp16(_mm512_sub_ps(m_old, o)));
  }
  // exp(scale * s - off) = 2^(s * scale log2(e) - off log2(e)) (amx::exp2_poly)
  const __m512 vscale = _mm512_set1_ps(scale * 1.44269504088896341f);
  for (int r = 0; r < rows; ++r) {
    const float* s = S + static_cast<long>(r) * lds;
    const __m512 voff = _mm512_set1_ps(-off[r] * 1.44269504088896341f);
    __m512 sum = _mm512_setzero_ps();
    uint16_t* prow = P + static_cast<long>(r) * ldp;
    for (int j = 0; j < n_pad; j += 16) {
      const __mmask16 mk = amx::lanes(n - j);
      __m512 e = amx::exp2_poly(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, s + j), vscale, voff), mk);
      sum = _mm512_add_ps(sum, e);
      if (keep != nullptr) {
        const __m128i kb = _mm_maskz_loadu_epi8(mk, keep + static_cast<long>(r) * ldk + j);
        e = _mm512_maskz_mov_ps(_mm_test_epi8_mask(kb, kb), e);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    tsum[r] = amx::hsum(sum);
  }
  for (int r = 0; r < rows; r += 16) {
    const __mmask16 mk = amx::lanes(rows - r);
    _mm512_mask_storeu_ps(l + r, mk, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, l + r),
                                                     _mm512_load_ps(factor + r),
                                                     _mm512_load_ps(tsum + r)));
  }
  for (int r = 0; r < rows; ++r) {
    if (factor[r] == 1.f) continue;
    float* o = O + static_cast<long>(r) * ldo;
    const __m512 f = _mm512_set1_ps(factor[r]);
    for (int c = 0; c < dpad; c += 16) _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_loadu_ps(o + c), f));
  }
}

void amx_exp_rows(const float* S, int lds, int rows, int n, int n_pad, float scale,
                  const float* lse, float* P, int ldp) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int r = 0; r < rows; ++r) {
    const float* s = S + static_cast<long>(r) * lds;
    float* p = P + static_cast<long>(r) * ldp;
    // The fp32 logit, then exp(x - lse) from the exact difference (exp_sub_exact's TwoSum).
    const __m512 b = _mm512_set1_ps(-lse[r]);
    for (int j = 0; j < n_pad; j += 16) {
      const __mmask16 mk = amx::lanes(n - j);
      const __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, s + j), vscale);
      const __m512 h = _mm512_add_ps(a, b);
      const __m512 bv = _mm512_sub_ps(h, a);
      __m512 t = _mm512_add_ps(_mm512_sub_ps(a, _mm512_sub_ps(h, bv)), _mm512_sub_ps(b, bv));
      t = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, t, _CMP_ORD_Q), t);  // inf operands
      const __m512 e = amx::exp16(h);
      _mm512_storeu_ps(p + j, _mm512_maskz_mov_ps(mk, _mm512_fmadd_ps(e, t, e)));
    }
  }
}

void amx_ds_tile(const float* P, float* dP, int ld, int rows, int rows_pad, int n_pad,
                 const float* D, const uint8_t* keep, int ldk, float keep_scale,
                 const float* tanh) {
  const __m512 one = _mm512_set1_ps(1.f), ks = _mm512_set1_ps(keep_scale);
  for (int r = 0; r < rows; ++r) {
    const float* p = P + static_cast<long>(r) * ld;
    float* dp = dP + static_cast<long>(r) * ld;
    const __m512 dr = _mm512_set1_ps(D[r]);
    for (int j = 0; j < n_pad; j += 16) {
      __m512 g = _mm512_loadu_ps(dp + j);
      if (keep != nullptr) {
        const __m128i kb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
            keep + static_cast<long>(r) * ldk + j));
        g = _mm512_maskz_mul_ps(_mm_test_epi8_mask(kb, kb), g, ks);
      }
      __m512 ds = _mm512_mul_ps(_mm512_loadu_ps(p + j), _mm512_sub_ps(g, dr));
      if (tanh != nullptr) {
        const __m512 t = _mm512_loadu_ps(tanh + static_cast<long>(r) * ld + j);
        ds = _mm512_mul_ps(ds, _mm512_fnmadd_ps(t, t, one));
      }
      _mm512_storeu_ps(dp + j, ds);
    }
  }
  for (int r = rows; r < rows_pad; ++r)
    for (int j = 0; j < n_pad; j += 16) _mm512_storeu_ps(dP + static_cast<long>(r) * ld + j, _mm512_setzero_ps());
}

#pragma GCC pop_options

#else  // no AMX compiler support: the callers never get past amx_usable()

bool amx_usable() { return false; }
void amx_begin() {}
void amx_end() {}
void amx_gemm(const uint16_t*, int, const uint16_t*, int, float*, int, int, int, int, bool) {}
void amx_pack_transposed(const uint16_t*, int, int, int, int, uint16_t*, int) {}
void amx_pack_pairs(const uint16_t*, int, int, int, int, uint16_t*, int) {}
void amx_pack_pairs(const float*, int, int, int, int, uint16_t*, int) {}
void amx_to_bf16(const float*, int, int, int, int, uint16_t*, int) {}
void amx_copy_row(const uint16_t*, int, int, uint16_t*) {}
void amx_store_bf16(const float*, int, float, uint16_t*) {}
void amx_softmax_tile(const float*, int, int, int, int, float, float*, float*, float*, int, int,
                      const uint8_t*, int, uint16_t*, int) {}
void amx_exp_rows(const float*, int, int, int, int, float, const float*, float*, int) {}
void amx_ds_tile(const float*, float*, int, int, int, int, const float*, const uint8_t*, int, float,
                 const float*) {}

#endif

}  // namespace cpu
FLASH_NAMESPACE_END
