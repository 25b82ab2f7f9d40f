"""Use the flash-attn Hub kernel as a named Transformers attention backend.

    import flash_attn_hub
    flash_attn_hub.register(name="flash_hub", source="flash-kernels/flash-attn")   # or a local path
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="flash_hub")

Why this is more than `AttentionInterface.register(name, fn)` (Transformers 5.22.2):

* The attention function must come with a mask function: without an `AttentionMaskInterface`
  entry, Transformers hands the attention function `attention_mask=None`, and a padded batch
  silently attends to its padding. `register` installs both and checks both are there.
* Any name containing "flash" makes Transformers preload it as a flash kernel
  (`lazy_import_flash_attention(name)`, at model init and in every flash forward), which fails
  for a name that is not a Hub repo id. `register` therefore maps the name to the loaded kernel
  the way Transformers maps `flash_attention_2` to its Hub fallback: an entry in
  `FLASH_ATTN_KERNEL_FALLBACK` naming a repo id that `LOCAL_KERNELS` points at the kernel's
  build directory. The attention function is then Transformers' own flash wrapper, so the named
  backend takes exactly the code path of `attn_implementation="<repo-id>"` (padding -> varlen,
  packed `position_ids`, `cu_seq_lens_*`, sliding window, softcap, dropout), only without the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

__all__ = ["DEFAULT_NAME", "DEFAULT_REPO_ID", "load", "register", "is_registered", "unregister"]

DEFAULT_NAME = "flash_hub"
DEFAULT_REPO_ID = "flash-kernels/flash-attn"
# Repo ids of the form `<_ALIAS_ORG>/<name>` are ours: LOCAL_KERNELS maps them to a build dir.
_ALIAS_ORG = "flash-attn-hub-local"
_BUILTIN_NAMES = {"eager", "sdpa", "flex_attention", "paged|eager", "flash_attention_2",
                  "flash_attention_3", "flash_attention_4"}


def _is_local(source: str | os.PathLike) -> bool:
    return isinstance(source, os.PathLike) or Path(source).exists()


def load(source: str | os.PathLike = DEFAULT_REPO_ID, *, version: int | None = None,
         revision: str | None = None, trust_remote_code: bool = False) -> tuple[ModuleType, Path]:
    """Load the kernel; return (module, variant directory it was imported from).

    `source` is a Hub repo id (resolved by `kernels`: downloaded, or read from the cache when
    `HF_HUB_OFFLINE=1`) or a local path: the repository root, its `build/`, or one variant.
    """
    import kernels
    from huggingface_hub import constants

    if _is_local(source):
        path = Path(source).resolve()
        if not path.exists():
            raise FileNotFoundError(f"source: {path} does not exist")
        module = kernels.get_local_kernel(path)
        return module, Path(module.__file__).resolve().parent
    if not isinstance(source, str) or source.count("/") != 1:
        raise ValueError(f"source: {source!r} is neither an existing path nor an 'org/name' repo id")
    if version is None and revision is None:
        version = 1
    variant = kernels.install_kernel(source, version=version, revision=revision,
                                     local_files_only=constants.HF_HUB_OFFLINE,
                                     trust_remote_code=trust_remote_code)
    return kernels.get_local_kernel(Path(variant)), Path(variant)


def _alias(name: str) -> str:
    return f"{_ALIAS_ORG}/{name}"


def _set_local_kernel(repo_id: str, path: Path) -> None:
    """Point `repo_id` at `path` in LOCAL_KERNELS (kernels re-reads it on every lookup)."""
    if ":" in str(path):
        raise ValueError(f"source: LOCAL_KERNELS cannot hold a path with ':' ({path})")
    entries = [e for e in os.environ.get("LOCAL_KERNELS", "").split(":")
               if e and not e.startswith(f"{repo_id}=")]
    os.environ["LOCAL_KERNELS"] = ":".join(entries + [f"{repo_id}={path}"])


def register(name: str = DEFAULT_NAME, source: str | os.PathLike = DEFAULT_REPO_ID, *,
             version: int | None = None, revision: str | None = None,
             trust_remote_code: bool = False) -> ModuleType:
    """Register the kernel as `attn_implementation=name`; return the kernel module.

    Installs the attention function (Transformers' flash wrapper, bound to this kernel) and the
    flash mask function (2-D padding mask, or None when nothing is padded), and makes the name
    resolvable by Transformers' flash preloading. Calling it again re-points the name.
    """
    from transformers import AttentionInterface
    from transformers import modeling_flash_attention_utils as mfau
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    if not isinstance(name, str) or not name or any(c in name for c in "/:@|") \
            or name in _BUILTIN_NAMES:
        raise ValueError(f"name: {name!r} must be a new name without '/', ':', '@' or '|'")
    module, variant = load(source, version=version, revision=revision,
                           trust_remote_code=trust_remote_code)
    for fn in ("flash_attn_func", "flash_attn_varlen_func"):
        if not callable(getattr(module, fn, None)):
            raise ValueError(f"source: kernel at {variant} has no {fn}()")

    _set_local_kernel(_alias(name), variant)
    mfau.FLASH_ATTN_KERNEL_FALLBACK[name] = _alias(name)
    # Force a re-import if this name was loaded before with another source.
    if mfau._loaded_implementation == name:
        mfau._loaded_implementation = None
    AttentionInterface.register(name, flash_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    if not is_registered(name):
        raise RuntimeError(f"registration of {name!r} did not take effect")
    return module


def is_registered(name: str) -> bool:
    """True only if both the attention and the mask function are registered for `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return (name in AttentionInterface._global_mapping
            and name in AttentionMaskInterface._global_mapping)


def unregister(name: str) -> None:
    """Remove what `register(name)` installed (for tests and for switching sources)."""
    from transformers import AttentionInterface
    from transformers import modeling_flash_attention_utils as mfau
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    mfau.FLASH_ATTN_KERNEL_FALLBACK.pop(name, None)
    if mfau._loaded_implementation == name:
        mfau._loaded_implementation = None
    entries = [e for e in os.environ.get("LOCAL_KERNELS", "").split(":")
               if e and not e.startswith(f"{_alias(name)}=")]
    if entries:
        os.environ["LOCAL_KERNELS"] = ":".join(entries)
    else:
        os.environ.pop("LOCAL_KERNELS", None)
