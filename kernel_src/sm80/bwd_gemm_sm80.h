// Owns: the warp-level GEMM of the sm80 backward, C += A B on m16n8k16 tensor-core tiles with both
// operands read from swizzled shared tiles by ldmatrix, in whichever orientation the tile is
// stored; and the store of a C fragment into a shared tile (P^T, dS^T).
//
// Every operand of the backward is one of four cases (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"; A is M x K row-major in registers, B is K x N "col"):
//   A stored M-major (rows = M, e.g. K for S^T = K Q^T)       ldmatrix,       lanes pattern A
//   A stored K-major (rows = K, e.g. dS^T for dQ = dS K)      ldmatrix.trans, lanes pattern B
//   B stored N-major (rows = N, e.g. Q for S^T = K Q^T)       ldmatrix,       lanes pattern B
//   B stored K-major (rows = K, e.g. dO for dV = P^T dO)      ldmatrix.trans, lanes pattern A
// Pattern A: lane l addresses stored row (l & 7) + 8 ((l >> 3) & 1), column 8 (l >> 4) of the
// 16 x 16 block; pattern B: row (l & 7) + 8 (l >> 4), column 8 ((l >> 3) & 1). The register
// order that ldmatrix returns then is the fragment order the MMA wants in all four cases.
// Whole-warp functions (namespace warp). They read the lane index themselves, through volatile
// asm (thread_index_in_block), so that the compiler cannot hoist every ldmatrix address of a
// GEMM out of the caller's loop into registers held across it (measured: 255 registers and
// spills at head dim 32 before, when the lane was a parameter).
#pragma once
#include <cstdint>

#include "primitives.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

// A swizzled shared tile: `rows` rows of 2-byte elements, column blocks of kSwizzleCols (64: 8
// chunks per row, swizzle r & 7; 32: 4 chunks, swizzle (r >> 1) & 3), as kernel_traits_sm80.h.
template <int kSwizzleCols>
struct SmemTile {
  uint32_t base;  // .shared byte address of element (0, 0)
  int rows;

  static __device__ __forceinline__ int swizzle(int row) {
    return kSwizzleCols == 64 ? (row & 7) : ((row >> 1) & 3);
  }
  // Element offset of (row, col); col's 8-element chunk is swizzled, its position inside is kept.
  __device__ __forceinline__ int offset(int row, int col) const {
    const int block = col / kSwizzleCols, c = col % kSwizzleCols;
    return block * rows * kSwizzleCols + row * kSwizzleCols + (((c >> 3) ^ swizzle(row)) << 3) +
           (c & 7);
  }
  __device__ __forceinline__ uint32_t addr(int row, int col) const {
    return base + 2 * offset(row, col);
  }
};

namespace warp {

// The lane's row and column inside a 16 x 16 block for ldmatrix pattern A / pattern B.
__device__ __forceinline__ int ldsm_row(int lane, bool pattern_b) {
  return (lane & 7) + 8 * (pattern_b ? (lane >> 4) : ((lane >> 3) & 1));
}
__device__ __forceinline__ int ldsm_col(int lane, bool pattern_b) {
  return 8 * (pattern_b ? ((lane >> 3) & 1) : (lane >> 4));
}

// acc[kM16][kN8][4] += A[m0 : m0 + 16 kM16, k0 : k0 + 16 kK16] * B[k0 :, n0 : n0 + 8 kN8].
// kATrans: A is stored K-major (the tile holds A^T); kBTrans: B is stored K-major. m0/n0/k0 are
// the logical coordinates of the warp's block in A (rows m) and B (columns n) and the start of
// the reduction.
template <typename Element, int kM16, int kN8, int kK16, bool kATrans, bool kBTrans, int kSwA,
          int kSwB>
__device__ __forceinline__ void gemm_ss(float (&acc)[kM16][kN8][4], const SmemTile<kSwA>& a,
                                        int m0, const SmemTile<kSwB>& b, int n0, int k0) {
  const int lane = thread_index_in_block() & 31;
  static_assert(kN8 % 2 == 0, "B fragments come in pairs of 8-column tiles");
  // Pattern per operand (header comment): A M-major and B K-major use A, the others B.
  const int ar = ldsm_row(lane, kATrans), ac = ldsm_col(lane, kATrans);
  const int br = ldsm_row(lane, !kBTrans), bc = ldsm_col(lane, !kBTrans);
#pragma unroll
  for (int kk = 0; kk < kK16; ++kk) {
    const int k = k0 + 16 * kk;
    uint32_t af[kM16][4];
#pragma unroll
    for (int mi = 0; mi < kM16; ++mi) {
      const int m = m0 + 16 * mi;
      if constexpr (kATrans) {
        ldmatrix_x4_trans(af[mi], a.addr(k + ar, m + ac));
      } else {
        ldmatrix_x4(af[mi], a.addr(m + ar, k + ac));
      }
    }
#pragma unroll
    for (int np = 0; np < kN8 / 2; ++np) {
      const int n = n0 + 16 * np;
      uint32_t bf[4];
      if constexpr (kBTrans) {
        ldmatrix_x4_trans(bf, b.addr(k + br, n + bc));
      } else {
        ldmatrix_x4(bf, b.addr(n + br, k + bc));
      }
#pragma unroll
      for (int mi = 0; mi < kM16; ++mi) {
        mma_m16n8k16<Element>(acc[mi][2 * np], af[mi], bf[0], bf[1]);
        mma_m16n8k16<Element>(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
      }
    }
  }
}

template <int kM16, int kN8>
__device__ __forceinline__ void zero(float (&acc)[kM16][kN8][4]) {
#pragma unroll
  for (int mi = 0; mi < kM16; ++mi)
#pragma unroll
    for (int nj = 0; nj < kN8; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.f;
}

// Stores a C fragment block (rows m0 + 16 mi + g (+8), columns n0 + 8 nj + 2 t, +1) into a shared
// tile as Element pairs.
template <typename Element, int kM16, int kN8, int kSw>
__device__ __forceinline__ void store_c(const float (&acc)[kM16][kN8][4], const SmemTile<kSw>& t,
                                        Element* tile_ptr, int m0, int n0) {
  const int lane = thread_index_in_block() & 31;
  const int g = lane >> 2, c = 2 * (lane & 3);
#pragma unroll
  for (int mi = 0; mi < kM16; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int nj = 0; nj < kN8; ++nj) {
        *reinterpret_cast<uint32_t*>(tile_ptr + t.offset(m0 + 16 * mi + g + 8 * h, n0 + 8 * nj + c)) =
            pack2<Element>(acc[mi][nj][2 * h], acc[mi][nj][2 * h + 1]);
      }
}

}  // namespace warp
}  // namespace sm80
FLASH_NAMESPACE_END
