"""The CUDA decode path beyond the shared grid of test_kvcache.py: paged and contiguous caches
give identical outputs, split-KV agrees with the unsplit kernel, the CUDA backend agrees with the
CPU backend, short queries through flash_attn_func take the split path correctly, a decode step
is captured in a CUDA graph and replayed (paged and contiguous), and bad device-resident indices
never write outside the cache."""
import pytest
import torch

from helpers import case_context, randn
from reference import attention_ref, kvcache_ref, pt_options

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = [torch.float16, torch.bfloat16]


def decode_inputs(batch, cache_len, h, hk, d, dtype, page=None, device="cuda"):
    """A filled cache (contiguous, plus the same keys in a shuffled paged pool when page is
    given) with per-sequence lengths and one new token per sequence."""
    lens = torch.randint(1, cache_len, (batch,), dtype=torch.int32)
    lens[0] = cache_len - 1  # one sequence that fills the cache after the append
    kc = randn(batch, cache_len, hk, d, dtype=dtype, device=device)
    vc = randn(batch, cache_len, hk, d, dtype=dtype, device=device)
    out = dict(q=randn(batch, 1, h, d, dtype=dtype, device=device),
               k=randn(batch, 1, hk, d, dtype=dtype, device=device),
               v=randn(batch, 1, hk, d, dtype=dtype, device=device),
               lens=lens.to(device), kc=kc, vc=vc)
    if page is not None:
        per_seq = -(-cache_len // page)
        n_blocks = batch * per_seq + 1
        table = torch.randperm(n_blocks)[:batch * per_seq].view(batch, per_seq).to(torch.int32)
        pool_k = torch.full((n_blocks, page, hk, d), float("nan"), dtype=dtype, device=device)
        pool_v = pool_k.clone()
        for b in range(batch):
            for p in range(per_seq):
                rows = slice(p * page, min((p + 1) * page, cache_len))
                n = rows.stop - rows.start
                pool_k[int(table[b, p]), :n] = kc[b, rows]
                pool_v[int(table[b, p]), :n] = vc[b, rows]
        out.update(table=table.to(device), pool_k=pool_k, pool_v=pool_v)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page", [1, 3, 16, 256])
def test_paged_equals_contiguous(flash, dtype, page):
    """The same keys read through a block table of any page size give the same output and LSE
    as the contiguous cache, and the same appended rows: bitwise when both run the same kernel
    with the same splits (a forced split count), within rounding otherwise (a contiguous cache
    may take a faster kernel, and the chosen split count follows the capacity)."""
    x = decode_inputs(3, 700, 8, 2, 128, dtype, page=page)
    for splits in (1, 0, 5):
        kc, vc = x["kc"].clone(), x["vc"].clone()
        pk, pv = x["pool_k"].clone(), x["pool_v"].clone()
        kw = dict(k=x["k"], v=x["v"], cache_seqlens=x["lens"], causal=True, num_splits=splits,
                  return_softmax_lse=True)
        out_c, lse_c = flash.flash_attn_with_kvcache(x["q"], kc, vc, **kw)
        out_p, lse_p = flash.flash_attn_with_kvcache(x["q"], pk, pv, block_table=x["table"], **kw)
        msg = f"paged (page {page}) differs, num_splits={splits}"
        if splits != 5:  # (0: the split count follows the cache capacity, which may differ)
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(out_p, out_c, rtol=0, atol=4 * eps, msg=msg)
            torch.testing.assert_close(lse_p, lse_c, rtol=eps / 16, atol=0, msg=msg)
        else:
            assert torch.equal(out_c, out_p), msg
            assert torch.equal(lse_c, lse_p), msg
        for b in range(3):
            t = int(x["lens"][b])
            blk = int(x["table"][b, t // page])
            assert torch.equal(pk[blk, t % page], kc[b, t])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (32, 1)])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_split_agrees_with_unsplit_and_reference(flash, tol, dtype, heads, seqlen_q):
    """Every split count gives the reference's answer by the 2x rule, and agrees with the
    unsplit kernel within a few roundings."""
    h, hk = heads
    b, n, d = 2, 3000, 128
    q = randn(b, seqlen_q, h, d, dtype=dtype, device="cuda")
    kc, vc = (randn(b, n, hk, d, dtype=dtype, device="cuda") for _ in range(2))
    lens = torch.tensor([n, 1234], dtype=torch.int32, device="cuda")
    kw = dict(cache_seqlens=lens, causal=True)
    ref = kvcache_ref(q, kc, vc, **kw)
    pt = kvcache_ref(q, kc, vc, **kw, **pt_options(dtype))
    base = None
    for splits in (1, 2, 7, 64, 0):
        out, lse = flash.flash_attn_with_kvcache(q, kc, vc, num_splits=splits,
                                                 return_softmax_lse=True, **kw)
        ctx = case_context(num_splits=splits, heads=heads)
        tol.check("out", out, ref[0], pt[0], dtype, 2.0, ctx)
        tol.check("lse", lse, ref[1], pt[1], dtype, 2.0, ctx)
        if base is None:
            base = out, lse
        else:
            # (the unsplit call may run a kernel that sums the probabilities after rounding
            # them to the input dtype, on the tensor cores: LSEs differ by that rounding)
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(out, base[0], rtol=0, atol=4 * eps)
            torch.testing.assert_close(lse, base[1], rtol=eps / 16, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary", ["interleaved", "half"])
def test_cuda_agrees_with_cpu_backend(flash, tol, dtype, rotary):
    """One decode step with every cache feature (paged pool, leftpad is exercised by the grid)
    on both backends: outputs within the rule of the reference and of each other, and the
    updated caches equal."""
    x = decode_inputs(4, 300, 8, 2, 64, dtype, page=16)
    angle = torch.rand(301, 16) * 6.3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    slopes = torch.rand(4, 8)
    kw = dict(cache_seqlens=x["lens"].cpu(), rotary_cos=cos, rotary_sin=sin,
              rotary_interleaved=rotary == "interleaved", causal=True, softcap=20.0,
              alibi_slopes=slopes, block_table=x["table"].cpu(), return_softmax_lse=True)
    cpu_args = [t.cpu() for t in (x["q"], x["pool_k"], x["pool_v"], x["k"], x["v"])]
    cuda_args = [t.clone() for t in (x["q"], x["pool_k"], x["pool_v"], x["k"], x["v"])]
    cuda_kw = {key: (val.cuda() if isinstance(val, torch.Tensor) else val)
               for key, val in kw.items()}
    ref_kw = {key: val for key, val in kw.items() if key != "return_softmax_lse"}
    q, pk, pv, k, v = cpu_args
    ref = kvcache_ref(q, pk, pv, k, v, **ref_kw)
    pt = kvcache_ref(q, pk, pv, k, v, **ref_kw, **pt_options(dtype))
    out_cpu, lse_cpu = flash.flash_attn_with_kvcache(q, pk, pv, k=k, v=v, **kw)
    qg, pkg, pvg, kg, vg = cuda_args
    out_gpu, lse_gpu = flash.flash_attn_with_kvcache(qg, pkg, pvg, k=kg, v=vg, **cuda_kw)
    ctx = case_context(rotary=rotary)
    tol.check("out cuda", out_gpu, ref[0], pt[0], dtype, 2.0, ctx)
    tol.check("out cpu", out_cpu, ref[0], pt[0], dtype, 2.0, ctx)
    tol.check("out cuda vs cpu", out_gpu, out_cpu.double(), pt[0], dtype, 2.0, ctx)
    tol.check("lse cuda", lse_gpu, ref[1], pt[1], dtype, 2.0, ctx)
    # The appended keys, rotated in fp32 by both backends and rounded once: equal up to that
    # rounding (fused multiply-adds may differ); values copied bitwise.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(pkg.cpu(), pk, rtol=eps, atol=eps, equal_nan=True)
    torch.testing.assert_close(pvg.cpu(), pv, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 32, 8, 64, 8192), (2, 3, 16, 16, 128, 4000),
                                   (4, 1, 8, 1, 256, 2048), (1, 17, 4, 2, 96, 5000),
                                   (64, 1, 32, 8, 128, 1024)])
