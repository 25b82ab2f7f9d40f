// Owns: the CPU backend's entry points. Conventions: kernel_src/common/params.h and docs/design.md.
// Every entry point works for fp16, bf16, fp32 and fp64, any head_dim in [1, 256], in memory
// linear in the sequence lengths, and throws std::runtime_error (naming the argument) on input it
// cannot serve.
#pragma once
#include "../common/fused_params.h"
#include "../common/params.h"
#include "../common/rotary.h"

FLASH_NAMESPACE_BEGIN

void run_fwd_cpu(const FwdParams& params);
void run_bwd_cpu(const BwdParams& params);
void run_kv_append_cpu(const KvAppendParams& params);
void run_rotary_q_cpu(const RotaryQParams& params);
void run_rotary_cpu(const RotaryParams& params);  // common/rotary.h

// The fused training ops (common/fused_params.h, docs/fused_ops.md).
void run_norm_fwd_cpu(const NormFwdParams& params);
void run_norm_bwd_cpu(const NormBwdParams& params);
void run_cross_entropy_fwd_cpu(const CrossEntropyParams& params);
void run_cross_entropy_bwd_cpu(const CrossEntropyParams& params);

FLASH_NAMESPACE_END
