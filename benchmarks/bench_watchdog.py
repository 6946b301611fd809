"""Cost of hang detection on a healthy job: collectives with the watchdog versus raw torch.

One torchrun launch of N workers (default 4) per repeat; inside it every worker runs
both contenders each round, alternating which goes first (``workers/collectives_worker.py``):
``--small`` one-float ``all_reduce``s and ``--large`` 1 MiB ``all_reduce``s, raw
``torch.distributed`` versus ``DistributedRuntime(hang_timeout_s=5)`` (the watchdog ticks
every 0.5 s: the most often any threshold makes it). A round's time is the max over ranks.

Reported: medians of each contender, the ratio of medians and the median of per-round
paired ratios (runtime / raw, so slow drift on a shared machine cancels). Goal: <= 1.02.

Usage::

    python benchmarks/bench_watchdog.py                     # 4 ranks, 5000 small, 100 x 1 MiB
    python benchmarks/bench_watchdog.py --repeats 1 --rounds 2 --small 500   # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import TORCHRUN, WORKERS, loadavg, machine, median, run, save, table


def launch(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="drt-bench-") as out:
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(args.nproc), "--monitor-interval", "0.1",
               str(WORKERS / "collectives_worker.py"), "--rounds", str(args.rounds),
               "--small", str(args.small), "--large", str(args.large),
               "--hang-timeout", str(args.hang_timeout), "--out", out]
        result = run(cmd, args.timeout)
        if result.returncode != 0:
            raise SystemExit(f"torchrun failed ({result.returncode}):\n{result.tail()}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def per_round(workers: list[dict[str, Any]], field: str) -> dict[str, list[float]]:
    worst: dict[tuple[int, str], float] = {}
    for w in workers:
        for r in w["records"]:
            key = (int(r["round"]), str(r["variant"]))
            worst[key] = max(worst.get(key, 0.0), float(r[field]))
    out: dict[str, list[float]] = {}
    for (_, variant), value in sorted(worst.items()):
        out.setdefault(variant, []).append(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="torchrun launches (default: 3)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per launch (default: 4)")
    parser.add_argument("--small", type=int, default=5000, help="one-float all_reduces per round")
    parser.add_argument("--large", type=int, default=100, help="1 MiB all_reduces per round")
    parser.add_argument("--hang-timeout", type=float, default=5.0, help="the runtime's hang_timeout_s")
    parser.add_argument("--timeout", type=float, default=900, help="bound per launch in seconds")
    parser.add_argument("--no-save", action="store_true", help="do not write results/watchdog.json")
    args = parser.parse_args()
    samples: dict[str, dict[str, list[float]]] = {"small": {"raw": [], "runtime": []},
                                                  "large": {"raw": [], "runtime": []}}
    loads = []
    for rep in range(args.repeats):
        workers = launch(args)
        loads.append(loadavg())
        for field, by_variant in samples.items():
            for variant, values in per_round(workers, field).items():
                by_variant[variant] += values
        print(f"launch {rep + 1}/{args.repeats} done (load {loads[-1]})", file=sys.stderr)
    results = []
    for field, label in (("small", f"{args.small} x all_reduce(1 float)"),
                         ("large", f"{args.large} x all_reduce(1 MiB)")):
        raw, rt = samples[field]["raw"], samples[field]["runtime"]
        paired = [b / a for a, b in zip(raw, rt, strict=True)]
        results.append({"loop": label, "rounds": len(raw), "raw_s": raw, "runtime_s": rt,
                        "raw_median_s": median(raw), "runtime_median_s": median(rt),
                        "ratio_of_medians": median(rt) / median(raw), "median_paired_ratio": median(paired)})
    runtime_records = [rec for w in workers for rec in w["records"] if rec["variant"] == "runtime"]
    ticks = [int(rec.get("watchdog_ticks", 0)) for rec in runtime_records]
    cpu = [float(rec.get("watchdog_cpu_s", 0.0)) for rec in runtime_records]
    per_tick_us = sum(cpu) / max(sum(ticks), 1) * 1e6
    rows = [[r["loop"], r["rounds"], f"{r['raw_median_s'] * 1e3:.1f}", f"{r['runtime_median_s'] * 1e3:.1f}",
             f"{r['ratio_of_medians']:.3f}", f"{r['median_paired_ratio']:.3f}"] for r in results]
    print(f"{args.nproc} ranks, gloo, CPU; runtime with hang_timeout_s={args.hang_timeout:g} (watchdog on)")
    headers = ["loop", "rounds", "raw (ms)", "runtime (ms)", "ratio of medians", "median paired ratio"]
    print(table(headers, rows))
    print(f"watchdog thread: {sum(ticks)} ticks, {per_tick_us:.0f} us of CPU per tick (last launch)")
    if not args.no_save:
        path = save("watchdog", {"machine": machine(), "nproc": args.nproc, "repeats": args.repeats,
                                 "rounds": args.rounds, "hang_timeout_s": args.hang_timeout,
                                 "loadavg_1min": loads, "results": results,
                                 "watchdog_cpu_us_per_tick": per_tick_us, "watchdog_ticks": sum(ticks)})
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
