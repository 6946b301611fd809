"""Per-test state inside a rank process; empty in the controller (the pytest process).

No torch import here: the plugin module imports this one in every pytest session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RankContext", "activate", "current", "deactivate", "in_rank_process", "mark_rank_process"]

@dataclass
class RankContext:
    """What a rank knows about the distributed test it is running.

    Attributes:
        rank: this process's rank in the test.
        world_size: number of ranks.
        backend: the resolved backend (``"gloo"``, ``"nccl"``...).
        init: whether the ``dist_info`` fixture enters ``DistributedRuntime``.
        store: the test's namespaced store (a ``torch.distributed.PrefixStore``).
        launch_env: the launch variables of this rank (RANK, WORLD_SIZE, ...).
        shared_tmp: the directory every rank of the test shares.
        deadline: ``time.monotonic()`` value past which the controller kills the test.
        peer_failures: filled when the runtime found that another rank failed first.

    Example:
        >>> ctx = RankContext(0, 2, "gloo", True, None, {}, Path("."), 0.0)
        >>> ctx.next_assert_index(), ctx.next_assert_index()
        (0, 1)
    """

    rank: int
    world_size: int
    backend: str
    init: bool
    store: Any
    launch_env: dict[str, str]
    shared_tmp: Path
    deadline: float
    peer_failures: dict[int, str] | None = None
    _asserts: int = field(default=0, repr=False)

    def next_assert_index(self) -> int:
        """Sequence number of the next collective assert (same order on every rank)."""
        index = self._asserts
        self._asserts += 1
        return index


class _ProcessState:
    """Whether this is a rank process, and the test it runs (one per process)."""

    def __init__(self) -> None:
        self.in_rank_process = False
        self.current: RankContext | None = None

    def __repr__(self) -> str:
        return f"_ProcessState(in_rank_process={self.in_rank_process}, current={self.current!r})"


_STATE = _ProcessState()


def mark_rank_process() -> None:
    """Called once by the rank worker before it starts its pytest session."""
    _STATE.in_rank_process = True


def in_rank_process() -> bool:
    """Whether this process is a rank worker (not the controlling pytest process)."""
    return _STATE.in_rank_process


def activate(ctx: RankContext) -> None:
    _STATE.current = ctx


def deactivate() -> None:
    _STATE.current = None


def current() -> RankContext | None:
    """The context of the distributed test running in this rank process, if any."""
    return _STATE.current
