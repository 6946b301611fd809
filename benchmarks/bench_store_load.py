"""Store load of real ranks, counted on the wire: raw torch versus distruntime.

N real ranks (processes, gloo) on this host; a real ``TCPStore`` hosted by the bench
(torchrun-like: ``TORCHELASTIC_USE_AGENT_STORE=True``, so every rank, rank 0 included, is a
client), and every rank's store traffic through the counting proxy (``benchmarks/wire.py``):
``MASTER_ADDR:MASTER_PORT`` point at the proxy. Phases are marked by the bench when every
rank has printed its marker (ranks wait on a go *file*, which costs the store nothing):

* ``startup``: connect, init, first all_reduce (raw torch and distruntime);
* ``settle``: the first 3 s after start-up (the first watchdog tick starts each host's
  waiter: a store connection and its ``wait``; rank 0 announces the job for ``where``);
* ``steady``: then ``--steady`` seconds of an idle, healthy job (distruntime, default settings:
  hang detection on);
* ``teardown``: leaving the runtime (raw: ``destroy_process_group``);
* ``hang``: the last rank sleeps before a collective (``hang_timeout_s=2``), until every
  rank is out;
* ``raise``: rank 1 raises after start-up, until every rank is out;
* ``stop``: ``graceful_stop=True``: its start-up and 20 ``should_stop()`` calls.

Usage::

    python benchmarks/bench_store_load.py --sizes 2,4,8,16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import PYTHON, WORKERS, clean_env, kill_tree, machine, parse_sizes, save, table
from torch.distributed import TCPStore
from wire import ProxyProcess

WORKER = str(WORKERS / "store_load_worker.py")


def job(mode: str, n: int, steady_s: float, timeout_s: float = 90.0) -> dict[str, Any]:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with ProxyProcess("127.0.0.1", server.port) as proxy, tempfile.TemporaryDirectory() as tmp:
        go = str(Path(tmp) / "go")
        procs = []
        proxy.mark("startup")
        for rank in range(n):
            env = clean_env(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n),
                            GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(proxy.port),
                            TORCHELASTIC_RUN_ID=f"wire{os.getpid()}{mode}{n}", TORCHELASTIC_RESTART_COUNT="0",
                            TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_MAX_RESTARTS="0")
            procs.append(subprocess.Popen([PYTHON, WORKER, mode, go], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True, start_new_session=True))
        deadline = time.monotonic() + timeout_s

        def await_line(marker: str) -> bool:
            for p in procs:
                assert p.stdout is not None
                while time.monotonic() < deadline:
                    line = p.stdout.readline()
                    if not line or line.strip() == marker:
                        break
            return time.monotonic() < deadline

        ok = await_line("READY")
        started_at = time.monotonic()
        phase = {"raw": "teardown", "runtime": "steady", "hang": "hang", "raise": "raise",
                 "stop": "stop"}[mode]
        if mode == "runtime":  # the first tick starts each host's waiter: not steady state yet
            proxy.mark("settle")
            time.sleep(3.0)
        proxy.mark(phase)
        if mode == "runtime":
            time.sleep(steady_s)
        Path(go).touch()
        if mode == "stop":
            await_line("CALLS")
            proxy.mark("stop_calls")
            Path(go + ".2").touch()
        if mode in ("runtime", "stop"):
            await_line("TEARDOWN")
            proxy.mark("teardown")
        Path(go + ".t").touch()
        for p in procs:
            try:
                p.wait(max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                kill_tree(p)
                ok = False
        elapsed = time.monotonic() - started_at
        proxy.mark("end")
        summary = proxy.summary()
    return {"mode": mode, "n": n, "ok": ok, "seconds_after_ready": elapsed,
            "phases": {k: {"requests": v["requests"], "by_type": v["by_type"]}
                       for k, v in summary.items() if k != "end"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[2, 4, 8, 16])
    parser.add_argument("--steady", type=float, default=5.0)
    parser.add_argument("--modes", default="raw,runtime,hang,raise,stop")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    runs = []
    for n in args.sizes:
        for mode in args.modes.split(","):
            run = job(mode, n, args.steady)
            runs.append(run)
            print(f"N={n} {mode}: " + ", ".join(f"{k} {v['requests']}" for k, v in run["phases"].items())
                  + ("" if run["ok"] else " (TIMED OUT)"), file=sys.stderr)
    rows = []
    for n in args.sizes:
        by = {r["mode"]: r["phases"] for r in runs if r["n"] == n}

        def req(mode: str, phase: str, by: dict[str, Any] = by) -> int:
            return int(by.get(mode, {}).get(phase, {}).get("requests", 0))
        rows.append([n, req("raw", "startup"), req("runtime", "startup"), req("runtime", "settle"),
                     req("raw", "teardown"),
                     req("runtime", "teardown"), f"{req('runtime', 'steady') / n / args.steady:.3f}",
                     req("hang", "hang"), req("raise", "raise"), req("stop", "startup"),
                     req("stop", "stop") + req("stop", "stop_calls")])
    print(table(["N", "start-up raw", "start-up distruntime", "settle", "teardown raw",
                 "teardown distruntime",
                 "steady req/s/rank", "hang incident", "one rank raises", "start-up graceful_stop",
                 "20 should_stop calls (together)"], rows))
    if not args.no_save:
        print(save("store_load", {"machine": machine(), "steady_s": args.steady, "runs": runs,
                                  "note": "counts are exact; a shared 2-core machine"}), file=sys.stderr)


if __name__ == "__main__":
    main()
