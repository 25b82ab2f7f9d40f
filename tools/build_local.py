#!/usr/bin/env python3
"""Build the kernel's Hub variants locally, with the layout kernel-builder produces.

  python tools/build_local.py                      # CPU variant, every core
  python tools/build_local.py --variant cuda       # CUDA variant, every capability in build.toml
  python tools/build_local.py --variant all
  python tools/build_local.py --variant cuda --archs 9.0 --hdims 128 --dtypes bf16   # fast dev

Output: build/torch-stable-abi<XY>-cpu-x86_64-linux/ and build/torch-stable-abi<XY>-cu<MAJ><MIN>-
x86_64-linux/ (CUDA version from the local nvcc), each holding _flash_attn_<backend>_<rev>.abi3.so,
_ops.py, the package's .py files and metadata.json (see tools/_variant_layout.py). Both variants
build without a GPU, against the installed (CPU) torch, through the stable ABI; the CUDA variant
loads on torch >= 2.10 with CUDA 13 (link recipe: tools/_ninja_gen.py).

Sources and flags come from build.toml only. When build.toml is stale (a source was added or
removed), it is regenerated first, except under CI=true, where a stale build.toml is an error so
that the committed file is what gets tested. The ninja files and objects live in
build/.ninja/<variant>/, so rebuilding is incremental; a new git revision recompiles only the
binding (the only code that carries the ops name).

Trimming switches apply to the CUDA variant only, for fast development builds:
  --archs 8.0,9.0   keep these capabilities (9.0 keeps "9.0+PTX" and "9.0a"); a section left
                    with none compiles no GPU code and gets -DFLASH_DISABLE_<SM80|SM90>
  --hdims 64,128    keep instantiation files named hdim<H>; -DFLASH_DISABLE_HDIM<H> for the others
  --dtypes bf16     likewise for fp16/bf16; -DFLASH_DISABLE_FP16 / -DFLASH_DISABLE_BF16
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gen_build_toml  # noqa: E402
from _build_config import (  # noqa: E402
    BuildConfigError, Trim, load_build_toml, python_name, select_sources, source_revision,
    stable_abi_version, torch_target_version,
)
from _ninja_gen import NinjaPlan, Toolchain  # noqa: E402
from _variant_layout import REGISTRATION_H, assemble, write_if_changed  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STUB_C = b"/* Empty stand-in with soname libtorch_cuda.so: the link records the dependency; the\n" \
         b"   real library is loaded by `import torch` on a CUDA build of torch. */\n" \
         b"int flash_attn_libtorch_cuda_stub;\n"


def find_ninja() -> str:
    # Prefer the ninja of this interpreter's environment (pip package), then PATH.
    local = Path(sys.executable).parent / "ninja"
    found = str(local) if local.exists() else shutil.which("ninja")
    if not found:
        sys.exit("build_local: ninja not found: `pip install ninja` (tools/bootstrap.sh does)")
    return found


def cuda_info(nvcc: str) -> tuple[str, Path]:
    """('130', cuda root) from the local nvcc. The root comes from nvcc's own dry run, which also
    sees through wrapper scripts such as /usr/local/bin/nvcc."""
    try:
        version = subprocess.run([nvcc, "--version"], check=True, capture_output=True,
                                 text=True).stdout
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"build_local: cannot run nvcc ({nvcc}): {e}")
    m = re.search(r"release (\d+)\.(\d+)", version)
    top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
    if not m or not top:
        sys.exit(f"build_local: cannot read the CUDA version or root from {nvcc}")
    return f"{m.group(1)}{m.group(2)}", Path(top.group(1).strip()).resolve()


def toolchain(need_cuda: bool) -> tuple[Toolchain, str | None]:
    import torch  # noqa: PLC0415 (slow import, only when building)

    torch_dir = Path(torch.__file__).resolve().parent
    nvcc = cuda_tag = cuda_root = None
    if need_cuda:
        nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
        cuda_tag, cuda_root = cuda_info(nvcc)
    return Toolchain(
        cxx=os.environ.get("CXX", "g++"),
        cc=os.environ.get("CC", "gcc"),
        nvcc=nvcc,
        cuda_root=cuda_root,
        torch_include=[torch_dir / "include"],
        torch_lib=torch_dir / "lib",
        python_include=Path(sysconfig.get_paths()["include"]),
        cxx11_abi=bool(torch.compiled_with_cxx11_abi()),
    ), cuda_tag


def variant_name(config: dict, backend: str, cuda_tag: str | None) -> str:
    major, minor = stable_abi_version(config, backend)
    compute = "cpu" if backend == "cpu" else f"cu{cuda_tag}"
    return f"torch-stable-abi{major}{minor}-{compute}-{platform.machine()}-linux"


def ensure_build_toml(check_only: bool) -> None:
    if gen_build_toml.main(["--check"]) == 0:
        return
    if check_only:
        sys.exit("build_local: build.toml is stale (CI=true): run `python tools/gen_build_toml.py`"
                 " and commit the result")
    print("build_local: build.toml was stale; regenerated it (commit build.toml)", flush=True)
    if gen_build_toml.main([]) != 0:
        sys.exit(1)


@contextlib.contextmanager
def exclusive(lock_path: Path):
    """One build per variant at a time: two ninja runs in one build directory corrupt its logs
    and race on the outputs (several people and agents share a checkout here)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"build_local: waiting for another build of {lock_path.parent.name}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_variant(backend: str, args, config: dict, trim: Trim) -> Path:
    tool, cuda_tag = toolchain(backend == "cuda")
    name = variant_name(config, backend, cuda_tag)
    rev = source_revision(REPO, config)
    ops_name = f"_{python_name(config)}_{backend}_{rev}"
    out_dir = args.out / name
    ninja_dir = args.out / ".ninja" / name
    sources, archs, trim_defines = select_sources(config, backend, trim)
    with exclusive(ninja_dir / ".lock"):
        return _build_locked(backend, args, config, tool, name, ops_name, out_dir, ninja_dir,
                             sources, archs, trim_defines)


