#!/usr/bin/env bash
# Prepare a fresh machine for the README commands: the pinned Python environment in .venv/ and
# the system tools the tests call (nix-instantiate from Debian's nix-bin, readelf, a C++
# compiler). Idempotent: a second run only checks a stamp and returns within a second.
#
#   tools/bootstrap.sh            # then use .venv/bin/python
#   FLASH_PYTHON=python3.11 tools/bootstrap.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv"
reqs="$repo/tools/requirements.txt"
stamp="$venv/.bootstrap-stamp"

log() { printf 'bootstrap: %s\n' "$*"; }

# --- system tools -------------------------------------------------------------------------------
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}
missing_pkgs=()
command -v nix-instantiate >/dev/null || missing_pkgs+=(nix-bin)
command -v readelf >/dev/null || missing_pkgs+=(binutils)
command -v g++ >/dev/null || missing_pkgs+=(g++)
if [ ${#missing_pkgs[@]} -gt 0 ]; then
  log "installing ${missing_pkgs[*]} (apt-get)"
  # A fresh machine may have empty package lists.
  if ! apt-cache show "${missing_pkgs[0]}" >/dev/null 2>&1; then as_root apt-get update -qq; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_pkgs[@]}" >/dev/null
fi

# --- Python environment -------------------------------------------------------------------------
python="${FLASH_PYTHON:-}"
if [ -z "$python" ]; then
  # torch 2.13.0's CPU wheel on disk is built for CPython 3.11.
  if command -v python3.11 >/dev/null; then python=python3.11; else python=python3; fi
fi
want="$(cat "$reqs" "$0" | sha256sum | cut -c1-16) $("$python" -c 'import sys; print(sys.version.split()[0])')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import importlib.util as u; assert u.find_spec('torch') and u.find_spec('kernels')" 2>/dev/null; then
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv with $python"
  "$python" -m venv "$venv"
fi
# pip's output goes to a log (this machine's pip configuration warns about absent local
# indexes on every package); it is shown when an install fails.
pip_log="$venv/bootstrap-pip.log"
pip_install() {
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >"$pip_log" 2>&1; then
    tail -n 40 "$pip_log"; log "pip install $* failed (full log: $pip_log)"; return 1
  fi
}
log "installing torch (CPU wheel)"
pip_install "$(grep -E '^torch==' "$reqs")"
log "installing the pinned packages"
pip_install -r "$reqs"
"$venv/bin/python" - <<'PY'
import torch, kernels, transformers
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"bootstrap: torch {torch.__version__}, kernels {kernels.__version__}, "
      f"transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
