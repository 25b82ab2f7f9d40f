// Owns: the compile-time shape of one sm80 forward kernel (tile sizes, warps, fragment counts)
// and its shared-memory layout: where each Q/K/V element lives, with the XOR swizzle that makes
// both the 16-byte cp.async writes and the ldmatrix reads free of bank conflicts.
//
// Shared-memory tile layout (rows x kHeadDim, 2-byte elements): the head dim is cut into column
// blocks of kSwizzleCols (64 elements = 128 B, or 32 = 64 B when kHeadDim is not a multiple of
// 64, i.e. 32 and 96); block b of all rows is stored contiguously, row after row. Inside a row of
// a block, 16-byte chunk c of row r is stored at chunk c ^ swizzle(r), with swizzle(r) = r & 7
// for 128-B rows and (r >> 1) & 3 for 64-B rows. Eight consecutive rows read at the same logical
// chunk (one 8x8 ldmatrix matrix) then hit eight distinct 16-byte bank groups.
#pragma once
#include "../common/namespace.h"
#include "primitives.h"
#include "tile_size.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

// Tile: a type whose constexpr member kConfig is the TileConfig (tile_size.h's ShippedTile for
// the shipped kernels).
template <int kHeadDim_, typename Tile, typename Element_>
struct FwdKernelTraits {
  using Element = Element_;
  static constexpr TileConfig kConfig = Tile::kConfig;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kConfig.kBlockM;
  static constexpr int kBlockN = kConfig.kBlockN;
  static constexpr int kNWarps = kConfig.kNWarps;
  static constexpr int kStages = kConfig.kStages;
  static constexpr int kNThreads = kNWarps * 32;

  // Split-Q: warp w owns query rows [w * kRowsPerWarp, (w + 1) * kRowsPerWarp) of the block.
  static constexpr int kRowsPerWarp = kBlockM / kNWarps;
  static constexpr int kMmaM = kRowsPerWarp / 16;  // 16-row MMA tiles per warp
  static constexpr int kMmaNS = kBlockN / 8;       // 8-column tiles of S = Q K^T
  static constexpr int kMmaNO = kHeadDim / 8;      // 8-column tiles of O
  static constexpr int kKStepsQK = kHeadDim / 16;  // k-steps of Q K^T
  static constexpr int kKStepsPV = kBlockN / 16;   // k-steps of P V

  static_assert(kRowsPerWarp % 16 == 0 && kRowsPerWarp * kNWarps == kBlockM,
                "each warp must own whole 16-row MMA tiles");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "MMA k-steps are 16 wide");
  static_assert(kStages == 1 || kStages == 2, "K/V stages: 1 or 2");

  // ---- shared memory -----------------------------------------------------------------------
  static constexpr int kSwizzleCols = kHeadDim % 64 == 0 ? 64 : 32;  // elements per row of a block
  static constexpr int kChunksPerRow = kSwizzleCols / 8;             // 16-byte chunks: 8 or 4
  static constexpr int kColBlocks = kHeadDim / kSwizzleCols;
  static_assert(kHeadDim % kSwizzleCols == 0, "head dim must be a multiple of 32");

  static constexpr int kTileQElems = kBlockM * kHeadDim;
  static constexpr int kTileKVElems = kBlockN * kHeadDim;
  static constexpr int kSmemQOffset = 0;  // elements
  static constexpr int kSmemKOffset = kTileQElems;
  static constexpr int kSmemVOffset = kSmemKOffset + kStages * kTileKVElems;
  static constexpr int kSmemElems = kSmemVOffset + kStages * kTileKVElems;
  static constexpr int kSmemBytes = kSmemElems * 2;
  static_assert(kSmemBytes == tile_smem_bytes(kHeadDim, kConfig),
                "tile_size.h and the layout disagree");

  static __device__ __forceinline__ int swizzle(int row) {
    return kChunksPerRow == 8 ? (row & 7) : ((row >> 1) & 3);
  }

  // Element offset of (row, 16-byte chunk `chunk` of the head dim) in a tile of `rows` rows.
  static __device__ __forceinline__ int smem_offset(int rows, int row, int chunk) {
    const int block = chunk / kChunksPerRow;
    const int c = chunk % kChunksPerRow;
    return block * rows * kSwizzleCols + row * kSwizzleCols + ((c ^ swizzle(row)) << 3);
  }

  // ---- global -> shared copy mapping -------------------------------------------------------
  // Thread tid copies chunk (tid % kChunksPerRow) of every column block for rows
  // tid / kChunksPerRow + i * kRowStep. kRowStep is a multiple of 8, so a thread's swizzle is
  // the same on all its rows; a warp writes 32 distinct bank groups per instruction.
  static constexpr int kRowStep = kNThreads / kChunksPerRow;
  static_assert(kRowStep % 8 == 0, "copy rows must keep the swizzle phase");
  static_assert(kBlockM % kRowStep == 0 && kBlockN % kRowStep == 0,
                "tiles must be a whole number of copy passes");
  static constexpr int kCopyRowsQ = kBlockM / kRowStep;   // rows per thread for a Q tile
  static constexpr int kCopyRowsKV = kBlockN / kRowStep;  // rows per thread for a K/V tile
};

// The traits of a shipped kernel (the name the launch code uses).
template <int kHeadDim, TileKind kKind, typename Element>
struct TraitsFor {
  using type = FwdKernelTraits<kHeadDim, ShippedTile<kHeadDim, kKind>, Element>;
};

}  // namespace sm80
FLASH_NAMESPACE_END
