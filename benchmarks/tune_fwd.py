"""Tile-config tuning for the sm80 fast forward kernel (run on the GPU machine).

Builds one small library with the fast kernel (masked and unmasked) for each candidate tile
(head dim, kBlockM, kBlockN, warps, K/V stages), bf16, sm_90, then times each config on a few
sweep points next to PyTorch SDPA-flash, the configs of a head dim and SDPA-flash interleaved in
rounds (median of per-round ratios). Results feed docs/tuning.md; the winners go into
kernel_src/sm80/tile_size.h.

Usage: python benchmarks/tune_fwd.py [--configs "128,128,64,4,2;..."] [--rounds 5]
       [--causal both|only|no] [--out PATH]
A config may carry extra nvcc flags after ':' ("...,2:-DFLAG=1"), and "root=DIR" among them
compiles it against another copy of the tree (an A/B of kernel code in one run).

The tuning-only knobs of the earlier kernels (Q fragments in registers, O-rescale skip on/off,
min blocks/SM, rescale threshold, row sums by MMA on/off; the q/r/b fields of the config names in
docs/tuning.md) were removed from the shipped kernels after commit c942ee7: to tune them again,
check out that commit, whose tune_fwd.py takes "hd,bm,bn,nw,st,qr,sr,mb" and the
TUNE_THRESHOLD / TUNE_SUMMMA defines.
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import flash_harness as fh  # noqa: E402
from _measure import fwd_flops, kernel_ms, tflops  # noqa: E402

# hdim, kBlockM, kBlockN, warps, stages: the shipped tiles (first of each head dim) and neighbours
DEFAULT_CONFIGS = [
    (128, 128, 64, 4, 1), (128, 128, 64, 4, 2), (128, 128, 32, 4, 2), (128, 64, 64, 4, 2),
    (64, 128, 128, 4, 2), (64, 128, 64, 4, 2), (64, 128, 128, 8, 2),
    (256, 64, 64, 4, 1), (256, 128, 64, 8, 1), (256, 64, 32, 4, 2),
]

TU = """\
#include <cstdio>
#include <cstring>
#include "{root}/kernel_src/launch/fwd_launch_sm80.h"
using namespace FLASH_NAMESPACE;
struct TuneTile_{name} {{
  static constexpr sm80::TileConfig kConfig{{/*kBlockM=*/{bm}, /*kBlockN=*/{bn}, /*kNWarps=*/{nw},
                                            /*kStages=*/{st}}};
}};
using T = sm80::FwdKernelTraits<{hd}, TuneTile_{name}, __nv_bfloat16>;
extern "C" int flash_tune_{name}(const void* raw, long long size, void* stream, char* err,
                                 int errlen) {{
  if (size != (long long)sizeof(FwdParams)) {{ snprintf(err, errlen, "size"); return 1; }}
  FwdParams p;
  std::memcpy((void*)&p, raw, sizeof(FwdParams));
  try {{
    const bool masked = p.window_left >= 0 || p.window_right >= 0;
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    BOOL_SWITCH(masked, Is_masked, [&] {{
      launch_fwd_sm80<T, Is_masked, false, false>(p, sms, (cudaStream_t)stream);
    }});
  }} catch (const std::exception& e) {{ snprintf(err, errlen, "%s", e.what()); return 1; }}
  return 0;
}}
"""


def median(xs):
    """The middle element (upper middle for an even count): always a measured value."""
    return sorted(xs)[len(xs) // 2]


def cfg_name(c):
    name = "h{}_m{}_n{}_w{}_s{}".format(*c[:5])
    if len(c) > 5 and c[5]:  # extra -D flags: a readable suffix
        name += "_" + "".join(ch if ch.isalnum() else "_" for ch in c[5].replace("-D", ""))
    return name


def build(configs, outdir, jobs):
    os.makedirs(outdir, exist_ok=True)
    srcs = []
    extra = {}
    for c in configs:
        hd, bm, bn, nw, st = c[:5]
        path = os.path.join(outdir, cfg_name(c) + ".cu")
        flags = c[5].split() if len(c) > 5 and c[5] else []
        # "root=DIR" among the flags: compile this config against another copy of the tree
        # (A/B of kernel code in one run).
        root = next((f[5:] for f in flags if f.startswith("root=")), ROOT)
        extra[path] = [f for f in flags if not f.startswith("root=")]
        with open(path, "w") as f:
            f.write(TU.format(root=os.path.join(ROOT, root), hd=hd, bm=bm, bn=bn, nw=nw, st=st,
                              name=cfg_name(c)))
        srcs.append(path)
    srcs.append(os.path.join(HERE, "fwd_harness.cu"))
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fPIC",
             "-gencode=arch=compute_90,code=sm_90", "-DFLASH_HARNESS_LAYOUT_ONLY", "-Xptxas", "-v"]

    def one(src):
        obj = os.path.join(outdir, os.path.basename(src) + ".o")
        r = subprocess.run(["nvcc", *flags, *extra.get(src, []), "-c", src, "-o", obj],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        return obj, r.stderr
    with ThreadPoolExecutor(jobs) as ex:
        results = list(ex.map(one, srcs))
    lib = os.path.join(outdir, "libflash_tune.so")
    subprocess.run(["nvcc", "-shared", "-gencode=arch=compute_90,code=sm_90", "-o", lib,
                    *[o for o, _ in results]], check=True)
    ptxas = {cfg_name(c): results[i][1] for i, c in enumerate(configs)}
    return lib, ptxas


def ptxas_summary(log):
    out = []
    for line in log.splitlines():
        if "spill" in line or "Used" in line:
            out.append(line.strip().replace("ptxas info    : ", ""))
    return " | ".join(out)


def parse_config(text):
    """'hd,bm,bn,nw,st' optionally followed by ':-DFLAG=1 -DOTHER' (extra defines)."""
    nums, _, flags = text.partition(":")
    return tuple(int(x) for x in nums.split(",")) + ((flags.strip(),) if flags.strip() else ())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=None)
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--out", default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--causal", choices=["both", "only", "no"], default="both",
                    help="which masks to time (grid-order configs only change causal)")
    args = ap.parse_args()
    configs = DEFAULT_CONFIGS if not args.configs else [parse_config(c)
                                                        for c in args.configs.split(";")]
    t0 = time.time()
    lib_path, ptxas = build(configs, os.path.join(ROOT, "build", "tune"), args.jobs)
    print(f"built {len(configs)} configs in {time.time() - t0:.0f}s", flush=True)
    os.environ["FLASH_HARNESS_LIB"] = lib_path
    lib = ctypes.CDLL(lib_path)
    seqlens = [int(s) for s in args.seqlens.split(",")]
    rounds = args.rounds
    rows = []
    fns = {}
    for c in configs:
        fn = getattr(lib, "flash_tune_" + cfg_name(c))
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_char_p,
                       ctypes.c_int]
        fns[cfg_name(c)] = fn
    # One point at a time, every config of its head dim and SDPA-flash timed in `rounds` rounds
    # with a rotating order, so clock drift over the run (several % on the H200 near its power
    # limit) hits every config alike; a config's ratio is the median of its per-round ratios.
    for hd in sorted({c[0] for c in configs}, reverse=True):
        group = [c for c in configs if c[0] == hd]
        for s in seqlens:
            for causal in {"both": (False, True), "only": (True,), "no": (False,)}[args.causal]:
                torch.manual_seed(0)
                b, h = max(1, 16384 // s), 2048 // hd
                q = torch.randn(b, s, h, hd, device="cuda", dtype=torch.bfloat16)
                k, v = torch.randn_like(q), torch.randn_like(q)
                flops = fwd_flops(b, h, hd, s, s, causal)
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)

                def sdpa():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                calls, errs = {"sdpa_flash": sdpa}, {}
                for c in group:
                    call = fh.flash_fwd(q, k, v, causal=causal, poison=True, prepare_only=True,
                                        entry=fns[cfg_name(c)])
                    call()
                    errs[cfg_name(c)] = (call.out.float() - ref.float()).abs().max().item()
                    calls[cfg_name(c)] = call
                names = list(calls)
                times = {n: [] for n in names}
                for r in range(rounds):
                    for n in names[r % len(names):] + names[:r % len(names)]:
                        times[n].append(kernel_ms(calls[n]))
                for c in group:
                    name = cfg_name(c)
                    ratios = [f / o for o, f in zip(times[name], times["sdpa_flash"])]
                    r = dict(config=name, hdim=hd, seqlen=s, causal=causal,
                             ours=tflops(flops, median(times[name])),
                             sdpa_flash=tflops(flops, median(times["sdpa_flash"])),
                             ratio=median(ratios), ratio_min=min(ratios),
                             ratio_max=max(ratios), rounds=rounds,
                             max_err_vs_sdpa=errs[name])
                    rows.append(r)
                    print(f"{name:28} s{s:>6} causal={causal!s:5} ours {r['ours']:6.1f} "
                          f"flash {r['sdpa_flash']:6.1f} ratio {r['ratio']:.3f} "
                          f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] err {errs[name]:.2e}",
                          flush=True)
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               git_sha=os.environ.get("GIT_SHA", "unknown"), rows=rows,
               ptxas={k: ptxas_summary(v) for k, v in ptxas.items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("\nregisters/spills:")
    for k, v in res["ptxas"].items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
