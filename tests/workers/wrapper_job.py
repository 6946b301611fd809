"""One rank of a job that hands the runtime's world to a wrapper: ``python wrapper_job.py WRAPPER:MESH:MODE``.

Run under torchrun (rank info from the env). WRAPPER and MESH:

* ``fabric:own``  Lightning Fabric's ``ModelParallelStrategy`` building its own mesh
  (``init_device_mesh``: new groups that Fabric and DTensor keep alive), TP x FSDP2;
* ``fabric:runtime``  the same strategy on the runtime's mesh (``examples/wrappers.py``);
* ``fabric-ddp:runtime``  Fabric's DDP on the runtime's default group;
* ``accelerate:own``  ``Accelerator(cpu=True)`` DDP, plus a mesh Accelerate's
  ``ParallelismConfig`` builds itself (its own groups; the step also reduces over its
  ``dp_shard`` group). Accelerate's 2-D path refuses CPU, so the mesh is built, not prepared;
* ``accelerate:runtime``  ``Accelerator(cpu=True)`` given the runtime's mesh through
  ``ParallelismConfig.device_mesh``, DDP on the runtime's group (the step reduces over the
  mesh's ``dp_shard`` group too).

MODE: ``ok``; ``raise`` rank ``FAULT_RANK`` raises ValueError after one step; ``hang`` it
sleeps before the second step's collectives; ``kill`` it SIGKILLs itself there.

Prints ``ENTER <t>``, ``READY <rank>``, ``GROUPS <rank> <before> <after>`` (process groups
torch knows before and after the wrapper's set-up), ``FAULT <t>``, ``FAILED <t> <error>``,
``DONE <rank> <loss>``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from distruntime import DistInfo, DistributedRuntime

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import wrappers


def _say(text: str) -> None:
    # One write(2) per line, under PIPE_BUF: the ranks share one pipe, and print() under
    # PYTHONUNBUFFERED writes the text and its newline apart, so two ranks' lines could merge.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (text[:1000] + "\n").encode())


def _groups() -> int:
    return len(dist.distributed_c10d._world.pg_map)


def _fault(mode: str, rank: int) -> None:
    if rank != int(os.environ.get("FAULT_RANK", "-1")) or mode == "ok":
        return
    time.sleep(0.3)  # the peers block in the step's collectives first
    _say(f"FAULT {time.time()}")
    if mode == "raise":
        raise ValueError(f"injected fault on rank {rank}")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        time.sleep(3600)


def _fabric(info: DistInfo, own_mesh: bool, mode: str, ddp: bool) -> float:
    fabric = (wrappers.fabric_ddp(info) if ddp else
              wrappers.fabric_model_parallel(info, own_mesh=own_mesh, parallelize_fn=wrappers.parallelize))
    before = _groups()
    fabric.launch()
    model = fabric.setup_module(wrappers.TinyMLP())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    _say(f"GROUPS {info.rank} {before} {_groups()}")
    loss = torch.zeros(())
    for step in range(3):
        if step == 1:
            _fault(mode, info.rank)
        optimizer.zero_grad()
        loss = model(torch.ones(4, 8)).square().mean()
        fabric.backward(loss)
        optimizer.step()
    return float(loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss)


def _accelerate(info: DistInfo, own_mesh: bool, mode: str) -> float:
    before = _groups()
    accelerator, mesh = wrappers.accelerator_on_runtime(info, own_mesh=own_mesh)
    model = accelerator.prepare(wrappers.TinyMLP())
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    _say(f"GROUPS {info.rank} {before} {_groups()}")
    own_group = mesh["dp_shard"].get_group() if mesh is not None else None
    loss = torch.zeros(())
    for step in range(3):
        if step == 1:
            _fault(mode, info.rank)
        optimizer.zero_grad()
        loss = model(torch.ones(4, 8)).square().mean()
        accelerator.backward(loss)
        optimizer.step()
        if own_group is not None:  # a collective over the mesh's groups too
            dist.all_reduce(loss.detach().clone(), group=own_group)
    return float(loss)


_RUN: dict[str, Callable[[DistInfo, bool, str], Any]] = {
    "fabric": lambda info, own, mode: _fabric(info, own, mode, ddp=False),
    "fabric-ddp": lambda info, own, mode: _fabric(info, own, mode, ddp=True),
    "accelerate": _accelerate,
}


def main(spec: str) -> None:
    wrapper, mesh, mode = spec.split(":")
    hang = os.environ.get("HANG_TIMEOUT_S")
    _say(f"ENTER {time.time()}")
    try:
        with DistributedRuntime(
            "gloo", mesh=wrappers.mesh_for(wrapper),
            timeout_minutes=float(os.environ.get("TIMEOUT_MINUTES", "1")),
            hang_timeout_s=float(hang) if hang else None,
        ) as info:
            _say(f"READY {info.rank}")
            loss = _RUN[wrapper](info, mesh == "own", mode)
            _say(f"DONE {info.rank} {loss:.6f}")
    except BaseException as exc:
        _say(f"FAILED {time.time()} {type(exc).__name__}: {exc}".splitlines()[0])
        raise


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s[%(process)d]: %(message)s")
    main(sys.argv[1])
