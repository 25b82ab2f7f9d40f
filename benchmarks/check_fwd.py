"""Correctness grid of the CUDA forward (run on the GPU machine), against the fp64 reference.

Rule (docs/testing.md, after FA2/FA3): a case passes iff, for the output and the LSE,
    max|ours - ref| <= 2 * max|pt - ref| + eps(dtype) * max|ref|
where ref is fp64 and pt the same math in the input dtype (tests/reference.py). Every output is
poisoned with NaN before the call, inputs are fresh random numbers per case, and dropout masks
are compared bit for bit with the independent Python Philox model (tests/philox_ref.py).

Usage: python benchmarks/check_fwd.py [--quick] [--json PATH]
Prints one line per failing case and a summary (configs run, worst error ratio).
"""
import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import flash_harness as fh  # noqa: E402
import philox_ref  # noqa: E402
import reference as R  # noqa: E402

DEV = "cuda"
HDIMS = [32, 64, 96, 128, 192, 256, 40, 59, 111]
SEQLENS = [(1, 1), (113, 203), (239, 1), (799, 3), (1023, 1024), (1024, 1023)]
HEADS = {"MHA": (4, 4), "GQA": (6, 2), "MQA": (8, 1),
         "MANY": (267, 267)}  # 3 x 267 = 801 (sequence, head) pairs: see --quick
MASKS = ["none", "causal", "local"]


class Stats:
    def __init__(self):
        self.cases = 0
        self.failures = []
        self.worst = (0.0, "")
        self.by_group = {}

    def record(self, name, group, ratio, detail=""):
        self.cases += 1
        g = self.by_group.setdefault(group, [0, 0.0])
        g[0] += 1
        g[1] = max(g[1], ratio)
        if ratio > self.worst[0] or math.isnan(ratio):
            self.worst = (ratio, name)
        if not ratio <= 1.0:
            self.failures.append(f"{name}: ratio {ratio:.3f} {detail}")
            print(f"FAIL {name}: ratio {ratio:.3f} {detail}", flush=True)


def err_ratio(ours, ref, pt, dtype, factor=2.0):
    """max|ours-ref| / (factor*max|pt-ref| + eps*max|ref|) over finite-ref elements; inf
    entries of ref (empty rows' LSE) must match exactly."""
    ours, ref, pt = ours.double(), ref.double(), pt.double()
    inf = torch.isinf(ref)
    if inf.any():
        if not torch.equal(ours[inf], ref[inf]):
            return float("inf")
    fin = ~inf
    if not fin.any():
        return 0.0
    o, r, p = ours[fin], ref[fin], pt[fin]
    if torch.isnan(o).any():
        return float("nan")
    eps = torch.finfo(dtype).eps
    tol = factor * (p - r).abs().max().item() + eps * r.abs().max().item() + 1e-12
    return (o - r).abs().max().item() / tol


