// Owns: turning one forward call into a launch of the sm80 kernel: which variant (fast or general,
// masked or not, dropout or not) with its tile config (tile_size.h), the grid, the shared-memory
// attribute. Included by the generated instantiation files
// (one per head dim x dtype), which compile run_fwd_sm80<Element, kHeadDim>. Every tile config
// fits the smallest sm80+ shared memory (99 KB), so the choice does not depend on the device.
//
// Invariants: no device synchronisation and no allocation here (nothing beyond O and the LSE);
// every CUDA error becomes a std::runtime_error naming what failed.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../common/params.h"
#include "../sm80/fwd_kernel_sm80.h"
#include "../sm80/kernel_traits_sm80.h"
#include "../sm80/tile_size.h"
#include "fwd_dispatch_sm80.h"
#include "l2_sections.h"
#include "static_switch.h"

FLASH_NAMESPACE_BEGIN

// The fast kernel serves a call unless it uses a feature only the general kernel has.
inline bool needs_general_kernel(const FwdParams& p) {
  return p.p_dropout > 0.f || p.softcap > 0.f || p.alibi_slopes != nullptr ||
         p.block_table != nullptr || p.leftpad_k != nullptr || p.cache_batch_idx != nullptr ||
         p.p_ptr != nullptr || p.o_accum_ptr != nullptr || !(p.scale_log2 > 0.f) ||
         !sm80::tensors_aligned(p);
}

// Row blocks per (sequence, head) in the grid (see GridOrder). Batched: exact. Varlen: bounded by
// max_seqlen_q when given; when it is not (seqlen_q <= 0) or is only the trivial bound total_q,
// the grid is sized from the average length and the CTAs loop (fwd_kernel_sm80), so a packed
// batch of many short sequences does not launch batch x total_q / kBlockM idle CTAs.
inline int grid_row_blocks(const FwdParams& p, int block_m) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  int64_t rows = p.seqlen_q;
  if (p.cu_seqlens_q != nullptr) {
    if (!varlen_rows_bounded(p)) {
      const int64_t avg_blocks = ceil_div(std::max<int64_t>(p.total_q, 1), int64_t(p.batch) * block_m);
      rows = std::min<int64_t>(p.total_q, (2 * avg_blocks + 1) * block_m);
    }
  }
  return static_cast<int>(std::max<int64_t>(1, ceil_div(std::max<int64_t>(rows, 1), block_m)));
}

template <typename Traits, bool Is_masked, bool Is_general, bool Is_dropout>
void launch_fwd_sm80(const FwdParams& params, int num_sms, cudaStream_t stream) {
  auto kernel = &sm80::fwd_kernel_sm80<Traits, Is_masked, Is_general, Is_dropout>;
  constexpr int kSmem = Traits::kSmemBytes;
  if (kSmem > 48 * 1024) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  // Grid limits: x up to 2^31 - 1, y and z up to 65535 (CTAs loop over the row blocks and,
  // unmasked, the batch entries beyond them, fwd_kernel_sm80).
  const int row_blocks = grid_row_blocks(params, Traits::kBlockM);
  dim3 grid;
  if (Is_general && params.o_accum_ptr != nullptr) {  // split-KV (the splits of a block adjacent)
    if (params.nheads > 65535) {
      throw std::runtime_error("flash_attn CUDA: nheads = " + std::to_string(params.nheads) +
                               " exceeds the 65535 heads the grid can address");
    }
    const int rb = std::max(1, std::min(row_blocks, (1 << 30) / params.num_splits));
    grid = sm80::GridOrder::split(rb, params.num_splits, params.nheads,
                                  std::min(params.batch, 65535));
  } else if constexpr (Is_masked) {
    const int rb = std::min(row_blocks, 65535);
    const int64_t pairs = int64_t(params.nheads) * params.batch;
    // The q heads of one GQA group share their K/V in L2; grid z holds at most 65535 sections.
    const int group = std::max(1, params.nheads / std::max(1, params.nheads_k));
    const int64_t kv_bytes = l2_kv_bytes(params.seqlen_k, Traits::kHeadDim, group);
    grid = sm80::GridOrder::masked(
        rb, pairs, l2_section_pairs(pairs, kv_bytes, rb, num_sms, /*max_sections=*/65535));
  } else {
    if (params.nheads > 65535) {
      throw std::runtime_error("flash_attn CUDA: nheads = " + std::to_string(params.nheads) +
                               " exceeds the 65535 heads the grid can address");
    }
    grid = sm80::GridOrder::unmasked(row_blocks, params.nheads, std::min(params.batch, 65535));
  }
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(params);
  cuda_check(cudaGetLastError(), "launching the sm80 forward kernel");
}

