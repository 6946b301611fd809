"""Train a small model with DistributedDataParallel on CPU/gloo.

    torchrun --nproc-per-node 4 examples/train_ddp.py

Each rank fits its shard of a synthetic regression problem (y = X @ w_true + noise);
DDP averages the gradients, so every rank holds the same model. Rank 0 logs the loss,
which goes down, and the final line says whether training converged.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distruntime import DistributedRuntime

log = logging.getLogger("train_ddp")


def make_shard(rank: int, world_size: int, samples: int, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of one synthetic data set (the same on every rank: seed 0)."""
    generator = torch.Generator().manual_seed(0)
    w_true = torch.randn(features, 1, generator=generator)
    x = torch.randn(samples, features, generator=generator)
    y = x @ w_true + 0.01 * torch.randn(samples, 1, generator=generator)
    return x[rank::world_size], y[rank::world_size]


def main() -> int:
    parser = argparse.ArgumentParser(description="DDP on CPU/gloo with distruntime")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--features", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    with DistributedRuntime("auto", timeout_minutes=2) as info:
        torch.manual_seed(1234)  # same initial weights everywhere (DDP also broadcasts them)
        net = nn.Sequential(nn.Linear(args.features, 64), nn.ReLU(), nn.Linear(64, 1))
        model = DistributedDataParallel(net)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = make_shard(info.rank, info.world_size, args.samples, args.features)
        started = time.perf_counter()
        first = last = 0.0
        for step in range(args.steps):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            # The mean loss over ranks, so rank 0 reports the whole job's loss.
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= info.world_size
            last = mean_loss.item()
            if step == 0:
                first = last
            if info.is_main and (step % 10 == 0 or step == args.steps - 1):
                log.info("step %3d  loss %.4f", step, last)
        if info.is_main:
            log.info(
                "%d ranks (%s, %s) trained %d steps in %.2fs: loss %.4f -> %.4f (%s)",
                info.world_size, info.backend, info.launcher, args.steps,
                time.perf_counter() - started, first, last,
                "converged" if last < first / 10 else "NOT converged",
            )
    return 0 if last < first / 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
