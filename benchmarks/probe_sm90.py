"""Quick probe of the CUDA forward through flash_attn_func (loaded from build/ with kernels):
spot correctness against an fp64 reference on odd shapes, then bf16 TFLOP/s at head dim 64/128/256
(PROBE_HDIMS=64,128 trims), seqlen 1k/4k/16k, next to SDPA flash and cuDNN in the same run. Used for the sm90 steps in
docs/cuda_fwd_sm90.md (benchmarks/results/tuning/h200-sm90-steps.json); the full sweep is
bench_fwd.py.

    python benchmarks/probe_sm90.py
"""
import os, sys, math, statistics, torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
import kernels
from pathlib import Path
fa = kernels.get_local_kernel(Path("build"))
torch.manual_seed(0)
def ref(q, k, v, causal):
    b, sq, h, d = q.shape; sk = k.shape[1]; hk = k.shape[2]
    qf, kf, vf = (x.double().transpose(1, 2) for x in (q, k, v))
    kf = kf.repeat_interleave(h // hk, 1); vf = vf.repeat_interleave(h // hk, 1)
    s = qf @ kf.transpose(-1, -2) / math.sqrt(d)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]; j = torch.arange(sk, device=q.device)[None]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vf).transpose(1, 2), lse
bad = 0
for dt in (torch.bfloat16, torch.float16):
  for (b, sq, sk, h, hk, d, causal) in [(2, 1000, 1000, 4, 2, 64, False), (2, 1000, 1000, 4, 2, 64, True),
        (1, 257, 257, 2, 2, 128, True), (3, 128, 128, 8, 1, 64, False), (1, 300, 700, 2, 1, 128, True),
        (1, 700, 300, 2, 2, 64, True), (2, 1, 513, 3, 3, 128, False), (1, 4096, 4096, 2, 1, 128, True), (1, 77, 1, 2, 2, 64, True),
        (2, 1000, 1000, 2, 1, 256, True), (1, 129, 300, 2, 2, 256, False), (1, 4097, 4097, 1, 1, 256, True)]:
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dt); k = torch.randn(b, sk, hk, d, device="cuda", dtype=dt); v = torch.randn_like(k)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    ro, rl = ref(q, k, v, causal)
    # same math in the input dtype as the error yardstick
    e = (out.double() - ro).abs().max().item()
    yard = (ro.to(dt).double() - ro).abs().max().item()
    fin = torch.isfinite(rl)
    el = (lse.double() - rl)[fin].abs().max().item() if fin.any() else 0.0
    inf_ok = bool((lse[~fin] == float("inf")).all())
    ok = e <= 2 * yard + 4e-3 and el < 1e-3 and inf_ok and torch.isfinite(out).all().item()
    bad += not ok
    print(f"{str(dt)[6:]:9s} b{b} sq{sq} sk{sk} h{h}/{hk} d{d} causal={causal}: out err {e:.2e} (dtype yardstick {yard:.2e}) lse err {el:.2e} inf_ok {inf_ok} {'OK' if ok else 'FAIL'}")
print("failures:", bad)
def t(fn, n=20):
    fn(); torch.cuda.synchronize(); ts = []
    for _ in range(n):
        a = torch.cuda.Event(True); e = torch.cuda.Event(True); a.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(e))
    return statistics.median(ts)
for d in tuple(int(x) for x in os.environ.get("PROBE_HDIMS", "64,128,256").split(",")):
  for s in (1024, 4096, 16384):
    for causal in (False, True):
        b, h = 16384 // s, 2048 // d
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q)
        fl = 4 * b * h * s * s * d / (2 if causal else 1)
        ours = fl / t(lambda: fa.flash_attn_func(q, k, v, causal=causal)) / 1e9
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        r = {}
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            with sdpa_kernel(be): r[be.name] = fl / t(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)) / 1e9
        print(f"d{d} s{s} causal={causal}: ours {ours:6.1f}  flash {r['FLASH_ATTENTION']:6.1f}  cudnn {r['CUDNN_ATTENTION']:6.1f}  ours/flash {ours/r['FLASH_ATTENTION']:.3f} ours/cudnn {ours/r['CUDNN_ATTENTION']:.3f}")
