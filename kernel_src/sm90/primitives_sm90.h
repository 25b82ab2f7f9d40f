// Owns: the Hopper hardware primitives of the sm90a forward, one small inline-PTX wrapper each:
// mbarriers (init, arrive, expect-tx, parity wait), the tensor-memory-access bulk copy
// (cp.async.bulk.tensor, 4-d, completing on an mbarrier), warpgroup MMA bookkeeping (fence,
// commit, wait) and shared-memory matrix descriptors, register reallocation (setmaxnreg) and
// named barriers. The MMAs themselves are in wgmma_sm90.h (generated).
//
// Invariants:
// * Shared-memory addresses are 32-bit `.shared` addresses (smem_u32).
// * Tiles read by wgmma are written by TMA with the 128-byte swizzle: rows of 64 elements (128 B),
//   8-row atoms of 1024 B, each tile 1024-byte aligned, so descriptors carry base offset 0.
#pragma once
#include <cstdint>

#include "../common/cuda_primitives.h"
#include "../common/namespace.h"

FLASH_NAMESPACE_BEGIN
namespace sm90 {

using cuda::smem_u32;  // (common/cuda_primitives.h)

// ---- mbarriers ----------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}

// Makes the initialised barriers visible to the async proxy (TMA) and the other threads; the
// caller follows it with __syncthreads().
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// One arrival that also announces `bytes` of TMA traffic the phase must wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}

// Blocks until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// ---- tensor memory access -----------------------------------------------------------------------

// Copies the box at coordinates (c0 innermost .. c3) of the tensor map into shared memory; the
// bytes complete on `bar`. `tmap` is the generic address of a __grid_constant__ CUtensorMap.
__device__ __forceinline__ void tma_load_4d(void* dst, const void* tmap, uint64_t* bar, int c0,
                                            int c1, int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5, %6}], [%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2),
      "r"(c3)
      : "memory");
}

__device__ __forceinline__ void tma_prefetch_descriptor(const void* tmap) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}

using cuda::fence_proxy_async_shared;  // (common/cuda_primitives.h)

// ---- warpgroup MMA bookkeeping ------------------------------------------------------------------

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accesses of an accumulator register across the asynchronous
// MMA that owns it (CUTLASS's warpgroup_fence_operand does the same).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address, leading
// and stride byte offsets (all >> 4), swizzle mode 1 = 128 B in bits 62-63.
//   K-major tile (rows of 64 elements, K contiguous): LBO unused (1), SBO = 1024 (8-row atoms).
//   MN-major tile (B = V: keys x head dim, N contiguous): LBO = bytes between 64-column blocks
//   of N, SBO = 1024 (8 keys).
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// ---- warp specialisation ------------------------------------------------------------------------

template <int kRegs>
__device__ __forceinline__ void regs_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void regs_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace sm90
FLASH_NAMESPACE_END
