"""Decode sweep: `flash_attn_with_kvcache` (paged and contiguous KV cache) against PyTorch SDPA's
flash and cuDNN backends on the same cache, with the device copy rate measured in the same run
(method and fields: docs/benchmarking.md).

Points (bf16): batch x cached keys 1x8k, 16x8k, 64x4k, 8x64k, 128x1k; query/KV heads 32/8 (GQA),
32/32 (MHA), 32/1 (MQA); head dim 64 and 128; one query row (decode) and four (speculative
decoding). Ours reads the cache contiguous and paged through a block table with pages of 1, 16
and 256 tokens; the pages of a sequence are scattered (a random permutation of the pool), as
they are after a serving engine has run a while. The peers read the contiguous cache, sliced to
the used length; a backend that does not take GQA/MQA natively gets K/V expanded to every query
head with repeat_interleave, outside the timed region.

The measure is GB/s of K and V read (2 * batch * seqlen_k * nheads_k * hdim * 2 bytes over the
median time), against `copy_gbps`, the read+write rate of a large device copy in this run. The
L2 cache is flushed before every timed call (`_measure.kernel_ms`), so K/V come from HBM.
Four-row queries are timed non-causal for every backend (SDPA's `is_causal` is top-left aligned,
which is not the decode mask, and its lower-right causal bias never reaches the flash or cuDNN
backend); `ours_causal` adds ours with the bottom-right causal mask of speculative decoding.

`--device cpu` runs tiny shapes against SDPA's math backend: a smoke test that keeps the script
working where there is no GPU (tests/test_bench_decode.py), not a measurement.

    python benchmarks/bench_decode.py --build build [--quick] [--out PATH]

Writes benchmarks/results/<gpu>-decode.json unless --out is given; prints a ratio table last.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hf_integration"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import (clocks, command_line, device_slug, gbps, git_sha, kernel_id,  # noqa: E402
                      kernel_ms, kv_bytes, median_wall_s)

HEADS = [(32, 8), (32, 32), (32, 1)]             # (nheads, nheads_k): GQA, MHA, MQA
PAGE_SIZES = [0, 1, 16, 256]                     # 0: the contiguous cache
SEQLENS_Q = [1, 4]
# (batch, seqlen_k, heads, head dims) per device and mode. The CPU grid only exercises the code.
GRIDS = {
    ("cuda", False): dict(shapes=[(1, 8192), (16, 8192), (64, 4096), (8, 65536), (128, 1024)],
                          heads=HEADS, hdims=[64, 128]),
    ("cuda", True): dict(shapes=[(16, 8192), (8, 65536)], heads=[(32, 8)], hdims=[128]),
    ("cpu", False): dict(shapes=[(1, 64), (3, 40)], heads=[(4, 2), (4, 4), (4, 1)],
                         hdims=[16, 32]),
    ("cpu", True): dict(shapes=[(2, 40)], heads=[(4, 2)], hdims=[16]),
}
COPY_BYTES = {"cuda": 2 << 30, "cpu": 16 << 20}
PEERS = {"cuda": {"sdpa_flash": SDPBackend.FLASH_ATTENTION,
                  "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION},
         "cpu": {"sdpa_math": SDPBackend.MATH}}


def timer(device):
    """Milliseconds of one call: CUDA events on the GPU, the wall clock on the CPU."""
    if device == "cuda":
        return kernel_ms
    return lambda fn: 1e3 * median_wall_s(fn, reps=3)


def copy_gbps(device, ms_of):
    """Read+write GB/s of one large device-to-device copy: the practical bandwidth limit."""
    n = COPY_BYTES[device] // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return gbps(2 * src.numel() * src.element_size(), ms_of(lambda: dst.copy_(src)))


def paged(k_cache, v_cache, page_size, gen):
    """The contiguous (batch, seqlen_k, nheads_k, d) cache as a pool of pages plus a block table
    (batch, ceil(seqlen_k / page_size)) int32; a sequence's pages sit at random pool slots."""
    b, sk = k_cache.shape[:2]
    pages = math.ceil(sk / page_size)
    perm = torch.randperm(b * pages, generator=gen).to(k_cache.device)
    pools = []
    for c in (k_cache, v_cache):
        padded = F.pad(c, (0, 0, 0, 0, 0, pages * page_size - sk))
        pool = torch.empty((b * pages, page_size) + c.shape[2:], dtype=c.dtype, device=c.device)
        pool[perm] = padded.reshape(b * pages, page_size, *c.shape[2:])
        pools.append(pool)
    return pools[0], pools[1], perm.view(b, pages).to(torch.int32)


