// Owns: the compile-time shape of the sm80 backward kernel (bwd_kernel_sm80.h): tile sizes, how
// the warps of a CTA split each of its three GEMM phases, and the shared-memory layout.
//
// One CTA owns kBlockN keys of one (sequence, K/V head) and walks over the query blocks (kBlockM
// rows) of every query head of the K/V head's group that sees those keys. Per query block:
//   S-phase   S^T = K Q^T and dP^T = V dO^T    (kBlockN x kBlockM), warps split keys x queries
//   dKV-phase dV += P^T dO, dK += dS^T Q       (kBlockN x kHeadDim), warps split keys x head dim
//   dQ-phase  dQ += dS K (fp32 atomics)        (kBlockM x kHeadDim), warps split queries x head dim
// P^T and dS^T go through shared memory between the phases because each phase splits the work
// differently (FA2's backward does the same, Dao 2023).
//
// Shared-memory tiles are the forward's swizzled layout (kernel_traits_sm80.h): column blocks of
// kSwizzleCols elements, 16-byte chunk c of row r stored at chunk c ^ swizzle(r). The same names
// (kSwizzleCols, kChunksPerRow, kColBlocks, kRowStep, swizzle) let copy_sm80.h's tile loaders
// serve these tiles too.
#pragma once
#include "../common/namespace.h"
#include "../common/params.h"
#include "primitives.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

struct BwdTileConfig {
  int kBlockM;  // query rows per iteration
  int kBlockN;  // keys per CTA
  int kNWarps;
  // Warp grids of the three phases (rows x columns of warps; their product is kNWarps).
  int kWarpsS_N, kWarpsS_M;    // S-phase: keys x queries
  int kWarpsKV_N, kWarpsKV_D;  // dKV-phase: keys x head dim
  int kWarpsQ_M, kWarpsQ_D;    // dQ-phase: queries x head dim
  int kMinBlocksPerSm;         // __launch_bounds__: 2 caps registers at 128 per thread
};

// One config per head dim, and a second, larger one where it pays on GPUs with more opt-in shared
// memory (A100: 163 KB, H100/H200: 227 KB). Q, dO and their LSE/D rows are double-buffered (the
// next query block's copies overlap this one's GEMMs). 8 warps everywhere: the dK/dV accumulators
// of a CTA (2 x kBlockN x kHeadDim fp32) are spread over 256 threads. Up to head dim 128 the
// small configs fit the 99 KB of the smallest sm80+ GPUs; above, 104/136 KB need an A100/H100-class
// GPU (checked at launch).
constexpr BwdTileConfig bwd_tile_config(int head_dim, bool large = false) {
  // Up to 64: 128 keys per CTA, 98 KB at 64; 2 CTAs/SM would spill ~800 B (sm_90a, ptxas).
  if (head_dim <= 64) return {64, 128, 8, 8, 1, 8, 1, 4, 2, 1};
  // 96: 88 KB. 96/128 fit 128 registers with <= 144 B of spills, so two CTAs share an SM where
  // shared memory allows (A100/H100) and hide each other's copies and barriers.
  if (head_dim <= 96) return {64, 64, 8, 4, 2, 4, 2, 4, 2, 2};
  // 128, large: 64 query rows x 128 keys (161 KB), each warp owns 16 keys in the S and dKV phases
  // (255 registers, no spills): 1.3-1.4x the small config's speed on the H200 (docs/cuda_bwd.md).
  if (head_dim <= 128 && large) return {64, 128, 8, 8, 1, 8, 1, 2, 4, 1};
  // 128: 32 query rows per iteration keep two Q/dO stages and 64 keys in 72 KB.
  if (head_dim <= 128) return {32, 64, 8, 4, 2, 4, 2, 2, 4, 2};
  // 192/256: 104/136 KB; the dK/dV accumulators alone are 96/128 registers.
  return {32, 64, 8, 4, 2, 4, 2, 2, 4, 1};
}

constexpr bool operator==(const BwdTileConfig& a, const BwdTileConfig& b) {
  return a.kBlockM == b.kBlockM && a.kBlockN == b.kBlockN && a.kNWarps == b.kNWarps &&
         a.kWarpsS_N == b.kWarpsS_N && a.kWarpsS_M == b.kWarpsS_M && a.kWarpsKV_N == b.kWarpsKV_N &&
         a.kWarpsKV_D == b.kWarpsKV_D && a.kWarpsQ_M == b.kWarpsQ_M && a.kWarpsQ_D == b.kWarpsQ_D &&
         a.kMinBlocksPerSm == b.kMinBlocksPerSm;
}

// Whether head_dim has a large config of its own (only then is a second kernel compiled).
constexpr bool bwd_has_large_tile(int head_dim) {
  return !(bwd_tile_config(head_dim, true) == bwd_tile_config(head_dim, false));
}

constexpr int kBwdStages = 2;  // Q/dO/LSE/D buffers

constexpr int bwd_smem_bytes(int head_dim, BwdTileConfig c) {
  // Q, dO (kBlockM x d) per stage, K, V (kBlockN x d), P^T, dS^T (kBlockN x kBlockM), and per
  // stage the fp32 LSE and D rows.
  return 2 * (2 * kBwdStages * c.kBlockM * head_dim + 2 * c.kBlockN * head_dim +
              2 * c.kBlockN * c.kBlockM) +
         kBwdStages * 2 * 4 * c.kBlockM;
}

