"""The shared numerics of kernel_src/common/ (used by the CPU backend and both CUDA paths),
compiled with g++ into small drivers under tests/cpp/:

* merge() and merge_lse() of softmax_state.h, the combine primitives of split-KV decode, against
  an fp64 reference: two partial softmax results over disjoint key sets (either or both empty,
  or with every key masked) must combine into the softmax over the union. The driver also runs
  the online softmax that produces the partials (eager and lazy rescale), fed fresh random
  cases, so those are checked on the CPU as well.
* mask.h's block-level answers (full_tiles, the GPU loops' closed form of tile_is_full, and
  kv_range with a split range) against its element-wise definition, exhaustively on small
  shapes.
"""
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CPP = REPO / "tests" / "cpp"

# (keys in part A, keys in part B, masked keys in A): empty parts, one key, uneven splits, and
# a part whose keys are all masked (an empty state that still saw keys).
CASES = [(0, 0, 0), (0, 5, 0), (7, 0, 0), (1, 1, 0), (13, 29, 0), (40, 3, 0), (4, 6, 4),
         (5, 0, 5)]
D = 3
# Relative tolerance per variant: fp32 accumulates a few roundings per key; fp64 near exact.
TOL = {"f32": 1e-5, "f32_base2_lazy": 1e-5, "f64": 1e-12}


def build_driver(tmp_path_factory, name):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the CPU backend builds with one)"
    exe = tmp_path_factory.mktemp(name) / name
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{REPO}", str(CPP / f"{name}.cpp"), "-o",
                    str(exe)], check=True)
    return exe


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_driver(tmp_path_factory, "softmax_merge_check")


def make_part(n, masked, scale):
    logits = torch.randn(n, dtype=torch.float64) * scale
    logits[:masked] = -math.inf
    return logits, torch.randn(n, D, dtype=torch.float64)


def reference(logits, values):
    """(lse, O) of the softmax over the keys in fp64; a row without a visible key has
    lse = -inf and O = 0."""
    if logits.numel() == 0 or torch.isinf(logits).all():
        return -math.inf, torch.zeros(D, dtype=torch.float64)
    lse = torch.logsumexp(logits, 0)
    return lse.item(), torch.softmax(logits, 0) @ values


@pytest.mark.fast
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: logits far apart, the lazy rescale moves
def test_merge_matches_softmax_over_union(driver, scale):
    parts, lines = [], [str(len(CASES))]
    for na, nb, masked in CASES:
        a, b = make_part(na, masked, scale), make_part(nb, 0, scale)
        parts.append((a, b))
        lines.append(f"{na} {nb} {D}")
        for logits, values in (a, b):
            lines.append(" ".join(repr(float(x)) for x in logits.tolist()))
            lines.append(" ".join(repr(float(x)) for x in values.flatten().tolist()))
    out = subprocess.run([str(driver)], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == len(CASES) * len(TOL) * 2
    for i, ((na, nb, masked), (a, b)) in enumerate(zip(CASES, parts)):
        lse_ref, o_ref = reference(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
        for line in out[i * len(TOL) * 2:(i + 1) * len(TOL) * 2]:
            variant, path, lse, *o = line.split()
            lse, o = float(lse), torch.tensor([float(x) for x in o], dtype=torch.float64)
            case = f"case {(na, nb, masked)} {variant} {path}"
            if lse_ref == -math.inf:
                # merge(): the output convention (+inf); merge_lse(): the partial one (-inf)
                assert lse == (math.inf if path == "state" else -math.inf), case
                assert torch.equal(o, torch.zeros(D, dtype=torch.float64)), case
            else:
                tol = TOL[variant]
                assert abs(lse - lse_ref) <= tol * (1 + abs(lse_ref)), (case, lse, lse_ref)
                assert torch.allclose(o, o_ref, rtol=tol, atol=tol), (case, o, o_ref)


@pytest.mark.fast
def test_mask_block_ranges_match_elementwise_mask(tmp_path_factory):
    exe = build_driver(tmp_path_factory, "mask_check")
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
    assert " 0 failures" in r.stdout
