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

// Byte offsets of the lane's ldmatrix row pieces in a tile, computed once per GEMM (from a lane
// index the compiler cannot hoist), so that every ldmatrix in the unrolled loops is a register
// plus an immediate: the per-call integer work of the swizzle would otherwise outweigh the MMAs.
// The swizzle phase of a 16-row-aligned block depends only on the lane's row inside it, so:
//  * stored columns at compile-time multiples of 16 (the reduction dimension of an M/N-major
//    operand): kPairs offsets, one per 16-column pair of a swizzle block (fixed()),
//  * stored columns at a warp-dependent base c0 + 16 i (the M/N dimension of a K-major operand):
//    one offset per i (at()).
template <int kSw>
struct LaneOffsets {
  static constexpr int kPairs = kSw / 16;
  int lane_row, lane_col;  // inside the 16 x 16 block, per the lane pattern

  __device__ __forceinline__ LaneOffsets(int lane, bool pattern_b)
      : lane_row((lane & 7) + 8 * (pattern_b ? (lane >> 4) : ((lane >> 3) & 1))),
        lane_col(8 * (pattern_b ? ((lane >> 3) & 1) : (lane >> 4))) {}

  // Element offset of (row0 + lane_row, col0 + lane_col) in a tile of `rows` rows, for row0 a
  // multiple of 8 and col0 a multiple of 16.
  __device__ __forceinline__ int at(int rows, int row0, int col0) const {
    const SmemTile<kSw> t{0, rows};
    return t.offset(row0 + lane_row, col0 + lane_col);
  }
};

// The B operand of a warp's GEMM: the lane's ldmatrix offsets in a shared tile, computed once
// (see LaneOffsets), and the load of one fragment pair (two 8-column tiles) for reduction step kk.
// kBTrans: B is stored K-major. n0 is the warp's first column of B, a multiple of 16.
template <int kN8, bool kBTrans, int kSwB>
struct BOperand {
  static constexpr int kP = LaneOffsets<kSwB>::kPairs;
  const SmemTile<kSwB> b;
  int off[kBTrans ? kN8 / 2 : kP];

  __device__ __forceinline__ BOperand(const SmemTile<kSwB>& tile, int n0, int lane) : b(tile) {
    static_assert(kN8 % 2 == 0, "B fragments come in pairs of 8-column tiles");
    // Pattern per operand (header comment): B K-major uses A, N-major B.
    const LaneOffsets<kSwB> lb(lane, !kBTrans);
    if constexpr (kBTrans) {
#pragma unroll
      for (int np = 0; np < kN8 / 2; ++np) off[np] = lb.at(b.rows, 0, n0 + 16 * np);
    } else {
#pragma unroll
      for (int p = 0; p < kP; ++p) off[p] = lb.at(b.rows, n0, 16 * p);
    }
  }
  // k = 16 kk adds a compile-time amount: k rows (K-major: 16 kk * kSw elements) or k columns
  // (N-major: its swizzle block; the pair is in off).
  __device__ __forceinline__ void load(int kk, int np, uint32_t (&bf)[4]) const {
    const int k = 16 * kk;
    if constexpr (kBTrans) {
      ldmatrix_x4_trans(bf, b.base + 2 * (off[np] + k * kSwB));
    } else {
      ldmatrix_x4(bf, b.base + 2 * (off[kk % kP] + (k / kSwB) * b.rows * kSwB + 16 * np * kSwB));
    }
  }
};

