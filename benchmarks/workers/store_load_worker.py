"""One rank of benchmarks/bench_store_load.py: start up (raw torch or distruntime), say
READY, wait for the bench's go file (no store traffic), then run the phase's scenario."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist


def wait_go(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.02)


def main() -> None:
    mode, go = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if mode == "raw":
        dist.init_process_group("gloo")
        dist.all_reduce(torch.ones(1))
        print("READY", flush=True)
        wait_go(go)
        dist.destroy_process_group()
        return
    from distruntime import DistributedRuntime

    kwargs: dict[str, object] = {"hang_timeout_s": 2.0} if mode == "hang" else {}
    if mode == "stop":
        kwargs["graceful_stop"] = True
    with contextlib.suppress(Exception), DistributedRuntime("gloo", **kwargs):  # type: ignore[arg-type]
        dist.all_reduce(torch.ones(1))
        print("READY", flush=True)
        wait_go(go)
        if mode == "hang":
            if rank == world - 1:
                time.sleep(60)
            dist.all_reduce(torch.ones(1))
        elif mode == "raise":
            if rank == 1:
                raise ValueError("injected fault")
            dist.all_reduce(torch.ones(1))
        elif mode == "stop":
            import distruntime

            for _ in range(20):
                distruntime.should_stop()
            print("CALLS", flush=True)
            wait_go(go + ".2")
        print("TEARDOWN", flush=True)
        wait_go(go + ".t")


if __name__ == "__main__":
    main()
