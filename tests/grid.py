"""The test grids (docs/testing.md): every axis value listed once, here, and how they are combined.

On the CPU the default tier runs a pairwise covering (every pair of axis values appears in at
least one case) so that the suite stays under five minutes on two cores while still exercising
every value of every axis; `--full-grid` (or FLASH_FULL_GRID=1) runs the full cartesian product,
and CUDA always runs the full product. Cases are generated deterministically so that test ids
are stable across runs; the tensors inside each case are fresh random numbers (see conftest).
"""
import itertools
import tomllib
from pathlib import Path

import torch

DTYPES_CPU = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPES_CUDA = [torch.float16, torch.bfloat16]
# The compiled head dims (the one list, tools/kernel_axes.toml) plus odd ones that run padded.
KERNEL_AXES = tomllib.loads(
    (Path(__file__).resolve().parent.parent / "tools" / "kernel_axes.toml").read_text())
HDIMS = KERNEL_AXES["head_dims"] + [40, 59, 111]
SM90_HDIMS = KERNEL_AXES["sm90"]["head_dims"]
MASKS = ["none", "causal", "local"]
HEADS = ["MHA", "GQA", "MQA"]
SEQLENS = [(1, 1), (113, 203), (239, 1), (799, 3), (1023, 1024), (1024, 1023)]
SEQLENS_SLOW = [(4224, 4224)]  # only in the full grid (slow tier, GPU)
PAGE_SIZES = [1, 3, 16, 17, 256]

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}


def dtype_name(dtype):
    return _DTYPE_NAMES[dtype]


def head_counts(kind, device):
    """(nheads, nheads_k) for MHA / GQA / MQA; fewer heads on the CPU to stay fast."""
    if device == "cpu":
        return {"MHA": (2, 2), "GQA": (4, 2), "MQA": (3, 1)}[kind]
    return {"MHA": (4, 4), "GQA": (6, 2), "MQA": (8, 1)}[kind]


def batch_for(seqlen_q, seqlen_k, device):
    """Batch size: at least 2 where cheap so that batch strides are exercised."""
    if device == "cpu":
        return 2 if seqlen_q * seqlen_k <= 300_000 else 1
    return 4 if seqlen_q * seqlen_k <= 4_000_000 else 2


def pairwise(axes):
    """Greedy all-pairs covering of a dict {name: values}. Deterministic.

    Returns a list of dicts. Each step seeds a case with the smallest uncovered pair and fills
    the other axes with the value that covers the most uncovered pairs (AETG-style).
    """
    names = list(axes)
    sizes = [len(axes[n]) for n in names]
    if len(names) == 1:
        return [{names[0]: v} for v in axes[names[0]]]
    uncovered = {((a, ia), (b, ib))
                 for a, b in itertools.combinations(range(len(names)), 2)
                 for ia in range(sizes[a]) for ib in range(sizes[b])}
    cases = []
    while uncovered:
        (a, ia), (b, ib) = min(uncovered)
        case = {a: ia, b: ib}
        for c in range(len(names)):
            if c in case:
                continue

            def gain(ic, c=c):
                return sum(((min(c, x), ic if c < x else ix), (max(c, x), ix if c < x else ic))
                           in uncovered for x, ix in case.items())

            case[c] = max(range(sizes[c]), key=lambda ic: (gain(ic), -ic))
        for x, y in itertools.combinations(sorted(case), 2):
            uncovered.discard(((x, case[x]), (y, case[y])))
        cases.append({names[i]: axes[names[i]][case[i]] for i in range(len(names))})
    return cases


def product(axes):
    names = list(axes)
    return [dict(zip(names, vals)) for vals in itertools.product(*axes.values())]


# The axes crossed in full (docs/testing.md); other axes (layouts, options) are covered pairwise
# within every combination of these, which keeps "full" grids finite (the KV-cache grid alone
# would be 200k cases as a plain product).
CORE_AXES = ("dtype", "hdim", "mask", "heads", "seqlens")


def combine(axes, full):
    if not full:
        return pairwise(axes)
    core = {k: v for k, v in axes.items() if k in CORE_AXES}
    rest = {k: v for k, v in axes.items() if k not in CORE_AXES}
    if not rest:
        return product(axes)
    if not core:
        return pairwise(rest)
    return [dict(c, **r) for c in product(core) for r in pairwise(rest)]


def case_id(case):
    parts = []
    for key, val in case.items():
        if isinstance(val, torch.dtype):
            parts.append(dtype_name(val))
        elif isinstance(val, tuple):
            parts.append(f"{key}{'x'.join(map(str, val))}")
        elif isinstance(val, bool):
            parts.append(f"{key}" if val else f"no{key}")
        elif isinstance(val, int):
            parts.append(f"{key}{val}")
        else:
            parts.append(str(val))
    return "-".join(parts)
