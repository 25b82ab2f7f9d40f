#!/usr/bin/env bash
# Nsight Compute side by side: the sm80 forward kernel (FLASH_ATTN_DISABLE_SM90=1) and PyTorch
# SDPA-flash (FlashAttention-2's kernel) on the same inputs (benchmarks/profile_one.py), at
# ncu's locked base clock, with the metrics docs/tuning.md discusses (tensor pipe, shared-memory
# wavefronts, stall reasons, instructions). Needs build/harness (benchmarks/build_harness.sh).
# Usage: benchmarks/ncu_compare.sh [--bwd] OUTDIR HDIM SEQLEN [causal|none]...   (one pair per
# seqlen). --bwd: the main backward kernels instead (benchmarks/profile_bwd.py, through the local
# build; the fourth of five backward calls).
set -euo pipefail
cd "$(dirname "$0")/.."
script=benchmarks/profile_one.py ours_k=regex:fwd_kernel_sm80 fa2_k=regex:flash_fwd tag=
if [[ ${1:-} == --bwd ]]; then
  script=benchmarks/profile_bwd.py ours_k=regex:bwd_kernel_sm80 fa2_k=regex:flash_bwd_dq_dk_dv
  tag=bwd-; shift
fi
out=$1 hd=$2; shift 2
mask=none
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu | head -1)
M=gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,launch__grid_size,launch__block_size
M+=,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
M+=,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
M+=,sm__inst_executed_pipe_tensor.sum,smsp__inst_executed.sum
M+=,smsp__issue_active.avg.pct_of_peak_sustained_active
M+=,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed
M+=,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum
M+=,dram__throughput.avg.pct_of_peak_sustained_elapsed
for r in wait short_scoreboard long_scoreboard barrier math_pipe_throttle mio_throttle \
         not_selected selected; do
  M+=,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio
done
mkdir -p "$out"
for arg in "$@"; do
  if [[ $arg == causal || $arg == none ]]; then mask=$arg; continue; fi
  FLASH_ATTN_DISABLE_SM90=1 "$NCU" --launch-skip 3 --launch-count 1 -k "$ours_k" \
    --metrics "$M" python "$script" "$hd" "$arg" "$mask" \
    > "$out/ncu-${tag}ours-$hd-$arg-$mask.txt" 2>&1
  "$NCU" --launch-skip 3 --launch-count 1 -k "$fa2_k" --metrics "$M" \
    python "$script" "$hd" "$arg" "$mask" sdpa > "$out/ncu-${tag}fa2-$hd-$arg-$mask.txt" 2>&1
done
