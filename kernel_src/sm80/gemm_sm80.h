// Owns: the two warp-level GEMMs of the sm80 forward, on fragments read from the swizzled shared
// tiles of kernel_traits_sm80.h with ldmatrix:
//   S = Q K^T   (A = the warp's Q rows, B = K rows, non-transposed ldmatrix)
//   O += P V    (A = P straight from the S accumulators, converted in registers: no shared-memory
//                round trip; B = V rows, transposed ldmatrix)
// Both are whole-warp functions (namespace warp).
#pragma once
#include <cstdint>

#include "kernel_traits_sm80.h"
#include "primitives.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {
namespace warp {

// The per-lane part of every ldmatrix address, computed once per kernel. Two lane patterns:
// "A" (Q for S = Q K^T, V for O += P V): matrices ordered (rows 0-7, k lo), (rows 8-15, k lo),
// (rows 0-7, k hi), (rows 8-15, k hi); "B" (K): (n 0-7, k lo), (n 0-7, k hi), (n 8-15, k lo),
// (n 8-15, k hi). Either way lane l addresses row (l & 7) of its matrix, so its swizzle phase is
// the lane's own. The swizzle XOR only touches the chunk bits inside one swizzle row, so a lane
// needs one byte offset per chunk pair of that row (kChunksPerRow / 2 of them); everything else
// (16-row group, column block, stage) is a compile-time or uniform add. Holding these few offsets
// instead of one address per (k-step, tile) keeps the address registers from crowding out the
// accumulators (ldmatrix then takes them as register + immediate).
template <typename Traits>
struct LdsmLanes {
  static constexpr int kPairs = Traits::kChunksPerRow / 2;
  uint32_t a[kPairs];  // byte offset in a tile of the lane's piece of chunk pair p, pattern A
  uint32_t b[kPairs];  // same, pattern B

  __device__ __forceinline__ explicit LdsmLanes(int lane) {
    constexpr int kW = Traits::kSwizzleCols;
    const int phase = Traits::swizzle(lane & 7);
    const int ra = (lane & 7) + ((lane >> 3) & 1) * 8, hi_a = lane >> 4;
    const int rb = (lane & 7) + (lane >> 4) * 8, hi_b = (lane >> 3) & 1;
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
      a[p] = 2 * (ra * kW + (((2 * p + hi_a) ^ phase) << 3));
      b[p] = 2 * (rb * kW + (((2 * p + hi_b) ^ phase) << 3));
    }
  }
};

// Byte offset, inside a tile of kRows rows, of the lane's 16-byte piece of the chunk pair
// starting at head-dim chunk 2 * pair, for the 16-row group at row16 (a multiple of 16).
template <typename Traits, int kRows>
__device__ __forceinline__ uint32_t ldsm_offset(const uint32_t (&lane_off)[Traits::kChunksPerRow / 2],
                                                int row16, int pair) {
  constexpr int kW = Traits::kSwizzleCols, kPairs = Traits::kChunksPerRow / 2;
  const int block = pair / kPairs;
  return lane_off[pair % kPairs] + 2 * (block * kRows * kW + row16 * kW);
}

