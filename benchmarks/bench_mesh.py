"""The 5-dim device mesh at world size 8: through the runtime versus by hand, under torchrun.

Both contenders start and stop a ``DistributedRuntime("gloo")``; the raw one builds the
mesh itself (``init_device_mesh`` + five slices + three ``_flatten``), the other passes
``mesh={"pp": 2, "dp_shard": 2, "tp": 2}`` (five dims: dp_replicate and cp are 1). See
``workers/mesh_worker.py``. Reported: the median of each over all rounds (a round's time
is the max over ranks), the ratio of medians and the median of per-round paired ratios
(each round runs both back to back, so drift on a shared machine cancels). Goal: <= 1.05.

Usage::

    python benchmarks/bench_mesh.py                          # N = 8, 3 launches x 5 rounds
    python benchmarks/bench_mesh.py --repeats 1 --inner 2    # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import TORCHRUN, WORKERS, iqr, loadavg, machine, median, run, save, table


def launch(n: int, inner: int, warmup: int, spec: str, timeout_s: float) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="drt-bench-mesh-") as out:
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(n), "--monitor-interval", "0.1",
               str(WORKERS / "mesh_worker.py"), "--inner", str(inner), "--warmup", str(warmup),
               "--spec", spec, "--out", out]
        result = run(cmd, timeout_s)
        if result.returncode != 0:
            raise SystemExit(f"torchrun with {n} workers failed ({result.returncode}):\n{result.tail()}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=8)
    parser.add_argument("--spec", default='{"pp": 2, "dp_shard": 2, "tp": 2}')
    parser.add_argument("--repeats", type=int, default=3, help="torchrun launches (default: 3)")
    parser.add_argument("--inner", type=int, default=5, help="timed rounds per launch (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per launch (default: 1)")
    parser.add_argument("--timeout", type=float, default=600, help="bound per launch in seconds")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/mesh.json")
    args = parser.parse_args()

    samples: dict[str, list[float]] = {"raw": [], "runtime": []}
    groups: dict[str, set[int]] = {"raw": set(), "runtime": set()}
    loads = []
    for rep in range(args.repeats):
        per: dict[tuple[int, str], float] = {}
        for worker in launch(args.nproc, args.inner, args.warmup, args.spec, args.timeout):
            for r in worker["records"]:
                groups[r["variant"]].add(int(r["groups"]))
                if not r["warmup"]:
                    key = (int(r["iteration"]), str(r["variant"]))
                    per[key] = max(per.get(key, 0.0), float(r["total"]))
        for (_, variant), value in sorted(per.items()):
            samples[variant].append(value)
        loads.append(loadavg())
        print(f"launch {rep + 1}/{args.repeats}: raw {median(samples['raw']) * 1e3:.1f} ms, runtime "
              f"{median(samples['runtime']) * 1e3:.1f} ms (medians so far)", file=sys.stderr)
    raw, rt = samples["raw"], samples["runtime"]
    paired = [b / a for a, b in zip(raw, rt, strict=True)]
    result = {
        "n": args.nproc, "spec": json.loads(args.spec), "rounds": len(raw),
        "raw_ms": [x * 1e3 for x in raw], "runtime_ms": [x * 1e3 for x in rt],
        "raw_median_ms": median(raw) * 1e3, "runtime_median_ms": median(rt) * 1e3,
        "raw_iqr_ms": [x * 1e3 for x in iqr(raw)], "runtime_iqr_ms": [x * 1e3 for x in iqr(rt)],
        "ratio_of_medians": median(rt) / median(raw), "median_paired_ratio": median(paired),
        "groups_per_rank": {k: sorted(v) for k, v in groups.items()}, "loadavg_1min": loads,
    }
    print(table(["N", "spec", "rounds", "raw (ms)", "runtime (ms)", "ratio of medians", "median paired ratio"],
                [[args.nproc, args.spec, len(raw), f"{result['raw_median_ms']:.1f}",
                  f"{result['runtime_median_ms']:.1f}", f"{result['ratio_of_medians']:.3f}",
                  f"{result['median_paired_ratio']:.3f}"]]))
    if not args.no_save:
        path = save("mesh", {"machine": machine(), "repeats": args.repeats, "inner": args.inner,
                             "warmup": args.warmup, "result": result})
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
