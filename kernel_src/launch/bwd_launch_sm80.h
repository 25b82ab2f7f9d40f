// Owns: turning one backward call into the launches of the sm80 backward (bwd_kernel_sm80.h):
// D = rowsum(dO o O), the main kernel (masked or not, fast or general), the dQ conversion.
// Included by the generated instantiation files (one per head dim x dtype), which compile
// run_bwd_sm80<Element, kHeadDim>.
//
// Invariants: no device synchronisation and no allocation (the binding allocates and zero-fills
// the workspace in BwdParams); every CUDA error becomes a std::runtime_error naming what failed.
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../common/params.h"
#include "../sm80/bwd_kernel_sm80.h"
#include "../sm80/bwd_traits_sm80.h"
#include "static_switch.h"

FLASH_NAMESPACE_BEGIN

// The fast kernel serves a call unless it uses a feature only the general kernel has.
inline bool bwd_needs_general_kernel(const BwdParams& p) {
  return p.p_dropout > 0.0 || p.softcap > 0.0 || p.alibi_slopes != nullptr ||
         !(p.scale_log2 > 0.f) || !sm80::bwd_tensors_aligned(p);
}

// Key blocks per (sequence, K/V head) in the grid. Batched, or varlen with max_seqlen_k given:
// exact. Varlen without it: from the average length, and the CTAs loop (bwd_kernel_sm80) — except
// in deterministic mode, whose ordered dQ needs one CTA per key block.
inline int bwd_grid_key_blocks(const BwdParams& p, int block_n) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  int64_t keys = p.seqlen_k;
  const bool bounded = p.cu_seqlens_k == nullptr || p.seqlen_k < p.total_k || p.batch == 1;
  if (!bounded && !p.deterministic) {
    const int64_t avg = ceil_div(std::max<int64_t>(p.total_k, 1), int64_t(p.batch) * block_n);
    keys = std::min<int64_t>(p.total_k, (2 * avg + 1) * block_n);
  }
  const int64_t blocks = std::max<int64_t>(1, ceil_div(std::max<int64_t>(keys, 1), block_n));
  if (blocks > INT32_MAX) throw std::runtime_error("flash_attn CUDA: seqlen_k too large for the grid");
  return static_cast<int>(blocks);
}

template <typename Traits, bool Is_masked, bool Is_general>
void launch_bwd_sm80(BwdParams params, int smem_optin, cudaStream_t stream) {
  auto kernel = &sm80::bwd_kernel_sm80<Traits, Is_masked, Is_general>;
  // dQ by bulk reductions from a shared chunk (sm80/bwd_dq_sm80.h) where the kernel that runs is
  // sm90 code (the binary the runtime picked for this device) and the chunk fits beside the tiles;
  // FLASH_ATTN_BWD_DQ_ATOMIC=1 keeps the per-warp vector reductions (to compare the two).
  cudaFuncAttributes attr{};
  cuda_check(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes(sm80 backward)");
  constexpr int kSmemBulk = Traits::kSmemBytes + sm80::DqChunk<Traits>::kBytes;
  params.dq_bulk_reduce = !params.deterministic && attr.binaryVersion >= 90 &&
                          kSmemBulk <= smem_optin && !env_flag("FLASH_ATTN_BWD_DQ_ATOMIC");
  const int smem = params.dq_bulk_reduce ? kSmemBulk : Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  if (params.nheads > 65535) {  // nheads_k <= nheads: both grids' y
    throw std::runtime_error("flash_attn CUDA: nheads = " + std::to_string(params.nheads) +
                             " exceeds the 65535 heads the grid can address");
  }
  if (params.deterministic && params.batch > 65535) {
    throw std::runtime_error("flash_attn CUDA: deterministic backward supports batch <= 65535, got " +
                             std::to_string(params.batch));
  }
  const dim3 grid(bwd_grid_key_blocks(params, Traits::kBlockN), params.nheads_k,
                  std::min(params.batch, 65535));
  kernel<<<grid, Traits::kNThreads, smem, stream>>>(params);
  cuda_check(cudaGetLastError(), "launching the sm80 backward kernel");
}

template <typename Element, int kHeadDim, bool kLarge>
void run_bwd_sm80_tile(const BwdParams& params, int smem_optin, cudaStream_t stream) {
  using Traits = sm80::BwdTraits<kHeadDim, Element, kLarge>;
  if (Traits::kSmemBytes > smem_optin) {
    throw std::runtime_error(
        "flash_attn CUDA: the backward for head_dim " + std::to_string(params.head_dim) +
        " needs " + std::to_string(Traits::kSmemBytes) + " bytes of shared memory per block; this "
        "GPU offers " + std::to_string(smem_optin) +
        " (head dims above 128 need an A100/H100-class GPU for the backward)");
  }

  // D = rowsum(dO o O)
  constexpr int kDotWarps = 8;
  const int64_t pairs = sm80::q_rows(params) * params.nheads;
  if (pairs == 0) return;
  sm80::bwd_dot_do_o_kernel<Element, kDotWarps>
      <<<static_cast<unsigned>((pairs + kDotWarps - 1) / kDotWarps), kDotWarps * 32, 0, stream>>>(
          params);
  cuda_check(cudaGetLastError(), "launching the sm80 backward's dO.O kernel");

  // dK, dV, dQ accumulator
  const bool masked = params.window_left >= 0 || params.window_right >= 0;
  BOOL_SWITCH(masked, Is_masked, [&] {
    BOOL_SWITCH(bwd_needs_general_kernel(params), Is_general,
                [&] { launch_bwd_sm80<Traits, Is_masked, Is_general>(params, smem_optin, stream); });
  });

  // dQ: a CTA per (query block, query head, sequence), grid x from the rows' bound (varlen
  // without one: twice the average length, and the CTAs loop).
  int64_t rows = params.seqlen_q;
  if (params.cu_seqlens_q != nullptr && !varlen_rows_bounded(params)) {
    rows = 2 * ((int64_t(params.total_q) + params.batch - 1) / params.batch) + 1;
  }
  const int64_t m_blocks = std::max<int64_t>(1, (rows + Traits::kBlockM - 1) / Traits::kBlockM);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(m_blocks, INT32_MAX)), params.nheads,
                  std::min(params.batch, 65535));
  sm80::bwd_convert_dq_kernel<Traits><<<grid, Traits::kNThreads, 0, stream>>>(params);
  cuda_check(cudaGetLastError(), "launching the sm80 backward's dQ conversion");
}

template <typename Element, int kHeadDim>
void run_bwd_sm80(const BwdParams& params, cudaStream_t stream) {
  const int smem_optin = device_smem_optin();
  if constexpr (sm80::bwd_has_large_tile(kHeadDim)) {
    if (sm80::bwd_use_large_tile(kHeadDim, smem_optin)) {
      run_bwd_sm80_tile<Element, kHeadDim, true>(params, smem_optin, stream);
      return;
    }
  }
  run_bwd_sm80_tile<Element, kHeadDim, false>(params, smem_optin, stream);
}

FLASH_NAMESPACE_END