// One reduction step kk of a warp GEMM: acc += af (the A fragments of rows 16 mi) times every
// B fragment pair of step kk.
template <typename Element, int kM16, int kN8, typename BOp>
__device__ __forceinline__ void mma_step(float (&acc)[kM16][kN8][4], const uint32_t (&af)[kM16][4],
                                         const BOp& bop, int kk) {
#pragma unroll
  for (int np = 0; np < kN8 / 2; ++np) {
    uint32_t bf[4];
    bop.load(kk, np, bf);
#pragma unroll
    for (int mi = 0; mi < kM16; ++mi) {
      mma_m16n8k16<Element>(acc[mi][2 * np], af[mi], bf[0], bf[1]);
      mma_m16n8k16<Element>(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
    }
  }
}

// acc[kM16][kN8][4] += A[m0 : m0 + 16 kM16, 0 : 16 kK16] * B[0 : 16 kK16, n0 : n0 + 8 kN8].
// kATrans: A is stored K-major (the tile holds A^T); kBTrans: B is stored K-major. m0/n0 are the
// warp's block in A (rows m) and B (columns n), multiples of 16.
template <typename Element, int kM16, int kN8, int kK16, bool kATrans, bool kBTrans, int kSwA,
          int kSwB>
__device__ __forceinline__ void gemm_ss(float (&acc)[kM16][kN8][4], const SmemTile<kSwA>& a,
                                        int m0, const SmemTile<kSwB>& b, int n0) {
  const int lane = thread_index_in_block() & 31;
  // Pattern per operand (header comment): A M-major uses A, K-major B.
  const LaneOffsets<kSwA> la(lane, kATrans);
  const BOperand<kN8, kBTrans, kSwB> bop(b, n0, lane);
  // Offsets of the warp's blocks without the reduction coordinate k, which adds a compile-time
  // amount: k rows (K-major: 16 k * kSw elements) or k columns (M-major: the pair's offset).
  int a_off[kATrans ? kM16 : LaneOffsets<kSwA>::kPairs];
  if constexpr (kATrans) {
#pragma unroll
    for (int mi = 0; mi < kM16; ++mi) a_off[mi] = la.at(a.rows, 0, m0 + 16 * mi);
  } else {
#pragma unroll
    for (int p = 0; p < LaneOffsets<kSwA>::kPairs; ++p) a_off[p] = la.at(a.rows, m0, 16 * p);
  }
#pragma unroll
  for (int kk = 0; kk < kK16; ++kk) {
    const int k = 16 * kk;
    uint32_t af[kM16][4];
#pragma unroll
    for (int mi = 0; mi < kM16; ++mi) {
      if constexpr (kATrans) {
        ldmatrix_x4_trans(af[mi], a.base + 2 * (a_off[mi] + k * kSwA));
      } else {
        constexpr int kP = LaneOffsets<kSwA>::kPairs;
        ldmatrix_x4(af[mi], a.base + 2 * (a_off[kk % kP] + (k / kSwA) * a.rows * kSwA +
                                           16 * mi * kSwA));
      }
    }
    mma_step<Element>(acc, af, bop, kk);
  }
}

// The same with A in registers: a[mi][kk] is the A fragment of rows 16 mi and reduction columns
// 16 kk (to_a_fragments below makes it from a C fragment block).
template <typename Element, int kM16, int kN8, int kK16, bool kBTrans, int kSwB>
__device__ __forceinline__ void gemm_rs(float (&acc)[kM16][kN8][4],
                                        const uint32_t (&a)[kM16][kK16][4],
                                        const SmemTile<kSwB>& b, int n0) {
  const int lane = thread_index_in_block() & 31;
  const BOperand<kN8, kBTrans, kSwB> bop(b, n0, lane);
#pragma unroll
  for (int kk = 0; kk < kK16; ++kk) {
    uint32_t af[kM16][4];  // a[.][kk]: register copies, gone after unrolling
#pragma unroll
    for (int mi = 0; mi < kM16; ++mi)
#pragma unroll
      for (int r = 0; r < 4; ++r) af[mi][r] = a[mi][kk][r];
    mma_step<Element>(acc, af, bop, kk);
  }
}

// A C fragment block (16 kM16 rows x 8 kN8 columns, fp32) as the A fragments of a GEMM that
// reduces over those columns: the m16n8k16 A fragment of columns 16 kk..16 kk + 15 holds, per
// lane, the C values of the 8-column tiles 2 kk and 2 kk + 1 at the same rows and columns
// (PTX ISA, the mma.m16n8k16 fragment layouts), packed as Element pairs.
template <typename Element, int kM16, int kN8>
__device__ __forceinline__ void to_a_fragments(const float (&c)[kM16][kN8][4],
                                               uint32_t (&a)[kM16][kN8 / 2][4]) {
#pragma unroll
  for (int mi = 0; mi < kM16; ++mi)
#pragma unroll
    for (int kk = 0; kk < kN8 / 2; ++kk) {
      a[mi][kk][0] = pack2<Element>(c[mi][2 * kk][0], c[mi][2 * kk][1]);
      a[mi][kk][1] = pack2<Element>(c[mi][2 * kk][2], c[mi][2 * kk][3]);
      a[mi][kk][2] = pack2<Element>(c[mi][2 * kk + 1][0], c[mi][2 * kk + 1][1]);
      a[mi][kk][3] = pack2<Element>(c[mi][2 * kk + 1][2], c[mi][2 * kk + 1][3]);
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
// tile as Element pairs. m0 is a multiple of 8 (a warp's block), so every row the lane writes has
// row g's swizzle phase: the swizzle and the row part of the offset are computed once, and each
// column's part once for all rows (unsigned: n0 >= 0, so / and % are shifts and masks).
template <typename Element, int kM16, int kN8, int kSw>
__device__ __forceinline__ void store_c(const float (&acc)[kM16][kN8][4], const SmemTile<kSw>& t,
                                        Element* tile_ptr, int m0, int n0) {
  const int lane = thread_index_in_block() & 31;
  const int g = lane >> 2, c = 2 * (lane & 3);
  const unsigned sw = static_cast<unsigned>(SmemTile<kSw>::swizzle(g));
  Element* row_ptr = tile_ptr + (m0 + g) * kSw;
#pragma unroll
  for (int nj = 0; nj < kN8; ++nj) {
    const unsigned col = static_cast<unsigned>(n0) + 8u * nj;
    const int col_off = static_cast<int>((col / kSw) * static_cast<unsigned>(t.rows * kSw) +
                                         ((((col % kSw) >> 3) ^ sw) << 3)) + c;
#pragma unroll
    for (int mi = 0; mi < kM16; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<uint32_t*>(row_ptr + (16 * mi + 8 * h) * kSw + col_off) =
            pack2<Element>(acc[mi][nj][2 * h], acc[mi][nj][2 * h + 1]);
      }
  }
}

}  // namespace warp
}  // namespace sm80
FLASH_NAMESPACE_END
