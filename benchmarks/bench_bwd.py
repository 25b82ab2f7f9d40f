"""Backward benchmark sweep: forward+backward and backward alone of our CUDA kernels against
PyTorch SDPA (flash = FlashAttention-2's kernels, and cuDNN), measured in the same run.

Points: the forward sweep's (bf16 and fp16; head dim 64/128/256; seqlen 512..16k with batch =
16384 / seqlen and heads = 2048 / hdim; causal and not), GQA 32/8 query/KV heads at head dim 128,
and a varlen batch of mixed lengths. `ours_det` is forward+backward with deterministic=True.
FLOPs and timing as docs/benchmarking.md says (benchmarks/_measure.py): backward 2.5x the
forward's FLOPs over the exact attended area, forward+backward 3.5x; the backward alone is timed by
re-running autograd on a retained graph.

The kernel is loaded as users load it (kernels.get_local_kernel on build/). Usage:
  python benchmarks/bench_bwd.py [--out PATH] [--quick] [--build DIR]
FLASH_ATTN_DISABLE_SM90=1 leaves the forward on the sm80 kernels too (recorded as sm90_disabled).
Writes JSON {gpu, torch, cuda, git_sha, rows: [...]} and prints a ratio table last.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import clocks, fwd_flops, git_sha, kernel_ms, tflops, load_flash  # noqa: E402

BWD_FACTOR, FWDBWD_FACTOR = 2.5, 3.5


def time_pair(fwd):
    """(forward+backward ms, backward ms) of fwd(), a closure returning the output."""
    out = fwd()
    dout = torch.randn_like(out)
    inputs = fwd.inputs

    def fwdbwd():
        o = fwd()
        torch.autograd.grad(o, inputs, dout)

    def bwd():
        torch.autograd.grad(out, inputs, dout, retain_graph=True)

    return kernel_ms(fwdbwd), kernel_ms(bwd)


def try_pair(fwd):
    try:
        return time_pair(fwd)
    except Exception as e:  # a peer may not support a point: record None
        print(f"  peer failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None, None


def closure(fn, inputs):
    fn.inputs = inputs
    return fn


def row(op, flops, times, **meta):
    r = dict(op=op, **meta)
    for name, (fb, b) in times.items():
        r[name] = tflops(FWDBWD_FACTOR * flops, fb) if op == "fwdbwd" else tflops(BWD_FACTOR * flops, b)
        r["ms_" + name] = fb if op == "fwdbwd" else b
    return r


def batched_points(flash, dtype, hdim, seqlen, causal, nheads=None, nheads_k=None):
    b = max(1, 16384 // seqlen)
    h = nheads or 2048 // hdim
    hk = nheads_k or h
    mk = lambda n: torch.randn(b, seqlen, n, hdim, device="cuda", dtype=dtype,  # noqa: E731
                               requires_grad=True)
    q, k, v = mk(h), mk(hk), mk(hk)
    flops = fwd_flops(b, h, hdim, seqlen, seqlen, causal)
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    gqa = hk != h

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)
        return closure(fn, (qt, kt, vt))

    times = {
        "ours": time_pair(closure(lambda: flash.flash_attn_func(q, k, v, causal=causal), (q, k, v))),
        "ours_det": time_pair(closure(lambda: flash.flash_attn_func(
            q, k, v, causal=causal, deterministic=True), (q, k, v))),
        "sdpa_flash": try_pair(sdpa(SDPBackend.FLASH_ATTENTION)),
        "sdpa_cudnn": try_pair(sdpa(SDPBackend.CUDNN_ATTENTION)),
    }
    meta = dict(dtype=str(dtype)[6:], hdim=hdim, seqlen_q=seqlen, seqlen_k=seqlen, causal=causal,
                batch=b, nheads=h, nheads_k=hk)
    return [row("fwdbwd", flops, times, **meta), row("bwd", flops, times, **meta)]


def varlen_points(flash, dtype, hdim, causal, lens):
    h = 2048 // hdim
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    total, mx = int(cu[-1]), max(lens)
    mk = lambda: torch.randn(total, h, hdim, device="cuda", dtype=dtype, requires_grad=True)  # noqa: E731
    q, k, v = mk(), mk(), mk()
    flops = sum(fwd_flops(1, h, hdim, n, n, causal) for n in lens)
    times = {
        "ours": time_pair(closure(lambda: flash.flash_attn_varlen_func(
            q, k, v, cu, cu, mx, mx, causal=causal), (q, k, v))),
        "ours_det": time_pair(closure(lambda: flash.flash_attn_varlen_func(
            q, k, v, cu, cu, mx, mx, causal=causal, deterministic=True), (q, k, v))),
    }
    meta = dict(dtype=str(dtype)[6:], hdim=hdim, seqlen_q=mx, seqlen_k=mx, causal=causal,
                lens=lens, nheads=h, nheads_k=h, varlen=True)
    rows = [row("fwdbwd", flops, times, **meta), row("bwd", flops, times, **meta)]
    for r in rows:  # SDPA has no varlen backward entry point that autograd reaches
        r.update(sdpa_flash=None, sdpa_cudnn=None)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--build", default=str(HERE.parent / "build"))
    ap.add_argument("--quick", action="store_true",
                    help="only the batched points; defaults bf16, hdim 64/128, 1k and 4k")
    ap.add_argument("--hdims", default=None, help="default 64,128,256")
    ap.add_argument("--dtypes", default=None, help="default bf16,fp16")
    ap.add_argument("--seqlens", default=None, help="default 512,1024,2048,4096,8192,16384")
    args = ap.parse_args()
    torch.manual_seed(0)
    flash = load_flash(args.build)
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16}
    defaults = (("bf16", "64,128", "1024,4096") if args.quick else
                ("bf16,fp16", "64,128,256", "512,1024,2048,4096,8192,16384"))
    dtypes = [dts[x] for x in (args.dtypes or defaults[0]).split(",")]
    hdims = [int(x) for x in (args.hdims or defaults[1]).split(",")]
    seqlens = [int(x) for x in (args.seqlens or defaults[2]).split(",")]
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, cuda {torch.version.cuda}", flush=True)
    rows = []

    def emit(new):
        for r in new:
            rows.append(r)
            print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                              for k, v in r.items() if not k.startswith("ms_") and k != "lens"}),
                  flush=True)
        torch.cuda.empty_cache()

    for dtype in dtypes:
        for hdim in hdims:
            for seqlen in seqlens:
                for causal in (False, True):
                    emit(batched_points(flash, dtype, hdim, seqlen, causal))
    if not args.quick:
        for dtype in dtypes:
            for seqlen in (1024, 4096, 16384):
                for causal in (False, True):
                    emit([dict(r, op=r["op"] + "_gqa") for r in
                          batched_points(flash, dtype, 128, seqlen, causal, 32, 8)])
            lens = [512, 3000, 128, 7000, 1, 2048, 64, 4096, 1500, 900] * 2
            for causal in (False, True):
                emit(varlen_points(flash, dtype, 128, causal, lens))
    result = dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda,
                  git_sha=git_sha(), clocks_after=clocks(),
                  sm90_disabled=os.environ.get("FLASH_ATTN_DISABLE_SM90", "0") not in ("", "0"),
                  rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print("\nratio ours / sdpa_flash (target >= 1.05 for fwdbwd at seqlen >= 1k); det = deterministic")
    print(f"{'op':11} {'dt':5} {'d':>4} {'seqlen':>6} {'causal':>6} {'ours':>7} {'det':>7} "
          f"{'flash':>7} {'cudnn':>7} {'ratio':>6} {'det/ours':>8}")
    nan = float("nan")
    for r in rows:
        fl = r.get("sdpa_flash")
        ratio = r["ours"] / fl if fl else nan
        print(f"{r['op']:11} {r['dtype']:5} {r['hdim']:>4} {r['seqlen_q']:>6} {str(r['causal']):>6} "
              f"{r['ours']:7.1f} {r['ours_det']:7.1f} {fl or nan:7.1f} {r.get('sdpa_cudnn') or nan:7.1f} "
              f"{ratio:6.3f} {r['ours_det'] / r['ours']:8.3f}")


if __name__ == "__main__":
    main()
