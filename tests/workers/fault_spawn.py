"""Fault scenarios under torch.multiprocessing.spawn: ``fault_spawn.py MODE NPROCS PORT``."""

from __future__ import annotations

import logging
import os
import sys

import torch.multiprocessing as mp
from fault import run_rank


def _target(rank: int, mode: str, nprocs: int, port: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s[%(process)d]: %(message)s")
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
           "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    run_rank(mode, env)


if __name__ == "__main__":
    mode, nprocs, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(_target, args=(mode, nprocs, port), nprocs=nprocs, join=True)