template <typename Element, int kHeadDim, sm80::TileKind kKind, bool Is_general>
void launch_fwd_sm80_config(const FwdParams& params, int num_sms, cudaStream_t stream) {
  using Traits = typename sm80::TraitsFor<kHeadDim, kKind, Element>::type;
  const bool masked = params.window_left >= 0 || params.window_right >= 0;
  BOOL_SWITCH(masked, Is_masked, [&] {
    if constexpr (Is_general) {
      BOOL_SWITCH(params.p_dropout > 0.f, Is_dropout, [&] {
        launch_fwd_sm80<Traits, Is_masked, true, Is_dropout>(params, num_sms, stream);
      });
    } else {
      launch_fwd_sm80<Traits, Is_masked, false, false>(params, num_sms, stream);
    }
  });
}

// Short queries (one row block of the decode tile per sequence and head), and every split-KV
// call: the decode tile (tile_size.h). Never with dropout or S_dmask (fwd_cuda_num_splits does
// not split those either).
inline bool decode_shaped(const FwdParams& p) {
  if (p.p_dropout > 0.0 || p.p_ptr != nullptr) return false;
  if (p.o_accum_ptr != nullptr) return true;
  const bool bounded = p.cu_seqlens_q == nullptr || varlen_rows_bounded(p);
  return bounded && p.seqlen_q > 0 && p.seqlen_q <= 64;
}

template <typename Element, int kHeadDim>
void run_fwd_sm80(const FwdParams& params, int num_sms, cudaStream_t stream) {
  using sm80::TileKind;
  static_assert(sm80::tile_smem_bytes(kHeadDim, sm80::tile_config(kHeadDim, TileKind::kFast)) <=
                        sm80::kMinSmemOptin &&
                    sm80::tile_smem_bytes(kHeadDim,
                                          sm80::tile_config(kHeadDim, TileKind::kGeneral)) <=
                        sm80::kMinSmemOptin,
                "every config must fit the shared memory of every sm80+ GPU");
  static_assert(sm80::tile_smem_bytes(kHeadDim, sm80::tile_config(kHeadDim, TileKind::kDecode)) <=
                    sm80::kMinSmemOptin,
                "every config must fit the shared memory of every sm80+ GPU");
  if (decode_shaped(params)) {
    static_assert(sm80::tile_config(kHeadDim, TileKind::kDecode).kBlockM == 64,
                  "decode_shaped() counts rows in blocks of 64");
    using Traits = typename sm80::TraitsFor<kHeadDim, TileKind::kDecode, Element>::type;
    BOOL_SWITCH(params.window_left >= 0 || params.window_right >= 0, Is_masked, [&] {
      launch_fwd_sm80<Traits, Is_masked, true, false>(params, num_sms, stream);
    });
  } else if (needs_general_kernel(params)) {
    launch_fwd_sm80_config<Element, kHeadDim, TileKind::kGeneral, true>(params, num_sms, stream);
  } else {
    launch_fwd_sm80_config<Element, kHeadDim, TileKind::kFast, false>(params, num_sms, stream);
  }
}

FLASH_NAMESPACE_END
