"""One rank of a fault scenario: ``python fault.py MODE`` (rank info from the env).

Modes (the faulty rank is ``FAULT_RANK``; the others all_reduce with it):
``ok`` no fault; ``raise`` it raises ValueError; ``exit`` it calls ``os._exit(3)``;
``wait`` it sleeps until signalled or killed (SIGKILL, SIGTERM, SIGINT, or a hang);
``exit-after`` everyone succeeds, then it ``os._exit(3)``s during the others' teardown.
Hangs mid-job (every rank first completes one ``all_reduce``): ``sleep`` it sleeps before
the next collective; ``busy`` it spins in Python; ``gil`` it blocks in C holding the GIL;
``sigstop`` it stops itself; ``op`` it calls ``all_gather`` where the others
``all_reduce``; ``shape`` it reduces 8 elements where the others reduce 4; ``extra`` it
runs one collective more than the others; ``slow`` it works 2 s (under the threshold:
the job must pass); ``subgroup`` ranks 0 and 1 share a group, rank 1 sleeps before its
collective there; ``own-group`` the ranks reduce over a group the runtime does not own,
kept alive as a wrapper keeps its mesh, and the faulty rank raises, then lives on 30 s
holding it (its peers must be freed by the failure path, not by its exit).

Prints ``ENTER <t>`` before the runtime, ``READY <rank>`` inside it, ``FAULT <t>`` at the
fault and ``FAILED <t> <error>`` when the runtime raised, ``t`` being ``time.time()``.
``run_rank`` is also the target of ``fault_spawn.py`` (torch.multiprocessing.spawn).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from distruntime import DistributedRuntime


def _say(text: str) -> None:
    # One write(2) per line, under PIPE_BUF: the ranks share one pipe, and print() under
    # PYTHONUNBUFFERED writes the text and its newline apart, so two ranks' lines could merge.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (text[:1000] + "\n").encode())


def run_rank(mode: str, env: Mapping[str, str] | None = None) -> None:
    environ = os.environ if env is None else env
    fault_rank = int(environ.get("FAULT_RANK", "-1"))
    collective = environ.get("COLLECTIVE_TIMEOUT_MINUTES")
    hang = environ.get("HANG_TIMEOUT_S")
    _say(f"ENTER {time.time()}")
    try:
        with DistributedRuntime(
            "gloo",
            timeout_minutes=float(environ.get("TIMEOUT_MINUTES", "1")),
            collective_timeout_minutes=float(collective) if collective else None,
            env=env,
            hang_timeout_s=float(hang) if hang else None,
        ) as info:
            _say(f"READY {info.rank}")
            if mode in _HANGS:
                _hang(mode, info.rank, fault_rank, info.world_size)
                _say(f"DONE {info.rank}")
                return
            if mode == "own-group":
                _KEPT.append(dist.new_group(list(range(info.world_size)), group_desc="wrapper"))
                dist.all_reduce(torch.ones(1), group=_KEPT[0])
            if info.rank == fault_rank and mode in ("raise", "exit", "wait", "own-group"):
                time.sleep(0.3)  # let the peers block in the collective first
                _say(f"FAULT {time.time()}")
                mark_dir = environ.get("DRT_MARK_DIR")
                if mark_dir:  # tells the harness which pid to signal, and when
                    with open(os.path.join(mark_dir, f"fault-{info.rank}"), "w") as handle:
                        handle.write(str(os.getpid()))
                if mode in ("raise", "own-group"):
                    raise ValueError(f"injected fault on rank {info.rank}")
                if mode == "exit":
                    os._exit(3)
                while True:
                    time.sleep(0.05)
            dist.all_reduce(torch.ones(1), group=_KEPT[0] if _KEPT else None)
    except BaseException as exc:
        _say(f"FAILED {time.time()} {type(exc).__name__}: {exc}".splitlines()[0])
        if mode == "own-group" and _KEPT and isinstance(exc, ValueError):
            time.sleep(30)  # the faulty rank: alive, its group too
        raise
    if mode == "exit-after" and info.rank == fault_rank:
        _say(f"FAULT {time.time()}")
        os._exit(3)


_KEPT: list[object] = []  # the "wrapper's" groups: referenced beyond the runtime's teardown
_HANGS = ("sleep", "busy", "gil", "sigstop", "op", "shape", "extra", "slow", "subgroup")


def _hang(mode: str, rank: int, fault_rank: int, world_size: int) -> None:
    """One mid-job fault on ``fault_rank``; the other ranks run the job as written."""
    pair = dist.new_group([0, 1], group_desc="pair") if mode == "subgroup" else None
    data = torch.ones(4)
    dist.all_reduce(data)  # every rank is past one healthy collective (#1)
    if rank == fault_rank:
        time.sleep(0.3)  # let the peers block in the next collective first
        _say(f"FAULT {time.time()}")
        if mode in ("sleep", "subgroup"):
            time.sleep(3600)
        elif mode == "busy":
            total = 0.0
            while True:
                total += math.sqrt(total + 1.0)
        elif mode == "gil":
            ctypes.PyDLL(None).sleep(3600)  # PyDLL: the GIL stays held during the call
        elif mode == "sigstop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif mode == "op":
            dist.all_gather([torch.zeros(4) for _ in range(world_size)], data)
        elif mode == "shape":
            dist.all_reduce(torch.ones(8))
        elif mode == "extra":
            dist.all_reduce(data)
        elif mode == "slow":
            time.sleep(float(os.environ.get("SLOW_S", "2")))
    if mode == "subgroup" and rank in (0, 1):
        dist.all_reduce(data, group=pair)
    elif mode not in ("op", "shape") or rank != fault_rank:
        dist.all_reduce(data)
    dist.barrier()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s[%(process)d]: %(message)s")
    run_rank(sys.argv[1])