// S = Q K^T over the full head dim for the warp's kMmaM row tiles (acc_s is overwritten).
// smem_q: the Q tile's address plus the warp's first row (warp_row0 * kSwizzleCols * 2 bytes).
// K-step by k-step: each K fragment is read once and feeds every row tile of the warp; the Q
// fragments are re-read from shared memory at each k-step (holding them in registers, kMmaM *
// kHeadDim / 4 of them, measured slower: docs/tuning.md).
template <typename Traits>
__device__ __forceinline__ void gemm_qk(float (&acc_s)[Traits::kMmaM][Traits::kMmaNS][4],
                                        uint32_t smem_q, uint32_t smem_k,
                                        const LdsmLanes<Traits>& lanes) {
  using Element = typename Traits::Element;
#pragma unroll
  for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
    for (int nj = 0; nj < Traits::kMmaNS; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[mi][nj][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < Traits::kKStepsQK; ++kk) {
    uint32_t a_smem[Traits::kMmaM][4];
#pragma unroll
    for (int mi = 0; mi < Traits::kMmaM; ++mi) {
      ldmatrix_x4(a_smem[mi], smem_q + ldsm_offset<Traits, Traits::kBlockM>(lanes.a, mi * 16, kk));
    }
#pragma unroll
    for (int np = 0; np < Traits::kMmaNS / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, smem_k + ldsm_offset<Traits, Traits::kBlockN>(lanes.b, np * 16, kk));
#pragma unroll
      for (int mi = 0; mi < Traits::kMmaM; ++mi) {
        mma_m16n8k16<Element>(acc_s[mi][2 * np], a_smem[mi], b[0], b[1]);
        mma_m16n8k16<Element>(acc_s[mi][2 * np + 1], a_smem[mi], b[2], b[3]);
      }
    }
  }
}

// The A fragments of P for O += P V: k-step ks covers S columns [16 ks, 16 ks + 16), i.e. the
// 8-column tiles 2 ks and 2 ks + 1, whose C layout is exactly the A layout (PTX ISA fragments).
template <typename Traits>
__device__ __forceinline__ void convert_p(
    const float (&acc_s)[Traits::kMmaM][Traits::kMmaNS][4],
    uint32_t (&p)[Traits::kMmaM][Traits::kKStepsPV][4]) {
  using Element = typename Traits::Element;
#pragma unroll
  for (int mi = 0; mi < Traits::kMmaM; ++mi)
#pragma unroll
    for (int ks = 0; ks < Traits::kKStepsPV; ++ks) {
      p[mi][ks][0] = pack2<Element>(acc_s[mi][2 * ks][0], acc_s[mi][2 * ks][1]);
      p[mi][ks][1] = pack2<Element>(acc_s[mi][2 * ks][2], acc_s[mi][2 * ks][3]);
      p[mi][ks][2] = pack2<Element>(acc_s[mi][2 * ks + 1][0], acc_s[mi][2 * ks + 1][1]);
      p[mi][ks][3] = pack2<Element>(acc_s[mi][2 * ks + 1][2], acc_s[mi][2 * ks + 1][3]);
    }
}

// O += P V for the warp's rows; with kSumByMma also row_sum += P 1 (sum_frag, see RowState).
template <typename Traits, bool kSumByMma>
__device__ __forceinline__ void gemm_pv(float (&acc_o)[Traits::kMmaM][Traits::kMmaNO][4],
                                        const uint32_t (&p)[Traits::kMmaM][Traits::kKStepsPV][4],
                                        uint32_t smem_v, const LdsmLanes<Traits>& lanes,
                                        float (&sum_frag)[Traits::kMmaM][4]) {
  using Element = typename Traits::Element;
#pragma unroll
  for (int ks = 0; ks < Traits::kKStepsPV; ++ks) {
    if constexpr (kSumByMma) {
      const uint32_t ones = pack2<Element>(1.f, 1.f);
#pragma unroll
      for (int mi = 0; mi < Traits::kMmaM; ++mi) {
        mma_m16n8k16<Element>(sum_frag[mi], p[mi][ks], ones, ones);
      }
    }
#pragma unroll
    for (int dp = 0; dp < Traits::kMmaNO / 2; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, smem_v + ldsm_offset<Traits, Traits::kBlockN>(lanes.a, ks * 16, dp));
#pragma unroll
      for (int mi = 0; mi < Traits::kMmaM; ++mi) {
        mma_m16n8k16<Element>(acc_o[mi][2 * dp], p[mi][ks], b[0], b[1]);
        mma_m16n8k16<Element>(acc_o[mi][2 * dp + 1], p[mi][ks], b[2], b[3]);
      }
    }
  }
}

}  // namespace warp
}  // namespace sm80
FLASH_NAMESPACE_END
