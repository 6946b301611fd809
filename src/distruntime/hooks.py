"""User cleanup that must run before the process groups go (``distruntime.on_teardown``).

Resources bound to process groups -- NVSHMEM buffers over NCCL sub-groups (DeepEP), a
checkpoint writer's background group, a profiler's communicator -- must be released
while those groups still exist: destroying a group under them can hang, and leftover
GPU state can outlive the process for the rest of a SLURM allocation. Hooks run
last-registered-first, on normal exit and on the failure path, each in its own bounded
thread (:func:`~distruntime.teardown.run_bounded`, on the device that was current in
the thread that tears down): one that raises or hangs is logged and skipped, and the
group teardown still happens.

Two scopes:

* **session** hooks belong to one runtime session (:class:`TeardownHooks` on the
  registry's session) and run once, when it closes;
* **process** hooks (:data:`PROCESS_HOOKS`) are registered once -- typically by a
  wrapping library at import time, before any runtime exists -- and run at *every*
  teardown the library performs: closing an owned runtime (``with`` block, decorator,
  at exit, failure path) and every :func:`distruntime.destroy_global_state` call, even
  with no runtime and no process group. They stay registered until
  :func:`distruntime.remove_teardown`. Like :mod:`atexit`'s list they are process-wide
  state, the one kept outside :mod:`distruntime.registry` (which imports this module).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distruntime.teardown import run_bounded

__all__ = ["DEFAULT_HOOK_TIMEOUT_S", "PROCESS_HOOKS", "TeardownHooks", "run_teardown_hooks"]

logger = logging.getLogger("distruntime")

# The bound of a hook registered without one, where no runtime supplies its own
# ``teardown_timeout_s`` (``destroy_global_state`` with no runtime active).
DEFAULT_HOOK_TIMEOUT_S = 30.0


@dataclass
class TeardownHooks:
    """Cleanup functions run LIFO, each bounded; once (session) or at every teardown (``keep``).

    Args:
        keep: process scope: :meth:`run` leaves the hooks registered, and adding a
            function already registered only updates its timeout (a module imported
            twice, or a wrapper that registers on every init, still runs it once).

    Example:
        >>> order = []
        >>> hooks = TeardownHooks()
        >>> hooks.add(lambda: order.append("first registered"), timeout_s=1.0)
        >>> hooks.add(lambda: order.append("last registered"), timeout_s=1.0)
        >>> hooks.run()
        2
        >>> order
        ['last registered', 'first registered']
        >>> hooks.run()  # session hooks run once
        0
    """

    keep: bool = False
    _hooks: list[tuple[Callable[[], object], float | None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, fn: Callable[[], object], timeout_s: float | None = None) -> None:
        """Register ``fn`` (no arguments) to run at teardown within ``timeout_s`` seconds
        (``None``: the bound of the teardown that runs it)."""
        if not callable(fn):
            raise TypeError(f"on_teardown needs a callable with no arguments, got {fn!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"on_teardown timeout_s must be positive, got {timeout_s!r}")
        with self._lock:
            if self.keep:
                for i, (known, _) in enumerate(self._hooks):
                    if known == fn:
                        self._hooks[i] = (fn, timeout_s)
                        return
            self._hooks.append((fn, timeout_s))

    def remove(self, fn: Callable[[], object]) -> bool:
        """Unregister every registration of ``fn``; True when there was one."""
        with self._lock:
            kept = [(known, t) for known, t in self._hooks if known != fn]
            removed = len(kept) != len(self._hooks)
            self._hooks = kept
        return removed

    def __len__(self) -> int:
        with self._lock:
            return len(self._hooks)

    def run(self, default_timeout_s: float = DEFAULT_HOOK_TIMEOUT_S) -> int:
        """Run every hook, last registered first (forgetting them unless ``keep``); never raises.

        Returns the number of hooks run.
        """
        with self._lock:
            hooks = list(self._hooks)
            if not self.keep:
                self._hooks = []
        device = _current_cuda_device()
        for fn, timeout_s in reversed(hooks):
            name = getattr(fn, "__qualname__", None) or repr(fn)
            run_bounded(_on_device(fn, device), timeout_s or default_timeout_s, f"teardown hook {name}")
        return len(hooks)


PROCESS_HOOKS = TeardownHooks(keep=True)


def run_teardown_hooks(session: TeardownHooks | None, timeout_s: float, *, failed: bool = False) -> None:
    """Run a session's hooks (once), then the process hooks; never raises.

    Called by every teardown path before the process groups go. When hooks are about to
    run on a healthy teardown and CUDA is in use, the current device is synchronised
    first (bounded by ``timeout_s``), as NeMo Automodel does before freeing DeepEP's
    buffer; on the failure path (``failed``) a stuck kernel could hold that up, so no.

    Example:
        >>> ran = []
        >>> session = TeardownHooks()
        >>> session.add(lambda: ran.append("session"))
        >>> run_teardown_hooks(session, timeout_s=5.0)
        >>> ran
        ['session']
    """
    if (session is None or not len(session)) and not len(PROCESS_HOOKS):
        return
    device = None if failed else _current_cuda_device()
    if device is not None:
        run_bounded(lambda: torch.cuda.synchronize(device), timeout_s, "CUDA synchronize before the hooks")
    ran = session.run(timeout_s) if session is not None else 0
    ran += PROCESS_HOOKS.run(timeout_s)
    logger.debug("ran %d teardown hook(s)", ran)


def _current_cuda_device() -> int | None:
    """The calling thread's CUDA device, when CUDA has been initialised (else None)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return torch.cuda.current_device()
    return None


def _on_device(fn: Callable[[], object], device: int | None) -> Callable[[], object]:
    """``fn`` made to run on ``device``: a new thread starts on CUDA device 0, not the rank's."""
    if device is None:
        return fn

    def on_device() -> object:
        torch.cuda.set_device(device)
        return fn()

    return on_device
