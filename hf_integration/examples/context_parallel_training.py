"""Context-parallel training: a Transformers Llama whose attention runs as ring attention over
the flash-attn Hub kernel, each process holding one slice of a packed row of documents.

    pip install -e hf_integration ring-flash-attn==0.1.8
    python tools/build_local.py --variant cpu
    python hf_integration/examples/context_parallel_training.py --nproc 2            # CPU, gloo
    torchrun --nproc-per-node 8 hf_integration/examples/context_parallel_training.py --backend nccl

The model (random init, no download) sees only its rank's tokens; every layer but attention is
per token, and the attention is ring-flash-attn's `llama3_flash_attn_varlen_func`: it gathers
K/V from all ranks, runs this kernel's FlashAttention-2.8 internal varlen functions on the local
queries (causal within each document, documents may straddle ranks), and in the backward
reduce-scatters dK/dV back to the ranks that own them. Each rank's loss is its share of the
row's mean loss, so the parameter gradients summed over ranks are the whole row's gradients.

Rank 0 then trains the same model on the whole row in one process three times: through
Transformers' flash path with the same kernel (`flash_hub`), with eager attention in the
training dtype, and with eager attention in fp64 (the reference). The ring run passes if, over
all steps, max|ring - fp64| <= 2 * max|eager - fp64| + one rounding step of the training dtype
(the repository's rule for outputs, docs/testing.md). `--json PATH` writes every loss.

The attention is registered with Transformers as `attn_implementation="ring_attention"`
(AttentionInterface), with the flash mask function (AttentionMaskInterface), so that a padded
batch reaches the attention function as a mask and is refused instead of silently ignored; the
name contains no "flash", which would make Transformers preload it as a Hub kernel.

ring-flash-attn is written against the `flash_attn` package: the kernel module stands in for
it (`flash_attn_hub.as_flash_attn.install`, which also stands in for a Transformers helper that
the library's adapter imports and Transformers 5 removed).
"""

import argparse
import json
import math
import os
import socket
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

NAME = "ring_attention"
# ring-flash-attn 0.1.8 calls all_gather_into_tensor / reduce_scatter_tensor, which torch 2.13
# deprecates (with a warning at every call).
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def import_ring_flash_attn(kernel):
    from flash_attn_hub.as_flash_attn import install

    install(kernel)  # the kernel as `flash_attn`, which ring-flash-attn imports
    import ring_flash_attn
    return ring_flash_attn


class RingAttention:
    """A Transformers attention function: causal attention within packed documents across the
    ranks of `group`. Call `set_documents(cu_seqlens)` with the document boundaries of the whole
    row (all ranks' tokens) before each forward."""

    def __init__(self, rfa, group):
        self.rfa, self.group, self.params = rfa, group, None

    def set_documents(self, cu_seqlens):
        self.params = self.rfa.llama3_flash_attn_prepare_cu_seqlens(
            cu_seqlens, causal=True, rank=dist.get_rank(self.group),
            world_size=dist.get_world_size(self.group))

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 sliding_window=None, softcap=None, **kwargs):
        if attention_mask is not None:
            raise ValueError(f"{NAME}: padded batches are not supported; pack the documents "
                             "into one row and pass their boundaries to set_documents()")
        if query.shape[0] != 1 or dropout or sliding_window or softcap:
            raise ValueError(f"{NAME}: one packed row, no dropout, sliding window or softcap")
        cu_q, cu_k, max_q, max_k, k_slice = self.params
        # Transformers hands (batch, heads, tokens, head_dim); varlen takes (tokens, heads, dim).
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        out = self.rfa.llama3_flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, heads_k_stride=k.shape[1],
            local_k_slice=k_slice, softmax_scale=scaling, causal=True, group=self.group)
        return out.unsqueeze(0), None  # (batch, tokens, heads, head_dim), no weights


def make_model(attn_implementation, dtype, device, vocab, seed):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096)
    torch.manual_seed(seed)  # the same initial weights in every process and every run
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.to(device=device, dtype=dtype).train()


