"""flash_attn_with_kvcache: in-place append, cache_batch_idx, cache_leftpad, paged caches of
any page size, rotary (interleaved and half-split, rotary_dim < d), num_splits, int
cache_seqlens, return_softmax_lse. Semantics: docs/design.md "KV cache"."""
import pytest
import torch

import grid
from conftest import device_params, grid_params
from helpers import alibi_for, case_context, randn, window_for
from reference import kvcache_ref, pt_options

KV_AXES = {
    "dtype": grid.DTYPES_CPU,
    "mask": grid.MASKS,
    "heads": grid.HEADS,
    "hdim": [64, 59, 128],
    "seqlen_new": [0, 1, 5],
    "layout": ["contiguous", "batch_idx"] + [f"paged{p}" for p in grid.PAGE_SIZES],
    "leftpad": [False, True],
    "rotary": ["none", "interleaved", "half", "half_full"],
    "cache_seqlens": ["tensor", "int"],
    "num_splits": [0, 1, 3],
    "alibi": ["none", "bh"],
}
CACHE_LEN = 190


def pytest_generate_tests(metafunc):
    if "kv_case" in metafunc.fixturenames:
        metafunc.parametrize(("device", "kv_case"), grid_params(
            metafunc.config, KV_AXES, cuda_axes={"dtype": grid.DTYPES_CUDA},
            fast=lambda c: c["hdim"] == 64))


