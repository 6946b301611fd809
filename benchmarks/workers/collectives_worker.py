"""One torchrun worker of ``bench_watchdog.py``: collectives with and without the watchdog.

Alternating the order every round, each contender once per round:

* ``raw``: ``init_process_group("gloo")`` on the agent's store (own key prefix per round),
  the timed loops, ``destroy_process_group()``;
* ``runtime``: ``with DistributedRuntime("gloo", hang_timeout_s=HANG)``: the same loops with
  the hang watchdog running (a tick every ``HANG / 10`` s, at least 0.2 s).

Timed loops (after a warm-up, with every rank starting together at a store barrier):
``--small`` all_reduces of one float, then ``--large`` all_reduces of 1 MiB (262,144
floats). Each rank writes ``<out>/rank<R>.json``; the harness takes the max over ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from distruntime import DistributedRuntime


def _sync(store: Store, key: str, world: int) -> None:
    if store.add(f"{key}/n", 1) == world:
        store.set(f"{key}/go", "1")
    store.wait([f"{key}/go"], timedelta(seconds=600))


def _loops(sync: Store, key: str, world: int, small: int, large: int) -> tuple[float, float]:
    tiny, big = torch.ones(1), torch.ones(262_144)
    for _ in range(50):
        dist.all_reduce(tiny)
    dist.all_reduce(big)
    _sync(sync, f"{key}/small", world)
    t0 = time.perf_counter()
    for _ in range(small):
        dist.all_reduce(tiny)
    t1 = time.perf_counter()
    _sync(sync, f"{key}/large", world)
    t2 = time.perf_counter()
    for _ in range(large):
        dist.all_reduce(big)
    return t1 - t0, time.perf_counter() - t2


def _watchdog() -> Any:
    """The live runtime's watchdog (private: a benchmark reads its tick count and CPU time)."""
    from distruntime.registry import REGISTRY

    session = REGISTRY.session
    return session.agent if session is not None else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--large", type=int, default=100)
    parser.add_argument("--hang-timeout", type=float, default=5.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = TCPStore(addr, port, world, is_master=False, timeout=timedelta(seconds=600))
    sync = PrefixStore("bench-sync", agent)
    records = []
    for i in range(args.rounds):
        for variant in (("raw", "runtime") if i % 2 == 0 else ("runtime", "raw")):
            key = f"{i}/{variant}"
            if variant == "raw":
                store = PrefixStore(f"raw/{i}", agent)
                dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
                small, large = _loops(sync, key, world, args.small, args.large)
                dist.destroy_process_group()
            else:
                with DistributedRuntime("gloo", hang_timeout_s=args.hang_timeout):
                    small, large = _loops(sync, key, world, args.small, args.large)
                    watchdog = _watchdog()
                    ticks, cpu = (watchdog.ticks, watchdog.cpu_s) if watchdog is not None else (0, 0.0)
            records.append({"round": i, "variant": variant, "small": small, "large": large})
            if variant == "runtime":
                records[-1].update(watchdog_ticks=ticks, watchdog_cpu_s=cpu)
    _sync(sync, "done", world)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "records": records}))


if __name__ == "__main__":
    main()
