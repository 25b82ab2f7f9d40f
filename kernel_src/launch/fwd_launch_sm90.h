// Owns: turning one forward call that the Hopper path serves (fwd_dispatch_sm90.h) into a launch
// of the sm90a kernel: the causal or full variant, the TMA tensor maps, the persistent grid and
// its L2 sections. Included by the generated sm90 instantiation files (one per head dim x dtype,
// compiled for 9.0a only), which compile run_fwd_sm90<Element, kHeadDim>.
//
// Invariants: no allocation, no device synchronisation; the driver's tensor-map encoder is
// reached through the runtime (cudaGetDriverEntryPointByVersion), so nothing links libcuda;
// every CUDA error becomes a std::runtime_error naming what failed.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common/cuda_primitives.h"  // cuda_check
#include "../common/params.h"
#include "../sm90/fwd_kernel_sm90.h"
#include "fwd_dispatch_sm90.h"
#include "l2_sections.h"
#include "static_switch.h"

FLASH_NAMESPACE_BEGIN
namespace sm90 {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    cuda_check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000,
                                                cudaEnableDefault, &status),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (status != cudaDriverEntryPointSuccess || ptr == nullptr) {
      throw std::runtime_error("flash_attn CUDA (sm90): the driver has no cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// 4-d map over (d, rows, heads, batch) with a (64, box_rows, 1, 1) box and the 128-byte swizzle
// the wgmma descriptors expect; varlen tensors are (d, total, heads, 1). A stride of a dimension
// of extent 1 is never stepped, so it is replaced by a legal value when the tensor's own is not
// (e.g. a sliced batch of one).
inline CUtensorMap make_map(const FwdParams& p, const void* ptr, int64_t rows, int heads,
                            int batch, int64_t row_stride, int64_t head_stride,
                            int64_t batch_stride, int box_rows) {
  const int64_t elem = 2;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(row_stride * elem),
                                 static_cast<cuuint64_t>((heads > 1 ? head_stride : 8) * elem),
                                 static_cast<cuuint64_t>((batch > 1 ? batch_stride : 8) * elem)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult res = tensor_map_encoder()(
      &map, p.dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                        : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      4, const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    throw std::runtime_error("flash_attn CUDA (sm90): cuTensorMapEncodeTiled failed with error " +
                             std::to_string(static_cast<int>(res)));
  }
  return map;
}

}  // namespace sm90

template <typename Traits>
void launch_fwd_sm90(const FwdParams& p, int num_sms, cudaStream_t stream) {
  sm90::FwdArgs args;
  args.p = p;
  args.varlen = p.cu_seqlens_q != nullptr;
  args.v_tail_zero = args.varlen || p.seqused_k != nullptr;
  const int64_t q_rows = args.varlen ? p.total_q : p.seqlen_q;
  const int64_t k_rows = args.varlen ? p.total_k : p.seqlen_k;
  const int batch = args.varlen ? 1 : p.batch;
  args.tm_q = sm90::make_map(p, p.q_ptr, q_rows, p.nheads, batch, p.q_row_stride,
                             p.q_head_stride, p.q_batch_stride, Traits::kBlockM);
  args.tm_k = sm90::make_map(p, p.k_ptr, k_rows, p.nheads_k, batch, p.k_row_stride,
                             p.k_head_stride, p.k_batch_stride, Traits::kBlockN);
  args.tm_v = sm90::make_map(p, p.v_ptr, k_rows, p.nheads_k, batch, p.v_row_stride,
                             p.v_head_stride, p.v_batch_stride, Traits::kBlockN);
  args.num_m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t tiles = static_cast<int64_t>(args.num_m_blocks) * p.nheads * p.batch;
  if (tiles > INT32_MAX) {
    throw std::runtime_error("flash_attn CUDA (sm90): " + std::to_string(tiles) +
                             " row blocks exceed 2^31 - 1");
  }
  args.num_tiles = static_cast<int>(tiles);
  // Causal L2 sections (make_tile, l2_sections.h). The budget counts each query head's K/V in
  // full (no GQA sharing), as measured. Head dim 256 beyond 1k keys keeps the plain
  // longest-first order: sections cost it 2-10% there on the H100 (h100-fwd.json vs
  // tuning/h100-fwd-f15e4ea-l2-sections.json), while they gain 20% at 1k. The persistent grid
  // has no limit on the number of sections.
  const int64_t pairs = int64_t(p.nheads) * p.batch;
  const bool sectioned = Traits::kHeadDim <= 128 || p.seqlen_k <= 1024;
  args.l2_section =
      sectioned ? l2_section_pairs(pairs, l2_kv_bytes(p.seqlen_k, Traits::kHeadDim, /*group=*/1),
                                   args.num_m_blocks, num_sms, /*max_sections=*/pairs)
                : static_cast<int>(pairs);
  const int ctas = static_cast<int>(std::min<int64_t>(tiles, num_sms));  // persistent: one per SM
  auto kernel = &sm90::fwd_kernel_sm90<Traits>;
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  Traits::kSmemBytes),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  kernel<<<static_cast<unsigned>(ctas), Traits::kThreads, Traits::kSmemBytes, stream>>>(args);
  cuda_check(cudaGetLastError(), "launching the sm90 forward kernel");
}

template <typename Element, int kHeadDim>
void run_fwd_sm90(const FwdParams& params, int num_sms, cudaStream_t stream) {
  BOOL_SWITCH(params.window_right == 0, Is_causal, [&] {
    launch_fwd_sm90<sm90::FwdTraits<kHeadDim, Element, Is_causal>>(params, num_sms, stream);
  });
}

FLASH_NAMESPACE_END
