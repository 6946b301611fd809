"""The library's one piece of global state: the active session, behind one lock.

It sits at the bottom of the import graph so that every module that needs the active
runtime (the mesh helpers, the coordinated stop, the control plane) reads it from here
rather than importing :mod:`distruntime.runtime` from below. The runtime alone writes it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distruntime.errors import DistRuntimeError
from distruntime.hooks import TeardownHooks
from distruntime.info import DistInfo
from distruntime.teardown import EnvPatch, SignalScope

if TYPE_CHECKING:
    from distruntime.control.agent import RankAgent
    from distruntime.control.channel import HostChannel
    from distruntime.control.stop import StopCoordinator
    from distruntime.rendezvous import Rendezvous
    from distruntime.runtime import DistributedRuntime

__all__ = ["REGISTRY", "Session", "current", "is_active", "stop_coordinator"]


@dataclass
class Session:
    """The live distributed state of this process."""

    info: DistInfo
    owner: DistributedRuntime | None  # None: a group created outside the library
    depth: int = 1
    rendezvous: Rendezvous | None = None
    signals: SignalScope = field(default_factory=SignalScope)
    env_patch: EnvPatch = field(default_factory=EnvPatch)
    channel: HostChannel | None = None  # this host's node-local channel (multi-rank jobs)
    agent: RankAgent | None = None  # the control-plane agent (the hang watchdog)
    stop: StopCoordinator | None = None  # graceful_stop=True
    hooks: TeardownHooks = field(default_factory=TeardownHooks)


class _Registry:
    """The active session and the process-wide runtime of the seed shims."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.session: Session | None = None
        self.generation = 0  # runtimes started in this process; namespaces store keys
        self.global_runtime: DistributedRuntime | None = None  # the seed shims' runtime
        self.atexit_registered = False


REGISTRY = _Registry()


def current() -> DistInfo:
    """The ``DistInfo`` of the active runtime (for functions under the decorator).

    Raises:
        DistRuntimeError: no runtime is active.

    Example:
        >>> from distruntime import DistributedRuntime
        >>> @DistributedRuntime("gloo")
        ... def main() -> int:
        ...     return current().world_size
        >>> main()
        1
    """
    session = REGISTRY.session
    if session is None:
        raise DistRuntimeError(
            "no DistributedRuntime is active. Fix: call this inside "
            "`with DistributedRuntime(...)`, a function decorated with it, or after "
            "initialize_distributed()."
        )
    return session.info


def is_active() -> bool:
    """Whether a runtime (or an adopted group) is active in this process.

    Example:
        >>> is_active()
        False
    """
    return REGISTRY.session is not None


def stop_coordinator() -> StopCoordinator:
    """The active runtime's coordinated stop (behind :func:`distruntime.should_stop`)."""
    session = REGISTRY.session
    if session is None or session.stop is None:
        state = "no DistributedRuntime is active" if session is None else "its runtime has graceful_stop off"
        raise DistRuntimeError(
            f"should_stop()/request_stop() need a coordinated stop, but {state}. Fix: run "
            "inside `with DistributedRuntime(..., graceful_stop=True)` (on every rank)."
        )
    return session.stop
