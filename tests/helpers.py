"""Input builders shared by the test files: random tensors, windows, ALiBi slopes, varlen
batches, paged pools. Everything random is drawn from torch's default generator, which conftest
reseeds per test (fresh each run, reproducible with --seed)."""
import re

import torch

import grid


def randn(*shape, dtype, device, requires_grad=False):
    x = torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)
    return x.requires_grad_(requires_grad)


def qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, d, *, dtype, device, requires_grad=False):
    q = randn(batch, seqlen_q, nheads, d, dtype=dtype, device=device, requires_grad=requires_grad)
    k = randn(batch, seqlen_k, nheads_k, d, dtype=dtype, device=device,
              requires_grad=requires_grad)
    v = randn(batch, seqlen_k, nheads_k, d, dtype=dtype, device=device,
              requires_grad=requires_grad)
    return q, k, v


def window_for(mask, seqlen_q, seqlen_k):
    """(causal, window_size) for a mask kind; local windows are random, as in FA2's tests."""
    if mask == "none":
        return False, (-1, -1)
    if mask == "causal":
        return True, (-1, -1)
    left, right = torch.randint(0, max(seqlen_k, 1), (2,)).tolist()
    return False, (left, right)


def alibi_for(kind, batch, nheads, device):
    """None, (nheads,) or (batch, nheads) fp32 slopes."""
    if kind in (None, "none"):
        return None
    shape = (nheads,) if kind == "h" else (batch, nheads)
    return (torch.rand(*shape, device=device) * 0.3 + 0.01).float()


def random_seqlens(batch, max_len, *, with_empty=True):
    """Per-sequence lengths including a 0- and a 1-length sequence when batch allows."""
    lens = torch.randint(0, max_len + 1, (batch,)).tolist()
    if with_empty and batch >= 3:
        lens[0], lens[1] = 0, 1
        lens[2] = max_len
    return lens


def cu_seqlens(lens, device):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def paged_pool(k_seqs, page_size, *, extra_blocks=3, poison=float("nan")):
    """Scatter per-sequence keys (list of (len, hk, d)) into a shuffled paged pool.

    Returns pool (num_blocks, page, hk, d) and block_table (batch, max_blocks) int32. Unused
    slots are poisoned so that reading them shows up as NaN.
    """
    hk, d = k_seqs[0].shape[1:]
    dtype, device = k_seqs[0].dtype, k_seqs[0].device
    blocks_per = [-(-t.shape[0] // page_size) for t in k_seqs]
    num_blocks = sum(blocks_per) + extra_blocks
    perm = torch.randperm(num_blocks).tolist()
    pool = torch.full((num_blocks, page_size, hk, d), poison, dtype=dtype, device=device)
    table = torch.zeros(len(k_seqs), max(max(blocks_per), 1), dtype=torch.int32)
    nxt = 0
    for b, t in enumerate(k_seqs):
        for blk in range(blocks_per[b]):
            table[b, blk] = perm[nxt]
            nxt += 1
        # entries a sequence does not read may hold anything (docs/design.md; Transformers
        # writes -1): -1 here makes a kernel that reads them fail
        table[b, blocks_per[b]:] = -1
        for i in range(t.shape[0]):
            pool[int(table[b, i // page_size]), i % page_size] = t[i]
    return pool, table.to(device)


def names(arg):
    """Regex matching the argument name as a whole word (k, but not k_cache or block)."""
    return re.compile(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])")


def case_context(**kw):
    """A short description of random choices, appended to assertion messages."""
    return "[" + ", ".join(f"{k}={grid.dtype_name(v) if isinstance(v, torch.dtype) else v}"
                           for k, v in kw.items()) + "]"
