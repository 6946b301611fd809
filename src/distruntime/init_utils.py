"""The seed API, as thin shims over one process-wide :class:`DistributedRuntime`.

A drop-in for NeMo Automodel's ``nemo_automodel.components.distributed.init_utils``:
existing code that calls ``initialize_distributed`` / ``destroy_global_state`` keeps
working, and gets the runtime's guarantees: truthful ``DistInfo``, bounded teardown,
teardown hooks, and errors that name the bad variable. ``docs/migrating-from-nemo.md``
lists what behaves the same and the deliberate differences.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch.distributed

from distruntime.errors import LaunchEnvError
from distruntime.hooks import DEFAULT_HOOK_TIMEOUT_S, run_teardown_hooks
from distruntime.info import DistInfo
from distruntime.launchers import discover
from distruntime.runtime import enter_global, exit_global
from distruntime.teardown import run_bounded

__all__ = [
    "DistInfo",
    "destroy_global_state",
    "get_local_rank_preinit",
    "get_local_world_size_preinit",
    "get_rank_safe",
    "get_world_size_safe",
    "initialize_distributed",
]

# ``torch.distributed`` and ``signal`` are used through the module names, as in the seed
# module: its tests patch ``init_utils.torch.distributed.is_initialized`` or
# ``init_utils.signal.signal`` and must reach the calls made here.
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _group_is_live() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank_safe() -> int:
    """This process's global rank: the live group's, else the launch environment's, else 0.

    Raises:
        LaunchEnvError: no group is live and the environment is invalid or partial.

    Example:
        >>> get_rank_safe()
        0
    """
    return torch.distributed.get_rank() if _group_is_live() else discover(os.environ).rank


def get_world_size_safe() -> int:
    """The world size: the live group's, else the launch environment's, else 1.

    Example:
        >>> get_world_size_safe()
        1
    """
    return torch.distributed.get_world_size() if _group_is_live() else discover(os.environ).world_size


def get_local_rank_preinit() -> int:
    """The local rank from the launch environment (any launcher), before any group exists.

    Example:
        >>> get_local_rank_preinit()
        0
    """
    return discover(os.environ).local_rank


def get_local_world_size_preinit() -> int:
    """The number of processes on this node, from the launch environment, before any group.

    ``LOCAL_WORLD_SIZE`` under torchrun or hand-set variables, the launcher's own count
    under SLURM/MPI/LSF (``SLURM_NTASKS_PER_NODE``, ``OMPI_COMM_WORLD_LOCAL_SIZE``...),
    1 for a single process.

    Raises:
        LaunchEnvError: ``LOCAL_WORLD_SIZE`` (or the launcher's variable) is not a
            positive integer, or the environment is partial; the message names the
            variable, its value and the fix.

    Example:
        >>> get_local_world_size_preinit()
        1
    """
    raw = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    if raw and not (raw.isdigit() and int(raw) > 0):
        # Checked first: a bad value is the news, before any pairing rule is.
        raise LaunchEnvError(
            f"LOCAL_WORLD_SIZE={raw!r} is not a positive integer (read as the number of "
            "processes on this node). Fix: set LOCAL_WORLD_SIZE to the processes per node, "
            "e.g. 8, or unset it.",
            variable="LOCAL_WORLD_SIZE",
            value=raw,
        )
    return discover(os.environ).local_world_size


def initialize_distributed(backend: str, timeout_minutes: float = 1) -> DistInfo:
    """Initialise the process-wide runtime and return its ``DistInfo``.

    Idempotent: a second call returns the live ``DistInfo`` (after checking that the
    backend does not contradict it). A default group created outside the library
    (``dist.init_process_group``) is adopted, not re-created; :func:`destroy_global_state`
    destroys it. ``timeout_minutes`` bounds start-up only.

    Example:
        >>> info = initialize_distributed("gloo")
        >>> info.world_size
        1
        >>> destroy_global_state()
    """
    return enter_global(backend, timeout_minutes)


def destroy_global_state() -> None:
    """Tear down the distributed state of this process, whoever set it up.

    In order, with SIGINT ignored (from the main thread only; the previous handler is put
    back exactly afterwards):

    1. the active runtime is closed: :func:`initialize_distributed`'s, or a ``with``
       block's (which then leaves without a second teardown); its teardown runs the
       session's and the process's teardown hooks (:func:`distruntime.on_teardown`)
       before destroying the group it owns;
    2. with no runtime to close, the process hooks run anyway (with or without a
       process group), then a default group created elsewhere (a raw
       ``dist.init_process_group``, or one a runtime adopted) is destroyed, bounded
       by 30 s.

    A failing or hanging hook is logged and skipped. Safe with nothing initialised,
    safe twice, safe from a non-main thread.

    Example:
        >>> import torch.distributed as dist
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> destroy_global_state()
        >>> dist.is_initialized()
        False
    """
    previous = _hold_sigint()
    try:
        if not exit_global():
            run_teardown_hooks(None, DEFAULT_HOOK_TIMEOUT_S)
            if _group_is_live():
                run_bounded(torch.distributed.destroy_process_group, DEFAULT_HOOK_TIMEOUT_S,
                            "destroy_process_group")
    finally:
        _release_sigint(previous)


def _hold_sigint() -> _Handler:
    """Ignore SIGINT; return the handler to put back (``None``: nothing was changed).

    Not off the main thread (``signal.signal`` is refused there), and not over a handler
    installed from C (``getsignal`` returns ``None``: Python could not put it back).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        return None
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return previous


def _release_sigint(previous: _Handler) -> None:
    """Put ``previous`` back, unless a hook replaced our ``SIG_IGN`` in the meantime."""
    if previous is not None and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, previous)
