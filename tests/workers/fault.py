"""One rank of a fault scenario: ``python fault.py MODE`` (rank info from the env).

Modes (the faulty rank is ``FAULT_RANK``; the others all_reduce with it):
``ok`` no fault; ``raise`` it raises ValueError; ``exit`` it calls ``os._exit(3)``;
``wait`` it sleeps until signalled or killed (SIGKILL, SIGTERM, SIGINT, or a hang);
``exit-after`` everyone succeeds, then it ``os._exit(3)``s during the others' teardown.

Prints ``ENTER <t>`` before the runtime, ``READY <rank>`` inside it, ``FAULT <t>`` at the
fault and ``FAILED <t> <error>`` when the runtime raised, ``t`` being ``time.time()``.
``run_rank`` is also the target of ``fault_spawn.py`` (torch.multiprocessing.spawn).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping

import torch
import torch.distributed as dist

from distruntime import DistributedRuntime


def _say(text: str) -> None:
    print(text, flush=True)


def run_rank(mode: str, env: Mapping[str, str] | None = None) -> None:
    environ = os.environ if env is None else env
    fault_rank = int(environ.get("FAULT_RANK", "-1"))
    collective = environ.get("COLLECTIVE_TIMEOUT_MINUTES")
    _say(f"ENTER {time.time()}")
    try:
        with DistributedRuntime(
            "gloo",
            timeout_minutes=float(environ.get("TIMEOUT_MINUTES", "1")),
            collective_timeout_minutes=float(collective) if collective else None,
            env=env,
        ) as info:
            _say(f"READY {info.rank}")
            if info.rank == fault_rank and mode in ("raise", "exit", "wait"):
                time.sleep(0.3)  # let the peers block in the collective first
                _say(f"FAULT {time.time()}")
                mark_dir = environ.get("DRT_MARK_DIR")
                if mark_dir:  # tells the harness which pid to signal, and when
                    with open(os.path.join(mark_dir, f"fault-{info.rank}"), "w") as handle:
                        handle.write(str(os.getpid()))
                if mode == "raise":
                    raise ValueError(f"injected fault on rank {info.rank}")
                if mode == "exit":
                    os._exit(3)
                while True:
                    time.sleep(0.05)
            dist.all_reduce(torch.ones(1))
    except BaseException as exc:
        _say(f"FAILED {time.time()} {type(exc).__name__}: {exc}".splitlines()[0])
        raise
    if mode == "exit-after" and info.rank == fault_rank:
        _say(f"FAULT {time.time()}")
        os._exit(3)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s[%(process)d]: %(message)s")
    run_rank(sys.argv[1])
