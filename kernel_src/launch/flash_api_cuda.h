// Owns: the CUDA entry points the binding calls. Conventions: kernel_src/common/params.h and
// docs/design.md. Implementations live in kernel_src/launch/ (the only place where runtime values
// become template arguments). Each checks the device and the sizes it relies on first (one
// function for all of them) and throws std::runtime_error, naming the argument, for what no
// compiled kernel serves (e.g. a GPU below sm80, an op without a CUDA kernel yet).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/fused_params.h"
#include "../common/params.h"
#include "../common/rotary.h"

FLASH_NAMESPACE_BEGIN

// The forward (flash_attn_func, flash_attn_varlen_func): O and the LSE.
void run_fwd_cuda(const FwdParams& params, cudaStream_t stream);

// The backward: dq, dk, dv (zero-filled by the caller) from the forward's O and LSE. params
// carries the workspace (BwdParams: dq_accum_ptr zero-filled, dsoftmax_sum_ptr, and with
// params.deterministic bwd_cuda_semaphore_count(params) zeroed int32 counters in dq_semaphore);
// dq_accum_ptr holds bwd_cuda_dq_accum_elems(params) zeroed floats.
void run_bwd_cuda(const BwdParams& params, cudaStream_t stream);
int64_t bwd_cuda_semaphore_count(const BwdParams& params);
int64_t bwd_cuda_dq_accum_elems(const BwdParams& params);

// The number of split-KV partitions (common/split_kv.h) a forward call should use: the caller's
// num_splits when it is > 0, else 1 when the grid already fills the device, else a count from
// the SM count. When it returns n > 1, the caller allocates the partial buffers (PartialLayout
// sizes: n x lse numel, n x rows x nheads x dq_accum_width(d), fp32, uninitialised) and passes
// them with num_splits = n; this is the only allocation split-KV needs, so a caller that owns it
// can capture the call in a CUDA graph.
int fwd_cuda_num_splits(const FwdParams& params);

// The attention step of flash_attn_with_kvcache, over a cache that already holds the new keys
// (paged through block_table, indexed through cache_batch_idx, offset by leftpad_k, its lengths
// in seqused_k). The same kernels as run_fwd_cuda.
void run_fwd_kvcache_cuda(const FwdParams& params, cudaStream_t stream);

// The merge of split-KV partials into O and the LSE (fwd_combine_cuda.cu).
void run_fwd_combine_cuda(const FwdParams& params, cudaStream_t stream);

// flash_attn_with_kvcache's steps before the attention (rotary_cuda.cu): the in-place append of
// the new k/v (k rotated), with params.seqused_out filled on the device; the rotated copy of q.
void run_kv_append_cuda(const KvAppendParams& params, cudaStream_t stream);
void run_rotary_q_cuda(const RotaryQParams& params, cudaStream_t stream);

// The `rotary` op (flash_attn.layers.rotary).
void run_rotary_cuda(const RotaryParams& params, cudaStream_t stream);

// The fused norm ops (norm_cuda.cu; common/fused_params.h). The backward needs
// norm_bwd_cuda_workspace_floats(params) fp32 entries of scratch in params.workspace
// (uninitialised; may be 0 entries, then null).
void run_norm_fwd_cuda(const NormFwdParams& params, cudaStream_t stream);
void run_norm_bwd_cuda(const NormBwdParams& params, cudaStream_t stream);
int64_t norm_bwd_cuda_workspace_floats(const NormBwdParams& params);

// The chunked cross-entropy (cross_entropy_cuda.cu); the backward writes params.dlogits, which
// may be the logits themselves.
void run_cross_entropy_fwd_cuda(const CrossEntropyParams& params, cudaStream_t stream);
void run_cross_entropy_bwd_cuda(const CrossEntropyParams& params, cudaStream_t stream);

FLASH_NAMESPACE_END
