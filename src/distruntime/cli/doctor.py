"""``distruntime doctor``, the part every rank runs: start the runtime, check, measure.

Each rank starts a :class:`~distruntime.DistributedRuntime`, gathers who it is (host,
pid, device, versions), checks an ``all_reduce`` result, and times ``all_reduce`` over
message sizes. Rank 0 prints the report; every rank exits non-zero when a check fails.

Bounds: the runtime's start-up timeout is half the doctor's ``--timeout`` (so a missing
rank is reported, by name, before the hard limit), the collective timeout is the whole
of it, and a watchdog thread ends the process with status 124 if it is still running at
the limit (naming the phase it was stuck in).

Bandwidth follows nccl-tests: ``algbw = bytes / time`` and
``busbw = algbw * 2 (n - 1) / n`` for ``all_reduce`` over ``n`` ranks, in GB/s (1e9).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import statistics
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from distruntime.cli._format import format_bytes, render_table
from distruntime.errors import DistRuntimeError, LaunchEnvError, RendezvousError

__all__ = [
    "EXIT_PORT_IN_USE",
    "EXIT_TIMEOUT",
    "Check",
    "DoctorOptions",
    "bus_bandwidth",
    "iterations_for",
    "message_sizes",
    "process_started",
    "run_rank",
]

logger = logging.getLogger("distruntime.doctor")

# Exit status of a rank 0 whose MASTER_PORT was taken (the --nproc parent retries once).
EXIT_PORT_IN_USE = 75  # EX_TEMPFAIL
# Exit status when the doctor's --timeout expires (the convention of timeout(1)).
EXIT_TIMEOUT = 124
# Bytes each bandwidth size moves at most (iterations shrink for large messages).
_BYTES_PER_SIZE = 256 * 1024**2
# Reverse lookups slower than this are reported; probing stops at the limit.
_LOOKUP_WARN_S = 0.5
_LOOKUP_LIMIT_S = 2.0
# Per-rank rows shown in the table; larger jobs are summarised.
_MAX_RANK_ROWS = 64


@dataclass(frozen=True)
class DoctorOptions:
    """What ``distruntime doctor`` was asked to do.

    Example:
        >>> DoctorOptions(backend="gloo", timeout_s=120).max_bytes
        67108864
    """

    backend: str
    timeout_s: float
    min_bytes: int = 4
    max_bytes: int = 64 * 1024**2
    factor: int = 4
    iters: int = 20
    warmup: int = 3
    as_json: bool = False
    launched_by: str = ""  # "distruntime doctor --nproc N" for ranks the local launcher started


@dataclass(frozen=True)
class Check:
    """One row of the report: ``status`` is ``OK``, ``FAIL``, ``WARN`` or ``INFO``.

    Only ``FAIL`` makes the doctor exit non-zero.
    """

    name: str
    status: str
    detail: str


@dataclass
class _Result:
    checks: list[Check] = field(default_factory=list)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    bandwidth: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks)


def message_sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    """Message sizes from ``min_bytes`` to ``max_bytes``, each ``factor`` times the last,
    rounded down to whole float32 elements.

    Example:
        >>> message_sizes(4, 1024, 4)
        [4, 16, 64, 256, 1024]
    """
    if factor < 2:
        raise ValueError(f"factor must be at least 2, got {factor}")
    sizes: list[int] = []
    size = max(min_bytes, 4)
    while size <= max_bytes:
        sizes.append(size - size % 4)
        size *= factor
    return sizes


def iterations_for(size: int, iters: int) -> int:
    """Timed iterations at ``size`` bytes: ``iters``, fewer for large messages (at least 2).

    Deterministic from the size, so every rank runs the same number of collectives.

    Example:
        >>> iterations_for(4, 20), iterations_for(64 * 1024**2, 20)
        (20, 4)
    """
    return max(2, min(iters, _BYTES_PER_SIZE // size))


def bus_bandwidth(size: int, seconds: float, world_size: int) -> tuple[float, float]:
    """``(algbw, busbw)`` in GB/s for one ``all_reduce`` of ``size`` bytes (nccl-tests).

    Example:
        >>> bus_bandwidth(1_000_000_000, 1.0, 4)
        (1.0, 1.5)
    """
    algbw = size / seconds / 1e9 if seconds > 0 else 0.0
    return algbw, algbw * 2 * (world_size - 1) / world_size


class _Watchdog:
    """Ends the process with status 124 if the doctor is still running at its limit."""

    def __init__(self, deadline: float, rank: int) -> None:
        self.phase = "start-up"
        self.rank = rank
        self._deadline = deadline
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distruntime-doctor-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        if self._done.wait(max(self._deadline - time.monotonic(), 0.0)):
            return
        logger.error(
            "rank %d: doctor did not finish within its --timeout (stuck in phase: %s); exiting "
            "with status %d. A peer is probably stuck or gone: look at its log.",
            self.rank, self.phase, EXIT_TIMEOUT,
        )
        for handler in logging.getLogger("distruntime").handlers:
            handler.flush()
        os._exit(EXIT_TIMEOUT)


def process_started() -> float:
    """When this process started, on the ``time.monotonic()`` clock (Linux: from /proc;
    elsewhere: now). Lets the doctor report start-up with interpreter and imports.

    Example:
        >>> import time
        >>> process_started() <= time.monotonic()
        True
    """
    now = time.monotonic()
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        ticks = int(stat[stat.rfind(")") + 2:].split()[19])  # field 22: starttime
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return now
    return now - max(age, 0.0)


def run_rank(options: DoctorOptions, started: float, env: Mapping[str, str] | None = None) -> int:
    """Run the doctor as one rank of the job the environment describes; returns the exit status.

    ``started`` is ``time.monotonic()`` at process start (the doctor reports start-up
    time from it, imports included). Rank 0 writes the report to stdout.

    Example (one process, no launcher)::

        status = run_rank(DoctorOptions("gloo", 60, max_bytes=64), time.monotonic())  # 0: all checks passed
    """
    from distruntime.launchers import discover

    environ = os.environ if env is None else env
    try:
        launch = discover(environ)
    except LaunchEnvError as exc:
        logger.error("the launch environment is invalid: %s", exc)
        _emit(options, _failure(Check("launch environment", "FAIL", f"LaunchEnvError: {exc}")), None)
        return 1

    run = _Run(options, started, started + options.timeout_s, launch.rank, launch.world_size, launch.launcher)
    if launch.world_size > 1:
        run.rendezvous = f"{launch.master_addr}:{launch.master_port}"
    run.watchdog.start()
    try:
        return _run_checks(run, environ)
    finally:
        run.watchdog.stop()


@dataclass
class _Run:
    """One rank's doctor run: its options, bounds and results so far."""

    options: DoctorOptions
    started: float  # time.monotonic() at process start
    deadline: float
    rank: int
    world_size: int
    launcher: str
    rendezvous: str | None = None
    result: _Result = field(default_factory=_Result)
    watchdog: _Watchdog = field(init=False)

    def __post_init__(self) -> None:
        self.watchdog = _Watchdog(self.deadline, self.rank)