def test_flash_attn_func_short_queries(flash, tol, dtype, shape):
    """flash_attn_func / varlen with few query rows take the split path (and the decode view
    of GQA for one row; the last shape fills the GPU, so it runs unsplit through the decode
    view on either CUDA path); causal, bottom-right aligned."""
    b, sq, h, hk, d, sk = shape
    q = randn(b, sq, h, d, dtype=dtype, device="cuda")
    k, v = (randn(b, sk, hk, d, dtype=dtype, device="cuda") for _ in range(2))
    for causal in (False, True):
        out, lse, _ = flash.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
        ref = attention_ref(q, k, v, causal=causal, upcast=True)
        pt = attention_ref(q, k, v, causal=causal, **pt_options(dtype))
        ctx = case_context(causal=causal, shape=shape)
        tol.check("out", out, ref[0], pt[0], dtype, 2.0, ctx)
        tol.check("lse", lse, ref[1], pt[1], dtype, 2.0, ctx)
    # varlen, one long and one short sequence
    cu_q = torch.tensor([0, sq, 2 * sq], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, sk, sk + 100], dtype=torch.int32, device="cuda")
    qv = randn(2 * sq, h, d, dtype=dtype, device="cuda")
    kv_, vv = (randn(sk + 100, hk, d, dtype=dtype, device="cuda") for _ in range(2))
    out = flash.flash_attn_varlen_func(qv, kv_, vv, cu_q, cu_k, sq, sk, causal=True)
    for i, (q0, q1, k0, k1) in enumerate([(0, sq, 0, sk), (sq, 2 * sq, sk, sk + 100)]):
        args = (qv[None, q0:q1], kv_[None, k0:k1], vv[None, k0:k1])
        ref = attention_ref(*args, causal=True, upcast=True)[0]
        pt = attention_ref(*args, causal=True, **pt_options(dtype))[0]
        tol.check(f"varlen out seq {i}", out[None, q0:q1], ref, pt, dtype, 2.0,
                  case_context(shape=shape))


