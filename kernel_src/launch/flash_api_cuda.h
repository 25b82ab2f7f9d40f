// Owns: the CUDA entry points the binding calls. Conventions: kernel_src/common/params.h and
// docs/design.md. Implementations live in kernel_src/launch/ (the only place where runtime values
// become template arguments) and throw std::runtime_error, naming the argument, for what no
// compiled kernel serves (e.g. a GPU below sm80).
#pragma once
#include <cuda_runtime_api.h>

#include "../common/params.h"
#include "../common/rotary.h"

FLASH_NAMESPACE_BEGIN

void run_fwd_cuda(const FwdParams& params, cudaStream_t stream);

// The backward. params carries the workspace (dq_accum_ptr, dsoftmax_sum_ptr zero-filled or not
// as params.h says, and with params.deterministic bwd_cuda_semaphore_count(params) zeroed int32
// counters in dq_semaphore).
void run_bwd_cuda(const BwdParams& params, cudaStream_t stream);
int64_t bwd_cuda_semaphore_count(const BwdParams& params);

// The rotary op (common/rotary.h), an elementwise kernel (rotary_cuda.cu).
void run_rotary_cuda(const RotaryParams& params, cudaStream_t stream);

FLASH_NAMESPACE_END