def _failure(*checks: Check) -> _Result:
    return _Result(checks=list(checks))


def _run_checks(run: _Run, env: Mapping[str, str]) -> int:
    from distruntime.runtime import DistributedRuntime

    options, result, rank = run.options, run.result, run.rank
    remaining = max(run.deadline - time.monotonic(), 1.0)
    startup_limit = max(remaining / 2, 1.0)
    if rank == 0:
        logger.info(
            "starting %d rank(s) with backend %r (start-up bounded to %.0fs, whole run to %.0fs)",
            run.world_size, options.backend, startup_limit, remaining,
        )
    t0 = time.monotonic()
    header: dict[str, Any] = {"backend": f"{options.backend} (requested)", "world_size": run.world_size,
                              "launcher": run.launcher, "rendezvous": run.rendezvous}
    try:
        with DistributedRuntime(
            options.backend,
            timeout_minutes=startup_limit / 60,
            collective_timeout_minutes=remaining / 60,
            env=env,
        ) as info:
            init_s = time.monotonic() - t0
            header = {"backend": info.backend, "world_size": info.world_size, "launcher": info.launcher,
                      "rendezvous": f"{info.master_addr}:{info.master_port}" if info.master_addr else None}
            _inside(run, info, init_s)
            run.watchdog.phase = "teardown"
            t_down = time.monotonic()
        teardown_s = time.monotonic() - t_down
        result.checks.append(Check("teardown", "INFO", f"rank {rank}: {teardown_s * 1e3:.0f} ms"))
    except (DistRuntimeError, RuntimeError, OSError) as exc:
        phase = run.watchdog.phase
        text = f"{type(exc).__name__}: {exc}"
        logger.error("rank %d failed during %s: %s", rank, phase, text)
        if rank == 0:
            result.checks.append(Check(phase, "FAIL", text))
            _emit(options, result, header)
        if isinstance(exc, RendezvousError) and exc.reason == "port_in_use":
            return EXIT_PORT_IN_USE
        return 1
    if rank == 0:
        _emit(options, result, header)
    return 0 if result.ok else 1


