#!/usr/bin/env python3
"""Upload the kernel to the Hugging Face Hub as a `kernel` repository.

What goes where (what `kernels` 0.17 and Transformers 5.22 resolve):
  * branch `v<version>` (from build.toml): the whole tree of tools/hub_tree.py (build/<variant>/...,
    README.md, benchmarks/). `get_kernel(repo, version=1)` and `attn_implementation="<repo>"`
    read this branch. Variants no longer built are deleted from the branch, so a stale `.so`
    can never be resolved.
  * branch `main`: the kernel card README.md only (the page people land on).

    python tools/upload_hub.py --dry-run                 # list what would be uploaded, no network
    python tools/upload_hub.py --lockfile kernels.lock   # upload, then write a lock file pinning it

Authentication is huggingface_hub's usual one (`HF_TOKEN` or `hf auth login`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hub_tree  # noqa: E402  (sibling module; tools/ is not a package)

REPO_TYPE = "kernel"


def lock_json(repo_id: str, version: int, commit: str) -> str:
    """A kernels lock file (the format `kernels.load_kernel(..., lockfile=...)` parses)."""
    return json.dumps([{"dependency": {"repo-id": repo_id, "version": version},
                        "lock": {"commit": commit}}], indent=2) + "\n"


def plan(tree: Path, version: int) -> dict[str, list[str]]:
    """Files per branch: everything on `v<version>`, the card alone on `main`."""
    return {f"v{version}": hub_tree.tree_files(tree), "main": ["README.md"]}


def print_plan(repo_id: str, tree: Path, version: int) -> None:
    for branch, files in plan(tree, version).items():
        total = sum((tree / f).stat().st_size for f in files)
        print(f"{REPO_TYPE} repo {repo_id}, branch {branch}: {len(files)} files, "
              f"{total / 2**20:.2f} MiB")
        for f in files:
            print(f"  {(tree / f).stat().st_size:>12,d}  {f}")
    print(f"  (branch v{version}: remote files under build/ that are not listed are deleted)")


def upload(repo_id: str, tree: Path, version: int, private: bool, token: str | None) -> str:
    """Upload `tree`; return the commit id of branch `v<version>`."""
    from huggingface_hub import HfApi  # imported here: --dry-run needs no network stack

    api = HfApi(token=token)
    branch = f"v{version}"
    variants = sorted(p.name for p in (tree / "build").iterdir())
    api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
    api.upload_file(path_or_fileobj=str(tree / "README.md"), path_in_repo="README.md",
                    repo_id=repo_id, repo_type=REPO_TYPE, revision="main",
                    commit_message="Kernel card")
    api.create_branch(repo_id, branch=branch, repo_type=REPO_TYPE, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(tree), repo_type=REPO_TYPE,
                             revision=branch, delete_patterns=["build/**"],
                             ignore_patterns=["*.pyc", "**/__pycache__/**"],
                             commit_message=f"Upload builds: {', '.join(variants)}")
    return info.oid


def main(argv: list[str] | None = None) -> int:
    repo_root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo-id", default=hub_tree.repo_id_of(repo_root))
    ap.add_argument("--version", type=int, default=hub_tree.version_of(repo_root),
                    help="kernel version: uploads go to branch v<version>")
    ap.add_argument("--repo-root", type=Path, default=repo_root)
    ap.add_argument("--tree", type=Path, help="an already assembled tree (default: assemble now)")
    ap.add_argument("--dry-run", action="store_true", help="list what would be uploaded and stop")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--token", default=None, help="default: huggingface_hub's stored token")
    ap.add_argument("--lockfile", type=Path, help="write a kernels lock file for the upload")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hub-tree-") as tmp:
        try:
            tree = args.tree or hub_tree.assemble(args.repo_root, Path(tmp) / "tree")
        except (FileNotFoundError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print_plan(args.repo_id, tree, args.version)
        if args.dry_run:
            print("dry run: nothing uploaded")
            return 0
        commit = upload(args.repo_id, tree, args.version, args.private, args.token)
    print(f"uploaded: https://huggingface.co/kernels/{args.repo_id}/tree/v{args.version} "
          f"(commit {commit})")
    if args.lockfile:
        args.lockfile.write_text(lock_json(args.repo_id, args.version, commit))
        print(f"lock file written: {args.lockfile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
