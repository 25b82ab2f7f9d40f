"""Running a check on N CPU processes over gloo (tests of the sequence-parallel libraries):
spawn the ranks, let each compute its rows of error ratios, gather them on rank 0 into a JSON
file, and judge them all in the parent process."""
import json
import os
import socket

import torch


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank, world, port):
    """This process as rank `rank` of a gloo group on localhost (one thread each)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def finish_rank(rows, rank, world, out_path):
    """Gather every rank's rows on rank 0, which writes them to out_path; leave the group."""
    import torch.distributed as dist

    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([r for part in gathered for r in part], f)
    dist.destroy_process_group()


def run_ranks(worker, world, tmp_path, expected_rows):
    """Spawn `worker(rank, world, port, out_path, seed)` on `world` processes (one seed for all,
    drawn from the test's generator); assert every gathered row has ratio <= 1 (the suite's
    rule) and that there are `expected_rows` of them."""
    import torch.multiprocessing as mp

    out_path = tmp_path / "ratios.json"
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    mp.spawn(worker, args=(world, free_port(), str(out_path), seed), nprocs=world, join=True)
    rows = json.loads(out_path.read_text())
    assert len(rows) == expected_rows
    bad = [f"{r['case']} {r['quantity']} rank {r['rank']}: ratio {r['ratio']:.2f} ({r['msg']})"
           for r in rows if not r["ratio"] <= 1.0]
    assert not bad, "\n".join(bad)
