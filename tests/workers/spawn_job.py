"""``torch.multiprocessing.spawn`` with env vars: ``python spawn_job.py NPROCS PORT OUT``."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distruntime import DistributedRuntime


def worker(rank: int, nprocs: int, port: int, out: str) -> None:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
           "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with DistributedRuntime("gloo", env=env) as info:
        tensor = torch.tensor([info.rank + 1.0])
        dist.all_reduce(tensor)
        record = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
                  "launcher": info.launcher, "allreduce": tensor.item()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    nprocs, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    mp.spawn(worker, args=(nprocs, port, out), nprocs=nprocs, join=True)
