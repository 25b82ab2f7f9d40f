#!/usr/bin/env python3
"""Assemble the Hub repository tree of the kernel, exactly as it is uploaded.

Layout written to OUT (what `kernels` and the Hub expect of a kernel repository):

    OUT/README.md                      kernel card (front matter `library_name: kernels`)
    OUT/build/<variant>/...            every variant found under <repo>/build/, copied as is
    OUT/benchmarks/*.py                the benchmark scripts; benchmark*.py are the ones
                                       `kernels benchmark <repo-id>@v<version>` runs
    OUT/benchmarks/results/*.json      the results they wrote

The offline-cache test fixture is built from this same tree (`install_offline_cache`), so what
the tests load is what we ship. Usage:

    python tools/hub_tree.py --out /tmp/hub              # assemble
    python tools/hub_tree.py --out /tmp/hub --cache DIR  # ... and install it into an HF cache
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_REPO_ID = "flash-kernels/flash-attn"
CARD_TEMPLATE = Path(__file__).with_name("kernel_card.md")
# Bytecode never ships: the kernels loader refuses to download it, and stale .pyc would shadow
# the sources on the user's machine.
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


def _build_toml(repo_root: Path) -> dict:
    path = repo_root / "build.toml"
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def repo_id_of(repo_root: Path) -> str:
    """The Hub repo id: `[general.hub] repo-id` of build.toml, else the project default."""
    general = _build_toml(repo_root).get("general", {})
    return general.get("hub", {}).get("repo-id", DEFAULT_REPO_ID)


def version_of(repo_root: Path) -> int:
    """The kernel version (uploads go to branch `v<version>`): build.toml `[general] version`."""
    return int(_build_toml(repo_root).get("general", {}).get("version", 1))


def variant_dirs(repo_root: Path) -> list[Path]:
    """Every `build/<variant>/` holding a metadata.json (the loader refuses variants without)."""
    build = repo_root / "build"
    if not build.is_dir():
        return []
    return sorted(p for p in build.iterdir() if p.is_dir() and (p / "metadata.json").is_file())


def _git_sha(repo_root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root, capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _variant_row(variant: Path) -> tuple[str, str]:
    """(table row for the card, license) from the variant's metadata.json."""
    meta = json.loads((variant / "metadata.json").read_text())
    backend = meta.get("backend", {})
    archs = ", ".join(backend.get("archs") or []) or "-"
    row = f"| `{variant.name}` | {backend.get('type', '?')} | {archs} | `{meta.get('id', '?')}` |"
    return row, meta.get("license", "")


