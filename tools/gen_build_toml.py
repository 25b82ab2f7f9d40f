#!/usr/bin/env python3
"""Generate build.toml from the source tree: the single source of truth for build.toml.

kernel-builder's Nix sandbox only sees files that some `src` list names, and the local build
(tools/build_local.py) compiles exactly what build.toml lists, so every file under kernel_src/ and
every binding source in torch-ext/ must appear here. Writing the lists by hand drifts; this script
scans the tree instead, and `--check` (run by tests/test_build_toml.py in CI) fails on drift.

Which directory feeds which section (docs/design.md, "Layers and ownership"):

  [kernel.flash_attn_cpu]   backend cpu   kernel_src/cpu/**  + kernel_src/common/**
  [kernel.flash_attn_sm80]  backend cuda  kernel_src/sm80/** + launch/** + common/** + cpu/**
                                          + instantiations/*_sm80_*  (the CUDA variant also
                                          serves CPU tensors, so it compiles the CPU backend too)
  [kernel.flash_attn_sm90]  backend cuda  kernel_src/sm90/** + common/** + instantiations/*_sm90_*
                                          + launch/*.h  (the launch headers its instantiation
                                          files include)
  [torch]                                 torch-ext/*.cpp + torch-ext/*.h

Instantiation files are named <direction>_<arch>_hdim<H>_<dtype>.cu (tools/gen_instantiations.py)
and go to the section of their arch, as gen_instantiations.KERNELS says.

A file under kernel_src/ outside these directories, or an instantiation file whose name names no
known arch, is an error: the layout is the architecture.

Usage:
  python tools/gen_build_toml.py           # rewrite build.toml
  python tools/gen_build_toml.py --check   # exit 1 with a diff when build.toml is stale
"""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_instantiations import arch_sections  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUILD_TOML = "build.toml"

# Section settings. Key names follow the edition-5 schema of the `kernels` monorepo
# (kernels_data::config); tests/test_build_toml.py validates the output with the parser that
# ships in kernels 0.17.2 (`kernels._rust.Build.open`), which rejects unknown keys.
GENERAL = {
    "name": "flash-attn",
    "version": 1,
    "edition": 5,
    "license": "BSD-3-Clause",
    "backends": ["cpu", "cuda"],
}
HUB_REPO_ID = "flash-kernels/flash-attn"
STABLE_ABI = {"cpu": "2.10", "cuda": "2.10"}

# OpenMP parallelises the CPU backend, so every section that compiles kernel_src/cpu/ needs it.
CXX_FLAGS_WITH_CPU = ["-O3", "-fopenmp"]

# No --use_fast_math: it would turn every division, sqrt and exp in the CUDA code into its
# approximate, flush-to-zero form. Kernels that want the fast exp2 (ex2.approx) call it through
# an explicit intrinsic, so the choice stays visible and local. --expt-relaxed-constexpr lets
# constexpr helpers run on device. Fatbin compression: measured on fwd_sm80_hdim32_bf16.cu
# (sm_90 only) 653 KB -> 179 KB; the forward's 12 instantiations for 5 targets made a 195 MB .so
# with -lineinfo and no compression. -lineinfo (4x the size) is a build_local option for ncu and
# compute-sanitizer sessions, not part of the shipped build.
CUDA_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xfatbin=-compress-all"]

# Ampere-class SASS for A100 (8.0), RTX 30xx/A10 (8.6), RTX 40xx/L4/L40 (8.9) and H100/H200 as
# fallback (9.0). "+PTX" is how kernel-builder spells "also embed PTX" (utils.cmake:
# set_gencode_flags_for_srcs emits code=sm_90 and code=compute_90), so newer GPUs JIT the
# compute_90 PTX; the `kernels` loader's arch check (kernels/archs.py) understands the suffix.
SM80_CAPABILITIES = ["8.0", "8.6", "8.9", "9.0+PTX"]
# wgmma and setmaxnreg exist only on the arch-specific target, which runs on 9.0 devices only.
SM90_CAPABILITIES = ["9.0a"]

# kernel section name -> (backend, source directories under kernel_src/, extra settings); the
# instantiation files are routed by name (instantiation_section).
KERNEL_SECTIONS = {
    "flash_attn_cpu": {
        "backend": "cpu",
        "dirs": ["cpu", "common"],
        "cxx-flags": CXX_FLAGS_WITH_CPU,
    },
    "flash_attn_sm80": {
        "backend": "cuda",
        "dirs": ["sm80", "launch", "common", "cpu"],
        "cuda-capabilities": SM80_CAPABILITIES,
        "cuda-flags": CUDA_FLAGS,
        "cxx-flags": CXX_FLAGS_WITH_CPU,
    },
    "flash_attn_sm90": {
        "backend": "cuda",
        "dirs": ["sm90", "common"],
        "header_dirs": ["launch"],
        "cuda-capabilities": SM90_CAPABILITIES,
        "cuda-flags": CUDA_FLAGS,
    },
}
KNOWN_DIRS = sorted({d for s in KERNEL_SECTIONS.values() for d in s["dirs"]} | {"instantiations"})
INSTANTIATION_NAME = re.compile(r"[a-z_]+?_(sm\d+)_hdim\d+_[a-z0-9]+\.cu")

# Never listed: editor leftovers and bytecode are not sources.
IGNORED_SUFFIXES = (".pyc", ".pyo", "~", ".swp", ".orig", ".rej")


