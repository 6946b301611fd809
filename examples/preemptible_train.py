"""A preemptible training loop: every rank stops at one agreed step, checkpoints, resumes.

    torchrun --nproc-per-node 4 examples/preemptible_train.py --ckpt-dir /tmp/ckpt
    kill -USR1 <pid of any one worker>       # or: kill -TERM <pid of torchrun>
    torchrun --nproc-per-node 4 examples/preemptible_train.py --ckpt-dir /tmp/ckpt  # resumes

Under SLURM, ``--requeue`` makes rank 0 run ``scontrol requeue $SLURM_JOB_ID`` after the
stop, and the job's next run (``info.restart_count`` 1) resumes from the checkpoint::

    sbatch --requeue --signal=B:USR1@120 --wrap \\
        "srun python examples/preemptible_train.py --ckpt-dir ckpt --requeue"

With ``graceful_stop=True`` the first SIGTERM/SIGUSR1 only asks for a stop;
``distruntime.should_stop()`` returns True on every rank at the same step (at most two
steps after the signal reached any one rank), so every rank saves the same state. The
job then leaves the runtime normally and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import distruntime
from distruntime import DistributedRuntime

log = logging.getLogger("preemptible_train")


def load(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore the model and optimizer; the step to continue from (0 without a checkpoint)."""
    if not ckpt.exists():
        return 0
    state = torch.load(ckpt, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def save(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write atomically (rename), so a kill during the write never leaves half a file."""
    partial = ckpt.with_suffix(".partial")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, partial)
    os.replace(partial, ckpt)


def main() -> int:
    parser = argparse.ArgumentParser(description="preemptible DDP training with a coordinated stop")
    parser.add_argument("--ckpt-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--step-time", type=float, default=0.05, help="seconds of 'work' per step")
    parser.add_argument("--requeue", action="store_true", help="SLURM: requeue the job after a stop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s[%(process)d]: %(message)s")
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)

    with DistributedRuntime("auto", graceful_stop=True, requeue=args.requeue) as info:
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        ckpt = args.ckpt_dir / "model.pt"
        start = load(ckpt, model.module, optimizer)
        log.info("rank %d/%d: training from step %d (restart_count %d)",
                 info.rank, info.world_size, start, info.restart_count)
        generator = torch.Generator().manual_seed(info.rank)
        step = start
        while step < args.steps:
            x = torch.randn(16, 8, generator=generator)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()  # DDP all-reduces the gradients
            optimizer.step()
            time.sleep(args.step_time)  # stands in for a real step's compute
            step += 1
            if distruntime.should_stop():  # the same answer on every rank at this step
                break
        reason = distruntime.stop_reason()
        if info.is_main:
            save(ckpt, model.module, optimizer, step)
        record = {"rank": info.rank, "step": step, "restart_count": info.restart_count,
                  "stopped": reason is not None, "reason": str(reason) if reason else None}
        (args.ckpt_dir / f"rank{info.rank}.json").write_text(json.dumps(record))
        if reason is not None:
            log.info("rank %d: stopping at step %d: %s (checkpoint saved)", info.rank, step, reason)
        else:
            log.info("rank %d: finished all %d steps", info.rank, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
