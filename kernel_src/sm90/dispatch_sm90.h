// Owns: the entry of the Hopper (sm90a: TMA, wgmma) forward path, as seen by run_fwd_cuda.
#pragma once
#include <cuda_runtime_api.h>

#include "../common/params.h"

FLASH_NAMESPACE_BEGIN

// On a compute capability 9.0 device with `num_sms` multiprocessors (the caller checks the
// capability): runs the forward on the Hopper path if it serves this call and returns true;
// returns false (having launched nothing) otherwise, and the caller uses the sm80 path.
bool try_run_fwd_sm90(const FwdParams& params, int num_sms, cudaStream_t stream);

FLASH_NAMESPACE_END
