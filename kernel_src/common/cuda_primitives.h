// Owns: the small pieces both CUDA paths (kernel_src/sm80/, kernel_src/sm90/) use, which live here
// because a build section may only include its own directory and common/ (docs/design.md):
// on the device, the `.shared` address of a pointer, the generic-to-async proxy fence, 2^x on the
// special-function unit, packing two floats into fp16x2/bf16x2, and quad (4-lane) reductions;
// on the host, turning a CUDA error into the std::runtime_error the binding reports. Included by
// CUDA sources only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "namespace.h"

FLASH_NAMESPACE_BEGIN

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flash_attn CUDA: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

// The current device (per host thread; it can change between calls, so it is read per call).
inline int current_device() {
  int device = 0;
  cuda_check(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// An attribute of `device`: a cheap driver query, no synchronisation.
inline int device_attribute(int device, cudaDeviceAttr attr, const char* name) {
  int value = 0;
  cuda_check(cudaDeviceGetAttribute(&value, attr, device),
             (std::string("cudaDeviceGetAttribute(") + name + ")").c_str());
  return value;
}

// Whether environment variable `name` is set to something other than "" or "0" (the kernels'
// switches for tests and benchmarks, e.g. FLASH_ATTN_DISABLE_SM90). Read per call.
inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// The current device's opt-in shared memory per block (what a kernel may request with
// cudaFuncAttributeMaxDynamicSharedMemorySize): 99 KB on sm86/sm89, 163 KB on the A100, 227 KB
// on the H100/H200.
inline int device_smem_optin() {
  return device_attribute(current_device(), cudaDevAttrMaxSharedMemoryPerBlockOptin,
                          "MaxSharedMemoryPerBlockOptin");
}

// The current device's multiprocessor count (grid sizes).
inline int device_sms() {
  return device_attribute(current_device(), cudaDevAttrMultiProcessorCount, "MultiProcessorCount");
}

namespace cuda {

// fp32 value of a storage element (fp16, bf16, or any type static_cast converts).
template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// A storage element from fp32, rounded to nearest even once.
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Makes this thread's earlier generic-proxy writes to shared memory visible to the async proxy
// (wgmma operand reads, TMA and bulk copies) once the threads have synchronised. sm90+; a no-op
// in code compiled for earlier GPUs, which has no async proxy.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// 2^x on the special-function unit (ex2.approx.ftz: rel. error ~2^-22, denormals flushed, which
// is harmless for probabilities <= 1 that are rounded to fp16/bf16 anyway). exp2(-inf) = 0.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
// The same as SoftmaxState's Exp policy (common/softmax_state.h).
struct Exp2Approx {
  __device__ __forceinline__ float operator()(float x) const { return exp2_approx(x); }
};

// Packs (lo, hi) into one register of two fp16/bf16, round-to-nearest-even (cvt.rn.*x2).
template <typename Element>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  } else {
    static_assert(std::is_same_v<Element, __half>, "fp16 or bf16");
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  }
  return r;
}

namespace warp {

// Reductions over the 4 lanes of a quad (the 4 threads that share a row of an MMA fragment).
// Whole warp.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace warp
}  // namespace cuda
FLASH_NAMESPACE_END
