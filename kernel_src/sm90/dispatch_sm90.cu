// Owns: the Hopper path's dispatch: which forward calls the sm90a kernel serves (the rest go to
// the Ampere-class kernels of kernel_src/sm80/, built for sm_90 too), the TMA tensor maps, the
// launch. This file is the one source of the build's 9.0a section.
//
// Invariants: no allocation, no device synchronisation; the driver's tensor-map encoder is
// reached through the runtime (cudaGetDriverEntryPointByVersion), so nothing links libcuda.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "dispatch_sm90.h"
#include "fwd_kernel_sm90.h"

FLASH_NAMESPACE_BEGIN

namespace {

// FLASH_ATTN_DISABLE_SM90=1 sends every call to the sm80 kernels (tests and benchmarks compare
// the two paths on one GPU).
bool sm90_disabled() {
  static const bool disabled = [] {
    const char* v = std::getenv("FLASH_ATTN_DISABLE_SM90");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return disabled;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
bool strides16(int64_t row, int64_t head, int64_t batch) {
  return row % 8 == 0 && head % 8 == 0 && batch % 8 == 0;  // 2-byte elements: 16-byte strides
}

// Varlen needs a real bound on the sequence lengths (max_seqlen_q given and below total_q, as
// FA2's API asks): the persistent grid walks max_seqlen_q / kBlockM row blocks per sequence and
// skips those past each end. Without one the call goes to the sm80 kernels, whose grid is sized
// from the average length.
bool varlen_supported(const FwdParams& p) {
  if (p.cu_seqlens_q == nullptr && p.cu_seqlens_k == nullptr) return true;
  return p.cu_seqlens_q != nullptr && p.cu_seqlens_k != nullptr && p.total_q > 0 &&
         p.total_k > 0 && p.total_k <= INT32_MAX && varlen_rows_bounded(p);
}

bool serves(const FwdParams& p) {
  const bool causal = p.window_left < 0 && p.window_right == 0;
  const bool full = p.window_left < 0 && p.window_right < 0;
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) &&
         (p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256) && (causal || full) && p.p_dropout == 0.0 &&
         p.softcap == 0.0 && p.alibi_slopes == nullptr && p.p_ptr == nullptr &&
         varlen_supported(p) && p.leftpad_k == nullptr && p.cache_batch_idx == nullptr &&
         p.block_table == nullptr &&
         p.scale_log2 > 0.f && p.seqlen_q > 0 && p.seqlen_k > 0 &&
         aligned16(p.q_ptr) && aligned16(p.k_ptr) && aligned16(p.v_ptr) &&
         strides16(p.q_row_stride, p.q_head_stride, p.q_batch_stride) &&
         strides16(p.k_row_stride, p.k_head_stride, p.k_batch_stride) &&
         strides16(p.v_row_stride, p.v_head_stride, p.v_batch_stride) &&
         reinterpret_cast<uintptr_t>(p.o_ptr) % 4 == 0 && p.o_row_stride % 2 == 0 &&
         p.o_head_stride % 2 == 0 && p.o_batch_stride % 2 == 0;
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
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
CUtensorMap make_map(const FwdParams& p, const void* ptr, int64_t rows, int heads, int batch,
                     int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
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

template <typename Traits>
void launch(const FwdParams& p, int num_sms, cudaStream_t stream) {
  sm90::FwdArgs args;
  args.p = p;
  args.varlen = p.cu_seqlens_q != nullptr;
  args.v_tail_zero = args.varlen || p.seqused_k != nullptr;
  const int64_t q_rows = args.varlen ? p.total_q : p.seqlen_q;
  const int64_t k_rows = args.varlen ? p.total_k : p.seqlen_k;
  const int batch = args.varlen ? 1 : p.batch;
  args.tm_q = make_map(p, p.q_ptr, q_rows, p.nheads, batch, p.q_row_stride, p.q_head_stride,
                       p.q_batch_stride, Traits::kBlockM);
  args.tm_k = make_map(p, p.k_ptr, k_rows, p.nheads_k, batch, p.k_row_stride, p.k_head_stride,
                       p.k_batch_stride, Traits::kBlockN);
  args.tm_v = make_map(p, p.v_ptr, k_rows, p.nheads_k, batch, p.v_row_stride, p.v_head_stride,
                       p.v_batch_stride, Traits::kBlockN);
  args.num_m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t tiles = static_cast<int64_t>(args.num_m_blocks) * p.nheads * p.batch;
  if (tiles > INT32_MAX) {
    throw std::runtime_error("flash_attn CUDA (sm90): " + std::to_string(tiles) +
                             " row blocks exceed 2^31 - 1");
  }
  args.num_tiles = static_cast<int>(tiles);
  // Causal L2 sections (make_tile): as many (sequence, head) pairs as have K and V (seqlen_k rows
  // each) within 32 MB, two thirds of the H100/H200's 50 MB L2, but at least 4 waves of row
  // blocks per section, so that the persistent CTAs' static round robin still balances the long
  // and short blocks inside it (with 2-wave sections head dim 256 lost 10-15% at 2k-16k on the
  // H200); the pairs are then spread evenly over the sections. Head dim 256 beyond 1k keys keeps
  // the plain longest-first order: sections cost it 2-10% there on the H100 (h100-fwd.json vs
  // tuning/h100-fwd-f15e4ea-l2-sections.json), while they gain 20% at 1k.
  const int64_t pairs = int64_t(p.nheads) * p.batch;
  const bool sectioned = Traits::kHeadDim <= 128 || p.seqlen_k <= 1024;
  const int64_t kv_bytes = std::max<int64_t>(1, int64_t(2) * p.seqlen_k * Traits::kHeadDim * 2);
  const int64_t min_pairs = (int64_t(4) * num_sms + args.num_m_blocks - 1) / args.num_m_blocks;
  const int64_t per_section =
      std::clamp<int64_t>(std::max((int64_t(32) << 20) / kv_bytes, min_pairs), 1, pairs);
  const int64_t sections = (pairs + per_section - 1) / per_section;
  args.l2_section = sectioned ? static_cast<int>((pairs + sections - 1) / sections)
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
void run(const FwdParams& p, int num_sms, cudaStream_t stream) {
  if (p.window_right == 0) {
    launch<sm90::FwdTraits<kHeadDim, Element, true>>(p, num_sms, stream);
  } else {
    launch<sm90::FwdTraits<kHeadDim, Element, false>>(p, num_sms, stream);
  }
}

template <typename Element>
void run_dtype(const FwdParams& p, int num_sms, cudaStream_t stream) {
  if (p.head_dim == 64) {
    run<Element, 64>(p, num_sms, stream);
  } else if (p.head_dim == 128) {
    run<Element, 128>(p, num_sms, stream);
  } else {
    run<Element, 256>(p, num_sms, stream);
  }
}

}  // namespace

bool try_run_fwd_sm90(const FwdParams& params, int num_sms, cudaStream_t stream) {
  if (sm90_disabled() || !serves(params)) return false;
  if (params.dtype == DType::kBFloat16) {
    run_dtype<__nv_bfloat16>(params, num_sms, stream);
  } else {
    run_dtype<__half>(params, num_sms, stream);
  }
  return true;
}

FLASH_NAMESPACE_END