template <int kHeadDim_, typename Element_, bool kLarge_ = false>
struct BwdTraits {
  using Element = Element_;
  static constexpr BwdTileConfig kC = bwd_tile_config(kHeadDim_, kLarge_);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kC.kBlockM, kBlockN = kC.kBlockN;
  static constexpr int kNWarps = kC.kNWarps, kNThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kC.kMinBlocksPerSm;

  // Per-warp tiles of each phase, in MMA units (16 rows, 8 columns).
  static constexpr int kSRows = kBlockN / kC.kWarpsS_N, kSCols = kBlockM / kC.kWarpsS_M;
  static constexpr int kKVRows = kBlockN / kC.kWarpsKV_N, kKVCols = kHeadDim / kC.kWarpsKV_D;
  static constexpr int kQRows = kBlockM / kC.kWarpsQ_M, kQCols = kHeadDim / kC.kWarpsQ_D;
  // Whether each warp's S-phase block (keys x all queries) is its dKV-phase A operand (the same
  // keys, reduced over the queries): then P^T and dS^T feed dV/dK from registers
  // (warp::to_a_fragments), and only dS^T goes through shared memory, for the dQ-phase.
  static constexpr bool kPInRegs = kC.kWarpsS_M == 1 && kC.kWarpsS_N == kC.kWarpsKV_N;
  static_assert(kC.kWarpsS_N * kC.kWarpsS_M == kNWarps && kC.kWarpsKV_N * kC.kWarpsKV_D == kNWarps &&
                    kC.kWarpsQ_M * kC.kWarpsQ_D == kNWarps,
                "each phase uses every warp");
  static_assert(kSRows % 16 == 0 && kSCols % 16 == 0 && kKVRows % 16 == 0 && kKVCols % 16 == 0 &&
                    kQRows % 16 == 0 && kQCols % 16 == 0,
                "warp tiles are whole 16 x 16 MMA pairs");

  // ---- shared memory (elements; the fp32 LSE and D rows come last) --------------------------
  // Stage s of Q starts at kSmemQ + s * kStageElems, of dO at kSmemDO + s * kStageElems.
  static constexpr int kStages = kBwdStages;
  static constexpr int kSwizzleCols = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kChunksPerRow = kSwizzleCols / 8;
  static constexpr int kColBlocks = kHeadDim / kSwizzleCols;
  static constexpr int kStageElems = kBlockM * kHeadDim;
  static constexpr int kSmemQ = 0;
  static constexpr int kSmemDO = kSmemQ + kStages * kStageElems;
  static constexpr int kSmemK = kSmemDO + kStages * kStageElems;
  static constexpr int kSmemV = kSmemK + kBlockN * kHeadDim;
  static constexpr int kSmemPt = kSmemV + kBlockN * kHeadDim;
  static constexpr int kSmemDSt = kSmemPt + kBlockN * kBlockM;
  // Per stage: kBlockM LSE (base 2), then kBlockM D, fp32.
  static constexpr int kSmemStats = kSmemDSt + kBlockN * kBlockM;
  static constexpr int kSmemBytes = 2 * kSmemStats + kStages * 2 * 4 * kBlockM;
  static_assert(kSmemBytes == bwd_smem_bytes(kHeadDim, kC), "layout and bwd_smem_bytes disagree");
  // P^T / dS^T tiles: kBlockM columns, swizzled in blocks of 64 or 32.
  static constexpr int kSwizzleColsP = kBlockM % 64 == 0 ? 64 : 32;
  static_assert(kBlockM % 32 == 0, "P^T/dS^T columns are whole swizzle blocks");

  static __device__ __forceinline__ int swizzle(int row) {
    return kChunksPerRow == 8 ? (row & 7) : ((row >> 1) & 3);
  }

  // Global -> shared copies (copy_sm80.h): thread tid copies chunk tid % kChunksPerRow of every
  // column block for rows tid / kChunksPerRow + i * kRowStep.
  static constexpr int kRowStep = kNThreads / kChunksPerRow;
  static_assert(kRowStep % 8 == 0 && kBlockM % kRowStep == 0 && kBlockN % kRowStep == 0,
                "tiles are whole copy passes that keep the swizzle phase");
};

// Whether a call runs the large config: it exists for the head dim and the device's opt-in shared
// memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) holds it.
constexpr bool bwd_use_large_tile(int head_dim, int smem_optin) {
  return bwd_has_large_tile(head_dim) &&
         bwd_smem_bytes(head_dim, bwd_tile_config(head_dim, true)) <= smem_optin;
}

// Counters of the deterministic dQ order: per query head, one per query block of every sequence.
FLASH_HOST_DEVICE int64_t bwd_semaphores_per_head(const BwdParams& p, int block_m) {
  return p.cu_seqlens_q != nullptr ? int64_t(p.total_q) / block_m + p.batch + 1
                                   : int64_t(p.batch) * ((p.seqlen_q + block_m - 1) / block_m);
}

}  // namespace sm80
FLASH_NAMESPACE_END
