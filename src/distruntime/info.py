"""``DistInfo``: the truthful record of what a runtime set up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from distruntime.errors import MeshConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from distruntime.mesh import ParallelMesh

__all__ = ["DistInfo"]


@dataclass(frozen=True)
class DistInfo:
    """What this process is in the distributed job.

    The first five fields are the seed API and may be passed positionally; the rest
    have defaults so ``DistInfo("gloo", 0, 1, torch.device("cpu"), True)`` works.
    Equality and the hash compare those five seed fields only (what the seed's
    five-field record compared), so a record built by hand equals the runtime's for the
    same job whatever launcher started it. ``device`` may be given as ``None`` (the seed's
    value on CPU: normalised to ``torch.device("cpu")``), a string or a CUDA index.
    Frozen, unlike the seed's: use ``dataclasses.replace(info, rank=1)`` for a copy.

    Attributes:
        backend: the *effective* backend (``"gloo"`` when ``nccl`` fell back to it).
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of ranks in the default group.
        device: this rank's device, always a ``torch.device`` (``cpu`` included; ``None``
            given is stored as ``cpu``).
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
        parallel: the device mesh built from ``DistributedRuntime(mesh=...)`` (``None``
            without one); its repr is the mesh shape. Use :attr:`mesh`,
            :meth:`submesh`, :attr:`dp_rank` and :attr:`dp_size`.

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
    local_rank: int = field(default=0, compare=False)
    local_world_size: int = field(default=1, compare=False)
    node_rank: int = field(default=0, compare=False)
    num_nodes: int = field(default=1, compare=False)
    launcher: str = field(default="none", compare=False)
    master_addr: str | None = field(default=None, compare=False)
    master_port: int | None = field(default=None, compare=False)
    restart_count: int = field(default=0, compare=False)
    parallel: ParallelMesh | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.device, torch.device):
            object.__setattr__(self, "device", _as_device(self.device))

    @property
    def mesh(self) -> DeviceMesh:
        """The root ``DeviceMesh``, dims ``("pp", "dp_replicate", "dp_shard", "cp", "tp")``.

        Example::

            with DistributedRuntime("auto", mesh={"tp": 2, "dp_shard": -1}) as info:
                info.mesh.mesh_dim_names   # ('pp', 'dp_replicate', 'dp_shard', 'cp', 'tp')
        """
        return self._parallel().root

    def submesh(self, name: str) -> DeviceMesh:
        """The 1-D mesh of a dim, or of ``"dp"``, ``"dp_shard_cp"``, ``"dp_cp"`` (flattened).

        Example::

            model = fully_shard(model, mesh=info.submesh("dp_shard_cp"))
        """
        return self._parallel().submesh(name)

    @property
    def dp_rank(self) -> int:
        """The data-parallel rank (a data loader's rank): ``rank`` without a mesh.

        Example:
            >>> import torch
            >>> DistInfo("gloo", 3, 4, torch.device("cpu"), False).dp_rank
            3
        """
        return self.rank if self.parallel is None else self.parallel.dp_rank

    @property
    def dp_size(self) -> int:
        """The data-parallel size (a data loader's world size): ``world_size`` without a mesh.

        Example:
            >>> import torch
            >>> DistInfo("gloo", 3, 4, torch.device("cpu"), False).dp_size
            4
        """
        return self.world_size if self.parallel is None else self.parallel.dp_size

    def _parallel(self) -> ParallelMesh:
        if self.parallel is None:
            raise MeshConfigError(
                "this runtime has no device mesh. Fix: pass mesh= to DistributedRuntime, "
                "e.g. DistributedRuntime('auto', mesh={'tp': 2, 'dp_shard': -1})."
            )
        return self.parallel


def _as_device(device: object) -> torch.device:
    """The seed's device values as a ``torch.device``: ``None`` is CPU, an int a CUDA index."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise TypeError(
            f"DistInfo.device must be a torch.device, a device string, a CUDA index or None, "
            f"got {device!r}. Fix: pass torch.device('cuda', local_rank) or torch.device('cpu')."
        )
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
