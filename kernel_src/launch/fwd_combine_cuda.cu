// Owns: run_fwd_combine_cuda, the combine step of split-KV (common/split_kv.h): the partials
// (O_s, lse_s) of every (query row, head) merged into O (input dtype, params' strides) and the LSE,
// with merge_lse of common/softmax_state.h, the same merge the tests check on the CPU.
//
// One warp per (row, head): the lanes first reduce the split LSEs (lane s holds splits s, s + 32,
// ...; then a butterfly of merge_lse), the weights exp(lse_s - lse) go through shared memory, and
// each lane sums its columns over the splits. Arch-neutral (plain loads and stores), compiled for
// every CUDA target of the build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../common/softmax_state.h"
#include "../common/split_kv.h"
#include "flash_api_cuda.h"

FLASH_NAMESPACE_BEGIN

namespace {

constexpr int kWarps = 4;

template <typename Element>
__global__ void __launch_bounds__(kWarps * 32)
    combine_kernel(const __grid_constant__ FwdParams p) {
  __shared__ float weights[kWarps][kMaxSplits];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const PartialLayout layout(p);
  const int splits = p.num_splits;
  const int64_t items = layout.rows * p.nheads;
  for (int64_t item = int64_t(blockIdx.x) * kWarps + warp; item < items;
       item += int64_t(gridDim.x) * kWarps) {
    const int64_t row = item / p.nheads;
    const int head = static_cast<int>(item % p.nheads);
    // Where this (row, head) lives in O and the LSE (params.h layouts).
    int64_t lse_idx, o_off;
    if (p.cu_seqlens_q != nullptr) {
      lse_idx = int64_t(head) * p.total_q + row;
      o_off = row * p.o_row_stride + head * p.o_head_stride;
    } else {
      const int64_t b = row / p.seqlen_q, i = row % p.seqlen_q;
      lse_idx = (b * p.nheads + head) * p.seqlen_q + i;
      o_off = b * p.o_batch_stride + i * p.o_row_stride + head * p.o_head_stride;
    }

    // The merged LSE: each lane folds its splits, then a butterfly over the lanes.
    float lse = -INFINITY, wa, wb;
    for (int s = lane; s < splits; s += 32) {
      lse = merge_lse(lse, p.lse_accum_ptr[s * layout.lse_numel + lse_idx], &wa, &wb);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      lse = merge_lse(lse, __shfl_xor_sync(0xffffffffu, lse, offset), &wa, &wb);
    }
    for (int s = lane; s < splits; s += 32) {
      const float ls = p.lse_accum_ptr[s * layout.lse_numel + lse_idx];
      weights[warp][s] = ls == -INFINITY ? 0.f : __expf(ls - lse);
    }
    __syncwarp();

    Element* out = static_cast<Element*>(p.o_ptr) + o_off;
    for (int col = lane; col < p.head_dim; col += 32) {
      float acc = 0.f;
      for (int s = 0; s < splits; ++s) {
        const float w = weights[warp][s];
        if (w != 0.f) acc += w * p.o_accum_ptr[layout.o_offset(s, row, head, p.nheads) + col];
      }
      out[col] = static_cast<Element>(acc);
    }
    // No key at all: the output convention's +inf (O is 0: every weight was 0).
    if (lane == 0) p.softmax_lse_ptr[lse_idx] = lse == -INFINITY ? INFINITY : lse;
    __syncwarp();  // the weights of the next item overwrite these
  }
}

}  // namespace

void run_fwd_combine_cuda(const FwdParams& p, cudaStream_t stream) {
  const int64_t items = PartialLayout(p).rows * p.nheads;
  if (items <= 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>((items + kWarps - 1) / kWarps, 1 << 16));
  if (p.dtype == DType::kBFloat16) {
    combine_kernel<__nv_bfloat16><<<blocks, kWarps * 32, 0, stream>>>(p);
  } else {
    combine_kernel<__half><<<blocks, kWarps * 32, 0, stream>>>(p);
  }
  cuda_check(cudaGetLastError(), "launching the split-KV combine kernel");
}

FLASH_NAMESPACE_END
