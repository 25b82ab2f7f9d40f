"""Tensor-parallel cross-entropy (process_group) on the CPU with torch.distributed's gloo backend
and 2 processes: each rank holds half of the vocabulary; the losses, z-losses and each rank's
slice of the logits gradient must equal the single-process result on the full vocabulary (the
same op, so up to the rounding of combining the two shards' lse)."""
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernel_loader
from gloo_ranks import free_port, init_rank

WORLD = 2


def _run(flash, logits, labels, kw, process_group=None, rank=0, world=1):
    """losses, z_losses and the gradient of this rank's vocabulary slice."""
    vocab = logits.shape[1] // world
    shard = logits[:, rank * vocab:(rank + 1) * vocab].clone().requires_grad_()
    loss_fn = flash.losses.cross_entropy.CrossEntropyLoss(
        reduction="none", return_z_loss=True, process_group=process_group, **kw)
    losses, z_losses = loss_fn(shard * 1.0, labels)  # a non-leaf: inplace_backward may write it
    dloss = torch.linspace(0.5, 1.5, labels.shape[0])
    (losses * dloss).sum().backward()
    return losses.detach(), z_losses, shard.grad


def _worker(rank, port, cases, results):
    try:
        init_rank(rank, WORLD, port)
        flash = kernel_loader.load_local()
        results[rank] = [_run(flash, logits, labels, kw, dist.group.WORLD, rank, WORLD)
                         for logits, labels, kw in cases]
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001  (reported to the parent)
        results[rank] = traceback.format_exc()


CONFIGS = [dict(), dict(label_smoothing=0.1, lse_square_scale=1e-3, logit_scale=0.8,
                        inplace_backward=True)]


def test_tensor_parallel_cross_entropy_gloo_two_processes(flash):
    """Both configurations in one pair of processes (starting them is most of the time)."""
    kernel_loader.require_build()
    cases = []
    for kw in CONFIGS:
        logits = 3 * torch.randn(6, 2 * 1531)
        labels = torch.randint(0, 2 * 1531, (6,))
        labels[0], labels[1], labels[2] = -100, 5, 1531 + 7  # ignored, in shard 0, in shard 1
        cases.append((logits, labels, kw))
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_worker, args=(free_port(), cases, results), nprocs=WORLD, join=True,
                       start_method="spawn")
    for rank in range(WORLD):
        assert not isinstance(results[rank], str), results[rank]
    for i, (logits, labels, kw) in enumerate(cases):
        losses, z_losses, grad = _run(flash, logits, labels, kw)
        vocab = logits.shape[1] // WORLD
        for rank in range(WORLD):
            r_losses, r_z, r_grad = results[rank][i]
            ctx = f"rank {rank}, config {kw}"
            torch.testing.assert_close(r_losses, losses, rtol=1e-6, atol=1e-6, msg=ctx)
            torch.testing.assert_close(r_z, z_losses, rtol=1e-6, atol=1e-6, msg=ctx)
            torch.testing.assert_close(r_grad, grad[:, rank * vocab:(rank + 1) * vocab],
                                       rtol=1e-6, atol=1e-7, msg=ctx)
