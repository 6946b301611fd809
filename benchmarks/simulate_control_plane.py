"""The control plane at scale, simulated with the library's own code against one real TCPStore.

N simulated ranks on N / ``--per-host`` simulated hosts. Each host is one real
:class:`distruntime.control.channel.HostChannel` (a directory in /dev/shm) and one real
:class:`distruntime.control.waiter.HostWaiter` thread with its own store connection,
blocked in ``wait ev/<k>``. Ranks are not processes: their node-local slots are written
with a synthetic state record (what a rank's agent writes while it answers an incident:
Flight Recorder progress, pending collective, main-thread stack). One rank is stuck in
user code at ``--stuck-at``; the rest wait in ``all_reduce`` #11. The assembler runs the
agent's own calls: :func:`incident.open_event`, :func:`incident.assemble`,
:func:`incident.publish_verdict`. Everything on the store therefore is the real protocol;
only the local evidence is faked.

The store is a real ``TCPStore``; every request goes through the counting proxy
(``benchmarks/wire.py``, in a process of its own). Measured per N: requests in steady
state (waiters blocked), requests of one hang incident, time to verdict; and the store's
raw capacity on this machine for the incident's request mix (no proxy).

Usage::

    python benchmarks/simulate_control_plane.py                     # N = 64, 256, 1024, 4096
    python benchmarks/simulate_control_plane.py --sizes 64,256 --no-save
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from _common import loadavg, machine, parse_sizes, save, table
from torch._C._distributed_c10d import PrefixStore
from torch.distributed import TCPStore
from wire import ProxyProcess

from distruntime.control import incident
from distruntime.control.channel import HostChannel
from distruntime.control.verdict import HangReport, parse_report
from distruntime.control.waiter import HostWaiter, WaiterConfig

STUCK_AT = "/job/train.py:57 in load_batch"
WAIT_AT = "/job/train.py:42 in step"
C10D = "/venv/site-packages/torch/distributed/distributed_c10d.py:2801 in all_reduce"


def rank_record(rank: int, host: str, stuck: bool, since: float, k: int,  # noqa: PLR0917
                stuck_at: str = STUCK_AT) -> dict[str, Any]:
    """The slot a rank's agent writes once it answered incident ``k`` (see agent._state_record)."""
    now = time.time()
    base: dict[str, Any] = {"rank": rank, "host": host, "pid": 0, "start": 0, "main": 1, "t": now,
                            "tick": 0.5, "waited": 0.0 if stuck else now - since, "stack_file": ""}
    if stuck:
        record = base | {"where": stuck_at, "stack": ["/job/train.py:80 in main", stuck_at],
                         "groups": {"0": {"enqueued": 10, "completed": 10, "desc": "default"}},
                         "pending": {}, "entries": []}
    else:
        entry = {"group": "0", "seq": 11, "op": "all_reduce", "sizes": [[1024]], "dtypes": ["Float"],
                 "completed": False, "created": since}
        record = base | {"where": WAIT_AT, "stack": ["/job/train.py:80 in main", WAIT_AT, C10D],
                         "groups": {"0": {"enqueued": 11, "completed": 10, "desc": "default"}},
                         "pending": {"0": {"seq": 11, "since": since, "op": "all_reduce"}},
                         "entries": [entry]}
    slot = dict(record)
    slot.update(answered=k, acted=0, record=record)
    return slot


