"""Train a tiny MLP with tensor parallelism and FSDP2 on a mesh from the runtime (CPU/gloo).

    torchrun --nproc-per-node 4 examples/train_fsdp_tp.py

``DistributedRuntime(mesh={"dp_shard": 2, "tp": 2})`` gives a validated 2 x 2 mesh
(every rank agreed on it at start-up). The MLP's two linears are split column-wise /
row-wise over ``submesh("tp")`` (torch's tensor parallelism), then FSDP2's
``fully_shard`` shards the parameters over ``submesh("dp_shard_cp")``. Each
data-parallel replica (``info.dp_rank`` of ``info.dp_size``) trains on its own slice of
a synthetic regression set; both tp ranks of a replica see the same batch. Rank 0 logs
the loss, which goes down; exit status 0 only when it fell at least tenfold.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.fsdp import fully_shard  # FSDP2, public from torch 2.6
except ImportError:
    raise SystemExit(
        f"train_fsdp_tp.py needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this is "
        f"torch {torch.__version__}. examples/train_ddp.py runs on any supported torch."
    ) from None
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from train_ddp import make_shard  # the same synthetic regression set, sliced per replica

from distruntime import DistributedRuntime

log = logging.getLogger("train_fsdp_tp")


class MLP(nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(features, hidden)
        self.down = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # clone: RowwiseParallel's output is a view, which FSDP2 warns about at its root.
        return self.down(torch.relu(self.up(x))).clone()


def main() -> int:
    parser = argparse.ArgumentParser(description="FSDP2 + TP on a distruntime mesh, CPU/gloo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    with DistributedRuntime("gloo", timeout_minutes=2, mesh={"dp_shard": 2, "tp": 2}) as info:
        torch.manual_seed(1234)  # the same full model everywhere before it is split
        model = MLP(args.features, args.hidden)
        parallelize_module(model, info.submesh("tp"), {"up": ColwiseParallel(), "down": RowwiseParallel()})
        fully_shard(model, mesh=info.submesh("dp_shard_cp"))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = make_shard(info.dp_rank, info.dp_size, args.samples, args.features)
        started = time.perf_counter()
        first = last = 0.0
        for step in range(args.steps):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            # Mean over the data-parallel replicas (tp ranks of one replica hold the same loss).
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss, group=info.submesh("dp").get_group())
            last = mean_loss.item() / info.dp_size
            first = last if step == 0 else first
            if info.is_main and (step % 10 == 0 or step == args.steps - 1):
                log.info("step %3d  loss %.4f", step, last)
        if info.is_main:
            log.info(
                "mesh %s, %d ranks: trained %d steps in %.2fs: loss %.4f -> %.4f (%s)",
                info.parallel, info.world_size, args.steps, time.perf_counter() - started,
                first, last, "converged" if last < first / 10 else "NOT converged",
            )
    return 0 if last < first / 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
