"""CUDA kernels of a decode call, per kernel: flash_attn_with_kvcache (automatic split count,
num_splits 1 and 8, a paged cache of 16-token pages) against SDPA flash and cuDNN on K/V expanded to
every query head, at a few points of the decode sweep (bf16, one query row). Each line: the median
time of a call (triton do_bench, L2 flushed) and the longest kernels with their mean device time
(torch.profiler, 10 calls). FLASH_ATTN_DISABLE_SM90=1 skips the peers and shows the sm80 path.

    python benchmarks/profile_decode.py        # from the repository root, after a CUDA build
"""
import os, sys, math, torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
sys.path.insert(0, "hf_integration"); sys.path.insert(0, "benchmarks")
import flash_attn_hub
from _measure import kernel_ms
flash, _ = flash_attn_hub.load("build")
from torch.profiler import profile, ProfilerActivity
def prof(fn, label):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(10): fn()
        torch.cuda.synchronize()
    ev = {}
    for e in p.key_averages():
        if e.device_time_total > 0: ev[e.key[:90]] = (e.count, e.device_time_total / e.count)
    ms = kernel_ms(fn)
    print(f"  {label:10s} {ms*1e3:8.1f} us/call", "; ".join(f"{k} x{c//10} {t:.1f}us" for k, (c, t) in sorted(ev.items(), key=lambda x: -x[1][1])[:5]))
pts = [(1, 8192, 32, 1, 128), (16, 8192, 32, 1, 64), (1, 8192, 32, 8, 128), (16, 8192, 32, 8, 128), (16, 8192, 32, 8, 64), (128, 1024, 32, 8, 64), (128, 1024, 32, 32, 64), (64, 4096, 32, 32, 64), (8, 65536, 32, 1, 64)]
for b, sk, h, hk, d in pts:
    print(f"b={b} sk={sk} h={h}/{hk} d={d}  KV MB={2*b*sk*hk*d*2/1e6:.1f}", flush=True)
    kc = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16); vc = torch.randn_like(kc)
    sl = torch.full((b,), sk, dtype=torch.int32, device="cuda")
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    prof(lambda: flash.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=sl), "ours")
    for ns in (1, 8):
        prof(lambda: flash.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=sl, num_splits=ns), f"ours s{ns}")
    ps = 16; pages = math.ceil(sk / ps); perm = torch.randperm(b * pages, device="cuda")
    kp = torch.empty(b * pages, ps, hk, d, device="cuda", dtype=torch.bfloat16); vp = torch.empty_like(kp)
    kp[perm] = kc.view(b * pages, ps, hk, d); vp[perm] = vc.view(b * pages, ps, hk, d)
    bt = perm.view(b, pages).to(torch.int32)
    prof(lambda: flash.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=sl, block_table=bt), "ours p16")
    prof(lambda: flash.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=sl, block_table=bt, num_splits=1), "p16 s1")
    if os.environ.get("FLASH_ATTN_DISABLE_SM90"): continue
    qt = q.transpose(1, 2); kt = kc.transpose(1, 2); vt = vc.transpose(1, 2)
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        k2, v2 = (kt, vt) if hk == h else (kt.repeat_interleave(h // hk, 1), vt.repeat_interleave(h // hk, 1))
        def f(k2=k2, v2=v2, be=be):
            with sdpa_kernel(be): return F.scaled_dot_product_attention(qt, k2, v2)
        try: prof(f, name)
        except RuntimeError as e: print("  ", name, "refused", str(e)[:80])
    del kc, vc, kp, vp; torch.cuda.empty_cache()
