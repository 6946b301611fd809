"""Multi-rank behaviour of the runtime, run on the project's own pytest plugin.

Real processes and real gloo groups, but pooled (torch imported once): the plugin is
its own first user. Launcher-level behaviour (torchrun, signals, exit codes) lives in
test_processes.py, test_faults.py and tests/launchers/.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import distruntime
from distruntime import DistInfo, DistributedRuntime, GroupMismatchError
from distruntime.testing import assert_all_ranks


@pytest.mark.distributed(world_size=[2, 4])
def test_all_reduce_and_info(dist_info: DistInfo) -> None:
    tensor = torch.tensor([float(dist_info.rank + 1)])
    dist.all_reduce(tensor)
    n = dist_info.world_size
    assert_all_ranks(tensor.item() == n * (n + 1) / 2, f"all_reduce gave {tensor.item()}")
    assert dist_info.backend == "gloo" and dist_info.device == torch.device("cpu")
    assert dist_info.is_main == (dist_info.rank == 0)


@pytest.mark.distributed(world_size=2)
def test_nested_runtime_shares_the_group(dist_info: DistInfo) -> None:
    with DistributedRuntime("auto") as inner:
        assert inner is dist_info
        assert distruntime.current() is dist_info
    assert dist.is_initialized()
    dist.barrier()


@pytest.mark.distributed(world_size=2)
def test_nested_runtime_asking_for_another_backend_raises(dist_info: DistInfo) -> None:
    with pytest.raises(GroupMismatchError, match="already live with backend 'gloo'"):
        DistributedRuntime("cpu:gloo,cuda:nccl").__enter__()
    dist.barrier()


@pytest.mark.distributed(world_size=2, init=False)
def test_consecutive_runtimes_in_one_process() -> None:
    for expected in (1.0, 2.0):
        with DistributedRuntime("gloo") as info:
            tensor = torch.ones(1) * expected
            dist.all_reduce(tensor)
            assert tensor.item() == expected * info.world_size
        assert not dist.is_initialized()


@pytest.mark.distributed(world_size=2, init=False)
def test_seed_shims_on_two_ranks() -> None:
    info = distruntime.initialize_distributed("gloo", timeout_minutes=1)
    assert distruntime.initialize_distributed("gloo") is info
    assert (distruntime.get_rank_safe(), distruntime.get_world_size_safe()) == (info.rank, 2)
    assert distruntime.get_local_rank_preinit() == info.local_rank
    distruntime.destroy_global_state()
    distruntime.destroy_global_state()
    assert not dist.is_initialized()


@pytest.mark.distributed(world_size=2, init=False)
def test_adopted_group_survives_the_runtime() -> None:
    dist.init_process_group("gloo")  # the rank's torchrun-style environment
    try:
        with DistributedRuntime("gloo") as info:
            assert info.world_size == 2 and info.rank == int(os.environ["RANK"])
        assert dist.is_initialized()
        dist.barrier()
    finally:
        dist.destroy_process_group()