def window_of(mask, sk):
    if mask == "causal":
        return True, (-1, -1)
    if mask == "local":
        return False, (max(1, sk // 4), max(0, sk // 8))
    return False, (-1, -1)


def check_batched(stats, dtype, d, mask, heads, sq, sk, *, softcap=0.0, alibi=False, batch=None,
                  layout="contiguous", tag=""):
    h, hk = HEADS[heads]
    b = batch or (4 if sq * sk <= 4_000_000 else 2)
    causal, window = window_of(mask, sk)
    if layout == "qkvpacked" and hk == h and sq == sk:
        qkv = torch.randn(b, sq, 3, h, d, device=DEV, dtype=dtype)
        q, k, v = qkv.unbind(2)
    elif layout == "unaligned":
        # Views starting one element into a larger buffer: base pointers not 16-byte aligned.
        def mk(s, hh):
            buf = torch.randn(b * s * hh * d + 1, device=DEV, dtype=dtype)
            return buf[1:].view(b, s, hh, d)
        q, k, v = mk(sq, h), mk(sk, hk), mk(sk, hk)
    elif layout == "strided":
        # Heads-first storage transposed: row stride != h * d.
        q = torch.randn(b, h, sq, d, device=DEV, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, hk, sk, d, device=DEV, dtype=dtype).transpose(1, 2)
        v = torch.randn(b, hk, sk, d, device=DEV, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(b, sq, h, d, device=DEV, dtype=dtype)
        k = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
        v = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
    slopes = None
    if alibi:
        slopes = torch.rand(b, h, device=DEV, dtype=torch.float32) * 0.3 if alibi == "2d" else \
            torch.rand(h, device=DEV, dtype=torch.float32) * 0.3
    out, lse, _ = fh.flash_fwd(q, k, v, causal=causal, window_size=window, softcap=softcap,
                               alibi_slopes=slopes)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
    ref_o, ref_l, _ = R.attention_ref(q, k, v, **kw)
    pt_o, pt_l, _ = R.attention_ref(q, k, v, upcast=False, **kw)
    name = f"{tag}{str(dtype)[6:]} d{d} {mask} {heads} {sq}x{sk} b{b} {layout}" + \
        (f" softcap{softcap}" if softcap else "") + (f" alibi{alibi}" if alibi else "")
    r_o = err_ratio(out, ref_o, pt_o, dtype)
    r_l = err_ratio(lse, ref_l, pt_l.float(), torch.float32 if dtype == torch.float16 else dtype)
    stats.record(name, tag or "grid", max(r_o, r_l), f"(out {r_o:.3f}, lse {r_l:.3f})")


def check_dropout(stats, dtype, d, mask, sq, sk, p=0.17, varlen=False):
    h, hk = 3, 1
    b = 2
    causal, window = window_of(mask, sk)
    seed, offset = torch.randint(0, 2**62, (2,)).tolist()
    q = torch.randn(b, sq, h, d, device=DEV, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
    out, lse, smask = fh.flash_fwd(q, k, v, causal=causal, window_size=window, dropout_p=p,
                                   seed=seed, offset=offset, return_softmax=True)
    keep = torch.from_numpy(philox_ref.keep_mask(seed, offset, b, h, sq, sk, p)).to(DEV)
    kw = dict(causal=causal, window_size=window, keep_mask=keep, dropout_p=p)
    ref_o, ref_l, ref_p = R.attention_ref(q, k, v, **kw)
    pt_o, pt_l, _ = R.attention_ref(q, k, v, upcast=False, **kw)
    name = f"dropout {str(dtype)[6:]} d{d} {mask} {sq}x{sk} p{p}"
    # The mask: S_dmask is negative exactly where dropped (among elements with P > 0).
    vis = ref_p > 0
    sm = smask.double()
    mask_ok = torch.equal((~keep & vis), (sm < 0) & vis) and not torch.isnan(sm).any().item()
    r_p = err_ratio(sm.abs(), ref_p, ref_p.to(dtype), dtype)
    r_o = err_ratio(out, ref_o, pt_o, dtype)
    r_l = err_ratio(lse, ref_l, pt_l.float(), torch.float32 if dtype == torch.float16 else dtype)
    ratio = max(r_o, r_l, r_p) if mask_ok else float("inf")
    stats.record(name, "dropout", ratio, f"(mask_equal {mask_ok}, out {r_o:.3f}, lse {r_l:.3f},"
                 f" P {r_p:.3f})")


def make_varlen(lens_q, lens_k, h, hk, d, dtype):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0).tolist()), dtype=torch.int32,
                        device=DEV)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0).tolist()), dtype=torch.int32,
                        device=DEV)
    q = torch.randn(int(cu_q[-1]), h, d, device=DEV, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), hk, d, device=DEV, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), hk, d, device=DEV, dtype=dtype)
    return q, k, v, cu_q, cu_k


