"""Tensor-parallel dense layers (ColumnParallelLinear, RowParallelLinear, ParallelFusedMLP, and
FusedDense / FusedMLP / fused_dense_func with process_group) on the CPU with torch.distributed's
gloo backend and 2 processes, with and without sequence parallelism, uneven feature splits, every
activation and checkpoint level: each rank's output and gradients (input, weight and bias shards)
must equal its slice of the single-process result of plain PyTorch on the full weights. fp64, so
that any difference beyond the summation order is a bug in the layout or the collectives."""
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kernel_loader
from gloo_ranks import free_port, init_rank

pytestmark = pytest.mark.fast

WORLD = 2
ACTS = {"gelu_approx": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu,
        "sqrelu": lambda h: F.relu(h).square()}
# d_in, d_hidden, d_out: the hidden / output features split unevenly over 2 ranks.
D_IN, D_HIDDEN, D_OUT = 12, 37, 7
CASES = [
    dict(kind="column", sp=True), dict(kind="column", sp=False),
    dict(kind="row", sp=True), dict(kind="row", sp=False),
    dict(kind="pmlp", sp=True, act="gelu_approx", lvl=0),
    dict(kind="pmlp", sp=False, act="relu", lvl=1),
    dict(kind="pmlp", sp=True, act="sqrelu", lvl=2),
    dict(kind="pmlp", sp=False, act="gelu_approx", lvl=2),
    dict(kind="fused_mlp", sp=True, act="gelu_approx", lvl=1),
    dict(kind="fused_dense", sp=True),
]


