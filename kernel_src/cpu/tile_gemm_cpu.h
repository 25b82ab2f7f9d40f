// Owns: the one matrix-multiply primitive of the CPU backend, C += A * B on small row-major
// scratch tiles (fp32 or fp64), used for every product of the forward and backward passes
// (S = Q K^T with K stored transposed, O += P V, dV += P^T dO, dQ += dS K, dK += dS^T Q).
//
// Why this shape: with B row-major, the innermost update is a broadcast of one A element times a
// contiguous vector of B, so the compiler needs no reassociation (we do not build with
// -ffast-math: masked logits are -inf and must stay so). A register block of kMR rows x one
// 32-byte vector of columns keeps the accumulators in registers; GCC/Clang vector extensions
// make that explicit instead of hoping the auto-vectoriser finds it. On baseline x86-64 (SSE2)
// a 32-byte vector is lowered to two 16-byte ops; measured on the 2-core CI machine (64x64x64
// fp32): 26 GFLOP/s baseline, 104 GFLOP/s when built with -mavx2 -mfma; 8 rows x 1 vector beat
// 4x1, 4x2, 2x2 and 4x4 on both.
//
// Preconditions: `cols` is a multiple of kSimdWidth<Acc> (callers pad their tiles), the row and
// depth counts are arbitrary; C must not alias A or B.
#pragma once
#include <cstring>

#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

template <typename Acc>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
};
template <typename Acc>
constexpr int kSimdWidth = static_cast<int>(32 / sizeof(Acc));

// Every scratch row length (head dim, key tile) is padded to this, a multiple of both widths.
constexpr int kPad = 8;
constexpr int pad_up(int n) { return (n + kPad - 1) / kPad * kPad; }

template <typename Acc, int kMR>
inline void gemm_block(const Acc* A, int lda, const Acc* B, int ldb, Acc* C, int ldc, int depth,
                       int cols) {
  using V = typename Simd<Acc>::V;
  constexpr int W = kSimdWidth<Acc>;
  for (int c = 0; c < cols; c += W) {
    V acc[kMR];
    for (int i = 0; i < kMR; ++i) std::memcpy(&acc[i], C + i * ldc + c, sizeof(V));
    for (int k = 0; k < depth; ++k) {
      V b;
      std::memcpy(&b, B + k * ldb + c, sizeof(V));
      for (int i = 0; i < kMR; ++i) acc[i] += A[i * lda + k] * b;
    }
    for (int i = 0; i < kMR; ++i) std::memcpy(C + i * ldc + c, &acc[i], sizeof(V));
  }
}

// C[rows x cols] += A[rows x depth] * B[depth x cols]; leading dimensions in elements.
template <typename Acc>
inline void gemm_acc(const Acc* A, int lda, const Acc* B, int ldb, Acc* C, int ldc, int rows,
                     int depth, int cols) {
  constexpr int kMR = 8;
  int r = 0;
  for (; r + kMR <= rows; r += kMR)
    gemm_block<Acc, kMR>(A + r * lda, lda, B, ldb, C + r * ldc, ldc, depth, cols);
  for (; r < rows; ++r) gemm_block<Acc, 1>(A + r * lda, lda, B, ldb, C + r * ldc, ldc, depth, cols);
}

// dst[cols x rows] = src[rows x cols]^T (for the products that need a transposed operand).
template <typename Acc>
inline void transpose(const Acc* src, int lds, Acc* dst, int ldd, int rows, int cols) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

}  // namespace cpu
FLASH_NAMESPACE_END