@pytest.mark.parametrize("paged", [False, True])
def test_decode_step_cuda_graph(flash, paged):
    """A decode step (append with rotary, split-KV attention) captured in a CUDA graph and
    replayed with new inputs gives the eager result: no host sync and no allocation outside the
    graph's pool inside the call."""
    dtype = torch.bfloat16
    x = decode_inputs(4, 2048, 16, 4, 128, dtype, page=64 if paged else None)
    angle = torch.rand(2049, 32, device="cuda") * 6.3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    kc, vc = (x["pool_k"], x["pool_v"]) if paged else (x["kc"], x["vc"])
    table = x["table"] if paged else None
    q, k, v, lens = (x[n].clone() for n in ("q", "k", "v", "lens"))

    def step():
        return flash.flash_attn_with_kvcache(q, kc, vc, k=k, v=v, cache_seqlens=lens,
                                             rotary_cos=cos, rotary_sin=sin, causal=True,
                                             block_table=table)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture (allocator, kernel attributes)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_graph = step()
    for _ in range(3):
        q.copy_(randn(*q.shape, dtype=dtype, device="cuda"))
        k.copy_(randn(*k.shape, dtype=dtype, device="cuda"))
        v.copy_(randn(*v.shape, dtype=dtype, device="cuda"))
        lens.copy_(torch.randint(1, 2047, lens.shape, dtype=torch.int32, device="cuda"))
        kc_before, vc_before = kc.clone(), vc.clone()
        graph.replay()
        torch.cuda.synchronize()
        got, kc_graph = out_graph.clone(), kc.clone()
        kc.copy_(kc_before)
        vc.copy_(vc_before)
        want = step()
        assert torch.equal(got, want), "graph replay differs from the eager call"
        torch.testing.assert_close(kc_graph, kc, rtol=0, atol=0, equal_nan=True)


def test_bad_device_indices_never_write_outside_the_cache(flash):
    """cache_seqlens past the cache and page ids past the pool (device-resident, unchecked
    without a sync): the append drops those tokens, nothing outside the cache changes, and the
    call returns finite outputs for the valid sequences."""
    dtype = torch.float16
    hk, d, page = 2, 64, 16
    guard = torch.full((3, page, hk, d), 7.0, dtype=dtype, device="cuda")
    pool = torch.zeros(8, page, hk, d, dtype=dtype, device="cuda")
    storage = torch.cat([pool, guard])  # the guard pages follow the pool in memory
    pool_k, pool_v = storage[:8], storage[:8].clone()
    table = torch.tensor([[0, 1, 2, 3], [4, 5, 1000, -3]], dtype=torch.int32, device="cuda")
    lens = torch.tensor([5, 40], dtype=torch.int32, device="cuda")  # seq 1 appends at page 2
    q = randn(2, 1, 4, d, dtype=dtype, device="cuda")
    k, v = (randn(2, 1, hk, d, dtype=dtype, device="cuda") for _ in range(2))
    out = flash.flash_attn_with_kvcache(q, pool_k, pool_v, k=k, v=v, cache_seqlens=lens,
                                        block_table=table)
    torch.cuda.synchronize()
    assert torch.equal(storage[8:], guard), "the append wrote past the pool"
    assert torch.isfinite(out[0]).all()
    assert torch.equal(pool_k[0, 5], k[0, 0])
