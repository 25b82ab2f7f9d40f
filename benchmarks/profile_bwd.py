"""Backward calls for Nsight Compute: forward once, then five backward calls of the same graph
(bf16, causal or not, given head dim and seqlen, batch = 16384 / seqlen, heads = 2048 / hdim).
Ours loaded as users load it (kernels.get_local_kernel on build/), or with a fourth argument
`sdpa` PyTorch SDPA's flash backend (FlashAttention-2's kernels) on the same inputs. Profile the
main kernel of the fourth backward: `benchmarks/ncu_compare.sh --bwd OUTDIR HDIM SEQLEN ...`
(ours: `-k regex:bwd_kernel_sm80`, FA2: `-k regex:flash_bwd_dq_dk_dv`).

Usage: python benchmarks/profile_bwd.py HDIM SEQLEN [causal|none] [sdpa]"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bwd import load_flash  # noqa: E402

hd = int(sys.argv[1]) if len(sys.argv) > 1 else 128
s = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
causal = len(sys.argv) > 3 and sys.argv[3] == "causal"
sdpa = len(sys.argv) > 4 and sys.argv[4] == "sdpa"
b, h = max(1, 16384 // s), 2048 // hd
q, k, v = (torch.randn(b, s, h, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
if sdpa:
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=causal).transpose(1, 2)
else:
    out = load_flash(Path(__file__).resolve().parent.parent / "build").flash_attn_func(
        q, k, v, causal=causal)
dout = torch.randn_like(out)
for _ in range(5):
    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
torch.cuda.synchronize()