class LayoutError(RuntimeError):
    """A file sits where no build.toml section can pick it up."""


def _is_source(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return not (
        name.startswith(".") or "__pycache__" in rel.split("/") or name.endswith(IGNORED_SUFFIXES)
    )


def list_files(repo: Path, top: str) -> list[str]:
    """Files under `top` (repo-relative, '/'-separated, sorted) that git does not ignore.

    Untracked files count: a new kernel file must be listed before it is committed, otherwise
    the drift check would pass locally and the Nix build would miss the file.
    """
    if not (repo / top).is_dir():
        return []
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", top],
            cwd=repo, check=True, capture_output=True,
        ).stdout.decode()
        rels = {p for p in out.split("\0") if p}
    except (OSError, subprocess.CalledProcessError):
        # Not a git checkout (e.g. an unpacked archive): walk the directory instead.
        rels = {p.relative_to(repo).as_posix() for p in (repo / top).rglob("*")}
    # Files deleted in the work tree but still in the index must not be listed.
    return sorted(r for r in rels if (repo / r).is_file() and _is_source(r))


def instantiation_section(rel: str) -> str | None:
    """The section of kernel_src/instantiations/<direction>_<arch>_hdim<H>_<dtype>.cu, by its arch;
    None when the name does not follow that pattern or names an arch without a section."""
    m = INSTANTIATION_NAME.fullmatch(rel.rsplit("/", 1)[-1])
    return arch_sections().get(m.group(1)) if m else None


def collect(repo: Path = REPO) -> dict:
    """The build configuration as plain data (the order of keys is the order written)."""
    kernel_files = list_files(repo, "kernel_src")
    by_dir: dict[str, list[str]] = {d: [] for d in KNOWN_DIRS}
    by_section: dict[str, list[str]] = {name: [] for name in KERNEL_SECTIONS}
    stray = []
    for rel in kernel_files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[1] == "instantiations":
            section = instantiation_section(rel)
            if section in by_section:
                by_section[section].append(rel)
            else:
                stray.append(rel)
        elif len(parts) >= 3 and parts[1] in by_dir:
            by_dir[parts[1]].append(rel)
        else:
            stray.append(rel)
    if stray:
        raise LayoutError(
            "files under kernel_src/ outside the known directories "
            f"({', '.join(d + '/' for d in KNOWN_DIRS)}): {', '.join(stray)}; "
            "move them into one of those (see docs/design.md) or extend tools/gen_build_toml.py; "
            "instantiations/ holds only <direction>_<arch>_hdim<H>_<dtype>.cu files of an arch "
            "that tools/gen_instantiations.py knows"
        )

    torch_src = [
        rel for rel in list_files(repo, "torch-ext")
        if rel.count("/") == 1 and rel.endswith((".cpp", ".h"))
    ]

    kernels = {}
    for name, spec in KERNEL_SECTIONS.items():
        section = {"backend": spec["backend"], "depends": ["torch"]}
        for key in ("cuda-capabilities", "cuda-flags", "cxx-flags"):
            if key in spec:
                section[key] = list(spec[key])
        section["include"] = ["."]
        headers = [f for d in spec.get("header_dirs", []) for f in by_dir[d] if f.endswith(".h")]
        section["src"] = sorted([f for d in spec["dirs"] for f in by_dir[d]] + headers +
                                by_section[name])
        kernels[name] = section

    return {
        "general": dict(GENERAL),
        "general.hub": {"repo-id": HUB_REPO_ID},
        "torch": {"include": ["."], "src": torch_src},
        "torch.stable-abi": dict(STABLE_ABI),
        "kernel": kernels,
    }


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        if any(c in v for c in '"\\\n'):
            raise ValueError(f"unsupported character in TOML string {v!r}")
        return f'"{v}"'
    if isinstance(v, list):
        items = [_value(x) for x in v]
        # Path lists one per line, so that adding a file is a one-line diff.
        if len(v) > 1 and any(isinstance(x, str) and "/" in x for x in v):
            return "[\n" + "".join(f"  {x},\n" for x in items) + "]"
        return "[" + ", ".join(items) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _table(name: str, body: dict) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_value(v)}\n" for k, v in body.items())


def render(config: dict) -> str:
    """build.toml text. Deterministic, so `--check` can compare byte for byte."""
    parts = [
        "# Generated by tools/gen_build_toml.py from the source tree. Do not edit by hand:\n"
        "# run `python tools/gen_build_toml.py` after adding, moving or removing a source file.\n"
    ]
    for key in ("general", "general.hub", "torch", "torch.stable-abi"):
        parts.append(_table(key, config[key]))
    for name, section in config["kernel"].items():
        parts.append(_table(f"kernel.{name}", section))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 and print a diff when build.toml is stale")
    parser.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    try:
        text = render(collect(args.repo))
    except LayoutError as e:
        print(f"gen_build_toml: {e}", file=sys.stderr)
        return 2
    path = args.repo / BUILD_TOML
    current = path.read_text() if path.exists() else ""
    if args.check:
        if current == text:
            return 0
        sys.stdout.writelines(difflib.unified_diff(
            current.splitlines(keepends=True), text.splitlines(keepends=True),
            fromfile="build.toml (committed)", tofile="build.toml (generated)"))
        print("build.toml is stale: run `python tools/gen_build_toml.py`", file=sys.stderr)
        return 1
    if current != text:
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
