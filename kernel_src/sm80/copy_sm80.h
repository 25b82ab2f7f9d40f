// Owns: data movement between global and shared memory for the sm80 forward: the Q/K/V tile
// loads (16-byte cp.async into the swizzled layout of kernel_traits_sm80.h, or a scalar fallback
// for tensors whose base pointer, strides or head dim are not 16-byte aligned) and the O tile
// store (fragments -> shared -> 16-byte coalesced global stores).
//
// Invariants:
// * Rows at or past `valid_rows` and head-dim columns at or past `head_dim` are written as zeros
//   in shared memory, never read from global memory: ragged tiles need no other predicate, and
//   zero K/V rows keep 0 * garbage = NaN out of P V.
// * A tile's rows are addressed through a RowAddr functor, so paged K/V (a block-table lookup
//   per row, any page size) and contiguous rows share one loader.
// * All functions are called by every thread of the CTA (they split the tile by thread index).
#pragma once
#include <cstdint>

#include "../common/params.h"
#include "kernel_traits_sm80.h"
#include "primitives.h"

FLASH_NAMESPACE_BEGIN
namespace sm80 {

// Whether a tensor allows the 16-byte copies (kAligned below): base pointer 16-byte aligned and
// strides multiples of 8 elements.
FLASH_HOST_DEVICE bool tensor_aligned16(const void* ptr, int64_t batch_stride, int64_t row_stride,
                                        int64_t head_stride) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0 &&
         ((batch_stride | row_stride | head_stride) & 7) == 0;
}

// Q, K and V all allow them, and the head dim is a multiple of 8 elements.
FLASH_HOST_DEVICE bool qkv_aligned16(const FwdParams& p) {
  return tensor_aligned16(p.q_ptr, p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
         tensor_aligned16(p.k_ptr, p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
         tensor_aligned16(p.v_ptr, p.v_batch_stride, p.v_row_stride, p.v_head_stride) &&
         (p.head_dim & 7) == 0;
}

// Key position `pos0 + row` of a paged sequence: page block_table[pos / page], row pos % page.
template <typename Element>
struct PagedRows {
  const Element* pool;       // k or v pointer, already offset by the head
  const int32_t* pages;      // this sequence's row of block_table
  int64_t page_stride;       // elements between pages (k_batch_stride)
  int64_t row_stride;
  int pos0;                  // position of the tile's row 0 (left padding + n_block * kBlockN)
  int page_size;
  uint64_t num_pages;        // pages in the pool (FwdParams::kv_num_blocks), or UINT64_MAX
                             //   when unknown (kv_bound())
  __device__ __forceinline__ const Element* operator()(int row) const {
    const int pos = pos0 + row;
    int page = __ldg(pages + pos / page_size);
    // A page id outside [0, num_pages) (never validated on the host for device tensors) reads
    // page 0 instead: wrong values for a wrong input, but never an out-of-bounds read. One
    // unsigned compare covers both ends.
    if (static_cast<uint64_t>(static_cast<int64_t>(page)) >= num_pages) {
      page = 0;
    }
    return pool + page * page_stride + (pos % page_size) * row_stride;
  }
};

// Where this thread's copies of a tile go in shared memory and come from in a row: chunk
// (tid % kChunksPerRow) of every column block, rows tid / kChunksPerRow + i * kRowStep.
template <typename Traits>
struct CopyThread {
  int row0;        // first tile row this thread copies
  int col0;        // first head-dim column of its chunk (in column block 0)
  int smem_offset; // element offset of (row0, its chunk) in a tile

  __device__ __forceinline__ explicit CopyThread(int tid) {
    const int chunk = tid % Traits::kChunksPerRow;
    row0 = tid / Traits::kChunksPerRow;
    col0 = chunk * 8;
    smem_offset = row0 * Traits::kSwizzleCols + ((chunk ^ Traits::swizzle(row0)) << 3);
  }
};

// Copies one 16-byte chunk (8 elements at src) into dst: cp.async when kAligned (zero-filled
// when !ok), else scalar loads of the columns < cols_left and a 16-byte shared store.
template <typename Element, bool kAligned>
__device__ __forceinline__ void copy_chunk(Element* dst, const Element* src, bool ok,
                                           int cols_left) {
  if constexpr (kAligned) {
    cp_async_16(smem_u32(dst), src, ok);
  } else {
    union {
      uint4 v;
      Element e[8];
    } pack;
#pragma unroll
    for (int e = 0; e < 8; ++e) pack.e[e] = (ok && e < cols_left) ? src[e] : Element(0.f);
    *reinterpret_cast<uint4*>(dst) = pack.v;
  }
}

// Loads rows [0, kRows) of a tile whose rows are row_stride elements apart into the swizzled
// shared tile at smem_tile; rows >= valid_rows and columns >= head_dim become zeros. `src` points
// at this thread's first element (tile row ct.row0, column ct.col0). kAligned: base pointers and
// strides are multiples of 16 bytes and head_dim of 8, so 16-byte cp.async applies; otherwise
// scalar loads (synchronous: the caller's barrier makes them visible like a completed group).
// The row pointer advances by one add per row, so no per-row address stays live in registers.
template <typename Traits, int kRows, bool kAligned>
__device__ __forceinline__ void load_tile(typename Traits::Element* smem_tile,
                                          const CopyThread<Traits>& ct,
                                          const typename Traits::Element* src,
                                          int64_t row_stride, int valid_rows, int head_dim) {
  constexpr int kW = Traits::kSwizzleCols;
  const int64_t step = Traits::kRowStep * row_stride;
  valid_rows -= ct.row0;
#pragma unroll
  for (int i = 0; i < kRows / Traits::kRowStep; ++i) {
    const bool row_ok = i * Traits::kRowStep < valid_rows;
#pragma unroll
    for (int b = 0; b < Traits::kColBlocks; ++b) {
      const int col = ct.col0 + b * kW;
      const bool ok = row_ok && col < head_dim;
      // A predicated-off cp.async reads nothing (src-size 0), so its address needs no clamp.
      copy_chunk<typename Traits::Element, kAligned>(
          smem_tile + b * kRows * kW + i * Traits::kRowStep * kW + ct.smem_offset, src + b * kW,
          ok, head_dim - col);
    }
    src += step;
  }
}

// Same for paged K/V: the row pointer of each row comes from the block table (any page size).
// All of the thread's block-table lookups are issued before its first copy, so their latencies
// overlap (one L1 round trip per tile) instead of each copy waiting for its own lookup.
template <typename Traits, int kRows, bool kAligned, typename Element>
__device__ __forceinline__ void load_tile_paged(Element* smem_tile, const CopyThread<Traits>& ct,
                                                const PagedRows<Element>& rows, int valid_rows,
                                                int head_dim) {
  constexpr int kW = Traits::kSwizzleCols;
  constexpr int kSteps = kRows / Traits::kRowStep;
  const Element* src[kSteps];
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const int row = ct.row0 + i * Traits::kRowStep;
    src[i] = rows(row < valid_rows ? row : 0) + ct.col0;
  }
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const bool row_ok = ct.row0 + i * Traits::kRowStep < valid_rows;
#pragma unroll
    for (int b = 0; b < Traits::kColBlocks; ++b) {
      const int col = ct.col0 + b * kW;
      const bool ok = row_ok && col < head_dim;
      copy_chunk<Element, kAligned>(
          smem_tile + b * kRows * kW + i * Traits::kRowStep * kW + ct.smem_offset,
          src[i] + b * kW, ok, head_dim - col);
    }
  }
}

