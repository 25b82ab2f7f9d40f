"""Load the kernel pinned by a lock file, never downloading anything.

The lock file names the Hub commit of branch v1 (`tools/upload_hub.py --lockfile kernels.lock`
writes it after an upload; examples/kernels.lock shows the format with a placeholder commit).
`kernels.load_kernel` reads that commit from the local Hugging Face cache only, so fetch it
once beforehand, e.g. `kernels.install_kernel(repo_id, revision=<commit>)`, or build the cache
offline with `python tools/hub_tree.py --out /tmp/tree --cache ~/.cache/huggingface/hub`.

    python hf_integration/examples/load_locked.py kernels.lock
"""

import sys
from pathlib import Path

import torch
from kernels import load_kernel

lockfile = Path(sys.argv[1] if len(sys.argv) > 1 else "kernels.lock")
fa = load_kernel("flash-kernels/flash-attn", lockfile=lockfile)
q = torch.randn(2, 64, 4, 64)
print(fa.flash_attn_func(q, q, q, causal=True).shape)
