"""Start-up + teardown: ``with DistributedRuntime("gloo")`` versus raw torch, under torchrun.

``--mode cold`` (the default; what users pay): one runtime per process, its first and
only. Each round launches torchrun twice with fresh processes, once per contender, in
alternating order; each worker times its one contender from a common start (an
untimed store barrier) to the end of teardown. Reported per N: rank 0's time and the
slowest rank's, medians over rounds, and the median of the per-round paired ratios.

``--mode warm``: many rounds inside one process, as below.

For each world size N, ``--repeats`` torchrun launches; inside each launch every worker
times ``--inner`` rounds of both contenders, alternating which goes first (see
``workers/startup_worker.py``). Time is measured inside the workers from just before
init to just after teardown, import time excluded; a round's time is the max over ranks.

Reported per N: median time of each contender over all rounds, the ratio of medians,
and the median of the per-round ratios (each round pairs the two contenders run
back to back, so slow drift on a shared machine cancels). Goal: ratio <= 1.03.

Usage::

    python benchmarks/bench_startup.py                       # cold, N = 1,2,4,8,16
    python benchmarks/bench_startup.py --sizes 1,2 --rounds 3  # quick
    python benchmarks/bench_startup.py --mode warm --sizes 1,2 --repeats 1 --inner 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    TORCHRUN,
    WORKERS,
    add_resolver_flag,
    iqr,
    loadavg,
    machine,
    median,
    parse_sizes,
    result_name,
    run,
    save,
    setup_resolver,
    table,
)


def launch(n: int, inner: int, warmup: int, variants: str, timeout_s: float,
           *, cold: str | None = None) -> list[dict[str, Any]]:
    """One torchrun launch of N workers; returns each worker's JSON record."""
    with tempfile.TemporaryDirectory(prefix="drt-bench-") as out:
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(n), "--monitor-interval", "0.1",
               str(WORKERS / "startup_worker.py"), "--inner", str(inner), "--warmup", str(warmup),
               "--variants", variants, "--out", out, *(["--cold", cold] if cold else [])]
        result = run(cmd, timeout_s)
        if result.returncode != 0:
            raise SystemExit(f"torchrun with {n} workers failed ({result.returncode}):\n{result.tail()}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def rounds(workers: list[dict[str, Any]], field: str = "total") -> dict[str, list[float]]:
    """Per contender, the max over ranks of each timed (non-warm-up) round."""
    per: dict[tuple[int, str], float] = {}
    for w in workers:
        for r in w["records"]:
            if r["warmup"]:
                continue
            key = (int(r["iteration"]), str(r["variant"]))
            per[key] = max(per.get(key, 0.0), float(r[field]))
    out: dict[str, list[float]] = {}
    for (_, variant), value in sorted(per.items()):
        out.setdefault(variant, []).append(value)
    return out


def _cold_times(workers: list[dict[str, Any]]) -> dict[str, float]:
    """Rank 0's and the slowest rank's total, and rank 0's start-up and teardown parts."""
    by_rank = {int(w["rank"]): w["records"][0] for w in workers}
    return {"rank0": float(by_rank[0]["total"]), "slowest": max(float(r["total"]) for r in by_rank.values()),
            "rank0_up": float(by_rank[0]["up"]), "rank0_down": float(by_rank[0]["down"])}


def cold(n: int, rounds: int, timeout_s: float) -> dict[str, Any]:
    """``rounds`` pairs of fresh torchrun launches (raw, runtime; order alternating)."""
    times: dict[str, dict[str, list[float]]] = {
        v: {"rank0": [], "slowest": [], "rank0_up": [], "rank0_down": []} for v in ("raw", "runtime")}
    loads = []
    for i in range(rounds):
        for variant in ("raw", "runtime") if i % 2 == 0 else ("runtime", "raw"):
            for key, value in _cold_times(launch(n, 0, 0, variant, timeout_s, cold=variant)).items():
                times[variant][key].append(value * 1e3)
        loads.append(loadavg())
        print(f"N={n} round {i + 1}/{rounds}: rank 0 raw {times['raw']['rank0'][-1]:.1f} ms, "
              f"runtime {times['runtime']['rank0'][-1]:.1f} ms", file=sys.stderr)
    result: dict[str, Any] = {"n": n, "rounds": rounds, "loadavg_1min": loads, "ms": times}
    for who in ("rank0", "slowest"):
        raw, rt = times["raw"][who], times["runtime"][who]
        result[f"{who}_raw_median_ms"] = median(raw)
        result[f"{who}_runtime_median_ms"] = median(rt)
        result[f"{who}_median_paired_ratio"] = median([b / a for a, b in zip(raw, rt, strict=True)])
    for part in ("rank0_up", "rank0_down"):
        result[f"{part}_raw_median_ms"] = median(times["raw"][part])
        result[f"{part}_runtime_median_ms"] = median(times["runtime"][part])
    return result


def main_cold(args: argparse.Namespace, resolver: str) -> None:
    results = [cold(n, args.rounds, args.timeout) for n in parse_sizes(args.sizes)]
    rows = [[r["n"], r["rounds"],
             f"{r['rank0_raw_median_ms']:.1f} / {r['rank0_runtime_median_ms']:.1f}",
             f"{r['rank0_median_paired_ratio']:.3f}",
             f"{r['slowest_raw_median_ms']:.1f} / {r['slowest_runtime_median_ms']:.1f}",
             f"{r['slowest_median_paired_ratio']:.3f}",
             f"{r['rank0_up_raw_median_ms']:.1f} / {r['rank0_down_raw_median_ms']:.1f}",
             f"{r['rank0_up_runtime_median_ms']:.1f} / {r['rank0_down_runtime_median_ms']:.1f}"]
            for r in results]
    print(table(["N", "rounds", "rank 0: raw / runtime (ms)", "rank 0 paired ratio",
                 "slowest rank: raw / runtime (ms)", "slowest paired ratio",
                 "rank 0 raw up / down (ms)", "rank 0 runtime up / down (ms)"], rows))
    print(f"resolver: {resolver}")
    if not args.no_save:
        path = save(result_name("startup_cold", resolver), {
            "machine": machine(), "resolver": resolver, "mode": "cold", "rounds": args.rounds,
            "results": results})
        print(f"saved {path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cold", "warm"), default="cold",
                        help="cold: one runtime per fresh process (default); warm: rounds in one process")
    parser.add_argument("--rounds", type=int, default=7, help="cold: paired rounds per size (default: 7)")
    parser.add_argument("--sizes", default="1,2,4,8,16", help="world sizes (default: 1,2,4,8,16)")
    parser.add_argument("--repeats", type=int, default=3, help="torchrun launches per size (default: 3)")
    parser.add_argument("--inner", type=int, default=5, help="timed rounds per launch (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per launch (default: 1)")
    parser.add_argument("--timeout", type=float, default=600, help="bound per launch in seconds")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/startup.json")
    add_resolver_flag(parser)
    args = parser.parse_args()
    resolver = setup_resolver(args)
    if args.mode == "cold":
        main_cold(args, resolver)
        return

    results: list[dict[str, Any]] = []
    for n in parse_sizes(args.sizes):
        samples: dict[str, list[float]] = {"raw": [], "runtime": []}
        ups: dict[str, list[float]] = {"raw": [], "runtime": []}
        downs: dict[str, list[float]] = {"raw": [], "runtime": []}
        loads = []
        for rep in range(args.repeats):
            workers = launch(n, args.inner, args.warmup, "raw,runtime", args.timeout)
            loads.append(loadavg())
            for name, values in rounds(workers).items():
                samples[name] += values
            for name, values in rounds(workers, "up").items():
                ups[name] += values
            for name, values in rounds(workers, "down").items():
                downs[name] += values
            print(f"N={n} launch {rep + 1}/{args.repeats}: raw {median(samples['raw']) * 1e3:.1f} ms, "
                  f"runtime {median(samples['runtime']) * 1e3:.1f} ms (medians so far)", file=sys.stderr)
        raw, rt = samples["raw"], samples["runtime"]
        paired = [b / a for a, b in zip(raw, rt, strict=True)]
        results.append({
            "n": n, "rounds": len(raw), "raw_ms": [x * 1e3 for x in raw], "runtime_ms": [x * 1e3 for x in rt],
            "raw_median_ms": median(raw) * 1e3, "runtime_median_ms": median(rt) * 1e3,
            "raw_iqr_ms": [x * 1e3 for x in iqr(raw)], "runtime_iqr_ms": [x * 1e3 for x in iqr(rt)],
            "raw_up_median_ms": median(ups["raw"]) * 1e3,
            "runtime_up_median_ms": median(ups["runtime"]) * 1e3,
            "raw_down_median_ms": median(downs["raw"]) * 1e3,
            "runtime_down_median_ms": median(downs["runtime"]) * 1e3,
            "ratio_of_medians": median(rt) / median(raw), "median_paired_ratio": median(paired),
            "loadavg_1min": loads,
            "rounds_over_1s": {"raw": sum(x >= 1 for x in raw), "runtime": sum(x >= 1 for x in rt)},
        })

    rows = [[r["n"], r["rounds"], f"{r['raw_median_ms']:.1f}", f"{r['runtime_median_ms']:.1f}",
             f"{r['raw_up_median_ms']:.1f} / {r['raw_down_median_ms']:.1f}",
             f"{r['runtime_up_median_ms']:.1f} / {r['runtime_down_median_ms']:.1f}",
             f"{r['ratio_of_medians']:.3f}", f"{r['median_paired_ratio']:.3f}",
             f"{r['rounds_over_1s']['raw']} / {r['rounds_over_1s']['runtime']}"] for r in results]
    print(table(["N", "rounds", "raw (ms)", "runtime (ms)", "raw up/down (ms)", "runtime up/down (ms)",
                 "ratio of medians", "median paired ratio", "rounds >= 1 s (raw / runtime)"], rows))
    print(f"resolver: {resolver}")
    if not args.no_save:
        path = save(result_name("startup", resolver), {
            "machine": machine(), "resolver": resolver, "repeats": args.repeats, "inner": args.inner,
            "warmup": args.warmup, "results": results})
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