def rotary_dim_for(kind, d):
    if kind == "none":
        return 0
    return (d // 2) & ~1 if kind in ("interleaved", "half") else d & ~1


class Cache:
    """A poisoned KV cache (NaN everywhere no sequence's valid key lives) plus the arguments
    of one flash_attn_with_kvcache call."""

    def __init__(self, c, device, batch=3):
        dtype, d = c["dtype"], c["hdim"]
        h, hk = grid.head_counts(c["heads"], device)
        n_new = c["seqlen_new"]
        self.sq = n_new if n_new else 2
        self.q = randn(batch, self.sq, h, d, dtype=dtype, device=device)
        self.k = randn(batch, n_new, hk, d, dtype=dtype, device=device) if n_new else None
        self.v = randn(batch, n_new, hk, d, dtype=dtype, device=device) if n_new else None
        room = CACHE_LEN - n_new
        if c["cache_seqlens"] == "int":
            lens = [int(torch.randint(0, room + 1, ()))] * batch
        else:
            lens = torch.randint(0, room + 1, (batch,)).tolist()
            lens[0] = 0  # an empty cache (with no append: a row that sees no key)
        self.lens = lens
        self.cache_seqlens = (lens[0] if c["cache_seqlens"] == "int" else
                              torch.tensor(lens, dtype=torch.int32, device=device))
        self.leftpad = None
        if c["leftpad"]:
            pads = [int(torch.randint(0, n + 1, ())) for n in lens]
            self.leftpad = torch.tensor(pads, dtype=torch.int32, device=device)
        self.batch_idx = None
        self.block_table = None
        layout = c["layout"]
        if layout.startswith("paged"):
            page = int(layout[5:])
            per_seq = -(-CACHE_LEN // page)
            n_blocks = batch * per_seq + 2
            table = torch.randperm(n_blocks)[:batch * per_seq].view(batch, per_seq)
            for b in range(batch):  # entries past what a sequence reads may hold anything
                table[b, -(-(lens[b] + n_new) // page):] = -1
            self.block_table = table.to(torch.int32).to(device)
            shape = (n_blocks, page, hk, d)
        else:
            rows = batch
            if layout == "batch_idx":
                rows = batch + 2
                self.batch_idx = torch.randperm(rows)[:batch].to(torch.int32).to(device)
            shape = (rows, CACHE_LEN, hk, d)
        self.k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        self.v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        self._fill_valid(batch, dtype, device)
        r = rotary_dim_for(c["rotary"], d)
        self.cos = self.sin = None
        if r:
            # queries of a full cache sit past its end (positions cache_seqlens + i)
            angle = torch.rand(CACHE_LEN + self.sq, r // 2, device=device) * 6.3
            self.cos, self.sin = angle.cos().to(dtype), angle.sin().to(dtype)
        self.interleaved = c["rotary"] == "interleaved"

    def _fill_valid(self, batch, dtype, device):
        for b in range(batch):
            left = 0 if self.leftpad is None else int(self.leftpad[b])
            for t in range(left, self.lens[b]):
                idx = self.index(b, t)
                self.k_cache[idx] = randn(*self.k_cache.shape[2:], dtype=dtype, device=device)
                self.v_cache[idx] = randn(*self.v_cache.shape[2:], dtype=dtype, device=device)

    def index(self, b, t):
        if self.block_table is not None:
            page = self.k_cache.shape[1]
            return int(self.block_table[b, t // page]), t % page
        return (b if self.batch_idx is None else int(self.batch_idx[b])), t

    def appended_mask(self):
        m = torch.zeros(self.k_cache.shape[:2], dtype=torch.bool)
        n_new = 0 if self.k is None else self.k.shape[1]
        for b in range(self.q.shape[0]):
            for t in range(self.lens[b], self.lens[b] + n_new):
                m[self.index(b, t)] = True
        return m.to(self.k_cache.device)

    def kwargs(self):
        return dict(k=self.k, v=self.v, cache_seqlens=self.cache_seqlens,
                    rotary_cos=self.cos, rotary_sin=self.sin, cache_batch_idx=self.batch_idx,
                    cache_leftpad=self.leftpad, block_table=self.block_table,
                    rotary_interleaved=self.interleaved)


def test_kvcache_grid(flash, tol, device, kv_case):
    c = kv_case
    dtype = c["dtype"]
    cache = Cache(c, device)
    causal, window = window_for(c["mask"], cache.sq, CACHE_LEN)
    slopes = alibi_for(c["alibi"], cache.q.shape[0], cache.q.shape[2], device)
    kw = dict(causal=causal, window_size=window, alibi_slopes=slopes, **cache.kwargs())
    k_before, v_before = cache.k_cache.clone(), cache.v_cache.clone()
    q_before = cache.q.clone()

    out, lse = flash.flash_attn_with_kvcache(cache.q, cache.k_cache, cache.v_cache,
                                             num_splits=c["num_splits"],
                                             return_softmax_lse=True, **kw)
    out_ref, lse_ref, k_ref, v_ref = kvcache_ref(cache.q, k_before, v_before, **kw)
    out_pt, lse_pt, k_pt, _ = kvcache_ref(cache.q, k_before, v_before, **kw,
                                          **pt_options(dtype))
    ctx = case_context(window=window, cache_seqlens=cache.lens,
                       leftpad=None if cache.leftpad is None else cache.leftpad.tolist())
    assert torch.equal(cache.q, q_before), "q must not be modified (rotary is out of place)"
    tol.check("out", out, out_ref, out_pt, dtype, 2.0, ctx)
    tol.check("lse", lse, lse_ref, lse_pt, dtype, 2.0, ctx)

    new = cache.appended_mask()
    # untouched cache slots are bitwise unchanged (NaN poison included)
    torch.testing.assert_close(cache.k_cache[~new], k_before[~new], rtol=0, atol=0,
                               equal_nan=True, msg="k_cache changed outside the append")
    torch.testing.assert_close(cache.v_cache[~new], v_before[~new], rtol=0, atol=0,
                               equal_nan=True, msg="v_cache changed outside the append")
    if new.any():
        torch.testing.assert_close(cache.v_cache[new], v_ref[new].to(dtype), rtol=0, atol=0,
                                   msg="v appended wrongly")
        tol.check("appended k (rotated)", cache.k_cache[new], k_ref[new], k_pt[new], dtype,
                  2.0, ctx)


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_kvcache_decode_loop_matches_reference(flash, tol, device):
    """Token-by-token decode with rotary and GQA, as generate() does it."""
    dtype = torch.bfloat16
    b, h, hk, d, steps = 2, 4, 2, 64, 6
    k_cache = torch.zeros(b, 32, hk, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    lens = torch.tensor([3, 0], dtype=torch.int32, device=device)
    k_cache[0, :3] = randn(3, hk, d, dtype=dtype, device=device)
    v_cache[0, :3] = randn(3, hk, d, dtype=dtype, device=device)
    angle = torch.rand(32, 16, device=device)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    for _ in range(steps):
        q = randn(b, 1, h, d, dtype=dtype, device=device)
        k = randn(b, 1, hk, d, dtype=dtype, device=device)
        v = randn(b, 1, hk, d, dtype=dtype, device=device)
        kw = dict(k=k, v=v, cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin, causal=True,
                  rotary_interleaved=False)
        k0, v0 = k_cache.clone(), v_cache.clone()
        out = flash.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
        ref = kvcache_ref(q, k0, v0, **kw)[0]
        pt = kvcache_ref(q, k0, v0, **kw, **pt_options(dtype))[0]
        tol.check("decode out", out, ref, pt, dtype)
        lens = lens + 1


@pytest.mark.fast
@pytest.mark.parametrize("device", device_params())
def test_kvcache_defaults(flash, tol, device):
    """cache_seqlens=None uses the whole cache; out only unless return_softmax_lse;
    rotary_interleaved defaults to True as in FA2."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    q = randn(2, 3, 2, 32, dtype=dtype, device=device)
    kc, vc = (randn(2, 11, 2, 32, dtype=dtype, device=device) for _ in range(2))
    out = flash.flash_attn_with_kvcache(q, kc, vc, causal=True)
    assert isinstance(out, torch.Tensor)
    tol.check("out", out, kvcache_ref(q, kc, vc, causal=True)[0],
              kvcache_ref(q, kc, vc, causal=True, **pt_options(dtype))[0], dtype)
    angle = torch.rand(11, 8, device=device)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    lens = torch.tensor([4, 7], dtype=torch.int32, device=device)
    kw = dict(cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin)
    out = flash.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), **kw)
    tol.check("out rotary default", out,
              kvcache_ref(q, kc, vc, rotary_interleaved=True, **kw)[0],
              kvcache_ref(q, kc, vc, rotary_interleaved=True, **kw, **pt_options(dtype))[0],
              dtype)


@pytest.mark.parametrize("device", device_params())
def test_kvcache_num_splits_only_changes_rounding(flash, device):
    dtype = torch.float32 if device == "cpu" else torch.float16
    q = randn(2, 1, 4, 64, dtype=dtype, device=device)
    kc, vc = (randn(2, 1000, 1, 64, dtype=dtype, device=device) for _ in range(2))
    lens = torch.tensor([999, 517], dtype=torch.int32, device=device)
    outs = [flash.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=n,
                                          return_softmax_lse=True) for n in (1, 2, 7, 0)]
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=0, atol=8 * torch.finfo(dtype).eps)
        torch.testing.assert_close(lse, outs[0][1], rtol=1e-5, atol=1e-5)
