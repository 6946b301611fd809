"""``DistributedRuntime`` as a decorator on ``main``.

    torchrun --nproc-per-node 2 examples/decorated_main.py
    python examples/decorated_main.py            # a single process works too

Inside the function, ``distruntime.current()`` returns the ``DistInfo``. Under torchrun
an uncaught exception also lands in ``TORCHELASTIC_ERROR_FILE``, so torchrun's summary
names it: try ``--fail-rank 1``.
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.distributed as dist

import distruntime

log = logging.getLogger("decorated_main")


@distruntime.DistributedRuntime("gloo")
def main(fail_rank: int | None) -> None:
    info = distruntime.current()
    total = torch.tensor([float(info.rank)])
    if info.rank == fail_rank:
        raise ValueError(f"rank {info.rank} failed on purpose (--fail-rank)")
    dist.all_reduce(total)
    expected = info.world_size * (info.world_size - 1) / 2
    log.info(
        "rank %d/%d: sum of ranks %.0f (expected %.0f)", info.rank, info.world_size, total.item(), expected
    )
    if total.item() != expected:
        raise RuntimeError(f"all_reduce gave {total.item()}, expected {expected}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fail-rank", type=int, default=None)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    main(parser.parse_args().fail_rank)
