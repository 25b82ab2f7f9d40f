"""Benchmarks in the Hub's `kernels benchmark` convention (kernels 0.17):

    kernels benchmark ./ [--iterations N] [--warmup N] [--output FILE] [--json]
    kernels benchmark flash-kernels/flash-attn@v1

The command finds `benchmarks/benchmark*.py`, loads the kernel itself (`build/<variant>/` of a
checkout, or the Hub repository) and runs every `benchmark_<workload>` method of each `Benchmark`
subclass here, after `setup_<workload>`, checking it against `verify_<workload>`.

Each class is one shape. Its workloads: `flash` (this kernel) and, where PyTorch has the same
operation, `sdpa` (torch's scaled_dot_product_attention with its default backend choice, on the
same tensors), or a second route through this kernel (`varlen`: paged decode through
flash_attn_varlen_func). Shapes depend on the device (the classes at the end): the real ones on
CUDA (bf16; batch x seqlen = 16384 tokens and heads x head dim = 2048 as in FlashAttention-2's
benchmarks, seqlen 1k-8k, head dim 64/128; GQA with Llama-3-8B's 32 query / 8 key-value heads of
128; decode of 32 sequences over an 8k cache), a few hundred tokens on the CPU so that CI runs
them all on two cores in well under a minute.

Verification: every workload, the SDPA twins included, is compared with a plain fp32 attention
written out with explicit boolean masks (one sequence at a time), gradients through autograd of
that same fp32 math. The runner's check is `torch.allclose(out, ref, atol=1e-2)`, an absolute
tolerance, so both sides are handed to it rescaled by the reference's largest magnitude (per
tensor: out, dq, dk, dv): every element must lie within 2% of the largest one (TOLERANCE). Raw
bf16 values of magnitude 2-4 would otherwise fail on a single rounding step (0.016) and tiny
gradients pass anything. The runner times verify_* too: its "Ref(ms)" and "Speedup" columns
compare with that fp32 reference, not with a peer; the peer is the `sdpa` row of the same class.

Skipping: the runner has no skip. A workload whose operation raises "... not implemented ..."
(today: CUDA flash_attn_with_kvcache; the CUDA backward until it lands) is detected at setup by
running it once; its row stays in the table but runs nothing: no check mark ("·" instead of "✓",
no "verified" key in the JSON) and the time of an empty call, and stderr carries
`skipped <Class>.<workload>: <reason>`. Any other error fails the run. Every supported workload has
a verify_*, so a row without "verified" is always a skipped one.
"""

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.benchmark import Benchmark

DTYPE = torch.bfloat16
# The runner checks torch.allclose(out, ref, atol=RUNNER_ATOL) (default rtol, 1e-5). We check
# every element within TOLERANCE of the reference's largest one: a bf16 rounding step is 0.4% of
# the value and a backward pass rounds several times (SDPA's bf16 CPU backward is off by up to
# 1.5% at seqlen 2k), while a wrong mask, scale, head mapping or page is off by tens of percent.
RUNNER_ATOL = 1e-2
TOLERANCE = 0.02


@dataclass(frozen=True)
class Case:
    """One shape. batch x seqlen (query and key length) x heads (query) / heads_k (key/value) x
    hdim; `lengths` replaces batch x seqlen with mixed sequence lengths (varlen), `page` is the
    page size of a paged KV cache (decode: seqlen is the cache capacity per sequence)."""

    batch: int
    seqlen: int
    heads: int
    heads_k: int
    hdim: int
    causal: bool
    lengths: tuple[int, ...] = ()
    page: int = 0

    def __str__(self):
        rows = f"lengths {list(self.lengths)}" if self.lengths else \
            f"batch {self.batch} x seqlen {self.seqlen}"
        paged = f", page {self.page}" if self.page else ""
        return (f"{rows}, heads {self.heads}/{self.heads_k}, hdim {self.hdim}, "
                f"{'causal' if self.causal else 'no mask'}{paged}, {str(DTYPE)[6:]}")


# --- fp32 reference with explicit masks ---------------------------------------------------------

