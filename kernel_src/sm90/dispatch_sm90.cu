// Owns: the Hopper path's dispatch. The Hopper forward kernel (TMA + wgmma, warp specialisation)
// is a later issue: until it lands, this serves no call, and H100/H200 run the Ampere-class
// kernels of kernel_src/sm80/ (built for sm_90 too), which are complete and tested there.
// This file is also the one source of the build's 9.0a section.
#include "dispatch_sm90.h"

FLASH_NAMESPACE_BEGIN

bool try_run_fwd_sm90(const FwdParams& /*params*/, cudaStream_t /*stream*/) { return false; }

FLASH_NAMESPACE_END
