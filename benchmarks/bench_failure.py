"""Failure detection: from a rank's failure to every process having exited.

Contenders: raw torch (``init_process_group`` + collectives, no clean-up code) and
``DistributedRuntime``, both with the same start-up/collective timeout ``--timeout-s``
(see ``workers/failure_worker.py``). Launch modes:

* ``plain``: N subprocesses with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (rank 0
  hosts the store), no supervisor: what each process does on its own decides.
* ``torchrun``: ``torchrun --standalone`` (monitor interval 0.1 s), whose agent stops
  the other workers once one fails.

Scenarios: ``exception`` (a rank raises while its peers wait in ``all_reduce``; rank 1,
and rank 0, the store's host), ``kill`` (a rank is SIGKILLed mid-collective), ``missing``
(a rank never arrives: not started under ``plain``, stuck before init under torchrun).

Time: from the failing rank's ``fail`` event (for ``missing``: from the moment the last
present rank began start-up) to the moment the harness sees the last process exit.
Each run is bounded (``--bound``, default 3 T + 20 s); a run past it is killed and
reported as ``> bound``. "Names culprit": in ``plain`` mode, whether a surviving rank's
own stderr names the failed rank ("rank 1").

Usage::

    python benchmarks/bench_failure.py                                # 3 repeats
    python benchmarks/bench_failure.py --repeats 1 --modes plain --sizes 2   # quick
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    TORCHRUN,
    WORKERS,
    add_resolver_flag,
    clean_env,
    kill_tree,
    loadavg,
    machine,
    median,
    parse_sizes,
    result_name,
    save,
    setup_resolver,
    table,
)

WORKER = str(WORKERS / "failure_worker.py")
# (label, worker scenario, failing rank: "last" or 0)
SCENARIOS = {
    "exception (rank 1 raises)": ("exception", 1),
    "exception (rank 0 raises)": ("exception", 0),
    "kill (rank 1 SIGKILLed)": ("kill", 1),
    "missing rank 1": ("stuck", 1),
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _events(out: Path) -> dict[int, dict[str, float]]:
    events: dict[int, dict[str, float]] = {}
    for path in out.glob("rank*.jsonl"):
        rank = int(path.stem[4:])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            events.setdefault(rank, {})[record["event"]] = float(record["t"])
    return events


@dataclass(frozen=True)
class Case:
    scenario: str
    fail_rank: int
    mode: str
    n: int
    timeout_s: float
    bound_s: float


def one_run(impl: str, case: Case) -> dict[str, Any]:
    scenario, fail_rank, mode, n, timeout_s, bound_s = (
        case.scenario, case.fail_rank, case.mode, case.n, case.timeout_s, case.bound_s)
    with tempfile.TemporaryDirectory(prefix="drt-fail-") as tmp:
        out = Path(tmp)
        args = ["--impl", impl, "--scenario", scenario, "--fail-rank", str(fail_rank),
                "--timeout-s", str(timeout_s), "--out", str(out)]
        procs: list[tuple[int, subprocess.Popen[bytes]]] = []
        if mode == "plain":
            port = _free_port()
            for rank in range(n):
                if scenario == "stuck" and rank == fail_rank:
                    continue  # missing: never started
                env = clean_env(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank),
                                LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                with (out / f"err{rank}.txt").open("wb") as err:
                    procs.append((rank, subprocess.Popen(
                        [PYTHON, WORKER, *args], env=env, stdout=subprocess.DEVNULL, stderr=err,
                        stdin=subprocess.DEVNULL, start_new_session=True)))
        else:
            cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(n), "--monitor-interval", "0.1",
                   WORKER, *args]
            with (out / "err_torchrun.txt").open("wb") as err:
                procs.append((-1, subprocess.Popen(
                    cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                    start_new_session=True)))
        started = time.time()
        exits: dict[int, float] = {}
        timed_out = False
        while len(exits) < len(procs):
            for rank, proc in procs:
                if rank not in exits and proc.poll() is not None:
                    exits[rank] = time.time()
            if time.time() - started > bound_s:
                timed_out = True
                for _, proc in procs:
                    if proc.poll() is None:
                        kill_tree(proc)
                break
            time.sleep(0.005)
        events = _events(out)
        if scenario == "stuck":
            present = [e["ready"] for r, e in events.items() if r != fail_rank and "ready" in e]
            t_ref = max(present) if present else float("nan")
        else:
            t_ref = events.get(fail_rank, {}).get("fail", float("nan"))
        last_exit = max(exits.values()) if exits and not timed_out else float("nan")
        survivors_err = " ".join((out / f"err{r}.txt").read_text(errors="replace")
                                 for r, _ in procs if r not in (fail_rank, -1))
        named = bool(re.search(rf"\brank[s]?:? {fail_rank}\b|missing ranks: {fail_rank}\b", survivors_err))
        return {
            "seconds": None if timed_out else last_exit - t_ref,
            "timed_out": timed_out,
            "codes": {str(r): p.returncode for r, p in procs},
            "names_culprit": named if mode == "plain" else None,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2", help="world sizes (default: 2)")
    parser.add_argument("--modes", default="plain,torchrun", help="plain, torchrun (default: both)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of: " + "; ".join(SCENARIOS))
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender and case (default: 3)")
    parser.add_argument("--timeout-s", type=float, default=10.0,
                        help="start-up/collective timeout T (default: 10)")
    parser.add_argument("--bound", type=float, default=None, help="kill a run after this many seconds")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/failure.json")
    add_resolver_flag(parser)
    args = parser.parse_args()
    resolver = setup_resolver(args)
    bound = args.bound or 3 * args.timeout_s + 20
    labels = [s.strip() for s in args.scenarios.split(",") if s.strip()]

    results: list[dict[str, Any]] = []
    for n in parse_sizes(args.sizes):
        for mode in args.modes.split(","):
            for label in labels:
                scenario, fail_rank = SCENARIOS[label]
                if mode == "torchrun" and scenario == "stuck" and fail_rank == 0:
                    continue
                runs: dict[str, list[dict[str, Any]]] = {"raw": [], "runtime": []}
                case = Case(scenario, fail_rank, mode, n, args.timeout_s, bound)
                for i in range(args.repeats):
                    for impl in (["raw", "runtime"] if i % 2 == 0 else ["runtime", "raw"]):
                        runs[impl].append(one_run(impl, case))
                    print(f"N={n} {mode} {label} {i + 1}/{args.repeats}: "
                          + ", ".join(f"{k} {v[-1]['seconds']}" for k, v in runs.items()), file=sys.stderr)
                row: dict[str, Any] = {"n": n, "mode": mode, "scenario": label, "load": loadavg()}
                for impl, rs in runs.items():
                    done = [r["seconds"] for r in rs if r["seconds"] is not None]
                    row[impl] = {
                        "median_s": median(done) if len(done) == len(rs) else None,
                        "runs": rs,
                        "timed_out": sum(r["timed_out"] for r in rs),
                        "names_culprit": rs[0]["names_culprit"],
                    }
                results.append(row)

    def cell(r: dict[str, Any]) -> str:
        if r["median_s"] is None:
            return f"> {bound:.0f} s ({r['timed_out']}/{len(r['runs'])} killed)"
        return f"{r['median_s']:.2f} s"

    def named(r: dict[str, Any]) -> str:
        return "-" if r["names_culprit"] is None else ("yes" if r["names_culprit"] else "no")

    headers = ["N", "launch", "scenario", "raw torch", "distruntime", "ratio", "names culprit (raw / drt)"]
    print(table(headers, [
        [r["n"], r["mode"], r["scenario"], cell(r["raw"]), cell(r["runtime"]),
         f"{r['runtime']['median_s'] / r['raw']['median_s']:.2f}"
         if r["raw"]["median_s"] and r["runtime"]["median_s"] else "-",
         f"{named(r['raw'])} / {named(r['runtime'])}"]
        for r in results
    ]))
    if not args.no_save:
        path = save(result_name("failure", resolver), {
            "machine": machine(), "resolver": resolver, "repeats": args.repeats, "timeout_s": args.timeout_s,
            "bound_s": bound, "results": results})
        print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
