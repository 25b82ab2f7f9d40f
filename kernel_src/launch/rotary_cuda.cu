// Owns: the elementwise rotary kernels of the CUDA variant (common/rotary.h: the pair rotation
// shared with the CPU backend): run_rotary_cuda (the `rotary` op), and the two steps of
// flash_attn_with_kvcache before the attention, run_kv_append_cuda (new k/v written into the
// cache in place, k rotated at its cache position) and run_rotary_q_cuda (q rotated into a copy).
// One thread per (token row, head, pair or copied tail dim), grid-stride over rows. Reads
// fp16/bf16/fp32/fp64, computes in fp32 (fp64 for fp64) and rounds once, like the CPU backend
// and FA2.
//
// No host synchronisation: the kvcache index tensors are read on the device only, so what the
// CPU backend rejects on the host is made harmless here instead (params.h, KvAppendParams): an
// append outside the cache (cache_seqlens, a page id or a cache_batch_idx out of range) is
// dropped, and a position past the rotary tables is left unrotated.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../common/rotary.h"
#include "flash_api_cuda.h"

FLASH_NAMESPACE_BEGIN

namespace {

// Storage type <-> accumulation type.
template <typename T>
struct RotaryIo {
  using Acc = float;
  static __device__ float load(T x) { return static_cast<float>(x); }
  static __device__ T store(float x) { return static_cast<T>(x); }
};
template <>
struct RotaryIo<double> {
  using Acc = double;
  static __device__ double load(double x) { return x; }
  static __device__ double store(double x) { return x; }
};
template <>
struct RotaryIo<__half> {
  using Acc = float;
  static __device__ float load(__half x) { return __half2float(x); }
  static __device__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct RotaryIo<__nv_bfloat16> {
  using Acc = float;
  static __device__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// One head of one token, by the threadIdx.x lanes: work item j < rotary_dim / 2 rotates pair j
// with row `pos` of the tables (identity when pos is outside [0, seqlen_ro)), the others copy the
// tail dims past rotary_dim.
template <typename T>
__device__ void rotate_head(const T* src, T* dst, int head_dim, int rotary_dim, bool interleaved,
                            bool conjugate, const T* cos, const T* sin, int64_t pos,
                            int64_t seqlen_ro) {
  using Io = RotaryIo<T>;
  using Acc = typename Io::Acc;
  const int half = rotary_dim / 2;
  const bool in_table = rotary_dim > 0 && pos >= 0 && pos < seqlen_ro;
  for (int j = threadIdx.x; j < half + (head_dim - rotary_dim); j += blockDim.x) {
    if (j >= half) {
      const int col = rotary_dim + (j - half);
      dst[col] = src[col];
      continue;
    }
    int i0, i1;
    rotary_pair_index(j, rotary_dim, interleaved, &i0, &i1);
    if (!in_table) {
      dst[i0] = src[i0];
      dst[i1] = src[i1];
      continue;
    }
    const Acc s = Io::load(sin[pos * half + j]);
    Acc y0, y1;
    rotate_pair<Acc>(Io::load(src[i0]), Io::load(src[i1]), Io::load(cos[pos * half + j]),
                     conjugate ? -s : s, &y0, &y1);
    dst[i0] = Io::store(y0);
    dst[i1] = Io::store(y1);
  }
}

// Block (threadIdx.x over a head's work items, threadIdx.y over heads), grid.x over token slots
// (batch * seqlen).
template <typename T>
__global__ void rotary_kernel(const RotaryParams p) {
  const T* x = static_cast<const T*>(p.x_ptr);
  T* out = static_cast<T*>(p.out_ptr);
  const T* cos = static_cast<const T*>(p.cos_ptr);
  const T* sin = static_cast<const T*>(p.sin_ptr);
  const int64_t slots = static_cast<int64_t>(p.batch) * p.seqlen;
  for (int64_t t = blockIdx.x; t < slots; t += gridDim.x) {
    const int b = static_cast<int>(t / p.seqlen);
    const int i = static_cast<int>(t % p.seqlen);
    int64_t row;
    if (p.cu_seqlens != nullptr) {
      if (i >= p.cu_seqlens[b + 1] - p.cu_seqlens[b]) continue;  // past this sequence's end
      row = static_cast<int64_t>(p.cu_seqlens[b]) + i;
    } else {
      row = t;
    }
    const int64_t pos = (p.seqlen_offsets != nullptr ? p.seqlen_offsets[b] : p.seqlen_offset) + i;
    const T* src_row = x + (p.cu_seqlens != nullptr ? row * p.x_row_stride
                                                    : b * p.x_batch_stride + i * p.x_row_stride);
    for (int h = threadIdx.y; h < p.nheads; h += blockDim.y) {
      rotate_head(src_row + h * p.x_head_stride, out + (row * p.nheads + h) * p.head_dim,
                  p.head_dim, p.rotary_dim, p.interleaved, p.conjugate, cos, sin, pos,
                  p.seqlen_ro);
    }
  }
}

// flash_attn_with_kvcache's append: token i of sequence b goes to cache position
// cache_seqlens[b] + i (its row through the block table when paged), k rotated at that position.
template <typename T>
__global__ void kv_append_kernel(const KvAppendParams p) {
  const int64_t slots = static_cast<int64_t>(p.batch) * p.seqlen_new;
  const uint64_t rows_bound = p.kv_num_rows > 0 ? static_cast<uint64_t>(p.kv_num_rows) : UINT64_MAX;
  for (int64_t t = blockIdx.x; t < slots; t += gridDim.x) {
    const int b = static_cast<int>(t / p.seqlen_new);
    const int i = static_cast<int>(t % p.seqlen_new);
    const int64_t pos = static_cast<int64_t>(p.cache_seqlens[b]) + i;
    if (i == 0 && p.seqused_out != nullptr && threadIdx.x == 0 && threadIdx.y == 0) {
      const int64_t used = pos + p.seqlen_new;
      p.seqused_out[b] = static_cast<int32_t>(
          p.capacity > 0 && used > p.capacity ? p.capacity : (used < 0 ? 0 : used));
    }
    if (pos < 0 || (p.capacity > 0 && pos >= p.capacity)) continue;
    int64_t k_row, v_row;
    if (p.block_table != nullptr) {
      const int64_t page = p.block_table[static_cast<int64_t>(b) * p.block_table_batch_stride +
                                         pos / p.page_block_size];
      if (static_cast<uint64_t>(page) >= rows_bound) continue;
      const int64_t r = pos % p.page_block_size;
      k_row = page * p.k_batch_stride + r * p.k_row_stride;
      v_row = page * p.v_batch_stride + r * p.v_row_stride;
    } else {
      const int64_t kb = p.cache_batch_idx != nullptr ? p.cache_batch_idx[b] : b;
      if (static_cast<uint64_t>(kb) >= rows_bound) continue;
      k_row = kb * p.k_batch_stride + pos * p.k_row_stride;
      v_row = kb * p.v_batch_stride + pos * p.v_row_stride;
    }
    const T* knew = static_cast<const T*>(p.k_new_ptr) +
                    static_cast<int64_t>(b) * p.knew_batch_stride + i * p.knew_row_stride;
    const T* vnew = static_cast<const T*>(p.v_new_ptr) +
                    static_cast<int64_t>(b) * p.vnew_batch_stride + i * p.vnew_row_stride;
    T* kc = static_cast<T*>(p.k_cache_ptr) + k_row;
    T* vc = static_cast<T*>(p.v_cache_ptr) + v_row;
    for (int h = threadIdx.y; h < p.nheads_k; h += blockDim.y) {
      rotate_head(knew + h * p.knew_head_stride, kc + h * p.k_head_stride, p.head_dim,
                  p.rotary_dim, p.rotary_interleaved, false,
                  static_cast<const T*>(p.rotary_cos_ptr), static_cast<const T*>(p.rotary_sin_ptr),
                  pos, p.rotary_seqlen);
      const T* vsrc = vnew + h * p.vnew_head_stride;
      T* vdst = vc + h * p.v_head_stride;
      for (int col = threadIdx.x; col < p.head_dim; col += blockDim.x) vdst[col] = vsrc[col];
    }
  }
}

// flash_attn_with_kvcache's query rotation (out of place, contiguous output): query i of
// sequence b at position cache_seqlens[b] + i (causal/local) or cache_seqlens[b] (otherwise).
template <typename T>
__global__ void rotary_q_kernel(const RotaryQParams p) {
  const int64_t slots = static_cast<int64_t>(p.batch) * p.seqlen_q;
  for (int64_t t = blockIdx.x; t < slots; t += gridDim.x) {
    const int b = static_cast<int>(t / p.seqlen_q);
    const int i = static_cast<int>(t % p.seqlen_q);
    const int64_t pos = (p.cache_seqlens != nullptr ? p.cache_seqlens[b] : 0) +
                        (p.positions_per_row ? i : 0);
    const T* src = static_cast<const T*>(p.q_ptr) + static_cast<int64_t>(b) * p.q_batch_stride +
                   i * p.q_row_stride;
    T* dst = static_cast<T*>(p.q_out_ptr) + t * p.nheads * p.head_dim;
    for (int h = threadIdx.y; h < p.nheads; h += blockDim.y) {
      rotate_head(src + h * p.q_head_stride, dst + static_cast<int64_t>(h) * p.head_dim,
                  p.head_dim, p.rotary_dim, p.rotary_interleaved, false,
                  static_cast<const T*>(p.rotary_cos_ptr), static_cast<const T*>(p.rotary_sin_ptr),
                  pos, p.rotary_seqlen);
    }
  }
}

// Block shape for `items` work items per head (threadIdx.x) and up to 256 / x heads
// (threadIdx.y); one block per token slot, at most 2^20 blocks (grid-stride beyond).
struct ElementwiseLaunch {
  dim3 grid, block;
  ElementwiseLaunch(int items, int64_t slots) {
    const int threads_x = items >= 128 ? 128 : (items >= 64 ? 64 : 32);
    block = dim3(threads_x, 256 / threads_x);
    grid = dim3(static_cast<unsigned>(slots < (1 << 20) ? slots : (1 << 20)));
  }
};

void check_rotary_dim(int rotary_dim, int head_dim) {
  if (rotary_dim < 0 || rotary_dim > head_dim || rotary_dim % 2 != 0) {
    throw std::runtime_error("flash_attn CUDA: rotary_dim must be even and in [0, head_dim], got " +
                             std::to_string(rotary_dim));
  }
}

// The storage type of a dtype code, as a tag for `fn`.
template <typename Fn>
void dispatch_dtype(DType dtype, bool half_only, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: fn(__half()); return;
    case DType::kBFloat16: fn(__nv_bfloat16()); return;
    case DType::kFloat32: if (!half_only) { fn(float()); return; } break;
    case DType::kFloat64: if (!half_only) { fn(double()); return; } break;
  }
  throw std::runtime_error("flash_attn CUDA: unsupported dtype code " +
                           std::to_string(static_cast<int>(dtype)));
}

}  // namespace

void run_kv_append_cuda(const KvAppendParams& p, cudaStream_t stream) {
  check_rotary_dim(p.rotary_dim, p.head_dim);
  if (p.batch == 0 || p.seqlen_new == 0 || p.nheads_k == 0) return;
  const int items = std::max(p.head_dim, p.rotary_dim / 2 + (p.head_dim - p.rotary_dim));
  const ElementwiseLaunch l(items, int64_t(p.batch) * p.seqlen_new);
  dispatch_dtype(p.dtype, true, [&](auto tag) {
    kv_append_kernel<decltype(tag)><<<l.grid, l.block, 0, stream>>>(p);
  });
  cuda_check(cudaGetLastError(), "launching the KV-cache append kernel");
}

void run_rotary_q_cuda(const RotaryQParams& p, cudaStream_t stream) {
  check_rotary_dim(p.rotary_dim, p.head_dim);
  if (p.batch == 0 || p.seqlen_q == 0 || p.nheads == 0) return;
  const ElementwiseLaunch l(p.rotary_dim / 2 + (p.head_dim - p.rotary_dim),
                            int64_t(p.batch) * p.seqlen_q);
  dispatch_dtype(p.dtype, true, [&](auto tag) {
    rotary_q_kernel<decltype(tag)><<<l.grid, l.block, 0, stream>>>(p);
  });
  cuda_check(cudaGetLastError(), "launching the query rotary kernel");
}

void run_rotary_cuda(const RotaryParams& p, cudaStream_t stream) {
  check_rotary_dim(p.rotary_dim, p.head_dim);
  if (p.batch == 0 || p.seqlen == 0 || p.nheads == 0 || p.head_dim == 0) return;
  const ElementwiseLaunch l(p.rotary_dim / 2 + (p.head_dim - p.rotary_dim),
                            int64_t(p.batch) * p.seqlen);
  dispatch_dtype(p.dtype, false, [&](auto tag) {
    rotary_kernel<decltype(tag)><<<l.grid, l.block, 0, stream>>>(p);
  });
  cuda_check(cudaGetLastError(), "launching the rotary kernel");
}

FLASH_NAMESPACE_END
