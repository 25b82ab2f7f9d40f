// Owns: every tile-size decision of the sm80 forward, in one constexpr function (FA3's
// tile_size.h). The launch code picks a TileKind at run time from the features in use; the
// instantiations compile exactly the configs returned here.
//
// Invariants checked by the traits (kernel_traits_sm80.h): kBlockM = kNWarps * kRowsPerWarp with
// kRowsPerWarp a multiple of 16 (each warp owns whole 16-row MMA tiles of Q: "split-Q", no
// inter-warp reduction), kBlockN a multiple of 16; and by the launch: Q + kStages x (K + V) in
// shared memory fits kMinSmemOptin. Evidence for each choice: docs/tuning.md.
#pragma once
#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

struct TileConfig {
  int kBlockM;   // query rows per CTA
  int kBlockN;   // keys per main-loop iteration
  int kNWarps;   // warps per CTA; each owns kBlockM / kNWarps query rows
  int kStages;   // K/V shared-memory stages (1: FA2's single buffer, 2: double buffer)
};
// What every config shares (fixed by the tuning of docs/tuning.md, plain code in the kernel):
// Q fragments read from shared memory at each k-step, the lazy O rescale (threshold 2^8) skipped
// when no row max of a warp moved, softmax row sums on the tensor cores unless dropout is on,
// and a 1-block/SM __launch_bounds__ hint.

enum class TileKind : int {
  kFast = 0,     // the hot path (no dropout, softcap, ALiBi, paging): tuned on H100/H200
  kGeneral = 1,  // every feature, 4 warps x 16 rows
  kDecode = 2,   // the general kernel for short queries (one row block per sequence and head,
                 // split-KV): memory-bound, so K/V double-buffered
};

// The smallest dynamic shared-memory limit among sm80+ GPUs (sm86/sm89: 99 KB): every config
// below fits it (static_assert in fwd_launch_sm80.h), so one set of kernels runs on all of them.
constexpr int kMinSmemOptin = 99 * 1024;

// Shared-memory bytes of a config for 2-byte elements.
constexpr int tile_smem_bytes(int head_dim, TileConfig c) {
  return 2 * head_dim * (c.kBlockM + 2 * c.kStages * c.kBlockN);
}

constexpr TileConfig tile_config(int head_dim, TileKind kind) {
  if (kind == TileKind::kFast) {
    // Measured on H200 (docs/tuning.md, tune2..tune8). Field order: kBlockM, kBlockN, kNWarps,
    // kStages.
    // 32/64: 4 warps x 32 rows, 128 keys per tile (O is only 32/64 registers, so the 128x128 S
    // tile fits; longer rows amortise the softmax bookkeeping), K/V double-buffered
    // (64: 1.09-1.14x SDPA-flash; 128x64 with Q in registers 1.05-1.11x).
    if (head_dim <= 64) return {128, 128, 4, 2};
    // 96/128: 4 warps x 32 rows (each K/V fragment read from shared memory feeds two row tiles),
    // FA2's single K/V buffer with two barriers per tile: 255 registers x 128 threads = 2 CTAs/SM
    // (128: 1.06-1.15x; 2 stages spilled more and measured 0.93-1.05x; 8 warps x 16 rows 0.84-0.97x).
    if (head_dim <= 128) return {128, 64, 4, 1};
    // 192/256: the O accumulator alone is 96/128 registers, so 16 rows per warp; FA2's H100
    // choice, 64 x 64 with 4 warps and one stage (96 KB at 256), gives 2 CTAs/SM, whose
    // prologues and epilogues overlap each other's main loops (256: 1.03-1.12x; 128 x 64 with
    // 8 warps, 1 CTA/SM: 0.94-1.14x).
    return {64, 64, 4, 1};
  }
  // kDecode: the general kernel's rows, with two K/V stages at every head dim so that a tile's
  // copies (and paged lookups) overlap the previous tile's math: a decode step only streams K/V.
  // (64 x 128 up to 64 columns, for 32 KB of K/V per stage, spilled ~250 bytes and measured
  // slower: benchmarks/results/tuning/h200-decode-dda1cef.json, docs/cuda_decode.md.)
  if (kind == TileKind::kDecode) {
    if (head_dim <= 128) return {64, 64, 4, 2};  // 80 KB at 128
    return {64, 32, 4, 2};                       // 96 KB at 256
  }
  // kGeneral: 4 warps x 16 rows, so the registers left beside S and O absorb the feature code
  // (softcap, ALiBi, Philox, paged addressing) without spilling.
  if (head_dim <= 64) return {64, 64, 4, 2};     // 40 KB
  if (head_dim <= 128) return {64, 64, 4, 1};    // 48 KB
  return {64, 32, 4, 1};                         // <= 64 KB at 256
}

// A config as a type, the one tile parameter of the kernel traits (kernel_traits_sm80.h): the
// shipped kernels use ShippedTile; the tuning harness (benchmarks/tune_fwd.py) passes its own
// type with a kConfig member.
template <int kHeadDim, TileKind kKind>
struct ShippedTile {
  static constexpr TileConfig kConfig = tile_config(kHeadDim, kKind);
};

}  // namespace sm80
FLASH_NAMESPACE_END
