// Owns: the hardware primitives of the Ampere-class path, one tiny inline-PTX wrapper each:
// tensor-core MMA (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate), shared-memory matrix loads
// (ldmatrix x4, plain and transposed), asynchronous global->shared copies (cp.async 16 B and 4 B with
// zero-fill, commit/wait_group); the fast exp2, fp16x2/bf16x2 packing, quad reductions and
// smem_u32 shared with the Hopper path come from common/cuda_primitives.h.
//
// Invariants:
// * Nothing here allocates or synchronises a block; functions that need the whole warp to take
//   part say so and live in namespace warp (ThunderKittens' convention).
// * Shared-memory addresses are 32-bit `.shared` addresses (cvta'd once by the caller through
//   smem_u32), global addresses are generic pointers.
// * Register fragment layouts are the PTX ISA's ("Matrix Fragments for mma.m16n8k16"): with
//   g = lane / 4 and t = lane % 4, the A fragment holds (row g | g+8, cols 2t, 2t+1 | +8), the B
//   fragment (k = 2t, 2t+1 | +8, n = g) and the fp32 C fragment (row g | g+8, cols 2t, 2t+1).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/cuda_primitives.h"
#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

// ---- element types ----------------------------------------------------------------------------

// What the MMA and the conversions need to know about the input type.
template <typename Element>
struct ElementTraits;

template <>
struct ElementTraits<__half> {
  static constexpr bool kIsBf16 = false;
};
template <>
struct ElementTraits<__nv_bfloat16> {
  static constexpr bool kIsBf16 = true;
};

// ---- addresses ----------------------------------------------------------------------------------

using cuda::smem_u32;

// threadIdx.x read through volatile asm. The kernel loops over row blocks (persistent-style), so
// everything computed from threadIdx.x is loop-invariant there and the compiler hoists it to the
// kernel entry, where dozens of per-lane epilogue offsets then stay live through the main loop
// and spill (measured: 376 B of spills at head dim 128, 80 B with this). Reading the index inside
// the row block keeps those computations where they are used.
__device__ __forceinline__ int thread_index_in_block() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
  return tid;
}

// ---- tensor cores -------------------------------------------------------------------------------

// D = A * B + D for one 16x8x16 tile; A row-major (4 regs), B column-major (2 regs), D fp32 (4).
template <typename Element>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
  if constexpr (ElementTraits<Element>::kIsBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- shared-memory matrix loads ----------------------------------------------------------------

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i of each
// lane receives (row lane/4, cols 2*(lane%4), +1) of matrix i. Whole warp.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// Same, each matrix transposed: register i receives (rows 2*(lane%4), +1, col lane/4). Used for
// V, stored key-major, as the B operand of O += P V. Whole warp.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// ---- asynchronous copies -----------------------------------------------------------------------

// 16 bytes global -> shared, bypassing L1 (.cg). When !pred nothing is read and the 16 bytes are
// zero-filled (src-size 0), so rows past the end of a sequence become zeros, never garbage.
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_size));
}

// 4 bytes global -> shared (through L1: .cg takes 16-byte copies only), zero-filled when !pred.
__device__ __forceinline__ void cp_async_4(uint32_t smem_addr, const void* gmem, bool pred) {
  const int src_size = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_size));
}

// Closes the group of cp.async issued since the last commit (an empty group is legal).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N committed groups are still in flight (this thread's copies only: a
// __syncthreads must follow before other threads read the data).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// CTA-wide barrier 0 without .aligned (PTX `barrier.sync`; __syncthreads is `bar.sync`, i.e.
// `barrier.sync.aligned`, which every thread must reach at the same instruction). Warps may
// arrive here from different call sites, as the main loop's warps do when their rows see none of
// a key tile (compute-sanitizer synccheck flags the aligned form there). Same memory ordering as
// __syncthreads for the shared-memory accesses before it; measured at parity with it on the H200
// (docs/tuning.md, tune12).
__device__ __forceinline__ void cta_barrier() { asm volatile("barrier.sync 0;\n" ::: "memory"); }

// ---- arithmetic --------------------------------------------------------------------------------

using cuda::exp2_approx;  // (common/cuda_primitives.h)
using cuda::Exp2Approx;
using cuda::pack2;

using cuda::to_float;

namespace warp {
using cuda::warp::quad_max;
using cuda::warp::quad_sum;
}  // namespace warp
}  // namespace sm80
FLASH_NAMESPACE_END