def _inside(run: _Run, info: Any, init_s: float) -> None:
    """The checks, run inside the runtime; each finished one is appended to ``run.result``."""
    import torch
    import torch.distributed as dist

    result, watchdog = run.result, run.watchdog
    rank, world = info.rank, info.world_size
    if rank == 0:
        logger.info("gathering rank records")
    watchdog.phase = "gathering rank records"
    record = {
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "local_rank": info.local_rank,
        "node_rank": info.node_rank,
        "device": str(info.device),
        "backend": info.backend,
        "torch": torch.__version__,
        "init_s": round(init_s, 4),
        "since_start_s": round(time.monotonic() - run.started, 3),
        "reverse_lookup_s": _reverse_lookup_seconds(info.master_addr, info.master_port),
    }
    records: list[Any] = [None] * world
    dist.all_gather_object(records, record)
    result.ranks = sorted(records, key=lambda r: int(r["rank"]))
    result.checks += _identity_checks(result.ranks, world)
    result.checks.append(_lookup_check(result.ranks))
    inits = [float(r["init_s"]) for r in result.ranks]
    starts = [float(r["since_start_s"]) for r in result.ranks]
    result.checks.append(Check(
        "start-up", "INFO",
        f"runtime start-up max {max(inits):.2f}s (median {statistics.median(inits):.2f}s); "
        f"ready {max(starts):.2f}s after process start, imports included",
    ))

    watchdog.phase = "all_reduce correctness"
    if rank == 0:
        logger.info("checking all_reduce results")
    ok, detail = _all_reduce_correct(info.device, rank, world)
    verdicts: list[Any] = [None] * world
    dist.all_gather_object(verdicts, (ok, detail))
    bad = {r: d for r, (good, d) in enumerate(verdicts) if not good}
    if bad:
        listed = "; ".join(f"rank {r}: {d}" for r, d in sorted(bad.items())[:8])
        result.checks.append(Check("all_reduce correct", "FAIL", listed))
    else:
        result.checks.append(Check("all_reduce correct", "OK", f"sum over {world} rank(s); {detail}"))

    watchdog.phase = "all_reduce bandwidth"
    result.bandwidth = _bandwidth(run, info.device)
    if result.bandwidth:
        best = max(result.bandwidth, key=lambda row: row["busbw_gbps"])
        small = result.bandwidth[0]
        peak = (
            f"peak busbw {best['busbw_gbps']:.3f} GB/s at {format_bytes(best['bytes'])}" if world > 1
            else "busbw is 0 for one rank (2(n-1)/n = 0)"
        )
        latency = f"latency {small['time_us']:.1f} us at {format_bytes(small['bytes'])}"
        result.checks.append(Check("all_reduce speed", "INFO", f"{latency}; {peak}"))


