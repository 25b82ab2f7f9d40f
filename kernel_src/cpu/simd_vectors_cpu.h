// Owns: the macro that defines the portable vector vocabulary of simd_kernels_cpu.inc (VF/VD/VI/VL,
// vload, vstore, vset1, vzero, vfma, vmax, vnarrow, vwiden) for a vector size, shared by the
// instruction-set variants of simd_cpu.cpp and the AMX file (amx_cpu.cpp, which uses its vexp).
// Include only inside an anonymous or variant namespace of a .cpp file.
#pragma once

#include <cstdint>
#include <cstring>

// The portable variants: GCC/Clang vector extensions of BYTES bytes, lowered to whatever the
// target has (SSE2 on baseline x86-64, NEON elsewhere, AVX-512 under its target pragma). LO/HI
// list the lanes of each half of an fp32 vector, ALL those of a whole one (vnarrow, vwiden);
// ZEROS / ZEROS_D as many zeros as an fp32 / fp64 vector has lanes (vset1).
#define FLASH_CPU_GENERIC_VECTORS(BYTES, ALL, LO, HI, ZEROS, ZEROS_D)                                     \
  typedef float VF __attribute__((vector_size(BYTES)));                                     \
  typedef double VD __attribute__((vector_size(BYTES)));                                    \
  typedef int32_t VI __attribute__((vector_size(BYTES)));                                   \
  typedef int64_t VL __attribute__((vector_size(BYTES)));                                   \
  typedef float VH __attribute__((vector_size(BYTES / 2)));                                 \
  inline VF vzero(const float*) { return VF{}; }                                            \
  inline VD vzero(const double*) { return VD{}; }                                           \
  inline VF vload(const float* p) {                                                         \
    VF v;                                                                                   \
    std::memcpy(&v, p, sizeof v);                                                           \
    return v;                                                                               \
  }                                                                                         \
  inline VD vload(const double* p) {                                                        \
    VD v;                                                                                   \
    std::memcpy(&v, p, sizeof v);                                                           \
    return v;                                                                               \
  }                                                                                         \
  inline void vstore(float* p, VF v) { std::memcpy(p, &v, sizeof v); }                     \
  inline void vstore(double* p, VD v) { std::memcpy(p, &v, sizeof v); }                    \
  /* A broadcast (from memory when x is loaded): VF{} + x would be an add of +0.0, which the \
     compiler must keep (-0.0 + 0.0 is +0.0), in front of every broadcast. */               \
  inline VF vset1(float x) {                                                                \
    const VF v = {x};                                                                       \
    return __builtin_shufflevector(v, v, ZEROS);                                            \
  }                                                                                         \
  inline VD vset1(double x) {                                                               \
    const VD v = {x};                                                                       \
    return __builtin_shufflevector(v, v, ZEROS_D);                                          \
  }                                                                                         \
  inline VF vfma(VF a, VF b, VF c) { return a * b + c; }                                    \
  inline VD vfma(VD a, VD b, VD c) { return a * b + c; }                                    \
  inline VF vmax(VF a, VF b) { return a > b ? a : b; }                                      \
  inline VD vmax(VD a, VD b) { return a > b ? a : b; }                                      \
  inline VF vnarrow(VD lo, VD hi) {                                                         \
    return __builtin_shufflevector(__builtin_convertvector(lo, VH),                         \
                                   __builtin_convertvector(hi, VH), ALL);                   \
  }                                                                                         \
  inline void vwiden(VF x, VD* lo, VD* hi) {                                                \
    *lo = __builtin_convertvector(__builtin_shufflevector(x, x, LO), VD);                   \
    *hi = __builtin_convertvector(__builtin_shufflevector(x, x, HI), VD);                   \
  }
#define FLASH_CPU_LANES4 0, 1, 2, 3
#define FLASH_CPU_LANES2_LO 0, 1
#define FLASH_CPU_LANES2_HI 2, 3
#define FLASH_CPU_LANES16 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#define FLASH_CPU_LANES8_LO 0, 1, 2, 3, 4, 5, 6, 7
#define FLASH_CPU_LANES8_HI 8, 9, 10, 11, 12, 13, 14, 15
#define FLASH_CPU_ZEROS2 0, 0
#define FLASH_CPU_ZEROS4 0, 0, 0, 0
#define FLASH_CPU_ZEROS8 0, 0, 0, 0, 0, 0, 0, 0
#define FLASH_CPU_ZEROS16 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
