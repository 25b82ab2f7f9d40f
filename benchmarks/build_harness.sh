#!/usr/bin/env bash
# Builds build/harness/libflash_harness.so: the CUDA forward (kernel_src/launch and the fwd
# instantiations: sm80 for the given archs, sm90 for 90a) plus benchmarks/fwd_harness.cu, without
# torch.
# Usage: benchmarks/build_harness.sh [ARCH...]   (default: 90; e.g. 80 86 90)
# Env: JOBS (parallel nvcc, default nproc), HDIMS ("64 128" trims the others), NVCC_EXTRA.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHS=${*:-90}
OUT=build/harness
rm -rf "$OUT/obj"; mkdir -p "$OUT/obj"
GENCODE=""
for a in $ARCHS; do GENCODE+=" -gencode=arch=compute_${a},code=sm_${a}"; done
DEFS=""
if [[ -n "${HDIMS:-}" ]]; then
  for h in $(python3 -c 'import tomllib; print(*tomllib.load(open("tools/kernel_axes.toml", "rb"))["head_dims"])'); do
    [[ " $HDIMS " == *" $h "* ]] || DEFS+=" -DFLASH_DISABLE_HDIM$h"
  done
fi
# Forward only: the entry point leaves the backward out (FLASH_DISABLE_BACKWARD), so the bwd
# instantiations need not be compiled.
FLAGS="-O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC -DFLASH_DISABLE_BACKWARD $DEFS $GENCODE ${NVCC_EXTRA:-}"
SRCS="kernel_src/launch/flash_api_cuda.cu benchmarks/fwd_harness.cu"
kept() {  # instantiation file $1 survives the HDIMS trim
  local h; h=$(basename "$1" | sed -E 's/.*_hdim([0-9]+)_.*/\1/')
  [[ -z "${HDIMS:-}" || " $HDIMS " == *" $h "* ]]
}
# The Hopper kernel needs the arch-specific sm_90a target (wgmma, setmaxnreg); without 90 in
# ARCHS the entry point is built without it.
if [[ " $ARCHS " == *" 90 "* ]]; then
  for f in kernel_src/instantiations/fwd_sm90_*.cu; do
    kept "$f" || continue
    o="$OUT/obj/$(echo "$f" | tr / _).o"
    nvcc -O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC $DEFS \
      -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -c "$f" -o "$o" 2> "$o.log" \
      || { cat "$o.log"; exit 1; }
  done
else
  FLAGS+=" -DFLASH_DISABLE_SM90"
fi
for f in kernel_src/instantiations/fwd_sm80_*.cu; do
  if kept "$f"; then SRCS+=" $f"; fi
done
printf '%s\n' $SRCS | xargs -P "${JOBS:-$(nproc)}" -I{} sh -c \
  'o='"$OUT"'/obj/$(echo {} | tr / _).o; nvcc '"$FLAGS"' -Xptxas -v -c {} -o $o 2> $o.log || { cat $o.log; exit 255; }; echo "built {}"'
nvcc -shared $GENCODE -o "$OUT/libflash_harness.so" "$OUT"/obj/*.o
grep -h -E "Compiling entry|spill|Used" "$OUT"/obj/*.log > "$OUT/ptxas.txt" || true
echo "wrote $OUT/libflash_harness.so"
