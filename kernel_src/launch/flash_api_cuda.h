// Owns: the CUDA entry points the binding calls. Conventions: kernel_src/common/params.h and
// docs/design.md. Implementations live in kernel_src/launch/ (the only place where runtime values
// become template arguments). Each checks the device and the sizes it relies on first (one
// function for all of them) and throws std::runtime_error, naming the argument, for what no
// compiled kernel serves (e.g. a GPU below sm80, an op without a CUDA kernel yet).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/params.h"

FLASH_NAMESPACE_BEGIN

// The forward (flash_attn_func, flash_attn_varlen_func): O and the LSE.
void run_fwd_cuda(const FwdParams& params, cudaStream_t stream);

// The backward: dq, dk, dv (zero-filled by the caller) from the forward's O and LSE. params
// carries the workspace (BwdParams: dq_accum_ptr zero-filled, dsoftmax_sum_ptr, and with
// params.deterministic bwd_cuda_semaphore_count(params) zeroed int32 counters in dq_semaphore).
void run_bwd_cuda(const BwdParams& params, cudaStream_t stream);
int64_t bwd_cuda_semaphore_count(const BwdParams& params);

// The attention step of flash_attn_with_kvcache, over a cache that already holds the new keys
// (paged through block_table, indexed through cache_batch_idx, offset by leftpad_k, its lengths
// in seqused_k; num_splits as the caller asked).
void run_fwd_kvcache_cuda(const FwdParams& params, cudaStream_t stream);

FLASH_NAMESPACE_END
