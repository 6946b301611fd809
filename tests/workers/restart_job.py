"""One torchrun worker for the restart test: ``python restart_job.py OUT_DIR``.

Round 0 (``restart_count`` 0): rank 1 fails after three steps, so torchrun
(``--max-restarts 1``) restarts every worker. Round 1 runs ten steps with a coordinated
stop on and writes ``rank<R>.json``; it would fail at check-in if any key of round 0
were still visible to it (a rank claimed twice).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import distruntime
from distruntime import DistributedRuntime


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s[%(process)d]: %(message)s")
    out = Path(sys.argv[1])
    with DistributedRuntime("gloo", graceful_stop=True) as info:
        for step in range(10):
            tensor = torch.ones(1)
            dist.all_reduce(tensor)
            if info.restart_count == 0 and info.rank == 1 and step == 3:
                raise RuntimeError("rank 1 fails in round 0 on purpose")
            assert not distruntime.should_stop()
        record = {"rank": info.rank, "restart_count": info.restart_count, "sum": tensor.item()}
        (out / f"rank{info.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
