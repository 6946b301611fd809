"""The device mesh: declare the parallel dims once, get a validated, agreed ``DeviceMesh``.

Two halves:

* :func:`plan_mesh` is a pure function of the spec, the world size and the node layout.
  It resolves ``-1``, refuses impossible specs with :class:`~distruntime.MeshConfigError`
  (before any process group exists), and computes every group of every dim row-major
  over the fixed order ``("pp", "dp_replicate", "dp_shard", "cp", "tp")`` -- the order
  NeMo Automodel and torchtitan use -- and which ``tp``/``cp`` groups span nodes.
* :func:`build_mesh` turns a plan into torch's ``DeviceMesh`` plus the flattened dims
  ``dp`` (dp_replicate x dp_shard), ``dp_shard_cp`` and ``dp_cp``, kept here so users
  never slice a flattened dim from the root (deprecated in torch 2.13).

The runtime calls both: plan before the rendezvous (its resolved shape rides on the
check-in, so ranks that disagree fail there, never in ``new_group``), build after the
default group exists. The mesh groups are sub-groups of the default group, so they are
destroyed (or aborted) with it.

Example:
    >>> plan = plan_mesh({"tp": 2, "dp_shard": -1}, world_size=8)
    >>> plan
    MeshPlan(pp=1, dp_replicate=1, dp_shard=4, cp=1, tp=2)
    >>> plan.groups("tp")[:2], plan.groups("dp_shard_cp")[0]
    (((0, 1), (2, 3)), (0, 2, 4, 6))
    >>> plan.coordinate("dp", 5), plan.size("dp")
    (2, 4)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from distruntime.errors import MeshConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from distruntime.launchers import LaunchEnv

__all__ = [
    "DIMS",
    "FLATTENED",
    "MeshPlan",
    "ParallelMesh",
    "build_mesh",
    "flatten_ways",
    "mesh_dim_of_group",
    "mesh_dim_of_failure",
    "plan_mesh",
    "ranks_per_node",
    "release_mesh",
]

logger = logging.getLogger("distruntime")

DIMS: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
"""Every mesh dim, outermost first (row-major: ``tp`` ranks are adjacent)."""

FLATTENED: Mapping[str, tuple[str, ...]] = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}
"""Flattened dims the library keeps, and the dims each one merges."""

# Dims whose traffic is per layer (latency-bound): spanning nodes makes them slow.
_NODE_LOCAL = ("tp", "cp")
# Locality findings listed in full up to this many groups.
_MAX_LISTED = 4


@dataclass(frozen=True)
class MeshPlan:
    """A validated mesh: the size of every dim for one world size, and its groups.

    Attributes:
        sizes: the size of each dim of :data:`DIMS`, in that order.
        world_size: the number of ranks the plan covers (the product of ``sizes``).
        spans: one line per ``tp``/``cp`` group that spans nodes (empty when the node
            layout is unknown or every such group is node-local).
    """

    sizes: tuple[int, ...]
    world_size: int
    spans: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"MeshPlan({self.shape})"

    @property
    def shape(self) -> str:
        """``"pp=1, dp_replicate=1, dp_shard=4, cp=1, tp=2"``."""
        return ", ".join(f"{name}={size}" for name, size in zip(DIMS, self.sizes, strict=True))

    def size(self, name: str) -> int:
        """The size of a dim or flattened dim."""
        return self._layout(name)[1]

    def coordinate(self, name: str, rank: int) -> int:
        """``rank``'s index within its group of ``name`` (e.g. its data-parallel rank)."""
        _, size, stride = self._layout(name)
        return (rank // stride) % size

    def group_of(self, name: str, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s group of ``name``, in mesh order."""
        _, size, stride = self._layout(name)
        base = rank - self.coordinate(name, rank) * stride
        return tuple(range(base, base + size * stride, stride))

    def groups(self, name: str) -> tuple[tuple[int, ...], ...]:
        """Every group of a dim or flattened dim, each in mesh order, sorted by first rank."""
        _, size, stride = self._layout(name)
        return tuple(tuple(range(base, base + size * stride, stride)) for base in self._bases(name))

    def _layout(self, name: str) -> tuple[int, int, int]:
        """(number of blocks, group size, stride) of ``name``'s groups.

        Row-major over :data:`DIMS`, and every flattened dim merges adjacent dims, so a
        group is an arithmetic progression: ``base + i * stride`` for ``i < size``.
        """
        first, last = (DIMS.index(part) for part in (_parts(name)[0], _parts(name)[-1]))
        return (
            math.prod(self.sizes[:first]),
            math.prod(self.sizes[first : last + 1]),
            math.prod(self.sizes[last + 1 :]),
        )

    def _bases(self, name: str) -> Iterator[int]:
        """The first rank of every group of ``name``, ascending."""
        blocks, size, stride = self._layout(name)
        for block in range(blocks):
            yield from range(block * size * stride, block * size * stride + stride)


def _parts(name: str) -> tuple[str, ...]:
    if name in DIMS:
        return (name,)
    if name in FLATTENED:
        return FLATTENED[name]
    raise MeshConfigError(
        f"unknown mesh dim {name!r}: the dims are {', '.join(DIMS)} and the flattened dims "
        f"{', '.join(FLATTENED)}. Fix: ask for one of those."
    )


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _product_text(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{name}={size}" for name, size in sizes.items())


def plan_mesh(
    spec: Mapping[str, int],
    world_size: int,
    *,
    ranks_per_node: int | None = None,
    strict: bool = False,
) -> MeshPlan:
    """Validate ``spec`` for ``world_size`` ranks and compute the mesh (pure: no process).

    Args:
        spec: dim name -> size; dims not named get size 1; at most one size may be
            ``-1`` (inferred from the world size).
        world_size: the number of ranks.
        ranks_per_node: ranks ``k * n .. k * n + n - 1`` share node ``k`` (torchrun's
            and SLURM's block placement); ``None``: the layout is unknown, no locality check.
        strict: a ``tp`` or ``cp`` group spanning nodes is an error, not a warning.

    Raises:
        MeshConfigError: an unknown dim, a size that is not a positive int (other than
            one ``-1``), two ``-1``, a product that does not fit the world size, or (with
            ``strict``) a ``tp``/``cp`` group spanning nodes.

    Example:
        >>> plan_mesh({"pp": 2, "dp_shard": -1, "tp": 2}, 8).sizes
        (2, 1, 2, 1, 2)
        >>> try:
        ...     plan_mesh({"tp": 3, "dp_shard": -1}, 8)
        ... except MeshConfigError as error:
        ...     print(str(error).split("}: ", 1)[1])
        tp=3 does not divide world size 8; sizes that fit: 1, 2, 4, 8. Fix: choose one of those sizes for tp.
    """
    if not isinstance(spec, Mapping):
        raise MeshConfigError(
            f"mesh={spec!r} is not a mapping. Fix: pass dim name -> size, e.g. "
            "mesh={'tp': 2, 'dp_shard': -1}."
        )
    given = dict(spec)
    where = f"mesh={given!r}"
    for name, size in given.items():
        if name not in DIMS:
            hint = (
                f" ({name!r} is a flattened dim the library builds from "
                f"{' x '.join(FLATTENED[name])}; ask for those instead)" if name in FLATTENED else ""
            )
            raise MeshConfigError(
                f"{where}: unknown mesh dim {name!r}{hint}. The dims are {', '.join(DIMS)}. "
                "Fix: use those names."
            )
        if isinstance(size, bool) or not isinstance(size, int) or (size <= 0 and size != -1):
            raise MeshConfigError(
                f"{where}: {name}={size!r} is not a valid size. Fix: a positive int, or -1 for "
                f"the one dim whose size is inferred from the world size ({world_size})."
            )
    inferred = [name for name, size in given.items() if size == -1]
    if len(inferred) > 1:
        raise MeshConfigError(
            f"{where}: {' and '.join(f'{n}=-1' for n in inferred)}: at most one dim can be "
            f"inferred. Fix: give all but one of {', '.join(inferred)} a size (world size "
            f"{world_size}; sizes that fit: {_divisors(world_size)})."
        )
    known = {name: size for name, size in given.items() if size != -1}
    for name, size in known.items():
        if world_size % size:
            raise MeshConfigError(
                f"{where}: {name}={size} does not divide world size {world_size}; sizes that fit: "
                f"{_divisors(world_size)}. Fix: choose one of those sizes for {name}."
            )
    product = math.prod(known.values())
    if inferred:
        if world_size % product:
            raise MeshConfigError(
                f"{where}: {_product_text(known)} = {product} does not divide world size "
                f"{world_size}, so {inferred[0]}=-1 cannot be inferred. Fix: make the product "
                f"a divisor of {world_size} ({_divisors(world_size)})."
            )
        known[inferred[0]] = world_size // product
    elif product != world_size:
        raise MeshConfigError(
            f"{where}: {_product_text(known) or 'every dim 1'} = {product} ranks, but the world "
            f"size is {world_size}. Fix: make the product {world_size}, or let one dim be "
            "inferred (e.g. 'dp_shard': -1)."
        )
    plan = MeshPlan(tuple(known.get(name, 1) for name in DIMS), world_size)
    if ranks_per_node is None or ranks_per_node >= world_size:
        return plan
    spans = tuple(_spanning_groups(plan, ranks_per_node))
    if spans and strict:
        raise MeshConfigError(
            f"{where} (mesh_strict=True): {'; '.join(spans)}. A tp or cp group should stay on "
            f"one node ({ranks_per_node} ranks per node). Fix: make tp x cp divide "
            f"{ranks_per_node}, or pass mesh_strict=False to run anyway."
        )
    return MeshPlan(plan.sizes, world_size, spans)


def _spanning_groups(plan: MeshPlan, per_node: int) -> Iterator[str]:
    for name in _NODE_LOCAL:
        _, size, stride = plan._layout(name)
        span = (size - 1) * stride  # a group's ranks ascend: first and last nodes tell
        crossing = [b for b in plan._bases(name) if b // per_node != (b + span) // per_node]
        if not crossing:
            continue
        shown = "; ".join(
            f"{list(plan.group_of(name, b))} on nodes "
            f"{sorted({r // per_node for r in plan.group_of(name, b)})}"
            for b in crossing[:_MAX_LISTED]
        )
        more = f" (and {len(crossing) - _MAX_LISTED} more)" if len(crossing) > _MAX_LISTED else ""
        yield f"{name}={size} spans nodes in {len(crossing)} group(s): {shown}{more}"


def ranks_per_node(launch: LaunchEnv) -> int | None:
    """The block layout the launcher placed the ranks in, or ``None`` when it is not one.

    torchrun numbers ranks node by node (``rank = node_rank * nproc + local_rank``), as
    does SLURM's default block distribution. A layout this rank contradicts (SLURM
    ``--distribution=cyclic``, uneven nodes) is reported as unknown.
    """
    per_node = launch.local_world_size
    block = per_node * launch.num_nodes == launch.world_size and (
        launch.rank == launch.node_rank * per_node + launch.local_rank
    )
    return per_node if block else None


# ---------------------------------------------------------------------- the torch side
@dataclass(frozen=True, eq=False)
class ParallelMesh:
    """The live mesh of one rank: torch's root ``DeviceMesh`` and every 1-D sub-mesh.

    Reached through ``DistInfo`` (``info.mesh``, ``info.submesh(name)``, ``info.dp_rank``,
    ``info.dp_size``). Identity equality: two runtimes' meshes are never the same.

    Attributes:
        plan: the validated plan.
        rank: this rank's global rank.
        root: the root ``DeviceMesh`` (dim names :data:`DIMS`).
        submeshes: name -> 1-D ``DeviceMesh`` for every dim and flattened dim.
        group_dims: process group name (``group.group_name``) -> the dim(s) it serves.
    """

    plan: MeshPlan
    rank: int
    root: DeviceMesh = field(repr=False)
    submeshes: Mapping[str, DeviceMesh] = field(repr=False)
    group_dims: Mapping[str, str] = field(repr=False)

    def __repr__(self) -> str:
        return f"ParallelMesh({self.plan.shape})"

    def submesh(self, name: str) -> DeviceMesh:
        """The 1-D mesh of a dim or flattened dim (``"tp"``, ``"dp_shard_cp"``, ...)."""
        _parts(name)  # names the valid choices when ``name`` is unknown
        return self.submeshes[name]

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index (dp_replicate x dp_shard): the data loader's rank."""
        return self.plan.coordinate("dp", self.rank)

    @property
    def dp_size(self) -> int:
        """Number of data-parallel replicas (dp_replicate x dp_shard): the data loader's world."""
        return self.plan.size("dp")


FlattenWay = Literal["flatten", "alias"]


def flatten_way(plan: MeshPlan, name: str, torch_can_flatten: bool) -> tuple[FlattenWay, str]:
    """How to build flattened dim ``name`` on this torch: torch's ``_flatten``, or an alias.

    ``DeviceMesh._flatten`` appeared in torch 2.5; the project supports torch >= 2.4.
    Without it a flattened dim whose parts are all size 1 but one is the same group as
    that part, so its 1-D slice serves (``("alias", part)``); anything else is refused.

    Raises:
        MeshConfigError: the torch lacks ``_flatten`` and ``name`` really merges dims.

    Example:
        >>> plan = plan_mesh({"dp_shard": 2, "tp": 2}, 4)
        >>> flatten_way(plan, "dp_shard_cp", torch_can_flatten=False)
        ('alias', 'dp_shard')
    """
    parts = FLATTENED[name]
    if torch_can_flatten:
        return "flatten", name
    merged = [part for part in parts if plan.size(part) > 1]
    if len(merged) <= 1:
        return "alias", (merged or parts)[-1]
    import torch

    sizes = " x ".join(f"{part}={plan.size(part)}" for part in merged)
    raise MeshConfigError(
        f"mesh {plan.shape}: the flattened dim {name!r} merges {sizes}, "
        f"but torch {torch.__version__} has no DeviceMesh._flatten (added in torch 2.5). Fix: "
        "upgrade torch to 2.5 or later, or give at most one of "
        f"{', '.join(merged)} a size above 1."
    )


def flatten_ways(plan: MeshPlan) -> dict[str, tuple[FlattenWay, str]]:
    """``flatten_way`` of every flattened dim on the installed torch (refuses early)."""
    from torch.distributed.device_mesh import DeviceMesh

    can_flatten = hasattr(DeviceMesh, "_flatten")
    return {name: flatten_way(plan, name, can_flatten) for name in FLATTENED}


def build_mesh(plan: MeshPlan, device_type: str, rank: int, timeout: timedelta | None) -> ParallelMesh:
    """Create the root mesh and every sub-mesh (a collective: every rank calls it).

    ``timeout`` (the runtime's collective timeout) is given to every new mesh group;
    ``None`` leaves torch's default, the same the default group then has.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    ways = flatten_ways(plan)
    root = init_device_mesh(device_type, plan.sizes, mesh_dim_names=DIMS)
    submeshes: dict[str, DeviceMesh] = {name: root[name] for name in DIMS}
    for name, (way, target) in ways.items():
        # Kept here: slicing a flattened dim from the root warns in torch 2.13.
        submeshes[name] = root[FLATTENED[name]]._flatten(name) if way == "flatten" else submeshes[target]
    group_dims: dict[str, str] = {}
    default = dist.distributed_c10d._get_default_group()
    # torch 2.15 made it public as set_timeout (and deprecated the private name).
    c10d = dist.distributed_c10d
    set_timeout = getattr(dist, "set_timeout", None) or getattr(c10d, "_set_pg_timeout", None)
    if timeout is not None and set_timeout is None:
        logger.warning("torch %s cannot set a group's timeout: mesh groups keep torch's default",
                       torch.__version__)
    for name, mesh in submeshes.items():
        group = mesh.get_group()
        previous = group_dims.get(group.group_name)
        group_dims[group.group_name] = name if previous is None else f"{previous},{name}"
        if previous is None and timeout is not None and set_timeout is not None and group is not default:
            set_timeout(timeout, group)
    logger.debug("built device mesh %s on %s; groups %s", plan.shape, device_type, group_dims)
    return ParallelMesh(plan, rank, root, submeshes, group_dims)


def release_mesh(parallel: ParallelMesh | None) -> None:
    """Drop torch's references to the mesh groups, after they were destroyed.

    A gloo group closes its sockets only when its last reference goes (``shutdown()``
    and ``abort()`` leave them open), and a peer blocked in a mesh collective with this
    rank fails at once only then. ``DeviceMesh`` keeps every group in its root's
    ``_pg_registry``; references the user holds (an FSDP2 module keeps its groups) are
    theirs to drop, e.g. in an :func:`~distruntime.on_teardown` hook.
    """
    if parallel is None:
        return
    for mesh in (parallel.root, *parallel.submeshes.values()):
        registry = getattr(mesh, "_pg_registry", None)
        if isinstance(registry, dict):
            registry.clear()


def mesh_dim_of_failure(parallel: ParallelMesh | None, exc: BaseException) -> str:
    """``" (in a collective over mesh dim 'tp')"`` when ``exc`` came out of a torch
    collective on one of the mesh's groups, else ``""`` (for the failure report).

    The group is the ``group`` argument of the innermost ``torch.distributed`` frame of
    the traceback (``None`` there means the default group); gloo's own messages never
    name the group. Only runs on the failure path.
    """
    if parallel is None:
        return ""
    import torch.distributed as dist

    seen, found = False, None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.endswith("distributed_c10d.py") and "group" in frame.f_locals:
            seen, found = True, frame.f_locals["group"]
        tb = tb.tb_next
    if not seen:
        return ""
    if found is None and dist.is_initialized():
        found = dist.distributed_c10d._get_default_group()
    name = getattr(found, "group_name", None)
    dim = parallel.group_dims.get(name) if isinstance(name, str) else None
    return f" (in a collective over mesh dim {dim!r})" if dim else ""


def mesh_dim_of_group(group_name: str) -> str | None:
    """The mesh dim(s) a process group serves, e.g. ``"tp"`` (for hang and failure reports).

    ``group_name`` is ``ProcessGroup.group_name``. ``None`` when no runtime with a mesh is
    active or the group is not one of its mesh groups. Several dims sharing one group are
    joined by commas (``"dp_shard,dp"``).

    Example:
        >>> mesh_dim_of_group("0") is None   # no runtime active
        True
    """
    from distruntime.runtime import current, is_active

    if not is_active():
        return None
    parallel = current().parallel
    return None if parallel is None else parallel.group_dims.get(group_name)
