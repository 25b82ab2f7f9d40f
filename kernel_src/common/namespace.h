// Owns: the namespace every C++/CUDA symbol of this project lives in, and the host/device
// qualifier used by code shared between the CPU backend and the CUDA paths.
// Invariant: nothing under kernel_src/ includes torch headers (framework-agnostic, as FlashInfer).
#pragma once

// A private namespace so that our .so cannot clash with another flash-attn build loaded in the
// same process (FA2 does the same with FLASH_NAMESPACE).
#define FLASH_NAMESPACE flash_hub
#define FLASH_NAMESPACE_BEGIN namespace FLASH_NAMESPACE {
#define FLASH_NAMESPACE_END }

#if defined(__CUDACC__)
#define FLASH_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FLASH_HOST_DEVICE inline
#endif