def _build_locked(backend, args, config, tool, name, ops_name, out_dir, ninja_dir, sources, archs,
                  trim_defines) -> Path:
    major, minor = stable_abi_version(config, backend)
    defines = [f"TORCH_TARGET_VERSION={torch_target_version(major, minor)}", "TORCH_STABLE_ONLY",
               f"_GLIBCXX_USE_CXX11_ABI={int(tool.cxx11_abi)}"]
    # As kernel-builder's preamble.cmake: CPU_KERNEL, or CUDA_KERNEL and USE_CUDA.
    defines += ["CPU_KERNEL"] if backend == "cpu" else ["CUDA_KERNEL", "USE_CUDA=1"]
    defines += trim_defines

    write_if_changed(ninja_dir / "gen" / "registration.h", REGISTRATION_H.encode())
    if backend == "cuda":
        write_if_changed(ninja_dir / "gen" / "torch_cuda_stub.c", STUB_C)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = NinjaPlan(repo=REPO, ninja_dir=ninja_dir, output=out_dir / f"{ops_name}.abi3.so",
                     backend=backend, ops_name=ops_name, sources=sources, defines=defines,
                     tool=tool, nvcc_threads=args.nvcc_threads, ptxas_verbose=args.ptxas_verbose,
                     lineinfo=args.lineinfo)
    ninja_file = plan.write()

    n_cu = sum(s.lang == "cuda" for s in sources)
    print(f"== {name}: {len(sources)} sources ({n_cu} CUDA), ops {ops_name}"
          + (f", archs {' '.join(archs)}" if archs else "")
          + (f", trimmed {' '.join('-D' + d for d in trim_defines)}" if trim_defines else ""),
          flush=True)
    env = dict(os.environ, NINJA_STATUS=os.environ.get("NINJA_STATUS", "[%f/%t %es] "))
    cmd = [find_ninja(), "-f", str(ninja_file), "-j", str(args.jobs)]
    if args.verbose:
        cmd.append("-v")
    t0 = time.monotonic()
    if subprocess.run(cmd, env=env).returncode != 0:
        sys.exit(f"build_local: the {name} build failed")
    check_undefined(plan.output)
    assemble(REPO, out_dir, config, ops_name, backend, archs if backend == "cuda" else None)
    size_mb = plan.output.stat().st_size / 2**20
    print(f"== {name}: done in {time.monotonic() - t0:.1f}s, {plan.output.name} {size_mb:.1f} MiB"
          f" -> {out_dir}", flush=True)
    return out_dir


def check_undefined(so: Path) -> None:
    """Fail on symbols of our own namespace that nothing defines (a declared entry point whose
    implementation is missing from build.toml's sources). The linker accepts them in a shared
    library; dlopen would reject the .so later with a less helpful "undefined symbol" error."""
    syms = subprocess.run(["readelf", "--dyn-syms", "--wide", str(so)], check=True,
                          capture_output=True, text=True).stdout
    mangled_ns = "9flash_hub"  # FLASH_NAMESPACE (kernel_src/common/namespace.h), mangled
    missing = sorted({line.split()[-1] for line in syms.splitlines()
                      if " UND " in line and mangled_ns in line})
    if missing:
        so.unlink()  # never leave a .so that cannot load where the loader would find it
        names = subprocess.run(["c++filt", *missing], capture_output=True, text=True).stdout
        sys.exit(f"build_local: {so.name} references undefined functions (implementation not "
                 f"compiled; is its source listed in build.toml?):\n  "
                 + "\n  ".join(names.split("\n")).rstrip())


def _csv(kind):
    return lambda text: {kind(x) for x in text.split(",") if x}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--variant", choices=["cpu", "cuda", "all"], default="cpu")
    parser.add_argument("--archs", type=_csv(str), help="CUDA capabilities to keep, e.g. 8.0,9.0")
    parser.add_argument("--hdims", type=_csv(int), help="head dims to keep, e.g. 64,128")
    parser.add_argument("--dtypes", type=_csv(str), help="dtypes to keep: fp16,bf16")
    parser.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--nvcc-threads", type=int, default=1,
                        help="nvcc --threads (parallel gencodes within one file)")
    parser.add_argument("--ptxas-verbose", action="store_true",
                        help="print registers, shared memory and spills per kernel (-Xptxas -v)")
    parser.add_argument("--lineinfo", action="store_true",
                        help="-lineinfo for ncu/compute-sanitizer source lines (about 4x the size)")
    parser.add_argument("--out", type=Path, default=REPO / "build")
    parser.add_argument("--verbose", "-v", action="store_true", help="show full commands")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()

    ensure_build_toml(check_only=os.environ.get("CI", "").lower() in ("1", "true"))
    config = load_build_toml(REPO)
    trim = Trim(archs=args.archs, hdims=args.hdims, dtypes=args.dtypes)
    backends = ["cpu", "cuda"] if args.variant == "all" else [args.variant]
    try:
        for backend in backends:
            build_variant(backend, args, config, trim)
    except (BuildConfigError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"build_local: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
