"""Report what distruntime sees under any launcher: one JSON file per rank.

    torchrun --nproc-per-node 4 examples/launch_probe.py --out /tmp/probe
    srun -N 2 -n 4 python examples/launch_probe.py --out /tmp/probe
    mpirun -np 4 python examples/launch_probe.py --out /tmp/probe

Each rank writes ``OUT/rank<R>.json`` with its ``DistInfo`` fields, its host name and
the result of one ``all_reduce`` (the sum of rank+1 over all ranks).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from distruntime import DistributedRuntime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<R>.json")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with DistributedRuntime(args.backend, timeout_minutes=1) as info:
        value = torch.tensor([info.rank + 1.0], device=info.device)
        dist.all_reduce(value)
        record = {
            "rank": info.rank,
            "world_size": info.world_size,
            "local_rank": info.local_rank,
            "local_world_size": info.local_world_size,
            "node_rank": info.node_rank,
            "num_nodes": info.num_nodes,
            "launcher": info.launcher,
            "backend": info.backend,
            "device": str(info.device),
            "hostname": socket.gethostname(),
            "master_addr": info.master_addr,
            "master_port": info.master_port,
            "allreduce": value.item(),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
