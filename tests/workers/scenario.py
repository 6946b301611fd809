"""One rank of a test scenario. ``python scenario.py MODE [ARG]``; rank info from the env.

Prints ``READY <rank>`` once the runtime is up and ``RESULT <json>`` at the end; an
``atexit`` hook prints whether a process group was still alive at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from distruntime import DistributedRuntime


def _report_exit_state() -> None:
    print(f"EXIT group_alive={dist.is_initialized()}", flush=True)


def _listening_ports() -> list[int]:
    """TCP ports this process listens on (from /proc: no extra dependency)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.islink(f"/proc/self/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:  # 0A = LISTEN
                    ports.append(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s[%(process)d]: %(message)s")
    atexit.register(_report_exit_state)
    mode = sys.argv[1]
    arg = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    with DistributedRuntime("gloo", timeout_minutes=float(os.environ.get("TIMEOUT_MINUTES", "1"))) as info:
        print(f"READY {info.rank}", flush=True)
        result: dict[str, object] = {"rank": info.rank, "world_size": info.world_size,
                                     "launcher": info.launcher}
        if mode == "single":
            result["listening"] = _listening_ports()
        elif mode == "wait":  # rank ARG sleeps (to be signalled); the others wait in a barrier
            if info.rank == arg:
                while True:
                    time.sleep(0.1)
            dist.barrier()
        tensor = torch.tensor([float(info.rank)])
        dist.all_reduce(tensor)
        result["sum"] = tensor.item()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
