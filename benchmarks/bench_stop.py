"""Per-call cost of the coordinated stop check at N ranks, next to raw torch.

Contenders (``workers/stop_worker.py``), called once per simulated step on every rank:
``distruntime.should_stop()``; raw torch's blocking flag all-reduce each step (the
Megatron pattern, here on gloo/CPU); raw torch's pipelined ``async_op=True`` all-reduce
read one step later. Each repeat is a fresh ``torchrun --nproc-per-node N`` job; inside
it the contenders alternate order between rounds. Reported: the median per-call time
(microseconds) over every call of every rank, per repeat, and the median of those.

Usage::

    python benchmarks/bench_stop.py                        # 4 ranks, 5 repeats
    python benchmarks/bench_stop.py --repeats 1 --calls 100  # quick
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from _common import TORCHRUN, WORKERS, clean_env, loadavg, machine, median, run, save, table

WORKER = str(WORKERS / "stop_worker.py")
CONTENDERS = ("distruntime", "torch_sync", "torch_pipelined")


def one_job(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [TORCHRUN, "--nproc-per-node", str(args.ranks), WORKER, "--calls", str(args.calls),
           "--rounds", str(args.rounds), "--step-ms", str(args.step_ms)]
    done = run(cmd, args.bound, env=clean_env())
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"benchmark job failed (exit {done.returncode}):\n{done.tail()}")
    result: dict[str, Any] = json.loads(lines[0][7:])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300, help="timed calls per contender per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=2.0, help="simulated step between calls")
    parser.add_argument("--bound", type=float, default=300.0, help="seconds before a job is killed")
    args = parser.parse_args()

    per_repeat: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    loads = []
    for _ in range(args.repeats):
        loads.append(loadavg())
        result = one_job(args)
        for name in CONTENDERS:
            calls = [t for rank in result["ranks"] for t in rank[name]]
            per_repeat[name].append(median(calls))
    rows = []
    base = median(per_repeat["distruntime"])
    for name in CONTENDERS:
        value = median(per_repeat[name])
        rows.append([name, f"{value:.1f}", ", ".join(f"{v:.0f}" for v in per_repeat[name]),
                     f"{value / base:.2f}x"])
    print(f"{args.ranks} ranks, step {args.step_ms} ms, {args.calls} calls x {args.rounds} rounds "
          f"per contender per repeat, {args.repeats} repeats; load {min(loads)}-{max(loads)}")
    print(table(["contender", "median us/call", "per repeat", "vs distruntime"], rows))
    name = "stop" if args.step_ms == 2.0 else f"stop_step{args.step_ms:g}ms"
    save(name, {"machine": machine(), "args": vars(args), "loadavg_per_repeat": loads,
                  "median_us_per_repeat": per_repeat})


if __name__ == "__main__":
    main()
