"""A real hang for tests/test_simulator.py: rank STUCK sleeps in ``load_batch``, the others
wait in ``all_reduce``; every rank that gets the verdict prints it as JSON."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from distruntime import DistributedRuntime
from distruntime.errors import HangError

STUCK = int(os.environ.get("STUCK_RANK", "2"))


def load_batch() -> None:
    time.sleep(60)  # the stuck line: tests/test_simulator.py looks for it


def main() -> None:
    with DistributedRuntime("gloo", hang_timeout_s=2.0) as info:
        try:
            for _ in range(3):
                dist.all_reduce(torch.ones(4))
            if info.rank == STUCK:
                load_batch()
            dist.all_reduce(torch.ones(4))
        except HangError as error:
            print("VERDICT " + error.report.to_json(), flush=True)  # type: ignore[attr-defined]
            raise


if __name__ == "__main__":
    main()