def _identity_checks(ranks: list[dict[str, Any]], world: int) -> list[Check]:
    checks: list[Check] = []
    seen = [int(r["rank"]) for r in ranks]
    duplicates = sorted({r for r in seen if seen.count(r) > 1})
    missing = sorted(set(range(world)) - set(seen))
    if duplicates or missing:
        detail = f"duplicated ranks {duplicates}, missing ranks {missing}"
        checks.append(Check("ranks joined", "FAIL", detail))
    else:
        checks.append(Check("ranks joined", "OK", f"{world}/{world} ranks, each rank exactly once"))

    by_host: dict[str, list[int]] = {}
    for r in ranks:
        by_host.setdefault(str(r["host"]), []).append(int(r["rank"]))
    hosts = ", ".join(f"{h} ({_ranges(rs)})" for h, rs in list(by_host.items())[:8])
    more = f", ... ({len(by_host)} hosts)" if len(by_host) > 8 else ""
    checks.append(Check("hosts", "INFO", f"{len(by_host)} host(s): {hosts}{more}"))

    devices = [(str(r["host"]), str(r["device"])) for r in ranks]
    if all(d == "cpu" for _, d in devices):
        checks.append(Check("devices", "OK", "cpu on every rank"))
    else:
        shared = {key for key in devices if devices.count(key) > 1 and key[1] != "cpu"}
        if shared:
            text = "; ".join(
                f"ranks {_ranges([int(r['rank']) for r in ranks if (r['host'], r['device']) == key])} "
                f"share {key[1]} on {key[0]}" for key in sorted(shared)[:8]
            )
            checks.append(Check("devices", "FAIL", text + " (check the visible-devices masking)"))
        else:
            checks.append(Check("devices", "OK", "each rank has its own device"))

    versions = sorted({str(r["torch"]) for r in ranks})
    backends = sorted({str(r["backend"]) for r in ranks})
    if len(versions) > 1 or len(backends) > 1:
        checks.append(Check("same software", "FAIL", f"torch versions {versions}, backends {backends}"))
    else:
        checks.append(Check("same software", "OK", f"torch {versions[0]}, backend {backends[0]}"))
    return checks


def _reverse_lookup_seconds(address: str | None, port: int | None) -> float | None:
    """The slowest reverse lookup of the rendezvous address (IPv4 and IPv4-mapped IPv6),
    in seconds, capped at ``_LOOKUP_LIMIT_S``; ``None`` for a single process.

    torch's c10d formats socket addresses with ``getnameinfo`` (a reverse DNS lookup) on
    every store connection, so a slow resolver slows every connection by as much.
    """
    if address is None or port is None:
        return None
    slowest = [0.0]

    def probe() -> None:
        try:
            infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
        except OSError:
            return
        ips = {str(info[4][0]) for info in infos}
        ips |= {f"::ffff:{ip}" for ip in ips if ":" not in ip}
        for ip in sorted(ips):
            t0 = time.monotonic()
            with contextlib.suppress(OSError):
                socket.getnameinfo((ip, port), 0)
            slowest[0] = max(slowest[0], time.monotonic() - t0)

    worker = threading.Thread(target=probe, name="distruntime-doctor-lookup", daemon=True)
    worker.start()
    worker.join(_LOOKUP_LIMIT_S)
    return round(_LOOKUP_LIMIT_S if worker.is_alive() else slowest[0], 4)


