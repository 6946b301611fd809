"""The device mesh: the pure plan (no processes) and the live mesh on 4 and 8 ranks.

The expected groups are computed here independently of ``distruntime.mesh``: a
``torch.arange(world).reshape(sizes)`` tensor (row-major over the fixed dim order) whose
other axes are moved out of the way.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Mapping

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

import distruntime
from distruntime import (
    DistributedRuntime,
    DistRuntimeError,
    GroupMismatchError,
    MeshConfigError,
    MeshMismatchError,
    PeerFailureError,
    discover,
)
from distruntime.mesh import DIMS, flatten_way, mesh_dim_of_group, plan_mesh, ranks_per_node

# torch < 2.5 has no DeviceMesh._flatten: the runtime then serves a flattened dim that
# merges nothing by the one dim it holds, and refuses one that merges two (flatten_way).
CAN_FLATTEN = hasattr(DeviceMesh, "_flatten")
FLAT = {"dp": ("dp_replicate", "dp_shard"), "dp_shard_cp": ("dp_shard", "cp"),
        "dp_cp": ("dp_replicate", "dp_shard", "cp")}


def expected_groups(sizes: Mapping[str, int], name: str) -> list[list[int]]:
    """Groups of dim (or flattened dim) ``name``: row-major over DIMS, computed by torch."""
    shape = [sizes.get(d, 1) for d in DIMS]
    grid = torch.arange(math.prod(shape)).reshape(shape)
    moving = [DIMS.index(p) for p in FLAT.get(name, (name,))]
    fixed = [i for i in range(len(DIMS)) if i not in moving]
    flat = grid.permute(*fixed, *moving).reshape(-1, math.prod(shape[i] for i in moving))
    return sorted(flat.tolist())


def full_sizes(spec: Mapping[str, int], world: int) -> dict[str, int]:
    known = math.prod(v for v in spec.values() if v != -1)
    return {d: (world // known if spec.get(d) == -1 else spec.get(d, 1)) for d in DIMS}


# ---------------------------------------------------------------------- the pure plan
@pytest.mark.parametrize(("spec", "world"), [
    ({"tp": 2, "dp_shard": -1}, 8),
    ({"pp": 2, "dp_shard": -1, "tp": 2}, 8),
    ({"dp_replicate": 2, "dp_shard": 2, "cp": 2}, 8),
    ({"pp": 2, "dp_replicate": 2, "dp_shard": 2, "cp": 2, "tp": 2}, 32),
    ({"dp_shard": -1}, 1),
])
def test_plan_groups_match_an_independent_row_major_plan(spec: dict[str, int], world: int) -> None:
    plan = plan_mesh(spec, world)
    sizes = full_sizes(spec, world)
    assert plan.sizes == tuple(sizes[d] for d in DIMS)
    for name in (*DIMS, *FLAT):
        groups = expected_groups(sizes, name)
        assert [list(g) for g in plan.groups(name)] == groups, name
        for rank in range(world):
            group = next(g for g in groups if rank in g)
            assert list(plan.group_of(name, rank)) == group
            assert plan.coordinate(name, rank) == group.index(rank)
            assert plan.size(name) == len(group)


@pytest.mark.parametrize(("spec", "world", "pattern"), [
    ({"tp": 3, "dp_shard": -1}, 8, r"tp=3 does not divide world size 8; sizes that fit: 1, 2, 4, 8"),
    ({"tensor": 2}, 8, r"unknown mesh dim 'tensor'.*pp, dp_replicate, dp_shard, cp, tp"),
    ({"dp": 2}, 8, r"unknown mesh dim 'dp' \('dp' is a flattened dim .* dp_replicate x dp_shard"),
    ({"tp": 0}, 8, r"tp=0 is not a valid size.*-1 for the one dim"),
    ({"tp": -2}, 8, r"tp=-2 is not a valid size"),
    ({"tp": 2.0}, 8, r"tp=2.0 is not a valid size"),
    ({"tp": True}, 8, r"tp=True is not a valid size"),
    ({"tp": -1, "dp_shard": -1}, 8, r"dp_shard=-1 and tp=-1|tp=-1 and dp_shard=-1"),
    ({"pp": 4, "tp": 4, "dp_shard": -1}, 8, r"pp=4 x tp=4 = 16 does not divide world size 8"),
    ({"pp": 2, "tp": 2}, 8, r"pp=2 x tp=2 = 4 ranks, but the world size is 8.*'dp_shard': -1"),
    ({"tp": 2}, 1, r"tp=2 does not divide world size 1; sizes that fit: 1\."),
    ([("tp", 2)], 8, r"is not a mapping"),
])
def test_every_config_error(spec: object, world: int, pattern: str) -> None:
    with pytest.raises(MeshConfigError, match=pattern) as caught:
        plan_mesh(spec, world)  # type: ignore[arg-type]
    assert isinstance(caught.value, distruntime.DistRuntimeError) and "Fix:" in str(caught.value)


def test_locality_of_tp_and_cp_on_a_two_node_layout() -> None:
    assert plan_mesh({"tp": 4, "dp_shard": -1}, 8, ranks_per_node=4).spans == ()
    spans = plan_mesh({"tp": 4, "dp_shard": -1}, 8, ranks_per_node=2).spans
    assert len(spans) == 1
    assert spans[0].startswith("tp=4 spans nodes in 2 group(s): [0, 1, 2, 3] on nodes [0, 1]")
    cp = plan_mesh({"cp": 2, "tp": 2, "dp_shard": -1}, 8, ranks_per_node=2).spans
    assert [s.split(" ")[0] for s in cp] == ["cp=2"]  # tp pairs stay on a node, cp pairs cross
    with pytest.raises(MeshConfigError, match=r"mesh_strict=True.*tp=4 spans nodes.*2 ranks per node"):
        plan_mesh({"tp": 4, "dp_shard": -1}, 8, ranks_per_node=2, strict=True)
    assert plan_mesh({"tp": 8}, 8, ranks_per_node=None, strict=True).spans == ()  # layout unknown


def test_node_layout_from_the_launcher() -> None:
    def launch(rank: int, local_rank: int, node: int) -> int | None:
        return ranks_per_node(discover({
            "RANK": str(rank), "WORLD_SIZE": "8", "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": "4",
            "GROUP_RANK": str(node), "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1",
            "TORCHELASTIC_RUN_ID": "x",
        }))
    assert launch(5, 1, 1) == 4  # torchrun's block placement
    assert launch(5, 2, 1) is None  # a rank placed cyclically: layout unknown, no check


def test_flattening_on_a_torch_without_flatten() -> None:
    plan = plan_mesh({"dp_replicate": 2, "dp_shard": 2, "tp": 2}, 8)
    assert flatten_way(plan, "dp", torch_can_flatten=True) == ("flatten", "dp")
    assert flatten_way(plan, "dp_shard_cp", torch_can_flatten=False) == ("alias", "dp_shard")
    with pytest.raises(MeshConfigError, match=r"'dp' merges dp_replicate=2 x dp_shard=2, but torch .* "
                       r"no DeviceMesh._flatten \(added in torch 2.5\). Fix: upgrade"):
        flatten_way(plan, "dp", torch_can_flatten=False)


def test_plan_and_mesh_reprs() -> None:
    plan = plan_mesh({"tp": 2, "dp_shard": -1}, 4)
    assert repr(plan) == "MeshPlan(pp=1, dp_replicate=1, dp_shard=2, cp=1, tp=2)"
    with pytest.raises(MeshConfigError, match="unknown mesh dim 'ep'"):
        plan.size("ep")


def test_without_mesh_nothing_changes() -> None:
    with DistributedRuntime("gloo", env={}) as info:
        assert info.parallel is None and (info.dp_rank, info.dp_size) == (0, 1)
        assert "parallel=None" in repr(info)
        assert len(dist.distributed_c10d._world.pg_map) == 1
        with pytest.raises(MeshConfigError, match=r"no device mesh.*Fix: pass mesh="):
            info.submesh("tp")


def test_world_size_one_builds_no_extra_group() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with DistributedRuntime("gloo", env={}, mesh={"dp_shard": -1}) as info:
            assert info.parallel is not None and info.parallel.plan.sizes == (1, 1, 1, 1, 1)
            # torch < 2.5's init_device_mesh makes one group per dim even for one rank.
            assert len(dist.distributed_c10d._world.pg_map) == (1 if CAN_FLATTEN else 6)
            assert info.submesh("dp_cp").size() == 1 and "ParallelMesh(pp=1" in repr(info)
    assert not dist.is_initialized()


def test_mesh_on_an_adopted_group_is_refused() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(GroupMismatchError, match=r"has no mesh .*Fix: give the outermost"):
            DistributedRuntime("gloo", env={}, mesh={"tp": 1}).__enter__()
        assert not distruntime.is_active()
    finally:
        dist.destroy_process_group()


def test_on_teardown_session_scope_needs_an_active_runtime() -> None:
    with pytest.raises(DistRuntimeError, match="needs an active DistributedRuntime"):
        distruntime.on_teardown(lambda: None, scope="session")
    runtime = DistributedRuntime("gloo", env={})
    with pytest.raises(DistRuntimeError, match="is not active"):
        runtime.on_teardown(lambda: None)


# ---------------------------------------------------------------------- live meshes
_SPECS = {
    4: [{"dp_shard": 2, "tp": 2}],
    8: [{"pp": 2, "dp_shard": -1, "tp": 2}, {"dp_replicate": 2, "dp_shard": -1, "cp": 2}],
}


def _world() -> int:
    return int(os.environ["WORLD_SIZE"])


@pytest.mark.distributed(world_size=[4, 8], init=False, timeout=120)
def test_mesh_groups_collectives_and_teardown() -> None:
    for spec in _SPECS[_world()]:
        sizes = full_sizes(spec, _world())
        merges = any(sum(sizes[p] > 1 for p in parts) > 1 for parts in FLAT.values())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no torch deprecation warning on the way
            runtime = DistributedRuntime("gloo", mesh=spec, collective_timeout_minutes=0.75)
            if merges and not CAN_FLATTEN:
                with pytest.raises(MeshConfigError, match=r"no DeviceMesh._flatten \(added in torch 2.5\)"):
                    runtime.__enter__()
                assert not dist.is_initialized()  # refused before any group
            else:
                with runtime as info:
                    _check_mesh(info, spec)
        c10d = dist.distributed_c10d
        assert not dist.is_initialized() and not c10d._world.pg_map and not c10d._world.pg_names


def _check_mesh(info: distruntime.DistInfo, spec: Mapping[str, int]) -> None:
    sizes = full_sizes(spec, info.world_size)
    assert info.mesh.mesh_dim_names == DIMS and tuple(info.mesh.shape) == tuple(sizes[d] for d in DIMS)
    assert info.mesh.device_type == "cpu"
    assert f"parallel=ParallelMesh({', '.join(f'{d}={sizes[d]}' for d in DIMS)})" in repr(info)
    dp_group = next(g for g in expected_groups(sizes, "dp") if info.rank in g)
    assert (info.dp_rank, info.dp_size) == (dp_group.index(info.rank), len(dp_group))
    for name in (*DIMS, *FLAT):
        group = next(g for g in expected_groups(sizes, name) if info.rank in g)
        sub = info.submesh(name)
        alias = [p for p in FLAT.get(name, ()) if sizes[p] > 1] or list(FLAT.get(name, ()))[-1:]
        assert sub.mesh_dim_names == ((name,) if CAN_FLATTEN or name in DIMS else (alias[0],)), name
        assert sub.mesh.tolist() == group, name
        pg = sub.get_group()
        assert dist.get_process_group_ranks(pg) == group, name
        assert mesh_dim_of_group(pg.group_name) is not None and name in mesh_dim_of_group(pg.group_name)
        if pg is not dist.distributed_c10d._get_default_group():  # the runtime's timeout, not torch's 30 min
            assert pg._get_backend(torch.device("cpu")).options._timeout.total_seconds() == 45, name
        tensor = torch.tensor([float(info.rank)])
        dist.all_reduce(tensor, group=pg)
        assert tensor.item() == sum(group), name


@pytest.mark.distributed(world_size=4, init=False)
def test_mismatched_mesh_fails_on_every_rank_fast() -> None:
    rank = int(os.environ["RANK"])
    cases = [
        ({"tp": 4} if rank == 3 else {"tp": 2, "dp_shard": -1},
         r"rank 3 has mesh pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=4"),
        (None if rank == 2 else {"tp": 2, "dp_shard": -1}, r"rank 2 has mesh none"),
    ]
    for spec, pattern in cases:
        started = time.monotonic()
        with pytest.raises(MeshMismatchError, match=pattern) as caught:
            DistributedRuntime("gloo", timeout_minutes=0.5, mesh=spec).__enter__()
        assert caught.value.reason == "mesh_mismatch"
        assert "ranks asked for different device meshes" in str(caught.value)
        assert time.monotonic() - started < 10, "must not wait for the start-up timeout"
        assert not dist.is_initialized() and not distruntime.is_active()


@pytest.mark.distributed(world_size=4, init=False)
def test_impossible_mesh_refused_on_every_rank_before_any_group() -> None:
    for spec in ({"tp": 3, "dp_shard": -1}, {"tp": 2, "pp": 4}, {"tp": -1, "cp": -1}, {"ep": 2}):
        with pytest.raises(MeshConfigError, match=f"mesh={spec!r}".replace("{", r"\{").replace("}", r"\}")):
            DistributedRuntime("gloo", mesh=spec).__enter__()
        assert not dist.is_initialized() and not distruntime.is_active()


def _two_nodes() -> dict[str, str]:
    """This rank's torchrun environment, as if 4 ranks ran on two nodes of two."""
    rank = int(os.environ["RANK"])
    return {**os.environ, "LOCAL_RANK": str(rank % 2), "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": str(rank // 2), "GROUP_WORLD_SIZE": "2"}


@pytest.mark.distributed(world_size=4, init=False)
def test_tp_across_nodes_warns_and_strict_refuses(caplog: pytest.LogCaptureFixture) -> None:
    rank = int(os.environ["RANK"])
    with (
        caplog.at_level(logging.WARNING, logger="distruntime"),
        DistributedRuntime("gloo", env=_two_nodes(), mesh={"tp": 4}) as info,
    ):
        assert (info.num_nodes, info.local_world_size) == (2, 2)
    warned = [r.getMessage() for r in caplog.records if "spans nodes" in r.getMessage()]
    if rank == 0:
        assert warned == [
            "device mesh pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=4: tp=4 spans nodes in 1 group(s): "
            "[0, 1, 2, 3] on nodes [0, 1] (slow; mesh_strict=True makes this an error)"
        ]
    else:
        assert warned == []  # said once, by rank 0
    caplog.clear()
    with DistributedRuntime("gloo", env=_two_nodes(), mesh={"tp": 2, "dp_shard": 2}, mesh_strict=True):
        pass
    assert not [r for r in caplog.records if "spans nodes" in r.getMessage()]
    with pytest.raises(MeshConfigError, match=r"mesh_strict=True.*tp=4 spans nodes.*2 ranks per node"):
        DistributedRuntime("gloo", env=_two_nodes(), mesh={"tp": 4}, mesh_strict=True).__enter__()
    assert not dist.is_initialized()


@pytest.mark.distributed(world_size=4, init=False)
def test_reentry_nesting_and_failure_leave_no_group() -> None:
    runtime = DistributedRuntime("gloo", mesh={"dp_shard": -1, "tp": 2})
    for _ in range(2):  # re-entry builds the groups again
        with runtime as info:
            with DistributedRuntime("auto", mesh={"tp": 2, "dp_shard": 2}) as inner:
                assert inner is info  # nested, same mesh: shared
            with pytest.raises(GroupMismatchError, match=r"contradicts the live mesh \(pp=1"):
                DistributedRuntime("auto", mesh={"tp": 4}).__enter__()
            tensor = torch.ones(1)
            dist.all_reduce(tensor, group=info.submesh("tp").get_group())
            assert tensor.item() == 2
        assert not dist.is_initialized() and not dist.distributed_c10d._world.pg_map
    # Rank 1 fails; rank 3, blocked with it in a dp collective, fails at once (torch's
    # references to the mesh groups were dropped) and its report names the mesh dim.
    with (
        pytest.raises((ValueError, PeerFailureError)) as caught,
        DistributedRuntime("gloo", mesh={"dp_shard": -1, "tp": 2}) as info,
    ):
        if info.rank == 1:
            raise ValueError("boom")
        dist.barrier(group=info.submesh("dp").get_group())
        dist.barrier()
    assert not dist.is_initialized() and not dist.distributed_c10d._world.pg_map
    if int(os.environ["RANK"]) == 3:
        assert "rank 1 failed first (ValueError: boom)" in str(caught.value)
        dims = re.search(r"\(in a collective over mesh dim '([\w,]+)'\)", str(caught.value))
        assert dims is not None and "dp" in dims.group(1).split(","), str(caught.value)


@pytest.mark.distributed(world_size=4, init=False)
def test_teardown_hooks_order_isolation_bound_and_failure_path(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def hook(label: str, info: distruntime.DistInfo) -> Callable[[], None]:
        def run() -> None:
            # Runs while the mesh groups still exist: a collective over tp works.
            tensor = torch.ones(1)
            dist.all_reduce(tensor, group=info.submesh("tp").get_group())
            ran.append(f"{label}:{tensor.item():g}")
        return run

    def broken() -> None:
        raise RuntimeError("hook broke")

    stuck = threading.Event()
    runtime = DistributedRuntime("gloo", mesh={"dp_shard": 2, "tp": 2})
    with caplog.at_level(logging.WARNING, logger="distruntime"):
        with runtime as info:
            distruntime.on_teardown(hook("first", info))
            runtime.on_teardown(broken)
            runtime.on_teardown(stuck.wait, timeout_s=0.5)  # hangs: abandoned after 0.5 s
            distruntime.on_teardown(hook("last", info))
            started = time.monotonic()
        elapsed = time.monotonic() - started
    assert ran == ["last:2", "first:2"]
    assert 0.5 <= elapsed < 10 and not dist.is_initialized()
    messages = [r.getMessage() for r in caplog.records]
    assert any("broken failed: RuntimeError: hook broke" in m for m in messages)
    assert any("wait did not finish within 0.5s" in m for m in messages)
    stuck.set()

    ran.clear()
    state: list[bool] = []
    with (
        pytest.raises((ValueError, PeerFailureError)),
        DistributedRuntime("gloo", mesh={"dp_shard": 2, "tp": 2}) as info,
    ):
        distruntime.on_teardown(lambda: state.append(dist.is_initialized()))
        distruntime.on_teardown(lambda: ran.append("second"))
        if info.rank == 1:
            raise ValueError("boom")
        dist.barrier()
    assert ran == ["second"] and state == [True] and not dist.is_initialized()
    # A plain assert: after teardown no peer waits on this rank.
    assert not dist.distributed_c10d._world.pg_map, "a group survived teardown"


# ---------------------------------------------------------------------- the example
@pytest.mark.processes
def test_fsdp2_tp_example_trains_under_torchrun() -> None:
    """FSDP2 over dp_shard_cp and TP over tp on 4 CPU/gloo ranks: the loss goes down."""
    from procs import REPO, TORCHRUN, run

    example = str(REPO / "examples" / "train_fsdp_tp.py")
    result = run([TORCHRUN, "--nproc-per-node", "4", example, "--steps", "40"], 150)
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "fully_shard"):  # torch < 2.6 (the declared minimum is 2.4): a clear refusal
        assert result.returncode != 0 and "needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6)" \
            in result.output, result.output
        return
    assert result.returncode == 0, result.output
    losses = [float(m) for m in re.findall(r"step +\d+ +loss (\d+\.\d+)", result.stderr)]
    assert len(losses) == 5 and losses[-1] < losses[0] / 10, result.stderr
    assert "mesh ParallelMesh(pp=1, dp_replicate=1, dp_shard=2, cp=1, tp=2), 4 ranks" in result.stderr
    assert "(converged)" in result.stderr and "Warning:" not in result.stderr, result.stderr
