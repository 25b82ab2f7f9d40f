// Owns: run_rotary_cuda, the CUDA backend of the `rotary` op (common/rotary.h: RotaryParams and
// the pair rotation shared with the CPU backend). An elementwise kernel: one thread per
// (token row, head, pair or copied tail dim), grid-stride over rows. Reads fp16/bf16/fp32/fp64,
// computes in fp32 (fp64 for fp64) and rounds once, like the CPU backend and FA2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

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

// Block (threadIdx.x over a head's work items, threadIdx.y over heads), grid.x over token slots
// (batch * seqlen). Work item j < rotary_dim / 2 rotates pair j; the rest copy the tail dims.
template <typename T>
__global__ void rotary_kernel(const RotaryParams p) {
  using Io = RotaryIo<T>;
  using Acc = typename Io::Acc;
  const T* x = static_cast<const T*>(p.x_ptr);
  T* out = static_cast<T*>(p.out_ptr);
  const T* cos = static_cast<const T*>(p.cos_ptr);
  const T* sin = static_cast<const T*>(p.sin_ptr);
  const int half = p.rotary_dim / 2;
  const int items = half + (p.head_dim - p.rotary_dim);
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
    const bool in_table = pos >= 0 && pos < p.seqlen_ro;
    const T* src_row = x + (p.cu_seqlens != nullptr ? row * p.x_row_stride
                                                    : b * p.x_batch_stride + i * p.x_row_stride);
    for (int h = threadIdx.y; h < p.nheads; h += blockDim.y) {
      const T* src = src_row + h * p.x_head_stride;
      T* dst = out + (row * p.nheads + h) * p.head_dim;
      for (int j = threadIdx.x; j < items; j += blockDim.x) {
        if (j >= half) {
          const int col = p.rotary_dim + (j - half);
          dst[col] = src[col];
          continue;
        }
        int i0, i1;
        rotary_pair_index(j, p.rotary_dim, p.interleaved, &i0, &i1);
        if (!in_table) {
          dst[i0] = src[i0];
          dst[i1] = src[i1];
          continue;
        }
        const Acc s = Io::load(sin[pos * half + j]);
        Acc y0, y1;
        rotate_pair<Acc>(Io::load(src[i0]), Io::load(src[i1]), Io::load(cos[pos * half + j]),
                         p.conjugate ? -s : s, &y0, &y1);
        dst[i0] = Io::store(y0);
        dst[i1] = Io::store(y1);
      }
    }
  }
}

template <typename T>
void launch_rotary(const RotaryParams& p, cudaStream_t stream) {
  const int items = p.rotary_dim / 2 + (p.head_dim - p.rotary_dim);
  const int threads_x = items >= 128 ? 128 : (items >= 64 ? 64 : 32);
  const int threads_y = 256 / threads_x;
  const int64_t slots = static_cast<int64_t>(p.batch) * p.seqlen;
  const int blocks = static_cast<int>(slots < (1 << 20) ? slots : (1 << 20));
  rotary_kernel<T><<<blocks, dim3(threads_x, threads_y), 0, stream>>>(p);
  cuda_check(cudaGetLastError(), "rotary kernel launch");
}

}  // namespace

void run_rotary_cuda(const RotaryParams& p, cudaStream_t stream) {
  if (p.rotary_dim < 0 || p.rotary_dim > p.head_dim || p.rotary_dim % 2 != 0) {
    throw std::runtime_error("flash_attn CUDA: rotary_dim must be even and in [0, head_dim], got " +
                             std::to_string(p.rotary_dim));
  }
  if (p.batch == 0 || p.seqlen == 0 || p.nheads == 0 || p.head_dim == 0) return;
  switch (p.dtype) {
    case DType::kFloat16: launch_rotary<__half>(p, stream); break;
    case DType::kBFloat16: launch_rotary<__nv_bfloat16>(p, stream); break;
    case DType::kFloat32: launch_rotary<float>(p, stream); break;
    case DType::kFloat64: launch_rotary<double>(p, stream); break;
    default:
      throw std::runtime_error("flash_attn CUDA: unsupported x dtype code " +
                               std::to_string(static_cast<int>(p.dtype)));
  }
}

FLASH_NAMESPACE_END