def _lookup_check(ranks: list[dict[str, Any]]) -> Check:
    times = {int(r["rank"]): r.get("reverse_lookup_s") for r in ranks}
    measured = {rank: t for rank, t in times.items() if t is not None}
    if not measured:
        return Check("name lookups", "INFO", "single process: no rendezvous connection")
    slow = sorted(rank for rank, t in measured.items() if t >= _LOOKUP_WARN_S)
    worst = max(measured.values())
    if slow:
        return Check("name lookups", "WARN", (
            f"reverse DNS of the rendezvous address took {worst:.1f}s"
            f"{'+' if worst >= _LOOKUP_LIMIT_S else ''} on ranks {_ranges(slow)}; torch looks up "
            "every store connection's address the same way and waits as long. "
            "Fix: make the resolver answer, or list the address in /etc/hosts"))
    return Check("name lookups", "OK", f"reverse DNS of the rendezvous address: at most {worst * 1e3:.1f} ms")


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    spans: list[list[int]] = []
    for r in sorted(set(ranks)):
        if spans and spans[-1][1] + 1 == r:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _synchronize(device: Any) -> None:
    import torch

    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def _all_reduce_correct(device: Any, rank: int, world: int) -> tuple[bool, str]:
    """Sum known tensors (a constant, a ramp, a 4 MiB ramp) and compare exactly."""
    import torch
    import torch.distributed as dist

    for numel in (1, 4099, 512 * 1024):
        # Integer-valued float64: every partial sum is exact, so == is the right test.
        ramp = torch.arange(numel, dtype=torch.float64, device=device)
        tensor = ramp + float(rank * numel)
        dist.all_reduce(tensor)
        expected = ramp * world + float(numel * world * (world - 1) // 2)
        if not torch.equal(tensor, expected):
            wrong = int((tensor != expected).nonzero()[0].item())
            return False, (
                f"{numel} float64 elements: element {wrong} is {tensor[wrong].item()}, "
                f"expected {expected[wrong].item()}"
            )
    return True, "float64 ramps of 1, 4099 and 524288 elements exact"


def _bandwidth(run: _Run, device: Any) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    options, watchdog, rank, world = run.options, run.watchdog, run.rank, run.world_size

    sizes = message_sizes(options.min_bytes, options.max_bytes, options.factor)
    rows: list[dict[str, Any]] = []
    for index, size in enumerate(sizes, 1):
        watchdog.phase = f"all_reduce bandwidth at {format_bytes(size)}"
        count = size // 4
        tensor = torch.zeros(count, dtype=torch.float32, device=device)
        iters = iterations_for(size, options.iters)
        for _ in range(max(1, min(options.warmup, iters))):
            dist.all_reduce(tensor)
        _synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(tensor)
        _synchronize(device)
        elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        seconds = float(elapsed.item())
        algbw, busbw = bus_bandwidth(size, seconds, world)
        rows.append({"bytes": size, "count": count, "dtype": "float32", "iters": iters,
                     "time_us": seconds * 1e6, "algbw_gbps": algbw, "busbw_gbps": busbw})
        if rank == 0:
            logger.info("all_reduce %d/%d: %s, %d iters, %.1f us, busbw %.3f GB/s",
                        index, len(sizes), format_bytes(size), iters, seconds * 1e6, busbw)
        del tensor
    return rows


def _emit(options: DoctorOptions, result: _Result, header: Mapping[str, Any] | None) -> None:
    import sys

    if options.as_json:
        payload = {
            "ok": result.ok,
            **(dict(header) if header else {}),
            "launched_by": options.launched_by or None,
            "checks": [asdict(c) for c in result.checks],
            "ranks": result.ranks,
            "bandwidth": result.bandwidth,
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        sys.stdout.write(render_report(result, header, options.launched_by))
    sys.stdout.flush()


def render_report(result: _Result, header: Mapping[str, Any] | None, launched_by: str = "") -> str:
    """The doctor's report as text: checks, ranks, bandwidth, verdict."""
    out: list[str] = []
    if header:
        where = f", rendezvous {header['rendezvous']}" if header.get("rendezvous") else ""
        by = f" (started by {launched_by})" if launched_by else ""
        out.append(f"distruntime doctor: {header['world_size']} rank(s), backend {header['backend']}, "
                   f"launcher {header['launcher']}{by}{where}")
    else:
        out.append("distruntime doctor")
    checks = [[c.name, c.status, c.detail] for c in result.checks]
    out += ["", render_table(["check", "result", "detail"], checks), ""]
    if result.ranks:
        rows = [[r["rank"], r["host"], r["pid"], r["local_rank"], r["device"], f"{r['init_s']:.3f}"]
                for r in result.ranks[:_MAX_RANK_ROWS]]
        out += [render_table(["rank", "host", "pid", "local rank", "device", "start-up (s)"], rows)]
        if len(result.ranks) > _MAX_RANK_ROWS:
            out.append(f"... {len(result.ranks) - _MAX_RANK_ROWS} more ranks (use --json for all)")
        out.append("")
    if result.bandwidth:
        rows = [[format_bytes(b["bytes"]), b["count"], b["dtype"], b["iters"], f"{b['time_us']:.1f}",
                 f"{b['algbw_gbps']:.3f}", f"{b['busbw_gbps']:.3f}"] for b in result.bandwidth]
        headers = ["size", "count", "type", "iters", "time (us)", "algbw (GB/s)", "busbw (GB/s)"]
        out += ["all_reduce (sum; busbw = algbw * 2(n-1)/n, GB/s = 1e9 B/s; time: slowest rank)",
                render_table(headers, rows), ""]
    failed = [c.name for c in result.checks if c.status == "FAIL"]
    out.append(f"doctor: FAILED ({', '.join(failed)})" if failed else "doctor: all checks passed")
    return "\n".join(out) + "\n"
