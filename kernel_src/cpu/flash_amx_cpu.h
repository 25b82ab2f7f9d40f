// Owns: the entry points of the bf16 attention paths on AMX tiles (flash_fwd_amx_cpu.cpp,
// flash_bwd_amx_cpu.cpp) and the test that picks them. run_fwd_cpu / run_bwd_cpu call them for
// bf16 inputs when amx_usable(); everything else (fp16, fp32, fp64, CPUs without AMX, the
// FLASH_ATTN_CPU_NO_AMX switch) keeps the fp32-tile path of flash_fwd_cpu.cpp / flash_bwd_cpu.cpp.
#pragma once
#include "../common/params.h"
#include "layout_cpu.h"

FLASH_NAMESPACE_BEGIN
namespace cpu {

// bf16 inputs on a CPU (and OS) that lets the process use AMX. The forward also needs S_dmask
// unrequested (the test-only return of P stays on the fp32 path).
bool amx_fwd_applies(const FwdParams& p);
bool amx_bwd_applies(const BwdParams& p);

void run_fwd_amx(const FwdParams& p, const Problem& pr);
void run_bwd_amx(const BwdParams& p, const Problem& pr);

}  // namespace cpu
FLASH_NAMESPACE_END
