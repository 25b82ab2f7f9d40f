// Owns: the switch macros that turn runtime values into compile-time constants (FA2's
// static_switch.h, FlashInfer's DISPATCH_*). Every switch without a matching case throws a
// std::runtime_error naming the value: a silent fall-through would run the wrong kernel or none.
// The head dims come from tools/kernel_axes.toml through the generated head_dims.h.
//
// Build trimming (FA3's FLASHATTENTION_DISABLE_*): -DFLASH_DISABLE_HDIM<H> removes head dim H,
// -DFLASH_DISABLE_FP16 / -DFLASH_DISABLE_BF16 remove a dtype. The generator
// (tools/gen_instantiations.py) guards each instantiation with the same macros, so a trimmed
// build links; a trimmed-away head dim falls through to the next compiled one (padding by
// predication) on the sm80 path and to the sm80 path on Hopper, a trimmed-away dtype raises.
#pragma once
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/params.h"
#include "head_dims.h"

// BOOL_SWITCH(cond, Name, ...): runs the body with `static constexpr bool Name` = cond.
#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      static constexpr bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      static constexpr bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

#ifdef FLASH_DISABLE_FP16
#define FLASH_FP16_CASE(...)
#else
#define FLASH_FP16_CASE(...)                \
  case ::FLASH_NAMESPACE::DType::kFloat16: { \
    using elem_type = __half;                \
    return __VA_ARGS__();                    \
  }
#endif
#ifdef FLASH_DISABLE_BF16
#define FLASH_BF16_CASE(...)
#else
#define FLASH_BF16_CASE(...)                  \
  case ::FLASH_NAMESPACE::DType::kBFloat16: {  \
    using elem_type = __nv_bfloat16;           \
    return __VA_ARGS__();                      \
  }
#endif

// DTYPE_SWITCH(dtype, ...): runs the body with `using elem_type` = __half or __nv_bfloat16.
#define DTYPE_SWITCH(DTYPE, ...)                                                              \
  [&] {                                                                                       \
    switch (DTYPE) {                                                                          \
      FLASH_FP16_CASE(__VA_ARGS__)                                                            \
      FLASH_BF16_CASE(__VA_ARGS__)                                                            \
      default:                                                                                \
        throw std::runtime_error(                                                             \
            "flash_attn CUDA: q has a dtype this build does not serve (dtype code " +         \
            std::to_string(static_cast<int>(DTYPE)) +                                         \
            "); the CUDA kernels support float16 and bfloat16 (unless trimmed at build time)"); \
    }                                                                                         \
  }()

FLASH_NAMESPACE_BEGIN

// The smallest compiled head dim >= d (kernels predicate the columns past d), or 0 if none.
inline int compiled_head_dim_for(int d) {
  for (int h : kCompiledHeadDims) {
    if (h != 0 && h >= d) return h;
  }
  return 0;
}

// Whether the Hopper forward has a kernel for exactly head dim d in this build.
inline bool sm90_head_dim_compiled(int d) {
  for (int h : kSm90HeadDims) {
    if (h != 0 && h == d) return true;
  }
  return false;
}

FLASH_NAMESPACE_END

// One case per compiled head dim (head_dims.h expands FLASH_HDIM_CASE_<H> into this, or into
// nothing where the head dim is trimmed).
#define FLASH_HDIM_CASE(H, ...)        \
  case H: {                            \
    static constexpr int kHeadDim = H; \
    return __VA_ARGS__();              \
  }

// HDIM_SWITCH(d, ...): runs the body with `static constexpr int kHeadDim` = the smallest compiled
// head dim >= d.
#define HDIM_SWITCH(HEAD_DIM, ...)                                                          \
  [&] {                                                                                     \
    const int flash_hdim_ = ::FLASH_NAMESPACE::compiled_head_dim_for(HEAD_DIM);             \
    switch (flash_hdim_) {                                                                  \
      FLASH_HDIM_CASES(__VA_ARGS__)                                                         \
      default:                                                                              \
        throw std::runtime_error("flash_attn CUDA: head dimension " +                      \
                                 std::to_string(HEAD_DIM) +                                 \
                                 " has no compiled kernel in this build (compiled: up to " + \
                                 std::to_string(::FLASH_NAMESPACE::kMaxHeadDim) +           \
                                 " unless trimmed with FLASH_DISABLE_HDIM*)");              \
    }                                                                                       \
  }()

// SM90_HDIM_SWITCH(d, ...): runs the body with `static constexpr int kHeadDim` = d, a head dim
// of the Hopper forward (the caller checks sm90_head_dim_compiled(d) first).
#define SM90_HDIM_SWITCH(HEAD_DIM, ...)                                                     \
  [&] {                                                                                     \
    switch (HEAD_DIM) {                                                                     \
      FLASH_SM90_HDIM_CASES(__VA_ARGS__)                                                    \
      default:                                                                              \
        throw std::runtime_error("flash_attn CUDA: head dimension " +                      \
                                 std::to_string(HEAD_DIM) +                                 \
                                 " has no Hopper kernel in this build");                    \
    }                                                                                       \
  }()
