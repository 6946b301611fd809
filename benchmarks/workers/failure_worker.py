"""One rank of ``bench_failure.py``: start, meet once, then fail in the chosen way.

Implementations (same start-up and collective timeout ``--timeout-s`` for both):

* ``raw``: ``init_process_group("gloo", timeout=T)`` (env://), ``barrier()``, then the
  scenario, with no clean-up code (what a plain script does).
* ``runtime``: ``with DistributedRuntime("gloo", timeout_minutes=T/60,
  collective_timeout_minutes=T/60)``, ``barrier()``, then the scenario.

Scenarios:

* ``exception``: rank ``--fail-rank`` raises ``RuntimeError``; the others enter an
  ``all_reduce`` it never joins.
* ``kill``: rank ``--fail-rank`` SIGKILLs itself (a rank vanishing mid-job: OOM killer,
  node loss); the others are in an ``all_reduce``.
* ``stuck``: rank ``--fail-rank`` sleeps before init, forever (a rank that never
  arrives); the others wait in start-up.

Every rank appends events (``time.time()``) to ``<out>/rank<R>.jsonl``: ``ready``
(imports done), ``fail`` (just before the failure), ``exit`` (in a ``finally``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from distruntime import DistributedRuntime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["raw", "runtime"], required=True)
    parser.add_argument("--scenario", choices=["exception", "kill", "stuck"], required=True)
    parser.add_argument("--fail-rank", type=int, required=True)
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    log = Path(args.out, f"rank{rank}.jsonl")

    def event(name: str) -> None:
        with log.open("a") as f:
            f.write(json.dumps({"event": name, "t": time.time()}) + "\n")

    event("ready")
    failing = rank == args.fail_rank
    try:
        if failing and args.scenario == "stuck":
            event("fail")
            time.sleep(3600)
        if args.impl == "raw":
            dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
            body(failing, args.scenario, event)
        else:
            minutes = args.timeout_s / 60
            with DistributedRuntime("gloo", timeout_minutes=minutes, collective_timeout_minutes=minutes):
                body(failing, args.scenario, event)
    finally:
        event("exit")


def body(failing: bool, scenario: str, event: Callable[[str], None]) -> None:
    dist.barrier()
    if failing:
        time.sleep(0.2)  # the peers are inside the all_reduce below when this rank fails
        event("fail")
        if scenario == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("this rank fails on purpose")
    tensor = torch.ones(1)
    dist.all_reduce(tensor)
    dist.barrier()

if __name__ == "__main__":
    main()