def attention_ref(q, k, v, causal):
    """softmax(q k^T / sqrt(d), masked) v in fp32 for one sequence: q (sq, h, d), k, v (sk, hk, d)
    -> (sq, h, d). The causal mask is aligned to the bottom-right corner (query i sees keys
    j <= i + sk - sq), as in FlashAttention-2."""
    q, k, v = q.float(), k.float(), v.float()
    sq, h, d = q.shape
    sk, hk = k.shape[:2]
    k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        visible = j <= i + sk - sq
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def grads_ref(q, k, v, dout, causal):
    """(dq, dk, dv) in fp32 of attention_ref for one sequence, through autograd."""
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    return torch.autograd.grad(attention_ref(*leaves, causal), leaves, dout.float())


def scaled(tensors, refs):
    """(ours, ref) as flat fp32 vectors, each pair of tensors divided by its reference's largest
    magnitude times TOLERANCE / RUNNER_ATOL: the runner's fixed absolute tolerance then means
    'within TOLERANCE of the largest element'."""
    ours, ref = [], []
    for t, r in zip(tensors, refs):
        norm = r.abs().max().clamp_min(torch.finfo(torch.float32).tiny) * TOLERANCE / RUNNER_ATOL
        ours.append(t.float().flatten() / norm)
        ref.append(r.float().flatten() / norm)
    return torch.cat(ours), torch.cat(ref)


def _not_implemented(error):
    return isinstance(error, NotImplementedError) or "not implemented" in str(error)


def _nothing():
    pass


# --- workload families --------------------------------------------------------------------------

class _Workloads:
    """What every class shares: the shape for the runner's device, one setup per workload that
    says what it runs and skips what the backend does not implement, and the check.

    Subclasses define `make_inputs()`, `benchmark_<w>()` storing its result tuple in
    `self.result`, and `reference()` returning the matching fp32 tuple."""

    seed = 0
    cases: dict  # "cuda" / "cpu" -> Case

    @property
    def case(self) -> Case:
        return self.cases["cuda" if self.device == "cuda" else "cpu"]

    def prepare(self, workload):
        self.make_inputs()
        print(f"  {type(self).__name__}.{workload}: {self.case}", file=sys.stderr)
        try:
            getattr(self, f"benchmark_{workload}")()
        except (RuntimeError, NotImplementedError) as e:
            if not _not_implemented(e):
                raise
            reason = str(e).strip().splitlines()[0]
            print(f"  skipped {type(self).__name__}.{workload}: {reason}", file=sys.stderr)
            # The runner reads both through the instance after setup: a no-op to time, and no
            # verify_* (a row without a check mark) instead of a failure.
            setattr(self, f"benchmark_{workload}", _nothing)
            setattr(self, f"verify_{workload}", None)

    def check(self):
        self.out, ref = scaled(self.result, self.reference())
        return ref

    def randn(self, *shape, requires_grad=False):
        return torch.randn(*shape, device=self.device, dtype=DTYPE, requires_grad=requires_grad)


def _bhsd(x):
    return x.transpose(1, 2)  # (batch, seqlen, heads, d) <-> SDPA's (batch, heads, seqlen, d)


class _Forward(_Workloads):
    """out = flash_attn_func(q, k, v, causal); twin: SDPA on the same tensors."""

    def make_inputs(self):
        c = self.case
        self.q = self.randn(c.batch, c.seqlen, c.heads, c.hdim)
        self.k = self.randn(c.batch, c.seqlen, c.heads_k, c.hdim)
        self.v = self.randn(c.batch, c.seqlen, c.heads_k, c.hdim)

    def setup_flash(self):
        self.prepare("flash")

    def setup_sdpa(self):
        self.prepare("sdpa")

    def benchmark_flash(self):
        out = self.kernel.flash_attn_func(self.q, self.k, self.v, causal=self.case.causal)
        self.result = (out,)

    def benchmark_sdpa(self):
        c = self.case
        out = F.scaled_dot_product_attention(_bhsd(self.q), _bhsd(self.k), _bhsd(self.v),
                                             is_causal=c.causal, enable_gqa=c.heads != c.heads_k)
        self.result = (_bhsd(out),)

    def reference(self):
        return (torch.stack([attention_ref(self.q[b], self.k[b], self.v[b], self.case.causal)
                             for b in range(self.case.batch)]),)

    verify_flash = verify_sdpa = _Workloads.check


