// Owns: the interface between run_fwd_cuda (flash_api_cuda.cu) and the per-head-dim, per-dtype
// instantiations of the sm80 forward: the declaration of run_fwd_sm80, whose definition
// (fwd_launch_sm80.h) only the instantiation files compile, so that the entry point's translation
// unit stays free of kernel code.
#pragma once
#include <cuda_runtime_api.h>

#include "../common/params.h"

FLASH_NAMESPACE_BEGIN

// Defined in fwd_launch_sm80.h; explicitly instantiated for Element in {__half, __nv_bfloat16}
// and every compiled head dim (tools/kernel_axes.toml) by kernel_src/instantiations/ (generated
// by tools/gen_instantiations.py, each guarded by the FLASH_DISABLE_* build-trimming macros).
// num_sms: the device's multiprocessors (sizes the causal grid's L2 sections).
template <typename Element, int kHeadDim>
void run_fwd_sm80(const FwdParams& params, int num_sms, cudaStream_t stream);

FLASH_NAMESPACE_END
