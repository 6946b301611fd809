"""Hand the runtime's world to Lightning Fabric or Accelerate (docs/integrations.md).

The runtime owns start-up, the failure report and teardown; the wrapper runs the model on
the groups the runtime made, so there is one set of groups and every failure is explained::

    torchrun --nproc-per-node 4 examples/wrappers.py fabric        # ModelParallelStrategy, TP x FSDP2
    torchrun --nproc-per-node 4 examples/wrappers.py fabric-ddp    # Fabric DDP
    torchrun --nproc-per-node 4 examples/wrappers.py accelerate    # Accelerator() DDP

Needs the ``wrappers`` extra (``pip install distruntime[wrappers]``: lightning, accelerate).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from distruntime import DistInfo, DistributedRuntime

MESH = {"dp_shard": 2, "tp": 2}
"""The runtime's mesh in the Fabric recipes: 2-way FSDP x 2-way tensor parallel (4 ranks)."""

ACCELERATE_MESH = {"dp_replicate": 2, "dp_shard": 2}
"""The runtime's mesh in the Accelerate recipe: HSDP's 2 x 2 (Accelerate's ``tp_size`` > 1 needs
``transformers``, which the ``wrappers`` extra does not install)."""

# Fabric's ModelParallelStrategy names its mesh dims so (distributed_sampler_kwargs reads them).
FABRIC_DIMS = ("data_parallel", "tensor_parallel")


class TinyMLP(nn.Module):
    """Two linear layers: ``w1`` column-parallel, ``w2`` row-parallel under TP."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w1 = nn.Linear(8, 16)
        self.w2 = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.relu(self.w1(x)))


def parallelize(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Fabric's ``parallelize_fn``: TP over ``tensor_parallel``, FSDP2 over ``data_parallel``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(model, mesh["tensor_parallel"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def fabric_mesh(info: DistInfo) -> DeviceMesh:
    """The runtime's ``dp_shard`` x ``tp`` groups as a mesh with Fabric's dim names: no new group."""
    sub = info.mesh[("dp_shard", "tp")]
    groups = [sub.get_group("dp_shard"), sub.get_group("tp")]
    return DeviceMesh.from_group(groups, sub.device_type, mesh=sub.mesh, mesh_dim_names=FABRIC_DIMS)


def fabric_model_parallel(info: DistInfo, *, own_mesh: bool = False,
                          parallelize_fn: Callable[[Any, DeviceMesh], Any] = parallelize) -> Any:
    """Fabric with ``ModelParallelStrategy`` on the runtime's mesh (``own_mesh``: Fabric builds one).

    Fabric adopts the runtime's default group (it initialises only when none is live); its
    strategy's ``setup_environment`` always calls ``init_device_mesh``, which would make a
    second set of groups, so the subclass hands it the runtime's mesh instead.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy
    from lightning.fabric.strategies.parallel import ParallelStrategy

    class RuntimeMeshStrategy(ModelParallelStrategy):
        def setup_environment(self) -> None:
            ParallelStrategy.setup_environment(self)  # the accelerator's device, no mesh
            self._setup_distributed()  # sets Fabric's ranks; the group is the runtime's
            self._device_mesh = fabric_mesh(info)

    sizes = {"data_parallel_size": MESH["dp_shard"], "tensor_parallel_size": MESH["tp"]}
    strategy_type = ModelParallelStrategy if own_mesh else RuntimeMeshStrategy
    strategy = strategy_type(parallelize_fn=parallelize_fn, **sizes)
    return Fabric(accelerator="cpu" if info.device.type == "cpu" else "auto",
                  devices=info.local_world_size, num_nodes=info.num_nodes, strategy=strategy)


def fabric_ddp(info: DistInfo) -> Any:
    """Fabric's DDP on the runtime's default group (Fabric makes no group of its own)."""
    from lightning.fabric import Fabric

    return Fabric(accelerator="cpu" if info.device.type == "cpu" else "auto",
                  devices=info.local_world_size, num_nodes=info.num_nodes, strategy="ddp")


def accelerator_on_runtime(info: DistInfo, *, own_mesh: bool = False) -> tuple[Any, DeviceMesh | None]:
    """``Accelerator`` on the runtime's group, and the mesh for its 2-D path.

    The mesh is the runtime's, given through ``ParallelismConfig.device_mesh`` (Accelerate then
    builds none); ``own_mesh``: the one Accelerate's ``ParallelismConfig`` builds itself. On
    GPUs pass ``parallelism_config=config`` to ``Accelerator``; on CPU Accelerate refuses it
    (``ParallelismConfig is only compatible DistributedType.FSDP (version 2) or ...``), so here
    the plain ``Accelerator`` runs DDP on the default group and the mesh is returned beside it.
    """
    from accelerate import Accelerator
    from accelerate.parallelism_config import ParallelismConfig

    config = ParallelismConfig(dp_replicate_size=ACCELERATE_MESH["dp_replicate"],
                               dp_shard_size=ACCELERATE_MESH["dp_shard"])
    if not own_mesh:
        config.device_mesh = info.mesh
    on_cpu = info.device.type == "cpu"
    accelerator = Accelerator(cpu=on_cpu, parallelism_config=None if on_cpu else config)
    mesh = config.get_device_mesh(info.device.type) if on_cpu else accelerator.torch_device_mesh
    return accelerator, mesh


def _train(which: str, info: DistInfo) -> float:
    model = TinyMLP()
    if which.startswith("fabric"):
        fabric = fabric_ddp(info) if which == "fabric-ddp" else fabric_model_parallel(info)
        fabric.launch()
        model = fabric.setup_module(model)
        optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
        backward = fabric.backward
    else:
        accelerator, _mesh = accelerator_on_runtime(info)
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
        backward = accelerator.backward
    loss = torch.zeros(())
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(torch.ones(4, 8)).square().mean()
        backward(loss)
        optimizer.step()
    full = getattr(loss, "full_tensor", None)
    return float(full() if callable(full) else loss)


def mesh_for(which: str) -> dict[str, int]:
    """The runtime's ``mesh=`` for a recipe (``fabric``, ``fabric-ddp``, ``accelerate``)."""
    return ACCELERATE_MESH if which.startswith("accelerate") else MESH


def main(which: str) -> None:
    with DistributedRuntime("gloo", mesh=mesh_for(which)) as info:
        loss = _train(which, info)
        if info.is_main:
            print(f"{which}: loss {loss:.4f} after 3 steps on {info.world_size} ranks")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fabric")