class _ForwardBackward(_Forward):
    """out = flash_attn_func(q, k, v, causal), then (dq, dk, dv) for a random dout; twin: SDPA."""

    def make_inputs(self):
        c = self.case
        self.q = self.randn(c.batch, c.seqlen, c.heads, c.hdim, requires_grad=True)
        self.k = self.randn(c.batch, c.seqlen, c.heads_k, c.hdim, requires_grad=True)
        self.v = self.randn(c.batch, c.seqlen, c.heads_k, c.hdim, requires_grad=True)
        self.dout = self.randn(c.batch, c.seqlen, c.heads, c.hdim)

    def benchmark_flash(self):
        super().benchmark_flash()
        self.result = torch.autograd.grad(self.result, (self.q, self.k, self.v), self.dout)

    def benchmark_sdpa(self):
        super().benchmark_sdpa()
        self.result = torch.autograd.grad(self.result, (self.q, self.k, self.v), self.dout)

    def reference(self):
        per_batch = [grads_ref(self.q[b], self.k[b], self.v[b], self.dout[b], self.case.causal)
                     for b in range(self.case.batch)]
        return tuple(torch.stack(g) for g in zip(*per_batch))


class _Varlen(_Workloads):
    """Sequences of mixed lengths packed without padding: flash_attn_varlen_func. PyTorch's SDPA
    has no packed-sequence entry point, so there is no twin."""

    def make_inputs(self):
        c = self.case
        total = sum(c.lengths)
        self.q = self.randn(total, c.heads, c.hdim)
        self.k = self.randn(total, c.heads_k, c.hdim)
        self.v = self.randn(total, c.heads_k, c.hdim)
        offsets = torch.tensor((0, *c.lengths)).cumsum(0)
        self.cu_seqlens = offsets.to(device=self.device, dtype=torch.int32)
        self.bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))

    def setup_flash(self):
        self.prepare("flash")

    def benchmark_flash(self):
        mx = max(self.case.lengths)
        self.result = (self.kernel.flash_attn_varlen_func(
            self.q, self.k, self.v, self.cu_seqlens, self.cu_seqlens, mx, mx,
            causal=self.case.causal),)

    def reference(self):
        return (torch.cat([attention_ref(self.q[s:e], self.k[s:e], self.v[s:e], self.case.causal)
                           for s, e in self.bounds]),)

    verify_flash = _Workloads.check


class _CacheDecode(_Workloads):
    """One new query token per sequence over a KV cache of mixed fill (1 to seqlen keys), the
    cache left unchanged (no new k/v), so every call does the same work."""

    def make_inputs(self):
        c = self.case
        self.q = self.randn(c.batch, 1, c.heads, c.hdim)
        self.fill = torch.randint(1, c.seqlen + 1, (c.batch,), device=self.device,
                                  dtype=torch.int32)

    def setup_flash(self):
        self.prepare("flash")

    def reference(self):
        return (torch.stack([attention_ref(self.q[b], *self.keys_of(b), self.case.causal)
                             for b in range(self.case.batch)]),)


class _Decode(_CacheDecode):
    """Contiguous cache (batch, seqlen, heads_k, hdim): flash_attn_with_kvcache with
    cache_seqlens; twin: SDPA with a boolean mask of the filled positions."""

    def make_inputs(self):
        super().make_inputs()
        c = self.case
        self.k_cache = self.randn(c.batch, c.seqlen, c.heads_k, c.hdim)
        self.v_cache = self.randn(c.batch, c.seqlen, c.heads_k, c.hdim)
        positions = torch.arange(c.seqlen, device=self.device)
        self.mask = (positions[None, :] < self.fill[:, None])[:, None, None, :]

    def setup_sdpa(self):
        self.prepare("sdpa")

    def benchmark_flash(self):
        self.result = (self.kernel.flash_attn_with_kvcache(
            self.q, self.k_cache, self.v_cache, cache_seqlens=self.fill, causal=self.case.causal),)

    def benchmark_sdpa(self):
        c = self.case
        out = F.scaled_dot_product_attention(_bhsd(self.q), _bhsd(self.k_cache),
                                             _bhsd(self.v_cache), attn_mask=self.mask,
                                             enable_gqa=c.heads != c.heads_k)
        self.result = (_bhsd(out),)

    def keys_of(self, b):
        n = int(self.fill[b])
        return self.k_cache[b, :n], self.v_cache[b, :n]

    verify_flash = verify_sdpa = _Workloads.check


