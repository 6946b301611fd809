"""User cleanup that must run before the process groups go (``distruntime.on_teardown``).

Resources bound to process groups -- NVSHMEM buffers over NCCL sub-groups, a
checkpoint writer's background group, a profiler's communicator -- must be released
while those groups still exist: destroying a group under them can hang, and leftover
GPU state can outlive the process for the rest of a SLURM allocation. Hooks run
last-registered-first, on normal exit and on the failure path, each in its own bounded
thread (:func:`~distruntime.teardown.run_bounded`): one that raises or hangs is logged
and skipped, and the group teardown still happens.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from distruntime.teardown import run_bounded

__all__ = ["TeardownHooks"]

logger = logging.getLogger("distruntime")


@dataclass
class TeardownHooks:
    """The cleanup functions of one runtime session, run once, LIFO, each bounded.

    Example:
        >>> order = []
        >>> hooks = TeardownHooks()
        >>> hooks.add(lambda: order.append("first registered"), timeout_s=1.0)
        >>> hooks.add(lambda: order.append("last registered"), timeout_s=1.0)
        >>> hooks.run()
        >>> order
        ['last registered', 'first registered']
    """

    _hooks: list[tuple[Callable[[], object], float]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, fn: Callable[[], object], timeout_s: float) -> None:
        """Register ``fn`` (no arguments) to run at teardown within ``timeout_s`` seconds."""
        if not callable(fn):
            raise TypeError(f"on_teardown needs a callable with no arguments, got {fn!r}")
        if timeout_s <= 0:
            raise ValueError(f"on_teardown timeout_s must be positive, got {timeout_s!r}")
        with self._lock:
            self._hooks.append((fn, timeout_s))

    def run(self) -> None:
        """Run and forget every hook, last registered first; never raises."""
        with self._lock:
            hooks, self._hooks = self._hooks, []
        for fn, timeout_s in reversed(hooks):
            name = getattr(fn, "__qualname__", None) or repr(fn)
            run_bounded(fn, timeout_s, f"teardown hook {name}")
        if hooks:
            logger.debug("ran %d teardown hook(s)", len(hooks))
