"""One forward call for Nsight Compute (run under ncu with --launch-skip 3 --launch-count 1):
bf16, causal or not, given head dim and seqlen, batch = 16384 / seqlen, heads = 2048 / hdim.
Ours through the harness, or with a fourth argument `sdpa` PyTorch SDPA's flash backend
(FlashAttention-2's kernel, `-k regex:flash_fwd`) on the same inputs, for side-by-side metrics.

Usage: python benchmarks/profile_one.py HDIM SEQLEN [causal|none] [sdpa]"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import flash_harness as fh  # noqa: E402

hd = int(sys.argv[1]) if len(sys.argv) > 1 else 128
s = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
causal = len(sys.argv) > 3 and sys.argv[3] == "causal"
sdpa = len(sys.argv) > 4 and sys.argv[4] == "sdpa"
b, h = max(1, 16384 // s), 2048 // hd
q = torch.randn(b, s, h, hd, device="cuda", dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
if sdpa:
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def call():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
else:
    call = fh.flash_fwd(q, k, v, causal=causal, prepare_only=True)
for _ in range(5):
    call()
torch.cuda.synchronize()