class _PagedDecode(_CacheDecode):
    """The cache in pages of `page` rows scattered over a pool (block_table):
    flash_attn_with_kvcache, and the same attention through flash_attn_varlen_func's block_table
    (`varlen`). SDPA has no paged cache, so there is no twin."""

    def make_inputs(self):
        super().make_inputs()
        c = self.case
        pages = c.seqlen // c.page
        pool_blocks = c.batch * pages + 3  # spare pages nobody points at
        self.k_pool = self.randn(pool_blocks, c.page, c.heads_k, c.hdim)
        self.v_pool = self.randn(pool_blocks, c.page, c.heads_k, c.hdim)
        order = torch.randperm(pool_blocks, device=self.device)[:c.batch * pages]
        self.block_table = order.view(c.batch, pages).to(torch.int32)
        self.cu_seqlens_q = torch.arange(c.batch + 1, device=self.device, dtype=torch.int32)
        self.cu_seqlens_k = F.pad(self.fill.cumsum(0), (1, 0)).to(torch.int32)

    def setup_varlen(self):
        self.prepare("varlen")

    def benchmark_flash(self):
        self.result = (self.kernel.flash_attn_with_kvcache(
            self.q, self.k_pool, self.v_pool, cache_seqlens=self.fill,
            block_table=self.block_table, causal=self.case.causal),)

    def benchmark_varlen(self):
        c = self.case
        out = self.kernel.flash_attn_varlen_func(
            self.q.view(c.batch, c.heads, c.hdim), self.k_pool, self.v_pool, self.cu_seqlens_q,
            self.cu_seqlens_k, 1, c.seqlen, causal=c.causal, block_table=self.block_table)
        self.result = (out.view_as(self.q),)

    def keys_of(self, b):
        n = int(self.fill[b])
        rows = self.block_table[b].long()
        return self.k_pool[rows].flatten(0, 1)[:n], self.v_pool[rows].flatten(0, 1)[:n]

    verify_flash = verify_varlen = _Workloads.check


# --- the shapes ---------------------------------------------------------------------------------
# CUDA: FlashAttention-2's benchmark convention (16384 tokens, heads x hdim = 2048) at the seqlens
# and head dims that models use; CPU: the same head structure at a few hundred tokens.

class FwdHdim64(_Forward, Benchmark):
    cases = {"cuda": Case(16, 1024, 32, 32, 64, causal=False),
             "cpu": Case(2, 128, 4, 4, 64, causal=False)}


class FwdHdim128Causal(_Forward, Benchmark):
    cases = {"cuda": Case(8, 2048, 16, 16, 128, causal=True),
             "cpu": Case(2, 128, 4, 4, 128, causal=True)}


class FwdHdim128CausalLong(_Forward, Benchmark):
    cases = {"cuda": Case(2, 8192, 16, 16, 128, causal=True),
             "cpu": Case(1, 256, 4, 4, 128, causal=True)}


class FwdGqaCausal(_Forward, Benchmark):
    cases = {"cuda": Case(4, 4096, 32, 8, 128, causal=True),
             "cpu": Case(2, 128, 8, 2, 128, causal=True)}


class FwdBwdHdim64(_ForwardBackward, Benchmark):
    cases = {"cuda": Case(16, 1024, 32, 32, 64, causal=False),
             "cpu": Case(2, 64, 4, 4, 64, causal=False)}


class FwdBwdHdim128Causal(_ForwardBackward, Benchmark):
    cases = {"cuda": Case(8, 2048, 16, 16, 128, causal=True),
             "cpu": Case(2, 64, 4, 4, 128, causal=True)}


class FwdBwdGqaCausal(_ForwardBackward, Benchmark):
    cases = {"cuda": Case(4, 4096, 32, 8, 128, causal=True),
             "cpu": Case(2, 64, 8, 2, 128, causal=True)}


class VarlenCausal(_Varlen, Benchmark):
    # Lengths from 1 to a full 4k, 16382 tokens in all (CPU: 253).
    cases = {"cuda": Case(0, 0, 16, 16, 128, causal=True,
                          lengths=(4096, 1, 3000, 2048, 513, 4000, 1024, 1700)),
             "cpu": Case(0, 0, 4, 4, 128, causal=True, lengths=(64, 1, 47, 32, 9, 60, 16, 24))}


class DecodeGqa(_Decode, Benchmark):
    cases = {"cuda": Case(32, 8192, 32, 8, 128, causal=True),
             "cpu": Case(4, 512, 8, 2, 128, causal=True)}


class DecodeGqaPaged(_PagedDecode, Benchmark):
    cases = {"cuda": Case(32, 8192, 32, 8, 128, causal=True, page=256),
             "cpu": Case(4, 512, 8, 2, 128, causal=True, page=64)}
