// Owns: run_fwd_cuda, the CUDA forward entry point the binding calls (flash_api_cuda.h): checks
// that the device is served, routes to the Hopper path when it takes the call, else turns dtype
// and head dim into template arguments (static_switch.h) and hands over to the sm80 launch.
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../sm90/dispatch_sm90.h"
#include "flash_api_cuda.h"
#include "bwd_dispatch_sm80.h"
#include "fwd_dispatch_sm80.h"
#include "static_switch.h"
#include "../sm80/bwd_traits_sm80.h"

FLASH_NAMESPACE_BEGIN

namespace {

// What the entry point needs to know about the current device.
struct DeviceCaps {
  int device = 0;
  int major = 0, minor = 0;
  int sms = 0;  // multiprocessors (the Hopper kernel's persistent grid)
};

// Device attributes are cheap driver queries (no synchronisation), so they are read per call
// rather than cached: the current device can change between calls.
DeviceCaps current_device_caps() {
  DeviceCaps caps;
  cuda_check(cudaGetDevice(&caps.device), "cudaGetDevice");
  cuda_check(cudaDeviceGetAttribute(&caps.major, cudaDevAttrComputeCapabilityMajor, caps.device),
        "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  cuda_check(cudaDeviceGetAttribute(&caps.minor, cudaDevAttrComputeCapabilityMinor, caps.device),
        "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  cuda_check(cudaDeviceGetAttribute(&caps.sms, cudaDevAttrMultiProcessorCount, caps.device),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  return caps;
}

void require_sm80(const DeviceCaps& caps) {
  if (caps.major >= 8) return;
  cudaDeviceProp prop{};
  const std::string name =
      cudaGetDeviceProperties(&prop, caps.device) == cudaSuccess ? prop.name : "unknown";
  throw std::runtime_error(
      "flash_attn CUDA: device " + std::to_string(caps.device) + " ('" + name +
      "') has compute capability " + std::to_string(caps.major) + "." +
      std::to_string(caps.minor) +
      "; the CUDA kernels need compute capability 8.0 or newer (Ampere, Ada, Hopper)");
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::runtime_error("flash_attn CUDA: " + msg);
}

}  // namespace

void run_fwd_cuda(const FwdParams& params, cudaStream_t stream) {
  const DeviceCaps caps = current_device_caps();
  require_sm80(caps);
  require(params.head_dim >= 1 && params.head_dim <= 256,
          "head_dim = " + std::to_string(params.head_dim) + " must be in [1, 256]");
  require(params.nheads_k >= 1 && params.nheads % params.nheads_k == 0,
          "nheads = " + std::to_string(params.nheads) + " must be a multiple of nheads_k = " +
              std::to_string(params.nheads_k));
  require(params.block_table == nullptr || params.page_block_size > 0,
          "page_block_size must be positive with a block_table");
  require(params.batch >= 0 && params.nheads >= 0 && params.seqlen_k >= 0,
          "batch, nheads and seqlen_k must be non-negative");
  const bool varlen = params.cu_seqlens_q != nullptr;
  if (params.batch == 0 || params.nheads == 0) return;
  if (varlen ? params.total_q <= 0 : params.seqlen_q <= 0) return;  // no query rows: nothing to write

#ifndef FLASH_DISABLE_SM90  // a build without 9.0 (tools/build_local.py --archs) has no sm90 code
  // sm_90a code runs on exactly compute capability 9.0.
  if (caps.major == 9 && caps.minor == 0 && try_run_fwd_sm90(params, caps.sms, stream)) return;
#endif
  DTYPE_SWITCH(params.dtype, [&] {
    HDIM_SWITCH(params.head_dim, [&] { run_fwd_sm80<elem_type, kHeadDim>(params, caps.sms, stream); });
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
  const DeviceCaps caps = current_device_caps();
  require_sm80(caps);
  require(params.head_dim >= 1 && params.head_dim <= 256,
          "head_dim = " + std::to_string(params.head_dim) + " must be in [1, 256]");
  require(params.nheads_k >= 1 && params.nheads % params.nheads_k == 0,
          "nheads = " + std::to_string(params.nheads) + " must be a multiple of nheads_k = " +
              std::to_string(params.nheads_k));
  require(params.block_table == nullptr, "the backward does not take a paged K/V (block_table)");
  if (params.batch == 0 || params.nheads == 0) return;
  if (params.cu_seqlens_q != nullptr ? params.total_q <= 0 : params.seqlen_q <= 0) return;
  DTYPE_SWITCH(params.dtype, [&] {
    HDIM_SWITCH(params.head_dim, [&] { run_bwd_sm80<elem_type, kHeadDim>(params, stream); });
  });
}

FLASH_NAMESPACE_END