def kernels_benchmark_tables(results_dir: Path) -> str:
    """Markdown tables of the `kernels benchmark --output` files in results_dir
    (`<gpu>-kernels-benchmark.json`): per workload and implementation the mean milliseconds the
    command reports, SDPA's time over it where the workload has an `sdpa` twin, and whether the
    row verified against its fp32 reference."""
    blocks = []
    for path in sorted(results_dir.glob("*kernels-benchmark*.json")):
        doc = json.loads(path.read_text())
        sdpa_ms = {}
        for r in doc.get("results", []):
            group, _, impl = r["workload"].partition(".")
            if impl == "sdpa":
                sdpa_ms[group] = r["timingResults"]["mean_ms"]
        lines = [f"`kernels benchmark ./` on `{path.stem.split('-kernels-benchmark')[0]}` "
                 f"(kernel {doc.get('kernelCommitSha', '?')}, torch "
                 f"{doc.get('machineInfo', {}).get('pytorchVersion', '?')}; "
                 f"[`benchmarks/results/{path.name}`](benchmarks/results/{path.name})):", "",
                 "| workload | implementation | mean (ms) | sdpa / this | verified |",
                 "|---|---|---|---|---|"]
        for r in doc.get("results", []):
            group, _, impl = r["workload"].partition(".")
            ms = r["timingResults"]["mean_ms"]
            ratio = f"{sdpa_ms[group] / ms:.2f}x" if group in sdpa_ms and impl != "sdpa" else "-"
            lines.append(f"| {group} | {impl} | {ms:.3f} | {ratio} | "
                         f"{'yes' if r.get('verified') else 'no'} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) or "No `kernels benchmark` run is recorded in this revision."


def render_card(repo_root: Path, variants: list[Path], bench_files: list[str]) -> str:
    rows, licenses = zip(*(_variant_row(v) for v in variants))
    license_ = (next((lic for lic in licenses if lic), "")
                or _build_toml(repo_root).get("general", {}).get("license", "apache-2.0"))
    return CARD_TEMPLATE.read_text().format(
        license=license_.lower(),
        repo_id=repo_id_of(repo_root),
        version=version_of(repo_root),
        variant_rows="\n".join(rows),
        benchmark_files=", ".join(f"`{b}`" for b in bench_files) or "none yet",
        kernels_benchmark=kernels_benchmark_tables(repo_root / "benchmarks" / "results"),
        git_sha=_git_sha(repo_root),
    )


def assemble(repo_root: Path, out_dir: Path) -> Path:
    """Write the Hub tree of `repo_root` (its built variants) into `out_dir`; return `out_dir`.

    `out_dir` must be absent or empty: we never merge into an older tree, since a stale variant
    left there would be uploaded too.
    """
    repo_root, out_dir = Path(repo_root).resolve(), Path(out_dir)
    variants = variant_dirs(repo_root)
    if not variants:
        raise FileNotFoundError(
            f"no build variants under {repo_root / 'build'} (each needs a metadata.json): "
            "run `python tools/build_local.py` first")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"out_dir {out_dir} is not empty; pass an empty or new directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    for variant in variants:
        shutil.copytree(variant, out_dir / "build" / variant.name, ignore=_IGNORE)

    bench_src, bench_files = repo_root / "benchmarks", []
    if bench_src.is_dir():
        for src in sorted(bench_src.glob("*.py")) + sorted(bench_src.glob("results/*.json")):
            rel = src.relative_to(bench_src)
            (out_dir / "benchmarks" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out_dir / "benchmarks" / rel)
            if src.suffix == ".json":
                bench_files.append(str(Path("benchmarks") / rel))

    (out_dir / "README.md").write_text(render_card(repo_root, variants, bench_files))
    return out_dir


def tree_files(tree: Path) -> list[str]:
    """Relative paths of every file in an assembled tree, sorted (what an upload sends)."""
    return sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())


def tree_commit(tree: Path) -> str:
    """A deterministic 40-hex id of the tree's contents, used as the fake cache commit."""
    h = hashlib.sha1()
    for rel in tree_files(tree):
        h.update(rel.encode() + b"\0" + hashlib.sha1((tree / rel).read_bytes()).digest())
    return h.hexdigest()


def install_offline_cache(tree: Path, cache_dir: Path, repo_id: str = DEFAULT_REPO_ID,
                          version: int = 1) -> Path:
    """Lay `tree` out as a Hugging Face Hub cache entry of a kernel repository.

    Writes `cache_dir/kernels--<org>--<name>/{refs/v<version>, snapshots/<commit>/...}`, which is
    what `kernels.get_kernel(repo_id, version=...)` reads with `HF_HUB_OFFLINE=1` and
    `HF_HUB_CACHE=cache_dir` (the loader looks up `kernels--` first). `models--<org>--<name>` is
    a link to the same folder: `kernels benchmark <repo_id>@v<version>` (kernels 0.17.2) fetches
    the repository's scripts with a plain `snapshot_download`, whose default repo type is
    "model". Returns the snapshot directory. Files are copied, not linked to blobs: the loader
    only needs them to exist, and copies keep the fixture independent of the tree.
    """
    org, name = repo_id.split("/", 1)
    repo_dir = Path(cache_dir) / f"kernels--{org}--{name}"
    commit = tree_commit(tree)
    snapshot = repo_dir / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(tree, snapshot, ignore=_IGNORE)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / f"v{version}").write_text(commit)
    model_alias = Path(cache_dir) / f"models--{org}--{name}"
    if not (model_alias.is_symlink() or model_alias.exists()):
        model_alias.symlink_to(repo_dir.name, target_is_directory=True)
    return snapshot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write the tree into")
    ap.add_argument("--repo-root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--force", action="store_true", help="delete --out first if it exists")
    ap.add_argument("--cache", type=Path, help="also install the tree into this HF cache dir")
    args = ap.parse_args(argv)

    if args.force and args.out.exists():
        shutil.rmtree(args.out)
    try:
        tree = assemble(args.repo_root, args.out)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    files = tree_files(tree)
    print(f"assembled {len(files)} files in {tree}")
    for rel in files:
        print(f"  {rel}")
    if args.cache:
        snap = install_offline_cache(tree, args.cache, repo_id_of(args.repo_root),
                                     version_of(args.repo_root))
        print(f"installed into HF cache: {snap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
