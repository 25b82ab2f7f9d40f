#!/usr/bin/env bash
# The README's test command: set up what is missing, build the CPU variant, run the test suite
# through the `kernels` loader. Extra arguments go to pytest:
#
#   tools/test.sh               # the CPU suite (pairwise grids), what CI runs
#   tools/test.sh -m fast       # the fast tier, for every change
#   tools/test.sh --full-grid   # full grids on the CPU as well (slow)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

"$repo/tools/bootstrap.sh"
"$repo/.venv/bin/python" tools/build_local.py --variant cpu
exec "$repo/.venv/bin/python" -m pytest tests "$@"
