"""Small backward calls for compute-sanitizer (racecheck is too slow for the pytest grid): one
call per backward kernel shape, each checked against fp32 PyTorch math on the same GPU so that a
run under a sanitizer also says the results were right. Covers every tile config (head dims 64,
96, 128, 256: the registers-fed P^T and the shared-memory P^T paths, the large and small tiles),
the dQ adds (bulk reduction from shared memory on sm90+, and the deterministic mode's ordered
vector reductions), causal and local masks with ragged lengths, GQA, varlen with a zero-length
and a one-token sequence, softcap and dropout.

Usage (repository root, CUDA build in build/):
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \\
      python tests/cuda_harness/sanitize_bwd.py
Exit status 1 if a result is wrong; the sanitizer's summary line reports hazards."""
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import load_flash  # noqa: E402


def reference(q, k, v, dout, causal, window, softcap, scale):
    """fp32 attention with an explicit mask (bottom-right causal/local), and its gradients."""
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    kk, vv = (x.repeat_interleave(group, dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[1], k.shape[1]
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    left, right = window
    if causal:
        right = 0
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    grads = torch.autograd.grad(out, (q, k, v), dout.float())
    return out.detach(), grads


def check(name, got, want, tol):
    """Max error relative to the reference's largest element, floored at 1e-3: a one-token
    sequence's dQ and dK are exactly zero in exact math (D cancels dP) and about 1e-7 in fp32."""
    err = (got.float() - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-3)
    ok = err <= tol * scale
    print(f"{name}: max err {err:.3e} (scale {scale:.3e}) {'ok' if ok else 'WRONG'}", flush=True)
    return ok


def main():
    flash = load_flash(str(ROOT / "build"))
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    ok = True
    cases = [  # (head dim, seqlen_q, seqlen_k, heads, kv heads, causal, window, softcap, det)
        (64, 150, 200, 2, 1, True, (-1, -1), 0.0, False),
        (96, 130, 97, 2, 2, False, (-1, -1), 0.0, False),
        (128, 200, 200, 4, 2, False, (40, 8), 0.0, False),
        (128, 77, 150, 2, 2, True, (-1, -1), 30.0, True),
        (256, 100, 130, 2, 1, False, (-1, -1), 0.0, False),
    ]
    for d, sq, sk, h, hk, causal, window, softcap, det in cases:
        q = torch.randn(2, sq, h, d, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(2, sk, hk, d, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(2, sk, hk, d, device=dev, dtype=dt, requires_grad=True)
        out = flash.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                    deterministic=det)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        _, want = reference(q, k, v, dout, causal, window, softcap, 1 / math.sqrt(d))
        tag = f"d{d} {sq}x{sk} h{h}/{hk} causal={causal} window={window} softcap={softcap} det={det}"
        for n, g, w in zip("qkv", grads, want):
            ok &= check(f"{tag} d{n}", g, w, 2e-2)
    # varlen: a zero-length and a one-token sequence among ragged ones, causal, head dim 128
    lens = [70, 0, 1, 130, 64]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, 2, 128, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    out = flash.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for i, n in enumerate(lens):
        if n == 0:
            continue
        a, b = int(cu[i]), int(cu[i + 1])
        sl = lambda x: x[a:b].unsqueeze(0)  # noqa: E731
        _, want = reference(sl(q), sl(k), sl(v), sl(dout), True, (-1, -1), 0.0, 1 / math.sqrt(128))
        for n_, g, w in zip("qkv", grads, want):
            ok &= check(f"varlen seq {i} (len {n}) d{n_}", sl(g), w, 2e-2)
    # dropout: runs (its mask is checked by tests/test_dropout.py), under the sanitizer only
    q, k, v = (torch.randn(1, 96, 2, 64, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    out = flash.flash_attn_func(q, k, v, dropout_p=0.2, causal=True)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    torch.cuda.synchronize()
    print("all results right" if ok else "SOME RESULTS WRONG", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
