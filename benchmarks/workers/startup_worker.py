"""One torchrun worker of ``bench_startup.py`` / ``bench_scale.py``.

Imports first (import time is not measured), then, ``--inner`` times and alternating
the order, each contender once:

* ``raw``: what ``init_process_group("gloo")`` with ``env://`` does under torchrun (a new
  TCPStore client to the agent's store at MASTER_ADDR:MASTER_PORT, then the group),
  ``barrier()``, ``destroy_process_group()``. Each repeat wraps the store in its own key
  prefix, so repeats in one process never read the previous group's keys
  (``destroy_process_group`` resets torch's group counter, pytorch#119196); the prefix
  costs nothing measurable.
* ``runtime``: ``with DistributedRuntime("gloo"): pass``.

Before each timed section every rank meets at a store barrier (untimed), so the clock
starts together on all ranks. Each rank writes its times (and memory) to
``<out>/rank<R>.json``; the harness takes the max over ranks.

``--cold raw|runtime``: what a user pays -- one contender, once, in this fresh process
(its first and only group): ``raw`` is ``init_process_group("gloo")`` (``env://``),
``barrier()``, ``destroy_process_group()``; ``runtime`` is the ``with`` block.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from distruntime import DistributedRuntime


def _rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in KiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _sync(store: Store, key: str, world: int) -> None:
    if store.add(f"{key}/n", 1) == world:
        store.set(f"{key}/go", "1")
    store.wait([f"{key}/go"], timedelta(seconds=600))


def _raw(addr: str, port: int, rank: int, world: int, prefix: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    # torch.distributed.rendezvous._create_c10d_store under TORCHELASTIC_USE_AGENT_STORE:
    store = TCPStore(addr, port, world, is_master=False, timeout=timedelta(minutes=30))
    dist.init_process_group("gloo", store=PrefixStore(prefix, store), rank=rank, world_size=world)
    dist.barrier()
    t1 = time.perf_counter()
    dist.destroy_process_group()
    return t1 - t0, time.perf_counter() - t1


def _raw_cold() -> tuple[float, float]:
    t0 = time.perf_counter()
    dist.init_process_group("gloo")  # env:// under torchrun: the agent's store
    dist.barrier()
    t1 = time.perf_counter()
    dist.destroy_process_group()
    return t1 - t0, time.perf_counter() - t1


def _runtime() -> tuple[float, float]:
    t0 = time.perf_counter()
    runtime = DistributedRuntime("gloo")
    runtime.__enter__()
    t1 = time.perf_counter()
    runtime.__exit__(None, None, None)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default="raw,runtime")
    parser.add_argument("--cold", choices=("raw", "runtime"), help="time one contender once")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rss_before = _rss_kib("VmRSS")
    # The agent's store, for the untimed barriers between rounds.
    agent = TCPStore(addr, port, world, is_master=False, timeout=timedelta(seconds=600))
    sync = PrefixStore("bench-sync", agent)
    variants = args.variants.split(",")
    records: list[dict[str, object]] = []
    if args.cold:
        _sync(sync, "cold", world)
        up, down = _raw_cold() if args.cold == "raw" else _runtime()
        records.append({"iteration": 0, "variant": args.cold, "warmup": False,
                        "up": up, "down": down, "total": up + down})
    for i in range(0 if args.cold else args.warmup + args.inner):
        order = variants if i % 2 == 0 else variants[::-1]
        for variant in order:
            _sync(sync, f"{i}/{variant}", world)
            if variant == "raw":
                up, down = _raw(addr, port, rank, world, f"raw/{i}")
            else:
                up, down = _runtime()
            records.append({"iteration": i, "variant": variant, "warmup": i < args.warmup,
                            "up": up, "down": down, "total": up + down})
    _sync(sync, "done", world)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "records": records,
        "rss_before_kib": rss_before, "rss_after_kib": _rss_kib("VmRSS"), "peak_rss_kib": _rss_kib("VmHWM"),
    }))


if __name__ == "__main__":
    main()