def _span(dim, rank):
    """This rank's slice of `dim` features (2.8's split: the first ranks one more)."""
    sizes = [dim // WORLD + int(r < dim % WORLD) for r in range(WORLD)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _tokens(data, rank):
    n = data["x"].shape[0] // WORLD
    return slice(rank * n, (rank + 1) * n)


def _data():
    d = torch.float64
    return dict(x=torch.randn(4, 3, D_IN, dtype=d), w1=torch.randn(D_HIDDEN, D_IN, dtype=d),
                b1=torch.randn(D_HIDDEN, dtype=d), w2=torch.randn(D_OUT, D_HIDDEN, dtype=d),
                b2=torch.randn(D_OUT, dtype=d), dout=torch.randn(4, 3, D_OUT, dtype=d),
                dout_mlp=torch.randn(4, 3, D_IN, dtype=d),
                w3=torch.randn(D_IN, D_HIDDEN, dtype=d), b3=torch.randn(D_IN, dtype=d))


def _expected(case, data, rank):
    """What rank `rank` must return: its slices of the reference output and gradients."""
    kind, sp = case["kind"], case["sp"]
    tok = _tokens(data, rank) if sp else slice(None)
    leaves = {k: data[k].clone().requires_grad_() for k in ("x", "w1", "b1", "w2", "b2",
                                                             "w3", "b3")}
    x = leaves["x"]
    if kind in ("column", "fused_dense"):
        r = _span(D_HIDDEN, rank)
        out = F.linear(x, leaves["w1"], leaves["b1"])
        dout = data["dout_full_hidden"]
        out.backward(dout)
        return dict(out=out.detach()[..., r], dx=x.grad[tok], dw=leaves["w1"].grad[r],
                    db=leaves["b1"].grad[r])
    if kind == "row":
        c = _span(D_HIDDEN, rank)
        h = data["h"].clone().requires_grad_()
        out = F.linear(h, leaves["w2"], leaves["b2"])
        out.backward(data["dout"])
        want = dict(out=out.detach()[tok], dx=h.grad[..., c], dw=leaves["w2"].grad[:, c])
        if rank == 0:
            want["db"] = leaves["b2"].grad
        return want
    r = _span(D_HIDDEN, rank)
    hid = ACTS[case["act"]](F.linear(x, leaves["w1"], leaves["b1"]))
    out = F.linear(hid, leaves["w3"], leaves["b3"])
    out.backward(data["dout_mlp"])
    want = dict(out=out.detach()[tok], dx=x.grad[tok], dw1=leaves["w1"].grad[r],
                db1=leaves["b1"].grad[r], dw2=leaves["w3"].grad[:, r])
    if rank == 0:
        want["db2"] = leaves["b3"].grad
    return want


def _load(module, pairs):
    with torch.no_grad():
        for p, v in pairs:
            p.copy_(v)


def _on_rank(fd, case, data, pg, rank):
    """Rank `rank`'s layer with its shards of the full weights, run forward and backward on its
    slice of the input and of the output gradient; its output and gradients."""
    kind, sp, f64 = case["kind"], case["sp"], torch.float64
    tok = _tokens(data, rank) if sp else slice(None)
    r = _span(D_HIDDEN, rank)
    if kind in ("column", "fused_dense"):
        if kind == "column":
            layer = fd.ColumnParallelLinear(D_IN, D_HIDDEN, pg, sequence_parallel=sp, dtype=f64)
        else:
            layer = fd.FusedDense(D_IN, r.stop - r.start, return_residual=True, dtype=f64)
        _load(layer, [(layer.weight, data["w1"][r]), (layer.bias, data["b1"][r])])
        x = data["x"][tok].clone().requires_grad_()
        out = layer(x) if kind == "column" else layer(x, process_group=pg)
        if kind == "fused_dense":
            out, residual = out
            assert residual is x
        out.backward(data["dout_full_hidden"][..., r])
        return dict(out=out.detach(), dx=x.grad, dw=layer.weight.grad, db=layer.bias.grad)
    if kind == "row":
        layer = fd.RowParallelLinear(D_HIDDEN, D_OUT, pg, sequence_parallel=sp, dtype=f64)
        assert (layer.bias is not None) == (rank == 0)
        _load(layer, [(layer.weight, data["w2"][:, r])] +
              ([(layer.bias, data["b2"])] if rank == 0 else []))
        h = data["h"][..., r].clone().requires_grad_()
        out = layer(h)
        out.backward(data["dout"][tok])
        got = dict(out=out.detach(), dx=h.grad, dw=layer.weight.grad)
        if rank == 0:
            got["db"] = layer.bias.grad
        return got
    if kind == "pmlp":
        mlp = fd.ParallelFusedMLP(D_IN, D_HIDDEN, D_IN, activation=case["act"], process_group=pg,
                                  sequence_parallel=sp, checkpoint_lvl=case["lvl"], dtype=f64)
    else:  # FusedMLP over caller-sharded weights, sequence parallel
        mlp = fd.FusedMLP(D_IN, r.stop - r.start, D_IN, bias2=rank == 0, activation=case["act"],
                          checkpoint_lvl=case["lvl"], return_residual=True, dtype=f64)
    _load(mlp, [(mlp.fc1.weight, data["w1"][r]), (mlp.fc1.bias, data["b1"][r]),
                (mlp.fc2.weight, data["w3"][:, r])] +
          ([(mlp.fc2.bias, data["b3"])] if rank == 0 else []))
    x = data["x"][tok].clone().requires_grad_()
    out = mlp(x) if kind == "pmlp" else mlp(x, process_group=pg)
    if kind == "fused_mlp":
        out, residual = out
        assert residual is x
    out.backward(data["dout_mlp"][tok])
    got = dict(out=out.detach(), dx=x.grad, dw1=mlp.fc1.weight.grad, db1=mlp.fc1.bias.grad,
               dw2=mlp.fc2.weight.grad)
    if rank == 0:
        got["db2"] = mlp.fc2.bias.grad
    return got


def _worker(rank, port, data, results):
    try:
        init_rank(rank, WORLD, port)
        flash = kernel_loader.load_local()
        fd = flash.ops.fused_dense
        got = [_on_rank(fd, case, data, dist.group.WORLD, rank) for case in CASES]
        try:  # 3 rows do not split over 2 ranks: a clear error, not a hang or a wrong slice
            flash.utils.distributed.reduce_scatter_raw(torch.zeros(3, 2), dist.group.WORLD)
            got.append("no error")
        except ValueError as e:
            got.append(str(e))
        results[rank] = got
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001  (reported to the parent)
        results[rank] = traceback.format_exc()


def test_tensor_parallel_dense_gloo_two_processes(flash):
    """Every case in one pair of processes (starting them is most of the time)."""
    kernel_loader.require_build()
    data = _data()
    data["h"] = torch.randn(4, 3, D_HIDDEN, dtype=torch.float64)
    data["dout_full_hidden"] = torch.randn(4, 3, D_HIDDEN, dtype=torch.float64)
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_worker, args=(free_port(), data, results), nprocs=WORLD, join=True,
                       start_method="spawn")
    for rank in range(WORLD):
        assert not isinstance(results[rank], str), results[rank]
    for i, case in enumerate(CASES):
        for rank in range(WORLD):
            got, want = results[rank][i], _expected(case, data, rank)
            assert sorted(got) == sorted(want), (case, rank)
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10,
                                           msg=f"{name}, rank {rank}, {case}")
    for rank in range(WORLD):
        assert "flash_attn: reduce_scatter needs dimension 0 (3)" in results[rank][-1]

