// Owns: the CUDA entry points (flash_api_cuda.h): the device and size checks they share, the
// choice of path (the Hopper forward when it takes the call, else the sm80 kernels; split-KV and
// the decode view of GQA for short queries), and the switches that turn dtype and head dim into
// template arguments (static_switch.h).
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../common/split_kv.h"
#include "../sm80/bwd_traits_sm80.h"
#include "../sm80/tile_size.h"
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
  caps.device = current_device();
  caps.major = device_attribute(caps.device, cudaDevAttrComputeCapabilityMajor,
                                "ComputeCapabilityMajor");
  caps.minor = device_attribute(caps.device, cudaDevAttrComputeCapabilityMinor,
                                "ComputeCapabilityMinor");
  caps.sms = device_attribute(caps.device, cudaDevAttrMultiProcessorCount, "MultiProcessorCount");
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

// The decode view (FA2's "seqlen_q / ngroups swap"): a batched call with one query row per
// sequence and GQA becomes one with `group` rows per (sequence, K/V head), the query heads of the
// group as the rows, so that one CTA streams each K/V tile once for the whole group instead of
// once per query head. Only a view of the same memory (q and O: row stride = head stride; the
// LSE layout (batch, nheads, 1) is (batch, nheads_k, group) already). With one query row a
// causal mask or a right window hides nothing (the row is the last one, it sees every key), so
// they are dropped; a left window, ALiBi (per-head slopes), dropout and S_dmask depend on the
// head or the row and keep the plain layout.
FwdParams decode_view(const FwdParams& p) {
  const int group = p.nheads_k > 0 ? p.nheads / p.nheads_k : 1;
  const bool swap = p.cu_seqlens_q == nullptr && p.seqlen_q == 1 && group > 1 &&
                    p.window_left < 0 && p.alibi_slopes == nullptr && p.p_dropout == 0.0 &&
                    p.p_ptr == nullptr;
  if (!swap) return p;
  FwdParams v = p;
  v.seqlen_q = group;
  v.nheads = p.nheads_k;
  v.q_row_stride = p.q_head_stride;
  v.q_head_stride = p.q_head_stride * group;
  v.o_row_stride = p.o_head_stride;
  v.o_head_stride = p.o_head_stride * group;
  v.window_right = -1;
  v.is_causal = false;
  return v;
}

// The sm80 kernels for a call (the general kernel when split, then the combine step).
void run_sm80(const FwdParams& params, int sms, cudaStream_t stream) {
  DTYPE_SWITCH(params.dtype, [&] {
    HDIM_SWITCH(params.head_dim, [&] {
      run_fwd_sm80<elem_type, kHeadDim>(params, sms, stream);
    });
  });
  if (params.o_accum_ptr != nullptr) run_fwd_combine_cuda(params, stream);
}

// Both forward entry points: the decode view, then the path.
void run_fwd_any(const FwdParams& call, cudaStream_t stream) {
  const DeviceCaps caps = check_device_and_sizes(call);
  if (no_rows(call)) return;
  const FwdParams params = decode_view(call);
  if (params.o_accum_ptr != nullptr) {
    require(params.num_splits > 1 && params.num_splits <= kMaxSplits && params.lse_accum_ptr,
            "split-KV needs num_splits in [2, 128] and both partial buffers");
    run_sm80(params, caps.sms, stream);
    return;
  }
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
  run_sm80(params, caps.sms, stream);
}

}  // namespace

void run_fwd_cuda(const FwdParams& params, cudaStream_t stream) { run_fwd_any(params, stream); }

void run_fwd_kvcache_cuda(const FwdParams& params, cudaStream_t stream) {
  run_fwd_any(params, stream);
}

int fwd_cuda_num_splits(const FwdParams& call) {
  const bool half = call.dtype == DType::kFloat16 || call.dtype == DType::kBFloat16;
  if (call.num_splits == 1 || !half || call.p_dropout > 0.0 || call.p_ptr != nullptr ||
      no_rows(call) || call.seqlen_k <= 0) {
    return 1;
  }
  // Varlen without a real bound on the rows: the grid cannot be sized without a sync.
  if (call.cu_seqlens_q != nullptr && !varlen_rows_bounded(call)) return 1;
  const DeviceCaps caps = check_device_and_sizes(call);
  const FwdParams p = decode_view(call);
  int splits = 1;
  HDIM_SWITCH(p.head_dim, [&] {
    // Split calls run the sm80 decode tile (its sizes; 2 CTAs per SM fit its registers and
    // shared memory at every head dim).
    constexpr sm80::TileConfig tile = sm80::tile_config(kHeadDim, sm80::TileKind::kDecode);
    const int64_t row_blocks = (int64_t(p.seqlen_q) + tile.kBlockM - 1) / tile.kBlockM;
    const int64_t ctas = row_blocks * p.nheads * p.batch;
    const int key_tiles = (p.seqlen_k + tile.kBlockN - 1) / tile.kBlockN;
    splits = choose_num_splits(ctas, key_tiles, 2 * caps.sms, call.num_splits);
  });
  return splits;
}

// The query-block size and compiled head dim of the tile run_bwd_sm80 will choose
// (bwd_launch_sm80.h), and the counters / dQ chunks per query head of that tile.
static void bwd_tile_of_call(const BwdParams& params, int* block_m, int* head_dim) {
  const int smem_optin = device_smem_optin();
  HDIM_SWITCH(params.head_dim, [&] {
    *block_m = sm80::bwd_tile_config(kHeadDim, sm80::bwd_use_large_tile(kHeadDim, smem_optin)).kBlockM;
    *head_dim = kHeadDim;
  });
}

int64_t bwd_cuda_semaphore_count(const BwdParams& params) {
  int block_m = 0, head_dim = 0;
  bwd_tile_of_call(params, &block_m, &head_dim);
  return sm80::bwd_semaphores_per_head(params, block_m) * params.nheads;
}

int64_t bwd_cuda_dq_accum_elems(const BwdParams& params) {
  int block_m = 0, head_dim = 0;
  bwd_tile_of_call(params, &block_m, &head_dim);
  return sm80::bwd_semaphores_per_head(params, block_m) * params.nheads * block_m * head_dim;
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


FLASH_NAMESPACE_END
