// Owns: the CUDA entry points (flash_api_cuda.h): the device and size checks they share, the
// choice of path (the Hopper forward when it takes the call, else the sm80 kernels), and the
// switches that turn dtype and head dim into template arguments (static_switch.h).
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../sm80/bwd_traits_sm80.h"
#include "bwd_dispatch_sm80.h"
#include "flash_api_cuda.h"
#include "fwd_dispatch_sm80.h"
#include "fwd_dispatch_sm90.h"
#include "static_switch.h"

FLASH_NAMESPACE_BEGIN

namespace {

// What the entry points need to know about the current device.
struct DeviceCaps {
  int device = 0;
  int major = 0, minor = 0;
  int sms = 0;  // multiprocessors (grid sizes: L2 sections, the Hopper kernel's persistent grid)
};

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::runtime_error("flash_attn CUDA: " + msg);
}

// The checks every entry point runs before anything else: the current device is one the
// kernels were built for (sm80 or newer), and the sizes are ones the kernels can index. Device
// attributes are cheap driver queries (no synchronisation), so they are read per call rather
// than cached: the current device can change between calls.
DeviceCaps check_device_and_sizes(const FwdParams& params) {
  DeviceCaps caps;
  cuda_check(cudaGetDevice(&caps.device), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&caps.major, cudaDevAttrComputeCapabilityMajor, caps.device),
             "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  cuda_check(cudaDeviceGetAttribute(&caps.minor, cudaDevAttrComputeCapabilityMinor, caps.device),
             "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  cuda_check(cudaDeviceGetAttribute(&caps.sms, cudaDevAttrMultiProcessorCount, caps.device),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  if (caps.major < 8) {
    cudaDeviceProp prop{};
    const std::string name =
        cudaGetDeviceProperties(&prop, caps.device) == cudaSuccess ? prop.name : "unknown";
    throw std::runtime_error(
        "flash_attn CUDA: device " + std::to_string(caps.device) + " ('" + name +
        "') has compute capability " + std::to_string(caps.major) + "." +
        std::to_string(caps.minor) +
        "; the CUDA kernels need compute capability 8.0 or newer (Ampere, Ada, Hopper)");
  }
  require(params.head_dim >= 1 && params.head_dim <= kMaxHeadDim,
          "head_dim = " + std::to_string(params.head_dim) + " must be in [1, " +
              std::to_string(kMaxHeadDim) + "]");
  require(params.nheads_k >= 1 && params.nheads % params.nheads_k == 0,
          "nheads = " + std::to_string(params.nheads) + " must be a multiple of nheads_k = " +
              std::to_string(params.nheads_k));
  require(params.block_table == nullptr || params.page_block_size > 0,
          "page_block_size must be positive with a block_table");
  require(params.batch >= 0 && params.nheads >= 0 && params.seqlen_k >= 0,
          "batch, nheads and seqlen_k must be non-negative");
  return caps;
}

// No query rows: nothing to write.
bool no_rows(const FwdParams& params) {
  if (params.batch == 0 || params.nheads == 0) return true;
  return params.cu_seqlens_q != nullptr ? params.total_q <= 0 : params.seqlen_q <= 0;
}

}  // namespace

void run_fwd_cuda(const FwdParams& params, cudaStream_t stream) {
  const DeviceCaps caps = check_device_and_sizes(params);
  if (no_rows(params)) return;
#ifndef FLASH_DISABLE_SM90  // a build without 9.0 (tools/build_local.py --archs) has no sm90 code
  // sm_90a code runs on exactly compute capability 9.0.
  if (caps.major == 9 && caps.minor == 0 && sm90::serves(params)) {
    DTYPE_SWITCH(params.dtype, [&] {
      SM90_HDIM_SWITCH(params.head_dim, [&] {
        run_fwd_sm90<elem_type, kHeadDim>(params, caps.sms, stream);
      });
    });
    return;
  }
#endif
  DTYPE_SWITCH(params.dtype, [&] {
    HDIM_SWITCH(params.head_dim, [&] {
      run_fwd_sm80<elem_type, kHeadDim>(params, caps.sms, stream);
    });
  });
}

int64_t bwd_cuda_semaphore_count(const BwdParams& params) {
  int64_t per_head = 0;
  HDIM_SWITCH(params.head_dim, [&] {
    per_head = sm80::bwd_semaphores_per_head(params, sm80::bwd_tile_config(kHeadDim).kBlockM);
  });
  return per_head * params.nheads;
}

void run_bwd_cuda(const BwdParams& params, cudaStream_t stream) {
  check_device_and_sizes(params);
  require(params.block_table == nullptr, "the backward does not take a paged K/V (block_table)");
  if (no_rows(params)) return;
#ifdef FLASH_DISABLE_BACKWARD  // a forward-only build (benchmarks/build_harness.sh)
  (void)stream;
  throw std::runtime_error("flash_attn CUDA: this build has no backward (FLASH_DISABLE_BACKWARD)");
#else
  DTYPE_SWITCH(params.dtype, [&] {
    HDIM_SWITCH(params.head_dim, [&] { run_bwd_sm80<elem_type, kHeadDim>(params, stream); });
  });
#endif
}

void run_fwd_kvcache_cuda(const FwdParams& params, cudaStream_t /*stream*/) {
  check_device_and_sizes(params);
  throw std::runtime_error(
      "flash_attn: fwd_kvcache (flash_attn_with_kvcache) is not implemented for CUDA yet; use "
      "CPU tensors for it");
}

FLASH_NAMESPACE_END
