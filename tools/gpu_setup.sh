#!/usr/bin/env bash
# Source on the GPU machine, from the repository root: installs the wheels of tools/gpu_wheels.sh
# into /tmp/site (PYTHONPATH), names the revision (FLASH_GIT_SHA=$SHA: the tree travels without
# its .git) and builds the CUDA variant for this GPU unless SKIP_BUILD=1, log in $OUT/build.log.
#
#   SHA=<short sha> source tools/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 FLASH_GIT_SHA="${SHA:-unknown}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  _t0=$SECONDS
  _cap="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  python3 tools/build_local.py --variant cuda --archs "$_cap" --jobs "$(nproc)" \
    > "${OUT:-/tmp}/build.log" 2>&1 || { tail -50 "${OUT:-/tmp}/build.log"; return 1; }
  echo "gpu_setup: CUDA variant for capability $_cap built in $((SECONDS - _t0)) s"
fi
