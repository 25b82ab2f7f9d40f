#!/usr/bin/env bash
# The GPU tier in one command, for a machine with an NVIDIA GPU (docs/testing.md, "On the GPU
# machine"): build the CUDA variant for this GPU's capability, then run the named pytest tiers
# with pytest-xdist, each within its own time budget, writing a --grid-summary JSON and a junit
# file per tier into OUT. A tier cut short by its budget is stopped with SIGINT, so its summary
# still holds the outcome counts of what ran (its `exitstatus` is then 2; the tolerance records
# of workers cut short may be missing).
#
#   tools/gpu_check.sh OUT [TIER ...]
#
# TIER names (default: fwd bwd decode):
#   fwd        test_sm90, test_fwd, test_varlen, test_dropout   (whole dispatch)
#   fwd-sm80   test_fwd, test_varlen with FLASH_ATTN_DISABLE_SM90=1 (the Ampere-class kernels)
#   bwd        test_bwd, test_bwd_packed, test_internal_api
#   decode     test_kvcache_cuda, test_kvcache, test_rotary, test_modules_mha, test_bad_input
#   api        test_compile_opcheck, test_multihead_attention, test_transformers_cuda
#   sanitize   the sanitizers' quick grid: memcheck, racecheck and synccheck, each over the shard
#              SAN_SHARD (default 0/100) of three groups: the fwd tier (sm90 dispatch), the
#              fwd-sm80 tier, and bwd + decode; nine runs side by side, one process each (no
#              xdist), PYTORCH_NO_CUDA_MEMORY_CACHING=1; logs san-<tool>-<group>.log
#   sanitize-bwd the three sanitizers over tests/cuda_harness/sanitize_bwd.py (one small backward
#              call per kernel shape, checked against fp32 math), side by side; logs
#              san-<tool>-bwd-harness.log
#
# Environment: PYTHON (default python3), JOBS (xdist workers, default: cores, at most 16),
# BUDGET (seconds per tier, default 600), SHARD (I/N: pass --shard to every tier),
# BUILD_ARGS (extra tools/build_local.py arguments, e.g. "--hdims 64,128"), SKIP_BUILD=1,
# FLASH_TEST_GPUS (pin workers to GPUs, conftest.py). Needs pytest-xdist.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out="${1:?usage: tools/gpu_check.sh OUT [TIER ...]}"
shift
tiers=("$@")
[ ${#tiers[@]} -gt 0 ] || tiers=(fwd bwd decode)
py="${PYTHON:-python3}"
jobs="${JOBS:-$(( $(nproc) < 16 ? $(nproc) : 16 ))}"
budget="${BUDGET:-600}"
mkdir -p "$out"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cap="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" || exit 1
  t0=$SECONDS
  # shellcheck disable=SC2086  # BUILD_ARGS is a list of arguments
  "$py" tools/build_local.py --variant cuda --archs "$cap" --jobs "$(nproc)" ${BUILD_ARGS:-} \
    >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  echo "gpu_check: CUDA variant for capability $cap built in $((SECONDS - t0)) s"
fi

run_tier() {  # name, env assignments..., -- , test files...
  local name="$1"; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local t0=$SECONDS
  env "${envs[@]}" timeout -s INT "$budget" "$py" -m pytest "$@" -k cuda -m "not slow" -q \
    -p no:cacheprovider -n "$jobs" ${SHARD:+--shard "$SHARD"} \
    --grid-summary "$out/$name-summary.json" --junitxml "$out/$name-junit.xml" \
    >"$out/$name.log" 2>&1
  echo "gpu_check: $name: exit $? in $((SECONDS - t0)) s: $(tail -1 "$out/$name.log")"
}

san_one() {  # tool, group, env assignment, test files...
  local tool="$1" group="$2" ev="$3"; shift 3
  local t0=$SECONDS log="$out/san-$tool-$group.log"
  env "$ev" PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT "$budget" \
    compute-sanitizer --tool "$tool" "$py" -m pytest "$@" -k cuda -m "not slow" -q \
    -p no:cacheprovider --shard "${SAN_SHARD:-0/100}" \
    --grid-summary "$out/san-$tool-$group-summary.json" >"$log" 2>&1
  echo "gpu_check: $tool $group: exit $? in $((SECONDS - t0)) s: $(grep -E '(passed|failed)' "$log" | tail -1) / $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
}

run_sanitizers() {
  local tool
  for tool in memcheck racecheck synccheck; do
    san_one "$tool" fwd FLASH_ATTN_DISABLE_SM90=0 tests/test_sm90.py tests/test_fwd.py \
      tests/test_varlen.py tests/test_dropout.py &
    san_one "$tool" fwd-sm80 FLASH_ATTN_DISABLE_SM90=1 tests/test_fwd.py tests/test_varlen.py &
    san_one "$tool" bwd-decode FLASH_ATTN_DISABLE_SM90=0 tests/test_bwd.py tests/test_bwd_packed.py \
      tests/test_kvcache_cuda.py tests/test_kvcache.py &
  done
  wait
}

for tier in "${tiers[@]}"; do
  case "$tier" in
    fwd) run_tier fwd -- tests/test_sm90.py tests/test_fwd.py tests/test_varlen.py \
           tests/test_dropout.py ;;
    fwd-sm80) run_tier fwd-sm80 FLASH_ATTN_DISABLE_SM90=1 -- tests/test_fwd.py tests/test_varlen.py ;;
    bwd) run_tier bwd -- tests/test_bwd.py tests/test_bwd_packed.py tests/test_internal_api.py ;;
    decode) run_tier decode -- tests/test_kvcache_cuda.py tests/test_kvcache.py tests/test_rotary.py \
              tests/test_modules_mha.py tests/test_bad_input.py ;;
    api) run_tier api -- tests/test_compile_opcheck.py tests/test_multihead_attention.py \
           tests/test_transformers_cuda.py ;;
    sanitize) run_sanitizers ;;
    sanitize-bwd)
      for tool in racecheck memcheck synccheck; do
        ( t0=$SECONDS; log="$out/san-$tool-bwd-harness.log"
          PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT "$budget" compute-sanitizer --tool "$tool" \
            "$py" tests/cuda_harness/sanitize_bwd.py >"$log" 2>&1
          echo "gpu_check: $tool bwd-harness: exit $? in $((SECONDS - t0)) s: $(grep -E 'results right|RESULTS WRONG' "$log" | tail -1) / $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)" ) &
      done
      wait ;;
    *) echo "gpu_check: unknown tier $tier" >&2; exit 2 ;;
  esac
done