def sdpa_call(backend, q, k_cache, v_cache, seqlen_k):
    """SDPA on the contiguous cache as (b, h, s, d) views; GQA natively where the backend takes
    it, else K/V expanded here (the expansion is not part of the timed call). Returns (fn,
    expanded) or (None, reason) when the backend refuses the point."""
    h, hk = q.shape[2], k_cache.shape[2]
    qt = q.transpose(1, 2)
    kt, vt = (c[:, :seqlen_k].transpose(1, 2) for c in (k_cache, v_cache))

    def attempts():  # the expanded copy is made only when the native call was refused
        yield False, kt, vt
        if hk != h:
            yield True, *(x.repeat_interleave(h // hk, dim=1) for x in (kt, vt))

    reason = None
    for expanded, k, v in attempts():
        def fn(k=k, v=v, gqa=(hk != h and not expanded)):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, k, v, enable_gqa=gqa).transpose(1, 2)
        try:
            fn()
            return fn, expanded
        except RuntimeError as e:  # "No available kernel": this backend does not take the point
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None, reason


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def group_rows(flash, device, ms_of, batch, seqlen_k, nheads, nheads_k, hdim, dtype, gen):
    """All rows of one (batch, seqlen_k, heads, hdim): each page size x each query length."""
    k_cache = torch.randn(batch, seqlen_k, nheads_k, hdim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.full((batch,), seqlen_k, dtype=torch.int32, device=device)
    nbytes = kv_bytes(batch, seqlen_k, nheads_k, hdim, dtype)
    queries = {sq: torch.randn(batch, sq, nheads, hdim, device=device, dtype=dtype)
               for sq in SEQLENS_Q}
    peers_of = {}
    for sq, q in queries.items():
        peers, ref = {}, None
        for name, backend in PEERS[device].items():
            fn, how = sdpa_call(backend, q, k_cache, v_cache, seqlen_k)
            if fn is None:
                print(f"  {name} refuses b={batch} sk={seqlen_k} h={nheads}/{nheads_k} d={hdim} "
                      f"sq={sq}: {how}", flush=True)
                peers[name] = dict(ms=None, expanded=None)
                continue
            ref = fn() if ref is None else ref
            peers[name] = dict(ms=ms_of(fn), expanded=how)
        peers_of[sq] = (peers, ref)
    out = []
    for page_size in PAGE_SIZES:
        if page_size:
            kc, vc, table = paged(k_cache, v_cache, page_size, gen)
        else:
            kc, vc, table = k_cache, v_cache, None
        for sq, q in queries.items():
            peers, ref = peers_of[sq]

            def ours(causal=False, q=q):
                return flash.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens,
                                                     block_table=table, causal=causal)
            row = dict(batch=batch, seqlen_k=seqlen_k, nheads=nheads, nheads_k=nheads_k,
                       hdim=hdim, page_size=page_size or None, seqlen_q=sq, causal=False)
            try:
                got = ours()
                row["ours"] = gbps(nbytes, ms_of(ours))
                if sq > 1:
                    row["ours_causal"] = gbps(nbytes, ms_of(lambda: ours(causal=True)))
            except (RuntimeError, NotImplementedError) as e:
                # A point our kernel does not serve yet: recorded, and the sweep goes on.
                got, row["ours"] = None, None
                row["ours_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            for name, p in peers.items():
                row[name] = gbps(nbytes, p["ms"])
                row[f"{name}_expanded_kv"] = p["expanded"]
            for name in ("sdpa_flash", "sdpa_cudnn"):   # the result's columns on every device
                row.setdefault(name, None)
            row["max_diff_vs_sdpa"] = (max_diff(got, ref) if ref is not None and got is not None
                                       else None)
            out.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
        del kc, vc, table
    return out


def points(device, quick):
    grid = GRIDS[(device, quick)]
    return [(b, sk, h, hk, d) for b, sk in grid["shapes"] for h, hk in grid["heads"]
            for d in grid["hdims"]]


def ratio_table(rows, peers):
    print(f"\nours / best peer ({', '.join(peers)}); target >= 1.10 on the GPU")
    print(f"{'b':>4} {'seqlen_k':>8} {'h/hk':>6} {'d':>4} {'page':>5} {'sq':>3} {'ours':>8} "
          f"{'peer':>8} {'ratio':>6}")
    for r in rows:
        best = max((r[p] for p in peers if r.get(p)), default=None)
        ours = r["ours"] or float("nan")
        ratio = ours / best if best else float("nan")
        print(f"{r['batch']:>4} {r['seqlen_k']:>8} {r['nheads']:>3}/{r['nheads_k']:<2} "
              f"{r['hdim']:>4} {r['page_size'] or '-':>5} {r['seqlen_q']:>3} {ours:8.1f} "
              f"{best or float('nan'):8.1f} {ratio:6.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", type=Path, default=ROOT / "build",
                    help="the kernel to measure: repository root, build/ or one variant")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--quick", action="store_true",
                    help="GPU: 16x8k and 8x64k, GQA 32/8, hdim 128 only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_decode.py --device cuda needs a CUDA GPU (--device cpu: smoke run)",
              file=sys.stderr)
        return 2

    import kernels

    import flash_attn_hub

    flash, _ = flash_attn_hub.load(args.build)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ms_of = timer(args.device)
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"# {name}, torch {torch.__version__}, kernel {kernel_id(flash)}", flush=True)
    clocks_before = clocks() if args.device == "cuda" else None
    copy_rate = copy_gbps(args.device, ms_of)
    print(f"# device copy: {copy_rate:.1f} GB/s read+write", flush=True)
    rows = []
    for b, sk, h, hk, d in points(args.device, args.quick):
        rows += group_rows(flash, args.device, ms_of, b, sk, h, hk, d, dtype, gen)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    doc = {
        "gpu": name, "device": args.device, "torch": torch.__version__,
        "cuda": torch.version.cuda, "kernels": kernels.__version__,
        "kernel_id": kernel_id(flash), "git_sha": git_sha(),
        "command": command_line(sys.argv if argv is None else [__file__] + list(argv)),
        "dtype": "bfloat16", "quick": args.quick,
        "clocks_before": clocks_before,
        "clocks_after": clocks() if args.device == "cuda" else None,
        "copy_gbps": copy_rate,
        "timing": ("median of CUDA events via triton do_bench, L2 flushed before each call"
                   if args.device == "cuda" else "median wall time of 3 calls (smoke run)"),
        "units": "GB/s of K+V read: 2 * batch * seqlen_k * nheads_k * hdim * 2 bytes / time",
        "rows": rows,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"{device_slug(args.device)}-decode.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    ratio_table(rows, list(PEERS[args.device]))
    print(f"copy rate {copy_rate:.1f} GB/s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
