// Owns: every tile-size decision of the sm80 forward, in one constexpr function (FA3's
// tile_size.h). The launch code picks a TileKind at run time from the device's shared-memory
// limit and the features in use; the instantiations compile exactly the configs returned here.
//
// Invariants checked by the traits (kernel_traits_sm80.h): kBlockM = 16 * kNWarps * kMmaRowsPerWarp
// (each warp owns whole 16-row MMA tiles of Q: "split-Q", no inter-warp reduction), kBlockN a
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
    // 4 warps x 32 rows: each K/V fragment read from shared memory feeds two MMA row tiles,
    // halving shared-memory traffic per FLOP against 16-row warps (the bound at this size).
    // Double-buffered K/V keep the next tile's copy a whole iteration ahead.
    if (head_dim <= 32) return {128, 128, 4, 2};   // 80 KB; S tile 32x128 is cheap in registers
    if (head_dim <= 64) return {128, 128, 4, 2};   // 96 KB; softmax-heavy: long rows amortise
    if (head_dim <= 96) return {128, 64, 4, 2};    // 120 KB
    if (head_dim <= 128) return {128, 64, 4, 2};   // 96 KB -> 2 CTAs/SM on sm90 (228 KB)
    // 192/256: the O accumulator alone is 96/128 regs per thread at 16 rows per warp, so 8 warps
    // x 16 rows; one K/V stage keeps 2 CTAs... no: 1 CTA/SM either way, so two stages.
    if (head_dim <= 192) return {128, 64, 8, 2};   // 144 KB
    return {128, 64, 8, 2};                        // 192 KB (sm80: 163 KB -> kSmallSmem)
  }
  if (kind == TileKind::kGeneral) {
    // Portable: <= 99 KB dynamic shared memory at every head dim (sm86/sm89 limit), 4 warps.
    if (head_dim <= 64) return {64, 64, 4, 2};     // 40 KB
    if (head_dim <= 128) return {64, 64, 4, 1};    // 48 KB
    return {64, 32, 4, 1};                         // <= 64 KB at 256
  }
  // kSmallSmem: the fast path squeezed under 99 KB (sm86/sm89) or 163 KB (sm80).
  if (head_dim <= 64) return {128, 64, 4, 2};      // 64 KB
  if (head_dim <= 128) return {128, 64, 4, 1};     // 64 KB
  if (head_dim <= 192) return {64, 64, 4, 1};      // 72 KB
  return {64, 64, 4, 1};                           // 96 KB
}

}  // namespace sm80
FLASH_NAMESPACE_END
