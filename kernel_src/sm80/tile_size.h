// Owns: every tile-size decision of the sm80 forward, in one constexpr function (FA3's
// tile_size.h). The launch code picks a TileKind at run time from the device's shared-memory
// limit and the features in use; the instantiations compile exactly the configs returned here.
//
// Invariants checked by the traits (kernel_traits_sm80.h): kBlockM = kNWarps * kRowsPerWarp with
// kRowsPerWarp a multiple of 16 (each warp owns whole 16-row MMA tiles of Q: "split-Q", no
// inter-warp reduction), kBlockN a
// multiple of 16, and the shared memory of Q + kStages x (K + V) within the TileKind's budget.
// Evidence for each choice: docs/tuning.md.
#pragma once
#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

struct TileConfig {
  int kBlockM;   // query rows per CTA
  int kBlockN;   // keys per main-loop iteration
  int kNWarps;   // warps per CTA; each owns kBlockM / kNWarps query rows
  int kStages;   // K/V shared-memory stages (1: FA2's single buffer, 2: double buffer)
  bool kQInRegs = false;     // keep the warp's Q fragments in registers
  bool kSkipRescale = true;  // skip the O rescale when no row max of the warp moved
  int kMinBlocksPerSm = 1;   // __launch_bounds__ occupancy hint
  int kRescaleThreshold = 8;  // lazy O rescale: move the softmax reference when max grows > 2^8
  bool kQKSplitM = false;     // S = Q K^T row tile by row tile (softmax of tile 0 under tile 1)
  bool kPipelineQK = false;   // S of the next tile under the softmax of this one (2 stages)
  bool kSumByMma = true;      // softmax row sums on the tensor cores (P times ones)
};

enum class TileKind : int {
  kFast = 0,     // the hot path (no dropout, softcap, ALiBi, paging): tuned on H100/H200
  kGeneral = 1,  // every feature; fits the 99 KB of sm86/sm89 so it runs on every sm80+ GPU
  kSmallSmem = 2,  // the hot path for GPUs whose kFast config exceeds their shared memory
};

// Shared-memory bytes of a config for 2-byte elements.
constexpr int tile_smem_bytes(int head_dim, TileConfig c) {
  return 2 * head_dim * (c.kBlockM + 2 * c.kStages * c.kBlockN);
}

constexpr TileConfig tile_config(int head_dim, TileKind kind) {
  if (kind == TileKind::kFast) {
    // Measured on H200 (docs/tuning.md, tune2): 4 warps x 32 query rows beat 8 warps x 16 rows
    // everywhere (each K/V fragment read from shared memory feeds two MMA row tiles, and 255
    // registers x 128 threads still fits 2 CTAs/SM). Field order: kBlockM, kBlockN, kNWarps,
    // kStages, kQInRegs.
    // 32/64: O is only 32/64 registers, so Q fits in registers next to a 128x64 S tile; the
    // double-buffered K/V (2 stages) then hides the copies (64: 1.00-1.03x SDPA-flash).
    if (head_dim <= 64) return {128, 64, 4, 2, true};
    // 96/128: O takes 96/128 registers; FA2's single K/V buffer with two barriers per tile
    // spilled least and measured best (128: 0.96-1.03x; 2 stages 0.93-0.99x; kBlockN 32 worse).
    if (head_dim <= 128) return {128, 64, 4, 1};
    // 192/256: 16 rows per warp (O alone is 96/128 registers); one K/V stage measured best
    // (256: 0.89-1.14x) and fits 99 KB at 192 (sm86/sm89), 128 KB at 256 (sm80: 163 KB).
    return {128, 64, 8, 1};
  }
  if (kind == TileKind::kGeneral) {
    // Portable: <= 99 KB dynamic shared memory at every head dim (sm86/sm89 limit), 4 warps x
    // 16 rows, so the registers left beside S and O absorb the feature code (softcap, ALiBi,
    // Philox, paged addressing) without spilling.
    if (head_dim <= 64) return {64, 64, 4, 2};     // 40 KB
    if (head_dim <= 128) return {64, 64, 4, 1};    // 48 KB
    return {64, 32, 4, 1};                         // <= 64 KB at 256
  }
  // kSmallSmem: the fast path where kFast exceeds the device's shared memory (256 on sm86/sm89).
  return {64, 64, 4, 1};                           // 96 KB at 256
}

}  // namespace sm80
FLASH_NAMESPACE_END
