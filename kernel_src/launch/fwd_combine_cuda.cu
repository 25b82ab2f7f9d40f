// Owns: run_fwd_combine_cuda, the combine step of split-KV (common/split_kv.h): the partials
// (O_s, lse_s) of every (query row, head) merged into O (input dtype, params' strides) and the LSE,
// with merge_lse of common/softmax_state.h, the same merge the tests check on the CPU.
//
// One CTA per (row, head), grid-strided: warp 0 reduces the split LSEs (lane s holds splits s,
// s + 32, ...; then a butterfly of merge_lse) and leaves the weights exp(lse_s - lse) in shared
// memory; then every warp sums a quarter of the splits, each lane four adjacent columns (one
// 16-byte load per split, kUnroll loads in flight), and the warps' sums meet in shared memory.
// A decode call has few (row, head) items and up to kMaxSplits splits: the loads of one item
// must be spread over many threads and issued together, or the merge is a chain of dependent
// L2 round trips (a warp per item and one column per lane took 100 us of a 115 us decode call:
// docs/cuda_decode.md). Arch-neutral (plain loads and stores), compiled for every CUDA target.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../common/softmax_state.h"
#include "../common/split_kv.h"
#include "flash_api_cuda.h"
#include "head_dims.h"  // kMaxHeadDim

FLASH_NAMESPACE_BEGIN

namespace {

constexpr int kWarps = 4;
constexpr int kUnroll = 8;                       // splits in flight per warp
constexpr int kMaxChunks = (kMaxHeadDim + 3) / 4;  // float4 column chunks of the widest row

template <typename Element>
__global__ void __launch_bounds__(kWarps * 32)
    combine_kernel(const __grid_constant__ FwdParams p) {
  __shared__ float weights[kMaxSplits];
  __shared__ float4 sums[kWarps][kMaxChunks];
  __shared__ float merged_lse;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const PartialLayout layout(p);
  const int splits = p.num_splits;
  const int chunks = (p.head_dim + 3) / 4;  // the o_accum width is a multiple of 8: in bounds
  const int64_t items = layout.rows * p.nheads;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
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

    if (warp == 0) {
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
        weights[s] = ls == -INFINITY ? 0.f : __expf(ls - lse);
      }
      if (lane == 0) merged_lse = lse;
    }
    __syncthreads();

    // Warp w sums splits w, w + kWarps, ...; a split of weight 0 (no key, or a partial never
    // written) is selected away, not multiplied, so its contents cannot reach O.
    for (int c = lane; c < chunks; c += 32) {
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int s0 = warp; s0 < splits; s0 += kWarps * kUnroll) {
        float4 v[kUnroll];
        float w[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
          const int s = s0 + j * kWarps;
          w[j] = s < splits ? weights[s] : 0.f;
          v[j] = w[j] != 0.f ? reinterpret_cast<const float4*>(
                                   p.o_accum_ptr + layout.o_offset(s, row, head, p.nheads))[c]
                             : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
          acc.x += w[j] * v[j].x;
          acc.y += w[j] * v[j].y;
          acc.z += w[j] * v[j].z;
          acc.w += w[j] * v[j].w;
        }
      }
      sums[warp][c] = acc;
    }
    __syncthreads();

    Element* out = static_cast<Element*>(p.o_ptr) + o_off;
    for (int c = threadIdx.x; c < chunks; c += kWarps * 32) {
      float col[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        col[0] += sums[w][c].x;
        col[1] += sums[w][c].y;
        col[2] += sums[w][c].z;
        col[3] += sums[w][c].w;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (4 * c + e < p.head_dim) out[4 * c + e] = static_cast<Element>(col[e]);
      }
    }
    // No key at all: the output convention's +inf (O is 0: every weight was 0).
    if (threadIdx.x == 0) {
      p.softmax_lse_ptr[lse_idx] = merged_lse == -INFINITY ? INFINITY : merged_lse;
    }
    __syncthreads();  // the next item overwrites the weights and sums
  }
}

}  // namespace

void run_fwd_combine_cuda(const FwdParams& p, cudaStream_t stream) {
  const int64_t items = PartialLayout(p).rows * p.nheads;
  if (items <= 0) return;
  const int blocks = static_cast<int>(std::min<int64_t>(items, 1 << 16));
  if (p.dtype == DType::kBFloat16) {
    combine_kernel<__nv_bfloat16><<<blocks, kWarps * 32, 0, stream>>>(p);
  } else {
    combine_kernel<__half><<<blocks, kWarps * 32, 0, stream>>>(p);
  }
  cuda_check(cudaGetLastError(), "launching the split-KV combine kernel");
}

FLASH_NAMESPACE_END