def check_varlen(stats, dtype, d, mask, lens_q, lens_k, *, give_max=True, seqused=None,
                 page=None, alibi=False):
    h, hk = 6, 2
    q, k, v, cu_q, cu_k = make_varlen(lens_q, lens_k, h, hk, d, dtype)
    causal, window = window_of(mask, max(lens_k))
    used = None
    if seqused is not None:
        used = torch.tensor(seqused, dtype=torch.int32, device=DEV)
    block_table = None
    kk, vv = k, v
    if page is not None:
        # Scatter each sequence's keys into randomly permuted pages of a pool.
        lens = seqused if seqused is not None else lens_k
        per = [max(1, -(-n // page)) for n in lens_k]
        nblocks = sum(per) + 3
        perm = torch.randperm(nblocks, device=DEV)
        kk = torch.randn(nblocks, page, hk, d, device=DEV, dtype=dtype)
        vv = torch.randn(nblocks, page, hk, d, device=DEV, dtype=dtype)
        block_table = torch.zeros(len(lens_k), max(per), dtype=torch.int32, device=DEV)
        nxt = 0
        for bi, n in enumerate(lens_k):
            for pi in range(per[bi]):
                block_table[bi, pi] = perm[nxt]
                nxt += 1
            t = torch.arange(n, device=DEV)
            blk = block_table[bi].long()[t // page]
            kk[blk, t % page] = k[cu_k[bi]:cu_k[bi] + n]
            vv[blk, t % page] = v[cu_k[bi]:cu_k[bi] + n]
        del lens
    slopes = torch.rand(len(lens_q), h, device=DEV) * 0.3 if alibi else None
    out, lse, _ = fh.flash_fwd(q, kk, vv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                               max_seqlen_q=max(lens_q) if give_max else -1,
                               max_seqlen_k=max(lens_k) if give_max else -1, seqused_k=used,
                               block_table=block_table, causal=causal, window_size=window,
                               alibi_slopes=slopes)
    kw = dict(causal=causal, window_size=window, alibi_slopes=slopes)
    ref_o, ref_l = R.varlen_ref(q, kk, vv, cu_q, cu_k, seqused_k=used, block_table=block_table,
                                **kw)
    pt_o, pt_l = R.varlen_ref(q, kk, vv, cu_q, cu_k, seqused_k=used, block_table=block_table,
                              upcast=False, **kw)
    name = (f"varlen {str(dtype)[6:]} d{d} {mask} q{lens_q} k{lens_k} max{'' if give_max else '-1'}"
            + (f" used{seqused}" if seqused else "") + (f" page{page}" if page else "")
            + (" alibi" if alibi else ""))
    r_o = err_ratio(out, ref_o, pt_o, dtype)
    r_l = err_ratio(lse, ref_l, pt_l.float(), torch.float32 if dtype == torch.float16 else dtype)
    stats.record(name, "paged" if page else "varlen", max(r_o, r_l),
                 f"(out {r_o:.3f}, lse {r_l:.3f})")


def check_kvcache_style(stats, dtype, d):
    """leftpad_k + cache_batch_idx + seqused_k through the batched forward (flash_attn_with_kvcache
    after its append step)."""
    b, h, hk, sq, cache = 3, 4, 2, 5, 300
    q = torch.randn(b, sq, h, d, device=DEV, dtype=dtype)
    kc = torch.randn(b + 2, cache, hk, d, device=DEV, dtype=dtype)
    vc = torch.randn(b + 2, cache, hk, d, device=DEV, dtype=dtype)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEV)
    used = torch.tensor([250, 7, 300], dtype=torch.int32, device=DEV)
    left = torch.tensor([10, 0, 299], dtype=torch.int32, device=DEV)
    out, lse, _ = fh.flash_fwd(q, kc, vc, causal=True, seqused_k=used, leftpad_k=left,
                               cache_batch_idx=idx)
    for bi in range(b):
        kb = kc[int(idx[bi]), int(left[bi]):int(used[bi])][None]
        vb = vc[int(idx[bi]), int(left[bi]):int(used[bi])][None]
        ro, rl, _ = R.attention_ref(q[bi:bi + 1], kb, vb, causal=True)
        po, pl, _ = R.attention_ref(q[bi:bi + 1], kb, vb, causal=True, upcast=False)
        r = max(err_ratio(out[bi:bi + 1], ro, po, dtype),
                err_ratio(lse[bi:bi + 1], rl, pl.float(), dtype))
        stats.record(f"kvcache-style {str(dtype)[6:]} d{d} b{bi}", "kvcache", r)


def check_large(stats):
    """More than 2^31 elements in q/o (and in k/v): 64-bit offsets. Checks the last rows."""
    dtype, d = torch.bfloat16, 256
    sq, h = 65600, 128  # 65600 * 128 * 256 = 2.15e9 > 2^31 elements
    q = torch.randn(1, sq, h, d, device=DEV, dtype=dtype)
    k = torch.randn(1, 64, 8, d, device=DEV, dtype=dtype)
    v = torch.randn(1, 64, 8, d, device=DEV, dtype=dtype)
    out, lse, _ = fh.flash_fwd(q, k, v, poison=False)
    sl = slice(sq - 200, sq)
    ro, rl, _ = R.attention_ref(q[:, sl, -4:], k[:, :, -1:], v[:, :, -1:])
    po, pl, _ = R.attention_ref(q[:, sl, -4:], k[:, :, -1:], v[:, :, -1:], upcast=False)
    r = max(err_ratio(out[:, sl, -4:], ro, po, dtype), err_ratio(lse[:, -4:, sl], rl, pl.float(), dtype))
    stats.record("large q/o 2.15e9 elements (last rows)", "large", r)
    del q, out, lse
    torch.cuda.empty_cache()
    sk, hk = 65600, 128
    q = torch.randn(1, 2, hk, d, device=DEV, dtype=dtype)
    k = torch.randn(1, sk, hk, d, device=DEV, dtype=dtype)
    v = torch.randn(1, sk, hk, d, device=DEV, dtype=dtype)
    out, lse, _ = fh.flash_fwd(q, k, v, causal=True)
    ro, rl, _ = R.attention_ref(q[:, :, -2:], k[:, :, -2:], v[:, :, -2:], causal=True)
    po, pl, _ = R.attention_ref(q[:, :, -2:], k[:, :, -2:], v[:, :, -2:], causal=True, upcast=False)
    r = max(err_ratio(out[:, :, -2:], ro, po, dtype), err_ratio(lse[:, -2:], rl, pl.float(), dtype))
    stats.record("large k/v 2.15e9 elements", "large", r)
    del q, k, v, out
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a small subset (sanitizer runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-large", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    st = Stats()
    t0 = time.time()
    dtypes = [torch.float16, torch.bfloat16]
    if args.quick:
        for d in (64, 128, 256, 59):
            for mask in MASKS:
                check_batched(st, torch.bfloat16, d, mask, "GQA", 113, 203, batch=2)
        check_varlen(st, torch.float16, 64, "causal", [5, 0, 130], [7, 1, 200], page=3)
        for d in (64, 256):  # the sm90 path: tiles reading neighbouring sequences, zeroed V rows
            check_varlen(st, torch.bfloat16, d, "causal", [5, 0, 300, 130], [7, 1, 200, 300],
                         seqused=[7, 1, 150, 299])
            check_varlen(st, torch.bfloat16, d, "none", [5, 0, 300, 130], [7, 1, 200, 300])
        check_dropout(st, torch.bfloat16, 64, "causal", 70, 90)
        # The sm80 causal grid in L2 sections (fwd_launch_sm80.h): 52 KB of K/V per pair puts
        # the 801 pairs into two sections of 401 on a 132-SM GPU, the last CTA column spare.
        check_batched(st, torch.bfloat16, 64, "causal", "MANY", 113, 203, batch=3)
        check_batched(st, torch.bfloat16, 40, "local", "MQA", 64, 80, layout="unaligned",
                      softcap=5.0, alibi="1d", batch=1)
    else:
        # The full grid (docs/testing.md): dtype x head dims x masks x heads x awkward lengths.
        for dtype in dtypes:
            for d in HDIMS:
                for mask in MASKS:
                    for heads in HEADS:
                        for sq, sk in SEQLENS:
                            check_batched(st, dtype, d, mask, heads, sq, sk)
                    check_batched(st, dtype, d, mask, "MHA", 4224, 4224, batch=1, tag="slow ")
        print(f"grid done: {st.cases} cases, {time.time() - t0:.0f}s", flush=True)
        for dtype in dtypes:
            for d in (64, 128, 256, 40):
                for mask in MASKS:
                    check_batched(st, dtype, d, mask, "GQA", 239, 517, softcap=30.0 / 8,
                                  tag="softcap ")
                    check_batched(st, dtype, d, mask, "MHA", 517, 239, alibi="1d", tag="alibi ")
                    check_batched(st, dtype, d, mask, "MQA", 300, 301, alibi="2d", softcap=4.0,
                                  tag="softcap+alibi ")
                for layout in ("qkvpacked", "strided", "unaligned"):
                    check_batched(st, dtype, d, "causal", "MHA", 300, 300, layout=layout,
                                  tag="layout ")
            for d in (64, 128, 59):
                for mask in MASKS:
                    check_dropout(st, dtype, d, mask, 150, 171)
            for d in (64, 96, 256):
                for mask in MASKS:
                    lens_q = [0, 1, 300, 17, 1000, 64]
                    lens_k = [5, 1, 257, 0, 1100, 64]
                    check_varlen(st, dtype, d, mask, lens_q, lens_k)
                    check_varlen(st, dtype, d, mask, lens_q, lens_k, give_max=False)
                    check_varlen(st, dtype, d, mask, lens_q, lens_k,
                                 seqused=[3, 1, 200, 0, 900, 64])
                    for page in (1, 3, 16, 17, 256):
                        check_varlen(st, dtype, d, mask, lens_q, lens_k, page=page,
                                     give_max=page != 17)
                    check_varlen(st, dtype, d, mask, lens_q, lens_k, page=16, alibi=True,
                                 seqused=[3, 1, 200, 0, 900, 64])
            for d in (64, 128):
                check_kvcache_style(st, dtype, d)
        if not args.no_large:
            check_large(st)
    summary = {
        "configs_run": st.cases,
        "failures": len(st.failures),
        "worst_error_ratio": st.worst[0],
        "worst_case": st.worst[1],
        "by_group": {g: {"cases": n, "worst_ratio": w} for g, (n, w) in st.by_group.items()},
        "failing_cases": st.failures[:50],
        "rule": "max|ours-ref| <= 2*max|pt-ref| + eps(dtype)*max|ref| (out and lse); "
                "dropout masks bit-equal to tests/philox_ref.py",
        "seconds": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if not st.failures else 1


if __name__ == "__main__":
    sys.exit(main())
