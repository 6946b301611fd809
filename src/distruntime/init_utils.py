"""The seed API, as thin shims over one process-wide :class:`DistributedRuntime`.

Existing code that calls ``initialize_distributed`` / ``destroy_global_state`` keeps
working, and gets the runtime's guarantees: truthful ``DistInfo``, ownership, bounded
teardown, and errors that name the bad variable.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from distruntime.info import DistInfo
from distruntime.launchers import discover
from distruntime.runtime import enter_global, exit_global

__all__ = [
    "DistInfo",
    "destroy_global_state",
    "get_local_rank_preinit",
    "get_rank_safe",
    "get_world_size_safe",
    "initialize_distributed",
]


def _group_is_live() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank_safe() -> int:
    """This process's global rank: the live group's, else the launch environment's, else 0.

    Raises:
        LaunchEnvError: no group is live and the environment is invalid or partial.

    Example:
        >>> get_rank_safe()
        0
    """
    return dist.get_rank() if _group_is_live() else discover(os.environ).rank


def get_world_size_safe() -> int:
    """The world size: the live group's, else the launch environment's, else 1.

    Example:
        >>> get_world_size_safe()
        1
    """
    return dist.get_world_size() if _group_is_live() else discover(os.environ).world_size


def get_local_rank_preinit() -> int:
    """The local rank from the launch environment (any launcher), before any group exists.

    Example:
        >>> get_local_rank_preinit()
        0
    """
    return discover(os.environ).local_rank


def initialize_distributed(backend: str, timeout_minutes: int = 1) -> DistInfo:
    """Initialise the process-wide runtime and return its ``DistInfo``.

    Idempotent: a second call returns the live ``DistInfo`` (after checking that the
    backend does not contradict it). ``timeout_minutes`` bounds start-up only.

    Example:
        >>> info = initialize_distributed("gloo")
        >>> info.world_size
        1
        >>> destroy_global_state()
    """
    return enter_global(backend, timeout_minutes)


def destroy_global_state() -> None:
    """Tear down what :func:`initialize_distributed` set up.

    Safe with nothing initialised, safe twice, safe from a non-main thread; never
    changes SIGINT handling. A group created outside the library is left alone.

    Example:
        >>> info = initialize_distributed("gloo")
        >>> destroy_global_state()
        >>> destroy_global_state()   # a second call is a no-op
        >>> get_world_size_safe()
        1
    """
    exit_global()
