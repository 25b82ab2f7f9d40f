// Owns: the entry of the Hopper (sm90a: TMA, wgmma) forward path, as seen by run_fwd_cuda.
#pragma once
#include <cuda_runtime_api.h>

#include "../common/params.h"

FLASH_NAMESPACE_BEGIN

// Runs the forward on the Hopper path if it serves this call on the current device and returns
// true; returns false (having launched nothing) otherwise, and the caller uses the sm80 path.
bool try_run_fwd_sm90(const FwdParams& params, cudaStream_t stream);

FLASH_NAMESPACE_END
