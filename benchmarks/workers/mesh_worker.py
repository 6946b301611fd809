"""One torchrun worker of ``bench_mesh.py``: the 5-dim mesh, by hand versus from the runtime.

Imports first (not measured), then ``--warmup + --inner`` rounds, alternating which
contender goes first:

* ``raw``: ``with DistributedRuntime("gloo"):`` and inside it what every training stack
  writes by hand -- ``init_device_mesh("cpu", sizes, mesh_dim_names=...)``, the five 1-D
  slices, and ``_flatten`` of dp, dp_shard_cp and dp_cp.
* ``runtime``: ``with DistributedRuntime("gloo", mesh=SPEC):`` (validation, the check-in
  agreement, the same mesh and sub-meshes, teardown).

Timed apart: ``up`` (entry until the mesh and its sub-meshes exist: what the cost goal is
about), ``down`` (teardown) and, for the raw contender, ``free`` (dropping DeviceMesh's
references to the destroyed groups, which the runtime's teardown includes). Each round
starts at an untimed store barrier; each rank writes its times to
``<out>/rank<R>.json``; the harness takes the max over ranks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path

from startup_worker import _sync  # the untimed store barrier between rounds
from torch._C._distributed_c10d import PrefixStore, TCPStore
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distruntime import DistributedRuntime
from distruntime.mesh import DIMS
from distruntime.mesh import FLATTENED as FLAT


def _raw(sizes: tuple[int, ...]) -> dict[str, float]:
    t0 = time.perf_counter()
    runtime = DistributedRuntime("gloo")
    runtime.__enter__()
    mesh = init_device_mesh("cpu", sizes, mesh_dim_names=DIMS)
    subs: dict[str, DeviceMesh] = {name: mesh[name] for name in DIMS}
    for name, parts in FLAT.items():
        subs[name] = mesh[parts]._flatten(name)
    t1 = time.perf_counter()
    runtime.__exit__(None, None, None)
    t2 = time.perf_counter()
    # What the runtime's teardown also does: drop DeviceMesh's references to the destroyed
    # groups, so gloo closes them now (a hand-written stack leaves that to the garbage
    # collector: the meshes reference each other). Timed apart as "free".
    for m in (mesh, *subs.values()):
        m._pg_registry.clear()
    return {"up": t1 - t0, "down": t2 - t1, "free": time.perf_counter() - t2}


def _runtime(spec: dict[str, int]) -> dict[str, float]:
    t0 = time.perf_counter()
    runtime = DistributedRuntime("gloo", mesh=spec)
    runtime.__enter__()
    t1 = time.perf_counter()
    runtime.__exit__(None, None, None)  # destroys the groups and frees them
    return {"up": t1 - t0, "down": time.perf_counter() - t1, "free": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--spec", default='{"pp": 2, "dp_shard": 2, "tp": 2}')
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    known = math.prod(v for v in spec.values() if v != -1)
    sizes = tuple(world // known if spec.get(d) == -1 else spec.get(d, 1) for d in DIMS)
    agent = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                     timeout=timedelta(seconds=600))
    sync = PrefixStore("bench-sync", agent)
    records: list[dict[str, object]] = []
    for i in range(args.warmup + args.inner):
        for variant in ("raw", "runtime") if i % 2 == 0 else ("runtime", "raw"):
            _sync(sync, f"{i}/{variant}", world)
            times = _raw(sizes) if variant == "raw" else _runtime(spec)
            records.append({"iteration": i, "variant": variant, "warmup": i < args.warmup, **times})
    _sync(sync, "done", world)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "records": records}))


if __name__ == "__main__":
    main()
