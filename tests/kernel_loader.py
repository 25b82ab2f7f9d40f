"""Loading the kernel the way users do: through `kernels`, never by importing torch-ext/.

Three routes, all of which end in `kernels` importing `build/<variant>/`:
* local:     kernels.get_local_kernel(<repo>/build)
* local-env: LOCAL_KERNELS=<repo-id>=<repo>/build, then kernels.get_kernel(<repo-id>, version=1)
* hub-cache: an offline Hub cache tree built from exactly what we ship (tools/hub_tree.py),
             HF_HUB_OFFLINE=1, then kernels.get_kernel(<repo-id>, version=1)

Only one route may run per process: the extension registers its ops namespace once.
"""
import importlib.util
import os
import shutil
import sys
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_DIR = REPO_ROOT / "build"
DEFAULT_REPO_ID = "flash-kernels/flash-attn"
BUILD_HINT = ("run `.venv/bin/python tools/build_local.py --variant cpu` (and "
              "`--variant cuda` on a CUDA machine) from the repository root first")


class BuildMissing(Exception):
    pass


def repo_id():
    """The Hub repo id from build.toml's [general.hub] repo-id (the single source of truth)."""
    toml = REPO_ROOT / "build.toml"
    if toml.exists():
        hub = tomllib.loads(toml.read_text()).get("general", {}).get("hub", {})
        if "repo-id" in hub:
            return hub["repo-id"]
    return DEFAULT_REPO_ID


def variants(build_dir=BUILD_DIR):
    """Variant dirs that look complete (a metadata.json and an extension)."""
    if not build_dir.is_dir():
        return []
    return sorted(p for p in build_dir.iterdir()
                  if (p / "metadata.json").is_file() and any(p.glob("_flash_attn_*.so")))


def require_build(build_dir=BUILD_DIR):
    found = variants(build_dir)
    if not found:
        raise BuildMissing(f"no built variant under {build_dir}: {BUILD_HINT}")
    return found


def load_local(build_dir=BUILD_DIR):
    require_build(build_dir)
    import kernels
    return kernels.get_local_kernel(build_dir)


def load_local_env(build_dir=BUILD_DIR):
    require_build(build_dir)
    os.environ["LOCAL_KERNELS"] = f"{repo_id()}={build_dir}"
    import kernels
    return kernels.get_kernel(repo_id(), version=1)


def _hub_tree_module():
    path = REPO_ROOT / "tools" / "hub_tree.py"
    if not path.exists():
        raise BuildMissing(f"{path} does not exist yet (Hub packaging, HF owner)")
    spec = importlib.util.spec_from_file_location("flash_hub_tree", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_hub_cache(cache_root, build_dir=BUILD_DIR):
    """Build `$HF_HUB_CACHE/kernels--<org>--<repo>/{refs/v1, snapshots/<sha>/...}`.

    The snapshot is exactly the tree tools/hub_tree.py assembles for upload, installed by its
    install_offline_cache (refs/v1 holds the snapshot's sha, as huggingface_hub writes it; see
    kernels/_versions.py and huggingface_hub/_snapshot_download.py). Returns the snapshot dir.
    """
    require_build(build_dir)
    hub_tree = _hub_tree_module()
    cache_root = Path(cache_root)
    staging = cache_root.parent / (cache_root.name + "_tree")
    if staging.exists():
        shutil.rmtree(staging)
    tree = hub_tree.assemble(REPO_ROOT, staging)
    return hub_tree.install_offline_cache(tree, cache_root, hub_tree.repo_id_of(REPO_ROOT),
                                          hub_tree.version_of(REPO_ROOT))


def load_hub_cache(cache_root, build_dir=BUILD_DIR):
    """Offline get_kernel from a cache tree. Sets the environment before `kernels` is imported;
    if huggingface_hub was imported already, its constants are patched to the same values."""
    snapshot = make_hub_cache(cache_root, build_dir)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(cache_root)
    os.environ.pop("LOCAL_KERNELS", None)
    os.environ.pop("KERNELS_CACHE", None)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants
        constants.HF_HUB_OFFLINE = True
        constants.HF_HUB_CACHE = str(cache_root)
    import kernels
    module = kernels.get_kernel(repo_id(), version=1)
    assert Path(module.__file__).resolve().is_relative_to(snapshot.resolve()), (
        f"get_kernel loaded {module.__file__}, not the cache snapshot {snapshot}")
    return module


def ops_of(module):
    """torch.ops.<namespace> of a loaded kernel, via its generated _ops.py."""
    return importlib.import_module(module.__name__ + "._ops").ops
