#!/usr/bin/env bash
# Fetches, on a machine with network access, the Python packages the GPU machine lacks or has at
# other versions than tools/requirements.txt pins, as wheels into .whl/ (ignored by git), for a
# GPU machine that cannot reach a package index (docs/testing.md, "On the GPU machine"). Its image
# brings torch, pytest, pytest-xdist, safetensors, huggingface_hub and tokenizers itself.
#
#   tools/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12, the GPU image's python3
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
py="${1:-3.12}"
pin() { grep -E "^$1==" tools/requirements.txt | head -1 | sed 's/\[[a-z]*\]//'; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "$(pin 'kernels(\[[a-z]*\])?')" "$(pin transformers)" "$(pin ring-flash-attn)" \
  "$(pin yunchang)" tomlkit
ls -1 .whl
