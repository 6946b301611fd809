"""The 5-dim device mesh at world size 8: through the runtime versus by hand, under torchrun.

Both contenders start and stop a ``DistributedRuntime("gloo")``; the raw one builds the
mesh itself (``init_device_mesh`` + five slices + three ``_flatten``), the other passes
``mesh={"pp": 2, "dp_shard": 2, "tp": 2}`` (five dims: dp_replicate and cp are 1). See
``workers/mesh_worker.py``. Reported for the build (entry until the mesh exists) and for
the teardown: the median of each over all rounds (a round's time is the max over ranks),
the ratio of medians and the median of per-round paired ratios (each round runs both back
to back, so drift on a shared machine cancels). Goal: build ratio <= 1.05.

Usage::

    python benchmarks/bench_mesh.py                          # N = 8, 3 launches x 5 rounds
    python benchmarks/bench_mesh.py --repeats 1 --inner 2    # quick
"""

from __future__ import annotations

import argparse
import json
import sys

from _common import (
    add_resolver_flag,
    iqr,
    loadavg,
    machine,
    median,
    result_name,
    save,
    setup_resolver,
    table,
    torchrun_records,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=8)
    parser.add_argument("--spec", default='{"pp": 2, "dp_shard": 2, "tp": 2}')
    parser.add_argument("--repeats", type=int, default=3, help="torchrun launches (default: 3)")
    parser.add_argument("--inner", type=int, default=5, help="timed rounds per launch (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per launch (default: 1)")
    parser.add_argument("--timeout", type=float, default=600, help="bound per launch in seconds")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/mesh.json")
    add_resolver_flag(parser)
    args = parser.parse_args()
    resolver = setup_resolver(args)  # torch's reverse DNS stalls of 5 s: docs/benchmarks.md

    fields = ("up", "down", "free")
    samples: dict[tuple[str, str], list[float]] = {(v, f): [] for v in ("raw", "runtime") for f in fields}
    loads = []
    for rep in range(args.repeats):
        per: dict[tuple[int, str, str], float] = {}
        worker_args = ["--inner", str(args.inner), "--warmup", str(args.warmup), "--spec", args.spec]
        for worker in torchrun_records("mesh_worker.py", args.nproc, worker_args, args.timeout):
            for r in worker["records"]:
                if not r["warmup"]:
                    for f in fields:
                        key = (int(r["iteration"]), str(r["variant"]), f)
                        per[key] = max(per.get(key, 0.0), float(r[f]))
        for (_, variant, f), value in sorted(per.items()):
            samples[variant, f].append(value)
        loads.append(loadavg())
        print(f"launch {rep + 1}/{args.repeats}: build raw {median(samples['raw', 'up']) * 1e3:.1f} ms, "
              f"runtime {median(samples['runtime', 'up']) * 1e3:.1f} ms (medians so far)", file=sys.stderr)

    def ms(values: list[float]) -> list[float]:
        return [round(x * 1e3, 2) for x in values]

    raw_up, rt_up = samples["raw", "up"], samples["runtime", "up"]
    raw_down = [a + b for a, b in zip(samples["raw", "down"], samples["raw", "free"], strict=True)]
    rt_down = samples["runtime", "down"]
    result = {
        "n": args.nproc, "spec": json.loads(args.spec), "rounds": len(raw_up),
        "raw_up_ms": ms(raw_up), "runtime_up_ms": ms(rt_up),
        "raw_down_ms": ms(samples["raw", "down"]), "raw_free_ms": ms(samples["raw", "free"]),
        "runtime_down_ms": ms(rt_down),
        "raw_up_median_ms": median(raw_up) * 1e3, "runtime_up_median_ms": median(rt_up) * 1e3,
        "raw_up_iqr_ms": ms(list(iqr(raw_up))), "runtime_up_iqr_ms": ms(list(iqr(rt_up))),
        "build_ratio_of_medians": median(rt_up) / median(raw_up),
        "build_median_paired_ratio": median([b / a for a, b in zip(raw_up, rt_up, strict=True)]),
        "raw_down_median_ms": median(samples["raw", "down"]) * 1e3,
        "raw_free_median_ms": median(samples["raw", "free"]) * 1e3,
        "runtime_down_median_ms": median(rt_down) * 1e3,
        "teardown_median_paired_ratio": median([b / a for a, b in zip(raw_down, rt_down, strict=True)]),
        "loadavg_1min": loads,
    }
    print(table(
        ["N", "rounds", "build raw (ms)", "build runtime (ms)", "build ratio of medians",
         "build median paired ratio", "teardown raw: destroy + free (ms)", "teardown runtime (ms)",
         "teardown median paired ratio"],
        [[args.nproc, len(raw_up), f"{result['raw_up_median_ms']:.1f}",
          f"{result['runtime_up_median_ms']:.1f}",
          f"{result['build_ratio_of_medians']:.3f}", f"{result['build_median_paired_ratio']:.3f}",
          f"{result['raw_down_median_ms']:.1f} + {result['raw_free_median_ms']:.1f}",
          f"{result['runtime_down_median_ms']:.1f}", f"{result['teardown_median_paired_ratio']:.3f}"]]))
    print(f"spec {args.spec}; resolver: {resolver}; load average (1 min) after each launch: {loads}")
    if not args.no_save:
        path = save(result_name("mesh", resolver), {
            "machine": machine(), "resolver": resolver, "repeats": args.repeats, "inner": args.inner,
            "warmup": args.warmup, "result": result})
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
