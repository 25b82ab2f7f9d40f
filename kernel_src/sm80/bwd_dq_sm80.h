// Owns: the fp32 dQ accumulator of the sm80 backward: its blocked layout and the adds of one (query
// head, query block) contribution from the dQ-phase fragments (bwd_kernel_sm80.h converts it
// to dQ).
//
// Layout (BwdParams::dq_accum_ptr, zero-filled by the caller, bwd_dq_accum_elems floats): per
// query head, one chunk of kBlockM x kHeadDim floats per query block of every sequence; the chunk
// of (sequence b, block m) has the index of the deterministic mode's counter (sem_base + m,
// bwd_semaphores_per_head chunks per head). Inside a chunk the order is the dQ-phase's fragment
// order [warp][mi][nj][lane][4] (DqChunk), not rows x columns: each warp then adds, or stores,
// 512 contiguous bytes per instruction, and a CTA's whole contribution is one contiguous range.
// Rows past the sequence's end hold zeros (their dS is zero) and are never read.
//
// The adds (one per key block and query block):
// * sm90 and later, default mode: the warps store their fragments to a shared-memory copy of the
//   chunk (conflict-free 16-byte stores) and one thread adds the whole chunk with one bulk
//   reduction (cp.reduce.async.bulk .add.f32, PTX ISA), executed by the copy engine, as
//   FlashAttention-3 adds its dQ. Per-warp reductions instead held the warps' registers while
//   the load/store queue drained them (docs/cuda_bwd.md).
// * otherwise (sm80-sm89, and the deterministic mode's ordered adds): each warp adds its
//   fragments with vector reductions (red.global.add.v4.f32 on sm90, scalar atomics before).
#pragma once
#include <cstdint>

#include "../common/cuda_primitives.h"
#include "../common/params.h"
#include "bwd_traits_sm80.h"
#include "primitives.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

// ---- bulk reductions from shared memory (sm90+; PTX ISA, "cp.reduce.async.bulk") -------------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FLASH_BWD_BULK_DQ 1
#else
#define FLASH_BWD_BULK_DQ 0
#endif

// global[0 : bytes) += shared[0 : bytes) (fp32), asynchronously; bytes a multiple of 16, both
// addresses 16-byte aligned.
__device__ __forceinline__ void bulk_reduce_add_f32(float* gmem, uint32_t smem, uint32_t bytes) {
#if FLASH_BWD_BULK_DQ
  asm volatile(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gmem),
      "r"(smem), "r"(bytes)
      : "memory");
#else
  (void)gmem, (void)smem, (void)bytes;
  __trap();
#endif
}
__device__ __forceinline__ void bulk_commit() {
#if FLASH_BWD_BULK_DQ
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}
// Until this thread's bulk groups have read their shared-memory sources (the buffer may be
// rewritten) / have completed.
__device__ __forceinline__ void bulk_wait_read_all() {
#if FLASH_BWD_BULK_DQ
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void bulk_wait_all() {
#if FLASH_BWD_BULK_DQ
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

// dst[0..3] += v[0..3], dst 16-byte aligned: one vector reduction on sm90 (PTX `red`, not a
// returning atomic), four scalar atomics before.
__device__ __forceinline__ void atomic_add4(float* dst, const float (&v)[4]) {
#if FLASH_BWD_BULK_DQ
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(v[0]),
               "f"(v[1]), "f"(v[2]), "f"(v[3])
               : "memory");
#else
#pragma unroll
  for (int e = 0; e < 4; ++e) atomicAdd(dst + e, v[e]);
#endif
}

// One chunk's fragment order, for the dQ-phase warp grid of Traits.
template <typename Traits>
struct DqChunk {
  static constexpr int kQ16 = Traits::kQRows / 16, kQ8 = Traits::kQCols / 8;
  static constexpr int kWarpElems = kQ16 * kQ8 * 128;  // a warp's fragments: 32 lanes x 4 each
  static constexpr int kElems = Traits::kBlockM * Traits::kHeadDim;
  static constexpr int kBytes = 4 * kElems;
  static_assert(kWarpElems * Traits::kNWarps == kElems, "the warps' fragments tile the chunk");

  // Float offset of the lane's fragment (mi, nj) in the chunk.
  static __device__ __forceinline__ int offset(int warp, int mi, int nj, int lane) {
    return warp * kWarpElems + (mi * kQ8 + nj) * 128 + lane * 4;
  }

  // Adds the warp's fragments to the chunk in global memory.
  static __device__ __forceinline__ void add(float* chunk, const float (&acc)[kQ16][kQ8][4],
                                             int warp, int lane) {
#pragma unroll
    for (int mi = 0; mi < kQ16; ++mi)
#pragma unroll
      for (int nj = 0; nj < kQ8; ++nj) atomic_add4(chunk + offset(warp, mi, nj, lane), acc[mi][nj]);
  }

  // Stores the warp's fragments into a shared-memory copy of the chunk.
  static __device__ __forceinline__ void store(float* smem_chunk, const float (&acc)[kQ16][kQ8][4],
                                               int warp, int lane) {
#pragma unroll
    for (int mi = 0; mi < kQ16; ++mi)
#pragma unroll
      for (int nj = 0; nj < kQ8; ++nj) {
        *reinterpret_cast<float4*>(smem_chunk + offset(warp, mi, nj, lane)) =
            make_float4(acc[mi][nj][0], acc[mi][nj][1], acc[mi][nj][2], acc[mi][nj][3]);
      }
  }
};

// The chunk of (query head h, query block m_block) of the sequence whose first chunk is
// sem_base (BwdSeq); per_head = bwd_semaphores_per_head(p, kBlockM).
template <typename Traits>
__device__ __forceinline__ float* dq_chunk(const BwdParams& p, int64_t per_head, int h,
                                           int64_t sem_base, int m_block) {
  return p.dq_accum_ptr + (h * per_head + sem_base + m_block) * DqChunk<Traits>::kElems;
}

}  // namespace sm80
FLASH_NAMESPACE_END
