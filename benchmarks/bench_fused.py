"""The fused training ops against their eager PyTorch equivalents and `torch.compile` of them (the
fair peer: what a user gets without our kernels), same inputs, same run:

  norm   `ops.layer_norm.dropout_add_layer_norm` with a residual and prenorm=True (residual add +
         LayerNorm, both outputs) and `ops.rms_norm.rms_norm`; bf16, 16k tokens, hidden
         2048/4096/8192. Forward and forward+backward ms, and GB/s over the bytes the op must move
         at least: layer norm forward reads x0 and the residual and writes z and x (4 passes),
         its backward reads dz, the gradient of x and x and writes dx0 (4); RMSNorm forward 2
         passes, backward 3 (dz, x; dx). The device copy rate of the same run is the roof.
  ce     `losses.cross_entropy.CrossEntropyLoss` at vocab 128256, 8k tokens, bf16 logits:
         forward+backward ms and the peak memory the call allocates beyond its inputs
         (torch.cuda.max_memory_allocated), against F.cross_entropy eager and compiled.
  dense  `ops.fused_dense.FusedMLP` (tanh GELU) against Linear + GELU + Linear eager and compiled
         at a Llama MLP shape (4096 -> 11008 -> 4096, 8k tokens): forward+backward ms (ours at
         checkpoint_lvl 0 and 2 as `ours_lvl2`), and forward ms without autograd (the fused
         bias+GELU epilogue; `ours_unfused` is heuristic=-1, the GELU outside the GEMM).

Timing (docs/benchmarking.md): `_measure.kernel_ms` on the GPU (median, L2 flushed; the host's
launch work counts where it outlasts the flush), with `--graph` `_measure.graph_ms` (the same
around CUDA-graph replays: the kernels alone), the median wall time of 3 calls on the CPU. Ratios are peer time over ours (> 1: ours is faster).

    python benchmarks/bench_fused.py [--device cuda|cpu] [--quick] [--no-compile] [--graph]
                                     [--ops norm,ce,dense] [--out PATH]

The fused ops' public functions take CUDA tensors when `_fused_checks.CUDA_ENABLED` (docs/fused_ops.md,
"Status"); this script switches it on for itself, so that a kernel change can be measured before
its release.
`--device cpu --quick --no-compile` runs tiny shapes on the CPU: a check that the script works
(tests/test_bench_fused.py), not a measurement.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import (clocks, gbps, git_sha, graph_ms, kernel_ms, load_flash,  # noqa: E402
                      median_wall_s, wall_s_and_peak_mib)

SHAPES = {  # full, quick
    "norm": ([(16384, h) for h in (2048, 4096, 8192)], [(64, 40)]),
    "ce": ([(8192, 128256)], [(16, 1001)]),
    "dense": ([(8192, 4096, 11008)], [(32, 48, 80)]),
}


class Runner:
    def __init__(self, device, compile_peers, graph=False):
        self.device, self.compile_peers, self.graph = device, compile_peers, graph

    def ms(self, fn):
        if self.device == "cuda":
            return graph_ms(fn) if self.graph else kernel_ms(fn)
        return 1e3 * median_wall_s(fn, reps=3)

    def peers(self, eager):
        """{"eager": fn, "compiled": torch.compile(fn)} (compiled only when asked)."""
        out = {"eager": eager}
        if self.compile_peers:
            out["compiled"] = torch.compile(eager)
        return out

    def fwd_bwd(self, fn, inputs, grads):
        """fn(*inputs) -> tensor or tuple; backward with the fixed upstream gradients."""
        def run():
            for t in inputs:
                t.grad = None
            outs = fn(*inputs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(outs, grads)
        return run


def copy_rate(device, ms):
    src = torch.randn(64 << 20 if device == "cuda" else 1 << 20, device=device)
    dst = torch.empty_like(src)
    return gbps(2 * src.numel() * 4, ms(lambda: dst.copy_(src)))


def norm_rows(flash, r, shapes):
    rows = []
    eps = 1e-5
    for tokens, hidden in shapes:
        dev, dt = r.device, torch.bfloat16
        esz = torch.empty((), dtype=dt).element_size()
        x0 = torch.randn(tokens, hidden, device=dev, dtype=dt, requires_grad=True)
        res = torch.randn_like(x0, requires_grad=True)
        w = torch.randn(hidden, device=dev, dtype=dt, requires_grad=True)
        b = torch.randn(hidden, device=dev, dtype=dt, requires_grad=True)
        dz, dx = torch.randn_like(x0), torch.randn_like(x0)
        tensor_bytes = tokens * hidden * esz

        def ours_ln(x0, res, w, b):
            return flash.ops.layer_norm.dropout_add_layer_norm(x0, res, w, b, 0.0, eps,
                                                               prenorm=True)

        def eager_ln(x0, res, w, b):
            x = x0 + res
            return F.layer_norm(x, (hidden,), w, b, eps), x

        def ours_rms(x0, w):
            return flash.ops.rms_norm.rms_norm(x0, w, eps)

        def eager_rms(x0, w):
            xf = x0.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x0.dtype) * w

        for op, ours, eager, inputs, grads, passes in (
                ("layer_norm_prenorm", ours_ln, eager_ln, (x0, res, w, b), (dz, dx), (4, 4)),
                ("rms_norm", ours_rms, eager_rms, (x0, w), (dz,), (2, 3))):
            impls = dict(ours=ours, **r.peers(eager))
            row = dict(op=op, tokens=tokens, hidden=hidden, dtype="bf16", ms={}, ms_fwd_bwd={})
            for name, fn in impls.items():
                with torch.no_grad():
                    row["ms"][name] = r.ms(lambda fn=fn: fn(*inputs))
                row["ms_fwd_bwd"][name] = r.ms(r.fwd_bwd(fn, inputs, grads))
            row["gbps_fwd"] = {k: gbps(passes[0] * tensor_bytes, v) for k, v in row["ms"].items()}
            row["gbps_fwd_bwd"] = {k: gbps(sum(passes) * tensor_bytes, v)
                                   for k, v in row["ms_fwd_bwd"].items()}
            rows.append(ratios(row))
            print(json.dumps(row), flush=True)
    return rows


def ce_rows(flash, r, shapes):
    rows = []
    for tokens, vocab in shapes:
        dev = r.device
        logits = torch.randn(tokens, vocab, device=dev, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (tokens,), device=dev)
        grad = torch.ones((), device=dev)
        loss = flash.losses.cross_entropy.CrossEntropyLoss()

        def eager(logits, labels):
            return F.cross_entropy(logits, labels)

        impls = dict(ours=lambda lg, lb: loss(lg, lb), **r.peers(eager))
        row = dict(op="cross_entropy", tokens=tokens, vocab=vocab, dtype="bf16", ms_fwd_bwd={},
                   peak_mib={})
        for name, fn in impls.items():
            step = r.fwd_bwd(fn, (logits, labels), (grad,))
            row["ms_fwd_bwd"][name] = r.ms(step)
            row["peak_mib"][name] = wall_s_and_peak_mib(step, dev)[1]
        rows.append(ratios(row))
        print(json.dumps(row), flush=True)
    return rows


def dense_rows(flash, r, shapes):
    rows = []
    for tokens, d_in, d_hidden in shapes:
        dev, dt = r.device, torch.bfloat16
        x = torch.randn(tokens, d_in, device=dev, dtype=dt, requires_grad=True)
        fd = flash.ops.fused_dense
        mlp = fd.FusedMLP(d_in, d_hidden, device=dev, dtype=dt)
        w1, b1, w2, b2 = mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias
        grad = torch.randn(tokens, d_in, device=dev, dtype=dt)

        def eager(x):
            return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

        def ours_lvl(lvl, heuristic="auto"):
            return lambda x: fd.fused_mlp_func(x, w1, w2, b1, b2, checkpoint_lvl=lvl,
                                               heuristic=heuristic)

        peers = r.peers(eager)
        # Training (checkpoint_lvl 0 saves the pre-activation: addmm + GELU; level 2 runs the
        # fused bias+GELU epilogue forward and recomputes the first linear in the backward).
        train = dict(ours=mlp, ours_lvl2=ours_lvl(2), **peers)
        # No backward: the fused epilogue (CUDA), against the same call with the GELU kept out
        # of the GEMM (heuristic -1).
        infer = dict(ours=ours_lvl(0), ours_unfused=ours_lvl(0, heuristic=-1), **peers)
        row = dict(op="mlp", tokens=tokens, d_in=d_in, d_hidden=d_hidden, dtype="bf16",
                   ms_fwd_bwd={name: r.ms(r.fwd_bwd(fn, (x,), (grad,)))
                               for name, fn in train.items()}, ms={})
        with torch.no_grad():
            for name, fn in infer.items():
                row["ms"][name] = r.ms(lambda fn=fn: fn(x))
        rows.append(ratios(row))
        print(json.dumps(row), flush=True)
    return rows


def ratios(row):
    """Peer time over ours for every timing dict of the row (> 1: ours is faster)."""
    for key in ("ms", "ms_fwd_bwd"):
        if key in row:
            row["ratio" + key[2:]] = {k: v / row[key]["ours"] for k, v in row[key].items()
                                      if k != "ours"}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--build", default=str(HERE.parent / "build"))
    ap.add_argument("--ops", default="norm,ce,dense")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a check, not a measure)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--graph", action="store_true",
                    help="time CUDA-graph replays (kernels only, no host launch work)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    flash = load_flash(args.build, args.device)
    flash._fused_checks.CUDA_ENABLED = True  # also where a release keeps it off (docstring)
    r = Runner(args.device, args.compile, args.graph)
    result = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  torch=torch.__version__, git_sha=git_sha(),
                  command="python benchmarks/bench_fused.py " + " ".join(sys.argv[1:]),
                  copy_gbps=copy_rate(args.device, r.ms), rows=[])
    fns = {"norm": norm_rows, "ce": ce_rows, "dense": dense_rows}
    for op in args.ops.split(","):
        result["rows"] += fns[op](flash, r, SHAPES[op][1 if args.quick else 0])
    if args.device == "cuda":
        result["clocks"] = clocks()
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
