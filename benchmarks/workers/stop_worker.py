"""One rank of bench_stop.py: per-call cost of a stop check, three ways, side by side.

Contenders, each called once per simulated step (``--step-ms`` of sleep between calls):

* ``distruntime``: ``distruntime.should_stop()`` (pipelined MAX all-reduce on its
  private gloo group; reads the previous call's result).
* ``torch_sync``: raw torch, what Megatron-style code does: a blocking MAX all-reduce of
  a flag on a gloo group every step (on a GPU this would be NCCL plus ``.item()``).
* ``torch_pipelined``: the same algorithm as distruntime hand-written in raw torch
  (``async_op=True``, ``wait()`` one step later): the floor for this design.

The order of the contenders alternates between rounds. Rank 0 prints
``RESULT <json>`` with every rank's per-call times (microseconds).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

import distruntime
from distruntime import DistributedRuntime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=2.0)
    args = parser.parse_args()
    step_s = args.step_ms / 1000

    with DistributedRuntime("gloo", graceful_stop=True) as info:
        group = dist.new_group(backend="gloo")
        flag = torch.zeros(1, dtype=torch.int64)
        buffers = (torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        pending: list[dist.Work] = []

        def torch_sync() -> bool:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            return bool(flag.item())

        def torch_pipelined() -> bool:
            stop = False
            if pending:
                pending.pop().wait()
                stop = bool(buffers[0].item())
            buffers[0].copy_(buffers[1])  # stands in for filling the flag
            work = dist.all_reduce(buffers[0], op=dist.ReduceOp.MAX, group=group, async_op=True)
            assert work is not None
            pending.append(work)
            return stop

        contenders = {"distruntime": distruntime.should_stop, "torch_sync": torch_sync,
                      "torch_pipelined": torch_pipelined}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for round_ in range(args.rounds):
            names = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
            for name in names:
                call = contenders[name]
                for i in range(args.calls + 20):
                    time.sleep(step_s)  # the step's own work
                    started = time.perf_counter_ns()
                    assert not call()
                    elapsed = time.perf_counter_ns() - started
                    if i >= 20:  # warm-up calls
                        times[name].append(elapsed / 1000)
                if pending:
                    pending.pop().wait()
                dist.barrier(group)
        everyone: list[dict[str, list[float]] | None] = [None] * info.world_size
        dist.all_gather_object(everyone, times)
        # Every rank makes the same number of should_stop() calls: the exit check passes.
        if info.rank == 0:
            print("RESULT " + json.dumps({"world_size": info.world_size, "step_ms": args.step_ms,
                                          "ranks": everyone}), flush=True)


if __name__ == "__main__":
    main()
