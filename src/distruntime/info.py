"""``DistInfo``: the truthful record of what a runtime set up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DistInfo"]


@dataclass(frozen=True)
class DistInfo:
    """What this process is in the distributed job.

    The first five fields are the seed API and may be passed positionally; the rest
    have defaults so ``DistInfo("gloo", 0, 1, torch.device("cpu"), True)`` works.

    Attributes:
        backend: the *effective* backend (``"gloo"`` when ``nccl`` fell back to it).
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of ranks in the default group.
        device: this rank's device, always a ``torch.device`` (``cpu`` included).
        is_main: ``rank == 0``.
        local_rank: rank among the processes on this node.
        local_world_size: number of processes on this node.
        node_rank: index of this node.
        num_nodes: number of nodes.
        launcher: what started the process (``"torchrun"``, ``"slurm"``, ``"none"``...).
        master_addr: rendezvous host (``None`` for a single process).
        master_port: rendezvous port (``None`` for a single process).
        restart_count: restarts before this run: torchrun's ``TORCHELASTIC_RESTART_COUNT``,
            else SLURM's ``SLURM_RESTART_COUNT`` (requeues), else 0.

    Example:
        >>> import torch
        >>> DistInfo("gloo", 0, 1, torch.device("cpu"), True).launcher
        'none'
    """

    backend: str
    rank: int
    world_size: int
    device: torch.device
    is_main: bool
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    launcher: str = "none"
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0
