"""One forward call of the CUDA kernel for Nsight Compute (run under ncu with --launch-skip 3
--launch-count 1): bf16, causal or not, given head dim and seqlen, batch = 16384 / seqlen."""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import flash_harness as fh  # noqa: E402

hd = int(sys.argv[1]) if len(sys.argv) > 1 else 128
s = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
causal = len(sys.argv) > 3 and sys.argv[3] == "causal"
b, h = max(1, 16384 // s), 2048 // hd
q = torch.randn(b, s, h, hd, device="cuda", dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
call = fh.flash_fwd(q, k, v, causal=causal, prepare_only=True)
for _ in range(5):
    call()
torch.cuda.synchronize()
