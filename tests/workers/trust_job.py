"""One rank of a store-trust scenario: ``python trust_job.py MODE`` (rank info from the env).

Modes: ``ok`` every rank all-reduces for ``DURATION_S`` and exits 0; ``raise`` then rank 1
raises ValueError; ``hang`` rank 1 sleeps in Python after one step (a hang verdict follows); ``reuse`` after a
few steps rank 1 forks a child that keeps its sockets open, prints ``EXITING <pid>`` and
exits without a word (``os._exit``), so its pid can be handed to another process.
Prints ``FAILED <ExceptionName>: <first line>`` when the runtime raised, ``DONE <rank>`` at the end.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from distruntime import DistributedRuntime


def main(mode: str) -> None:
    duration = float(os.environ.get("DURATION_S", "6"))
    try:
        with DistributedRuntime("gloo", hang_timeout_s=float(os.environ.get("HANG_TIMEOUT_S", "4"))) as info:
            print(f"READY {info.rank} {os.getpid()}", flush=True)
            end = time.monotonic() + duration
            while time.monotonic() < end:
                dist.all_reduce(torch.ones(1))
                if mode == "hang" and info.rank == 1:
                    time.sleep(120)
                if mode == "reuse" and info.rank == 1 and time.monotonic() > end - duration + 1:
                    child = os.fork()
                    if child == 0:  # the child holds the job's connections, silently
                        os.setsid()  # and leaves the group, so the pid can be taken again
                        time.sleep(60)
                        os._exit(0)
                    print(f"EXITING {os.getpid()} {child}", flush=True)
                    os._exit(3)
                time.sleep(0.05)
            if mode == "raise" and info.rank == 1:
                raise ValueError("injected fault on rank 1")
            dist.all_reduce(torch.ones(1))
    except BaseException as exc:
        print(f"FAILED {type(exc).__name__}: {exc}".splitlines()[0], flush=True)
        raise
    print(f"DONE {info.rank}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
