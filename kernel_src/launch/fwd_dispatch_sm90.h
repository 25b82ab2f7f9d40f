// Owns: the interface between run_fwd_cuda (flash_api_cuda.cu) and the Hopper (sm90a: TMA, wgmma)
// forward: which calls it serves, and the declaration of run_fwd_sm90, whose definition
// (fwd_launch_sm90.h) only the sm90 instantiation files compile, for the 9.0a target. The rest
// of the calls on a compute capability 9.0 device go to the sm80 kernels, built for sm_90 too.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>

#include "../common/cuda_primitives.h"  // env_flag
#include "../common/params.h"
#include "static_switch.h"

FLASH_NAMESPACE_BEGIN

// Defined in fwd_launch_sm90.h; explicitly instantiated for Element in {__half, __nv_bfloat16}
// and the Hopper head dims (tools/kernel_axes.toml, [sm90]) by kernel_src/instantiations/.
// num_sms: the device's multiprocessors (the persistent grid has one CTA per SM).
template <typename Element, int kHeadDim>
void run_fwd_sm90(const FwdParams& params, int num_sms, cudaStream_t stream);

namespace sm90 {

// FLASH_ATTN_DISABLE_SM90=1 sends every call to the sm80 kernels (tests and benchmarks compare
// the two paths on one GPU). Read once per process.
inline bool disabled_by_env() {
  static const bool disabled = env_flag("FLASH_ATTN_DISABLE_SM90");
  return disabled;
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
inline bool strides16(int64_t row, int64_t head, int64_t batch) {
  return row % 8 == 0 && head % 8 == 0 && batch % 8 == 0;  // 2-byte elements: 16-byte strides
}

// Varlen needs a real bound on the sequence lengths (max_seqlen_q given and below total_q, as
// FA2's API asks): the persistent grid walks max_seqlen_q / kBlockM row blocks per sequence and
// skips those past each end. Without one the call goes to the sm80 kernels, whose grid is sized
// from the average length.
inline bool varlen_supported(const FwdParams& p) {
  if (p.cu_seqlens_q == nullptr && p.cu_seqlens_k == nullptr) return true;
  return p.cu_seqlens_q != nullptr && p.cu_seqlens_k != nullptr && p.total_q > 0 &&
         p.total_k > 0 && p.total_k <= INT32_MAX && varlen_rows_bounded(p);
}

// Whether the Hopper forward takes this call (the caller checks for compute capability 9.0):
// fp16/bf16, a compiled Hopper head dim, no mask or causal, none of the general kernel's
// features, TMA-compatible (16-byte) pointers and strides.
inline bool serves(const FwdParams& p) {
  const bool causal = p.window_left < 0 && p.window_right == 0;
  const bool full = p.window_left < 0 && p.window_right < 0;
  return !disabled_by_env() && (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) &&
         sm90_head_dim_compiled(p.head_dim) && (causal || full) && p.p_dropout == 0.0 &&
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

}  // namespace sm90

FLASH_NAMESPACE_END