class Job:
    """N simulated ranks on hosts of ``per_host`` ranks, each host with a real waiter."""

    def __init__(self, store_port: int, n: int, per_host: int, stuck: int, threshold_s: float) -> None:
        self.n, self.per_host, self.stuck = n, per_host, stuck
        self.namespace = f"distruntime-sim-{uuid.uuid4().hex[:8]}"
        self.port = store_port
        self.threshold_s = threshold_s
        self.stuck_at = STUCK_AT
        self.hosts = [f"sim-host-{h:05d}" for h in range((n + per_host - 1) // per_host)]
        self.channels: list[HostChannel] = []
        self.waiters: list[HostWaiter] = []
        tick = min(max(threshold_s / 10, 0.2), 1.0)
        self.tick = tick
        for h, host in enumerate(self.hosts):
            channel = HostChannel.open(self.namespace, host)
            assert channel is not None
            self.channels.append(channel)
            config = WaiterConfig("127.0.0.1", store_port, self.namespace, host, h * per_host, n, tick,
                                  2 * tick + 1.0)
            self.waiters.append(HostWaiter(channel, config))
        self.store = PrefixStore(self.namespace, TCPStore("127.0.0.1", store_port, is_master=False,
                                                          wait_for_workers=False,
                                                          timeout=timedelta(seconds=120)))

    def ranks_of(self, h: int) -> range:
        return range(h * self.per_host, min((h + 1) * self.per_host, self.n))

    def check_in(self) -> None:
        """Each rank's check-in record (``who/<r>``), as rendezvous writes it: read for silent hosts."""
        keys = [f"who/{r}" for r in range(self.n)]
        values = [json.dumps({"rank": r, "host": self.hosts[r // self.per_host]}) for r in range(self.n)]
        for i in range(0, self.n, 1024):
            self.store.multi_set(keys[i:i + 1024], values[i:i + 1024])

    def start_waiters(self) -> None:
        for waiter in self.waiters:
            waiter.start()

    def await_waiters(self, timeout_s: float = 120.0) -> None:
        """Until every host's waiter is connected (it writes ``leader`` to its host file
        then) and its first ``wait`` is on the wire."""
        deadline = time.monotonic() + timeout_s
        for channel in self.channels:
            while "leader" not in channel.read_host() and time.monotonic() < deadline:
                time.sleep(0.02)
        time.sleep(0.5)

    def write_slots(self, k: int, since: float) -> None:
        for h, channel in enumerate(self.channels):
            for rank in self.ranks_of(h):
                channel.write_slot(rank, rank_record(rank, self.hosts[h], rank == self.stuck, since, k,
                                                     self.stuck_at))

    def incident(self, k: int, claimant: int) -> tuple[HangReport, float, list[bytes | None]]:
        """Incident ``k`` opened by ``claimant``: the agent's claim and assembly, timed; the
        verdict each host's waiter read."""
        started = time.perf_counter()
        won, _ = incident.open_event(self.store, k, {"kind": "hang", "rank": claimant, "t": time.time()})
        assert won
        report = incident.assemble(self.store, k, self.n, self.threshold_s, window_s=2 * self.tick + 1.0 + 30)
        incident.publish_verdict(self.store, k, report)
        elapsed = time.perf_counter() - started
        deadline = time.monotonic() + 60
        verdicts: list[bytes | None] = []
        for channel in self.channels:
            while time.monotonic() < deadline and int(channel.read_host().get("verdict_round", 0)) < k:
                time.sleep(0.01)
            verdicts.append(channel.read_host().get("verdict", "").encode() or None)
        return report, elapsed, verdicts

    def close(self) -> None:
        for waiter in self.waiters:
            waiter._closing.set()  # the threads end after their verdict; no socket shutdown needed
        for channel in self.channels:
            shutil.rmtree(channel.path, ignore_errors=True)


def simulate_incident(store_port: int, proxy: ProxyProcess, n: int, per_host: int, steady_s: float, *,
                      stuck: int | None = None, threshold_s: float = 5.0) -> dict[str, Any]:
    stuck = n // 3 if stuck is None else stuck
    job = Job(proxy.port, n, per_host, stuck, threshold_s)
    try:
        proxy.mark(f"n{n}-checkin")
        job.check_in()
        proxy.mark(f"n{n}-waiters-start")
        job.start_waiters()
        job.await_waiters()
        proxy.mark(f"n{n}-steady")
        time.sleep(steady_s)
        proxy.mark(f"n{n}-incident")
        job.write_slots(1, time.time() - threshold_s)
        report, elapsed, verdicts = job.incident(1, (stuck + 1) % n)
        time.sleep(0.3)
        proxy.mark(f"n{n}-after")
        summary = proxy.summary()
    finally:
        job.close()
    steady = summary.get(f"n{n}-steady", {}).get("requests", 0)
    inc = summary.get(f"n{n}-incident", {})
    agreed = sum(1 for v in verdicts if v is not None and parse_report(v) is not None
                 and parse_report(v).culprits == report.culprits)
    return {
        "n": n, "hosts": len(job.hosts), "per_host": per_host,
        "steady_requests": steady, "steady_s": steady_s,
        "steady_per_rank_per_s": steady / n / steady_s,
        "waiters_start_requests": summary.get(f"n{n}-waiters-start", {}).get("requests", 0),
        "incident_requests": inc.get("requests", 0), "incident_by_type": inc.get("by_type", {}),
        "incident_keys": dict(list(inc.get("keys", {}).items())[:12]),
        "incident_per_rank": inc.get("requests", 0) / n,
        "time_to_verdict_s": elapsed, "hosts_with_verdict": agreed,
        "culprits": list(report.culprits), "summary": report.summary,
    }


def capacity(port: int, seconds: float = 2.0, clients: int = 4) -> dict[str, Any]:
    """Requests/s the store serves on this machine for an incident-like mix (direct, no proxy):
    compare_set, append, add, check in rotation; ``clients`` threads, one connection each."""
    stop = threading.Event()
    counts = [0] * clients

    def work(i: int) -> None:
        c = TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
        n = 0
        while not stop.is_set():
            c.compare_set(f"cap/{i}/{n % 64}", "", "x" * 200)
            c.append(f"cap/{i}/log", "y\n")
            c.add(f"cap/{i}/n", 1)
            c.check([f"cap/{i}/log"])
            n += 4
        counts[i] = n

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    total = sum(counts)
    return {"requests": total, "seconds": seconds, "clients": clients, "per_s": total / seconds,
            "note": "4 client threads in one Python process on a shared 2-core machine: a lower bound"}


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares a + b*N."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs) or 1.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[64, 256, 1024, 4096])
    parser.add_argument("--per-host", type=int, default=8, help="ranks per simulated host (default 8)")
    parser.add_argument("--steady", type=float, default=5.0, help="seconds of steady state measured per N")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    cap = capacity(server.port)
    print(f"store capacity (direct, incident mix): {cap['per_s']:.0f} req/s", file=sys.stderr)
    rows = []
    with ProxyProcess("127.0.0.1", server.port) as proxy:
        for n in args.sizes:
            row = simulate_incident(server.port, proxy, n, args.per_host, args.steady)
            rows.append(row)
            print(f"N={n}: {row['incident_requests']} requests, {row['time_to_verdict_s']:.2f} s to verdict, "
                  f"culprits {row['culprits']}, {row['hosts_with_verdict']}/{row['hosts']} hosts got it",
                  file=sys.stderr)
    a, b = fit([(r["n"], r["incident_requests"]) for r in rows])
    per_s = cap["per_s"]
    extrapolated = []
    for n in (1024, 16384, 100000):
        requests = a + b * n
        extrapolated.append({"n": n, "incident_requests": round(requests), "store_s": requests / per_s,
                             "steady_req_s": 2 * (n / args.per_host) / 300.0,
                             "steady_share": 2 * (n / args.per_host) / 300.0 / per_s})
    print(table(["N", "hosts", "steady req/s/rank", "incident requests", "per rank", "time to verdict s"],
                [[r["n"], r["hosts"], f"{r['steady_per_rank_per_s']:.4f}", r["incident_requests"],
                  f"{r['incident_per_rank']:.2f}", f"{r['time_to_verdict_s']:.2f}"] for r in rows]))
    print()
    print(f"fit: incident requests = {a:.0f} + {b:.3f} N; capacity {per_s:.0f} req/s")
    print(table(["N", "requests per incident", "store time per incident", "steady req/s (re-arm)", "share"],
                [[e["n"], e["incident_requests"], f"{e['store_s'] * 1000:.1f} ms", f"{e['steady_req_s']:.2f}",
                  f"{e['steady_share'] * 100:.3f} %"] for e in extrapolated]))
    payload = {"machine": machine(), "load_after": loadavg(), "per_host": args.per_host, "capacity": cap,
               "runs": rows, "fit": {"a": a, "b": b}, "extrapolated": extrapolated,
               "note": "2 CPU cores shared with other jobs: times are noisy; request counts are exact"}
    if not args.no_save:
        print(save("control_plane_sim", payload), file=sys.stderr)
        plot(payload)


def plot(payload: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    from _common import REPO

    runs = payload["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in runs]
    ax.loglog(ns, [r["incident_requests"] for r in runs], "o-", label="measured (simulator, on the wire)")
    ext = payload["extrapolated"]
    ax.loglog([e["n"] for e in ext], [e["incident_requests"] for e in ext], "x--", label="fit a + bN")
    ax.loglog(ns, [8.4 * n * n + 26 * n for n in ns], ":", label="before: 8.4 N² + 26 N")
    ax.set_xlabel("ranks N")
    ax.set_ylabel("store requests per hang incident")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    out = REPO / "docs" / "img" / "control_plane_sim.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out, file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
