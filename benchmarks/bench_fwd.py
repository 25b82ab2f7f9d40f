"""Forward benchmark sweep: our CUDA forward against PyTorch SDPA (flash and cuDNN backends),
measured in the same run (method and fields: docs/benchmarking.md).

Points: bf16 and fp16; head dim 64/128/256; seqlen 512..16k with batch = 16384 / seqlen and
heads = 2048 / hdim; causal and not; plus GQA 32/8 query/KV heads (hdim 128) and a varlen batch
of mixed lengths (SDPA-flash via torch's varlen FA2 entry, aten._flash_attention_forward).
TFLOP/s use the exact attended area and times are medians over CUDA events (benchmarks/_measure.py);
inputs are random (never zeros).

Usage: python benchmarks/bench_fwd.py [--out PATH] [--quick] [--hdims 64,128] [--dtypes bf16] [--seqlens 1024,4096]
"ours" is what run_fwd_cuda dispatches to: the Hopper kernel where it serves the call (H100/H200,
see sm90::serves in kernel_src/launch/fwd_dispatch_sm90.h), else the sm80 kernels; FLASH_ATTN_DISABLE_SM90=1 measures
the sm80 kernels alone (the JSON records which, as `sm90_disabled`).
Writes JSON {gpu, torch, cuda, git_sha, clocks, rows: [...]} and prints a ratio table last.
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import flash_harness as fh  # noqa: E402
from _measure import clocks, fwd_flops, git_sha, kernel_ms, repo_relative, tflops  # noqa: E402


def try_bench(fn):
    try:
        return kernel_ms(fn)
    except Exception as e:  # a peer may not support a point (e.g. a head dim): record None
        print(f"  peer failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None


def batched_point(dtype, hdim, seqlen, causal, nheads=None, nheads_k=None):
    b = max(1, 16384 // seqlen)
    h = nheads or 2048 // hdim
    hk = nheads_k or h
    q = torch.randn(b, seqlen, h, hdim, device="cuda", dtype=dtype)
    k = torch.randn(b, seqlen, hk, hdim, device="cuda", dtype=dtype)
    v = torch.randn(b, seqlen, hk, hdim, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    flops = fwd_flops(b, h, hdim, seqlen, seqlen, causal)
    ours = kernel_ms(fh.flash_fwd(q, k, v, causal=causal, poison=False, out=out, prepare_only=True))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = hk != h

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                      enable_gqa=gqa)
        return fn

    flash = try_bench(sdpa(SDPBackend.FLASH_ATTENTION))
    cudnn = try_bench(sdpa(SDPBackend.CUDNN_ATTENTION))
    return dict(op="fwd", dtype=str(dtype)[6:], hdim=hdim, seqlen_q=seqlen, seqlen_k=seqlen,
                causal=causal, batch=b, nheads=h, nheads_k=hk, ours=tflops(flops, ours),
                sdpa_flash=tflops(flops, flash), sdpa_cudnn=tflops(flops, cudnn),
                ms_ours=ours, ms_sdpa_flash=flash, ms_sdpa_cudnn=cudnn)


def varlen_point(dtype, hdim, causal, lens):
    h = 2048 // hdim
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                      device="cuda")
    total = int(cu[-1])
    q = torch.randn(total, h, hdim, device="cuda", dtype=dtype)
    k = torch.randn(total, h, hdim, device="cuda", dtype=dtype)
    v = torch.randn(total, h, hdim, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    mx = max(lens)
    flops = sum(fwd_flops(1, h, hdim, n, n, causal) for n in lens)
    ours = kernel_ms(fh.flash_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                              max_seqlen_k=mx, causal=causal, poison=False, out=out,
                              prepare_only=True))
    ours_nomax = kernel_ms(fh.flash_fwd(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=causal,
                                    poison=False, out=out, prepare_only=True))

    def flash():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, causal,
                                                       False, scale=1.0 / math.sqrt(hdim))
    fl = try_bench(flash)
    return dict(op="varlen_fwd", dtype=str(dtype)[6:], hdim=hdim, seqlen_q=mx, seqlen_k=mx,
                causal=causal, lens=lens, nheads=h, ours=tflops(flops, ours),
                ours_max_seqlen_unknown=tflops(flops, ours_nomax),
                sdpa_flash=tflops(flops, fl), sdpa_cudnn=None, ms_ours=ours, ms_sdpa_flash=fl)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="bf16, hdim 128, 3 seqlens")
    ap.add_argument("--hdims", default="64,128,256")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    args = ap.parse_args()
    torch.manual_seed(0)
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dtypes = [dts[x] for x in args.dtypes.split(",")]
    hdims = [int(x) for x in args.hdims.split(",")]
    seqlens = [int(x) for x in args.seqlens.split(",")]
    if args.quick:
        dtypes, hdims, seqlens = [torch.bfloat16], [128], [1024, 4096, 16384]
    rows = []
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, cuda {torch.version.cuda}", flush=True)
    print(clocks(), flush=True)
    for dtype in dtypes:
        for hdim in hdims:
            for seqlen in seqlens:
                for causal in (False, True):
                    r = batched_point(dtype, hdim, seqlen, causal)
                    rows.append(r)
                    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                                      for k, v in r.items() if not k.startswith("ms_")}),
                          flush=True)
                    torch.cuda.empty_cache()
    if not args.quick:
        for dtype in dtypes:
            for seqlen in (1024, 4096, 16384):
                for causal in (False, True):
                    r = batched_point(dtype, 128, seqlen, causal, nheads=32, nheads_k=8)
                    r["op"] = "fwd_gqa"
                    rows.append(r)
                    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                                      for k, v in r.items() if not k.startswith("ms_")}),
                          flush=True)
            lens = [512, 3000, 128, 7000, 1, 2048, 64, 4096, 1500, 900] * 2
            for causal in (False, True):
                r = varlen_point(dtype, 128, causal, lens)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "lens"}), flush=True)
    result = dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda,
                  git_sha=git_sha(), clocks_after=clocks(),
                  sm90_disabled=os.environ.get("FLASH_ATTN_DISABLE_SM90", "0") not in ("", "0"),
                  harness=repo_relative(fh.lib_path()), rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("\nratio ours / sdpa_flash (>= 1.05 is the target for seqlen >= 1k)")
    print(f"{'op':10} {'dt':5} {'d':>4} {'seqlen':>6} {'causal':>6} {'ours':>7} {'flash':>7} "
          f"{'cudnn':>7} {'ratio':>6}")
    for r in rows:
        fl = r["sdpa_flash"]
        ratio = r["ours"] / fl if fl else float("nan")
        cud = r["sdpa_cudnn"] or float("nan")
        print(f"{r['op']:10} {r['dtype']:5} {r['hdim']:>4} {r['seqlen_q']:>6} {str(r['causal']):>6} "
              f"{r['ours']:7.1f} {fl or float('nan'):7.1f} {cud:7.1f} {ratio:6.3f}")


if __name__ == "__main__":
    main()
