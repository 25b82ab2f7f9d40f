"""Training step of the toolkit modules against torch.nn.MultiheadAttention (which runs SDPA):
forward + backward of one self-attention layer (projections included), bf16, batch-first,
causal, at sequence lengths 2k and 8k. Rows: ours as `flash_attn.modules.mha.MHA`, ours as the
`MultiheadAttention` drop-in (an nn.MultiheadAttention state dict loaded unchanged), and
`nn.MultiheadAttention` with `is_causal=True` and the causal mask (its fast path to SDPA).

    python benchmarks/bench_modules.py [--build build] [--out PATH]

Time: the median of CUDA-event timings (_measure.kernel_ms) of forward + backward with a
random upstream gradient; the ratio is nn.MultiheadAttention's time over ours (> 1: faster).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import clocks, git_sha, kernel_ms  # noqa: E402
from bench_bwd import load_flash  # noqa: E402

SHAPES = [(8, 2048, 2048, 16), (2, 8192, 2048, 16)]  # (batch, seqlen, embed, heads)


def step_ms(module, x, call):
    """Median ms of forward + backward of call(module, x) with a fixed upstream gradient."""
    out = call(module, x)
    grad = torch.randn_like(out)

    def run():
        x.grad = None
        call(module, x).backward(grad)

    return kernel_ms(run)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=str(HERE.parent / "build"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    flash = load_flash(args.build)
    mha_mod = flash.modules.mha
    dtype, dev = torch.bfloat16, "cuda"
    rows = []
    for batch, seqlen, embed, heads in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(batch, seqlen, embed, device=dev, dtype=dtype, requires_grad=True)
        ref = torch.nn.MultiheadAttention(embed, heads, batch_first=True, device=dev, dtype=dtype)
        drop_in = mha_mod.MultiheadAttention(embed, heads, batch_first=True, device=dev,
                                             dtype=dtype)
        drop_in.load_state_dict(ref.state_dict())
        ours_mha = mha_mod.MHA(embed, heads, causal=True, use_flash_attn=True, device=dev,
                               dtype=dtype)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(seqlen, device=dev,
                                                                    dtype=dtype)

        def torch_call(m, t):
            return m(t, t, t, attn_mask=mask, is_causal=True, need_weights=False)[0]

        def drop_in_call(m, t):
            return m(t, t, t, is_causal=True, need_weights=False)[0]

        times = {"nn_multihead_attention": step_ms(ref, x, torch_call),
                 "ours_drop_in": step_ms(drop_in, x, drop_in_call),
                 "ours_mha": step_ms(ours_mha, x, lambda m, t: m(t))}
        row = dict(batch=batch, seqlen=seqlen, embed_dim=embed, num_heads=heads, causal=True,
                   dtype="bf16", ms=times,
                   ratio_drop_in=times["nn_multihead_attention"] / times["ours_drop_in"],
                   ratio_mha=times["nn_multihead_attention"] / times["ours_mha"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  cuda=torch.version.cuda, git_sha=git_sha(), clocks=clocks(),
                  command="python benchmarks/bench_modules.py", rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
