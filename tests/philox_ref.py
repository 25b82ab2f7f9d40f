"""Python model of the dropout stream specified in kernel_src/common/philox.h.

Written from the specification (and Salmon et al., SC'11), not from the C++ code, so that the
tests can check the kernels' masks bit for bit against an independent implementation. Vectorised
with numpy uint64 arithmetic: a 32x32 -> 64-bit product always fits.
"""
import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_MUL0, _MUL1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85


def philox4x32_10(ctr, key):
    """Ten Philox 4x32 rounds. ctr: 4 array-likes of uint32 (broadcast), key: 2 ints."""
    x, y, z, w = np.broadcast_arrays(*[np.asarray(c, dtype=np.uint64) for c in ctr])
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(10):
        p0 = _MUL0 * x
        p1 = _MUL1 * z
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        x, y, z, w = hi1 ^ y ^ np.uint64(k0), lo1, hi0 ^ w ^ np.uint64(k1), lo0
        k0 = (k0 + _WEYL0) & 0xFFFFFFFF
        k1 = (k1 + _WEYL1) & 0xFFFFFFFF
    return x, y, z, w


def dropout_threshold(p):
    """round(p * 2^32) of the float32 value of p, saturated to 2^32 - 1 (as philox.h)."""
    t = float(np.float32(p)) * 4294967296.0 + 0.5
    return 0xFFFFFFFF if t >= 4294967295.0 else int(t)


def keep_mask(seed, offset, batch, nheads, seqlen_q, seqlen_k, p):
    """Boolean keep mask (batch, nheads, seqlen_q, seqlen_k) for one call with these lengths.

    seed/offset are the two int64 entries of rng_state (reinterpreted as uint64). For varlen,
    pass one sequence at a time with `batch` replaced by the index range you need (see
    keep_mask_for).
    """
    return np.stack([keep_mask_for(seed, offset, b, nheads, nheads, seqlen_q, seqlen_k, p)
                     for b in range(batch)])


def keep_mask_for(seed, offset, b, h_count, nheads, seqlen_q, seqlen_k, p):
    """Keep mask (h_count, seqlen_q, seqlen_k) of sequence b, heads 0..h_count-1."""
    seed &= 0xFFFFFFFFFFFFFFFF
    offset &= 0xFFFFFFFFFFFFFFFF
    thr = dropout_threshold(p)
    heads = np.arange(h_count, dtype=np.uint64)[:, None, None]
    rows = np.arange(seqlen_q, dtype=np.uint64)[None, :, None]
    cols = np.arange(seqlen_k, dtype=np.uint64)[None, None, :]
    sub = (np.uint64(offset) + np.uint64(b) * np.uint64(nheads) + heads) & np.uint64(
        0xFFFFFFFFFFFFFFFF)
    ctr = (cols >> np.uint64(2), rows, sub & _MASK32, sub >> np.uint64(32))
    words = philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))
    word_idx = (cols & np.uint64(3)) + np.zeros_like(rows) + np.zeros_like(heads)
    chosen = np.choose(word_idx.astype(np.int64), words)
    return chosen >= np.uint64(thr)