def make_row(seqlen, vocab, seed):
    """One packed row: three documents of uneven lengths (boundaries fall inside ranks' slices),
    their token ids, per-document positions and next-token labels (-100 at document ends)."""
    lengths = [seqlen * 3 // 10, seqlen * 45 // 100]
    lengths.append(seqlen - sum(lengths))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (seqlen,), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.cat([ids[1:], ids[:1]])
    labels[cu_seqlens[1:].long() - 1] = -100
    return ids, positions, labels, cu_seqlens


def loss_sum(model, ids, positions, labels):
    logits = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def train(model, batch, steps, lr, before_forward=None, reduce=None):
    """Loss per step (the whole row's mean). `reduce(tensor)` sums over ranks in place."""
    ids, positions, labels, count = batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        if before_forward:
            before_forward()
        loss = loss_sum(model, ids, positions, labels) / count
        opt.zero_grad()
        loss.backward()
        loss = loss.detach().double()
        if reduce:
            reduce(loss)
            for p in model.parameters():
                reduce(p.grad)  # each rank holds part of every parameter's gradient
        opt.step()
        losses.append(loss.item())
    return losses


def worker(rank, world, args, port=None):
    if port is not None:  # started by this script, not by torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    dist.init_process_group(args.backend, rank=rank, world_size=world)

    import flash_attn_hub
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    kernel = flash_attn_hub.register(name="flash_hub", source=args.kernel)  # for the reference
    ring = RingAttention(import_ring_flash_attn(kernel), dist.group.WORLD)
    AttentionInterface.register(NAME, ring)
    AttentionMaskInterface.register(NAME, flash_attention_mask)

    if args.seqlen % world:
        raise SystemExit(f"--seqlen {args.seqlen} must be a multiple of the {world} processes")
    ids, positions, labels, cu_seqlens = make_row(args.seqlen, args.vocab, args.seed)
    count = int((labels != -100).sum())
    local = slice(rank * args.seqlen // world, (rank + 1) * args.seqlen // world)
    batch = tuple(t[local].to(device) for t in (ids, positions, labels)) + (count,)
    cu_seqlens = cu_seqlens.to(device)

    model = make_model(NAME, dtype, device, args.vocab, args.seed)
    ring_losses = train(model, batch, args.steps, args.lr,
                        before_forward=lambda: ring.set_documents(cu_seqlens),
                        reduce=lambda t: dist.all_reduce(t))
    dist.destroy_process_group()
    if rank != 0:
        return

    whole = tuple(t.to(device) for t in (ids, positions, labels)) + (count,)
    runs = {f"ring ({world} proc)": ring_losses}
    for label, impl, dt in (("flash_hub", "flash_hub", dtype), ("eager", "eager", dtype),
                            ("eager fp64", "eager", torch.float64)):
        model = make_model(impl, dt, device, args.vocab, args.seed)
        runs[label] = train(model, whole, args.steps, args.lr)
    report(runs, dtype, args)


def rule(ours, eager, ref, dtype):
    """max|ours - ref| and the bound 2 * max|eager - ref| + one rounding step of dtype."""
    err = max(abs(a - r) for a, r in zip(ours, ref))
    bound = 2 * max(abs(e - r) for e, r in zip(eager, ref))
    bound += torch.finfo(dtype).eps * max(abs(r) for r in ref)
    return err, bound


def report(runs, dtype, args):
    names = list(runs)
    print(f"{args.steps} AdamW steps on one packed row of {args.seqlen} tokens, {dtype}:")
    print("step  " + "  ".join(f"{n:>16}" for n in names))
    for step in range(args.steps):
        print(f"{step:>4}  " + "  ".join(f"{runs[n][step]:16.10f}" for n in names))
    ok = True
    for name in (names[0], "flash_hub"):
        err, bound = rule(runs[name], runs["eager"], runs["eager fp64"], dtype)
        ok &= err <= bound
        print(f"{name}: max|loss - fp64| = {err:.3e}, bound {bound:.3e}: "
              f"{'agrees' if err <= bound else 'DIFFERS'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(dtype=str(dtype).removeprefix("torch."), losses=runs), f, indent=1)
    if not ok:
        raise SystemExit("the context-parallel losses differ from the single-process run")
    print("context-parallel losses agree with the single-process run")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2,
                        help="processes to start (ignored under torchrun)")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"],
                        help="gloo: CPU processes; nccl: one process per GPU")
    parser.add_argument("--kernel", default="build",
                        help="a local build directory or a Hub repo id (flash-kernels/flash-attn)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="training dtype (default: float32 on the CPU, bfloat16 on GPUs)")
    parser.add_argument("--seqlen", type=int, default=256, help="tokens in the packed row")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="weights and tokens")
    parser.add_argument("--json", help="write every run's losses to this file")
    args = parser.parse_args()

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(args.nproc, args, port), nprocs=args.nproc)


if __name__ == "__main__":
    main()