// Writes the warp's O rows from registers to global memory. acc_o holds the normalised output
// of kMmaM 16-row tiles in the C-fragment layout; the warp's rows of the Q tile in shared memory
// (which only this warp reads: split-Q) are the staging buffer, so no CTA barrier is needed.
// Rows >= valid_rows and columns >= head_dim are not written.
template <typename Traits, bool kAligned>
__device__ __forceinline__ void store_o(typename Traits::Element* smem_q,
                                        const float (&acc_o)[Traits::kMmaM][Traits::kMmaNO][4],
                                        typename Traits::Element* gmem_o, int64_t o_row_stride,
                                        int valid_rows, int head_dim, int warp, int lane) {
  using Element = typename Traits::Element;
  constexpr int kW = Traits::kSwizzleCols;
  constexpr int kCpr = Traits::kChunksPerRow;
  const int g = lane >> 2, t = lane & 3;
  const int warp_row0 = warp * Traits::kRowsPerWarp;
  __syncwarp();  // every lane's last ldmatrix of Q is done before the tile is overwritten
#pragma unroll
  for (int mi = 0; mi < Traits::kMmaM; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + mi * 16 + g + 8 * h;
#pragma unroll
      for (int dj = 0; dj < Traits::kMmaNO; ++dj) {
        const int off = (dj / kCpr) * Traits::kBlockM * kW + row * kW +
                        (((dj % kCpr) ^ Traits::swizzle(row)) << 3) + 2 * t;
        *reinterpret_cast<uint32_t*>(smem_q + off) =
            pack2<Element>(acc_o[mi][dj][2 * h], acc_o[mi][dj][2 * h + 1]);
      }
    }
  }
  __syncwarp();
  constexpr int kChunks = Traits::kHeadDim / 8;
  constexpr int kWarpChunks = Traits::kRowsPerWarp * kChunks;
  static_assert(kWarpChunks % 32 == 0, "whole passes of the warp");
#pragma unroll
  for (int i = 0; i < kWarpChunks / 32; ++i) {
    const int idx = i * 32 + lane;
    const int r = idx / kChunks, c = idx % kChunks;
    const int row = warp_row0 + r;
    const int off = (c / kCpr) * Traits::kBlockM * kW + row * kW +
                    (((c % kCpr) ^ Traits::swizzle(row)) << 3);
    const uint4 v = *reinterpret_cast<const uint4*>(smem_q + off);
    Element* dst = gmem_o + row * o_row_stride + c * 8;
    if constexpr (kAligned) {
      if (row < valid_rows && c * 8 < head_dim) *reinterpret_cast<uint4*>(dst) = v;
    } else if (row < valid_rows) {
      const Element* e = reinterpret_cast<const Element*>(&v);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (c * 8 + k < head_dim) dst[k] = e[k];
      }
    }
  }
}

}  // namespace sm80
FLASH_NAMESPACE_END
