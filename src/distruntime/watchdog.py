"""Mid-job hang detection: a side thread per rank that costs nothing per collective.

Each rank runs one daemon thread while its runtime is active. Every *tick*
(``hang_timeout_s / 10``, between 0.2 and 1 s) it

1. re-arms ``faulthandler.dump_traceback_later``: a dead man's switch. If the main thread
   holds the GIL in native code, this thread cannot re-arm it, and faulthandler's own C
   thread writes every Python stack to a per-process file without needing the GIL;
2. reads torch's Flight Recorder progress counters (last enqueued / completed collective
   of every process group, a fraction of a millisecond) and notes since when a collective
   is pending;
3. writes a small heartbeat to the rendezvous store (progress, where the main thread is);
4. checks the store's incident counter.

Nothing wraps a collective. When a rank has waited in a collective for longer than the
threshold, it opens an *incident*: every rank that can still answer publishes a state
record (its stack, its last collectives with op, shapes and dtypes, and what ``/proc``
shows of the silent ranks on its host); the rank that opened it assembles one verdict
(:func:`distruntime.hangs.build_report`) and publishes it. If it is a hang, every rank
then ends: a rank running Python is interrupted (SIGURG, whose default action is to be
ignored, so no other use is disturbed) and raises :class:`~distruntime.HangError`; a rank
blocked in a collective has its group aborted underneath it (NCCL abort; for gloo, which
has no abort, its connections to the job's hosts are shut down), so the collective fails
and the runtime raises ``HangError`` instead; a rank that cannot answer (GIL held,
stopped) is killed by a live peer on its host after its state was read. Whatever is still
in its runtime ``_EXIT_GRACE_S`` later is ended by its own watchdog.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import IO, Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Store

from distruntime.errors import HangError
from distruntime.hangs import (
    HangReport,
    build_report,
    flight_progress,
    innermost_user_frame,
    own_stack,
    parse_entries,
    parse_faulthandler,
    process_state,
)
from distruntime.rendezvous import Rendezvous
from distruntime.teardown import DaemonThread

__all__ = [
    "Watchdog", "WatchdogConfig", "collect_report", "flight_recorder_available", "hang_threshold",
    "job_report", "stack_file_path", "start_watchdog",
]

logger = logging.getLogger("distruntime")

ENV_VAR = "DISTRUNTIME_HANG_TIMEOUT_S"
# Root-store key (outside any namespace) where rank 0 announces the live rendezvous, so
# that ``distruntime where HOST:PORT`` can find the job's keys without writing anything.
POINTER_KEY = "distruntime/current"
# The signal that interrupts a rank's main thread once a hang is decided. Its default
# action is "ignore", so a delivery meant for someone else is harmless.
INTERRUPT_SIGNAL = signal.SIGURG
# After the verdict, how long a rank may take to leave its runtime before its watchdog
# ends the process itself (a main thread that swallowed HangError, a native call that
# ignores signals).
_EXIT_GRACE_S = 5.0
_EXIT_CODE = 1
# How long ranks get to answer an incident, beyond two ticks.
_ANSWER_WINDOW_S = 1.0
_STORE_OP_TIMEOUT = timedelta(seconds=5)
_STACK_DIR = os.path.join(tempfile.gettempdir(), "distruntime-stacks")
# With no explicit threshold, the verdict is made this long before torch's own
# collective timeout fires, so that the timeout error can already carry it.
_DEFAULT_LEAD_S = 10.0


def hang_threshold(hang_timeout_s: float | None, collective_timeout_s: float,
                   env: dict[str, str] | None = None) -> float:
    """The threshold in force: the argument, else ``DISTRUNTIME_HANG_TIMEOUT_S``, else
    just under the group's collective timeout. ``inf`` (or ``off``) disables detection.

    Example:
        >>> hang_threshold(5.0, 1800.0), hang_threshold(None, 1800.0, {}), hang_threshold(None, 12.0, {})
        (5.0, 1790.0, 9.0)
        >>> hang_threshold(None, 600.0, {"DISTRUNTIME_HANG_TIMEOUT_S": "off"})
        inf
    """
    if hang_timeout_s is None:
        raw = (os.environ if env is None else env).get(ENV_VAR, "").strip()
        if raw.lower() in ("off", "inf", "none", "disabled"):
            return math.inf
        if raw:
            try:
                hang_timeout_s = float(raw)
            except ValueError:
                from distruntime.errors import LaunchEnvError

                raise LaunchEnvError(
                    f"{ENV_VAR}={raw!r} is not a number of seconds. Fix: set it to e.g. 300, or "
                    "'off' to disable hang detection.", variable=ENV_VAR, value=raw) from None
    if hang_timeout_s is None:
        lead = min(_DEFAULT_LEAD_S, collective_timeout_s * 0.25)
        return max(collective_timeout_s - lead, 1.0)
    if not hang_timeout_s > 0:
        raise ValueError(f"hang_timeout_s must be positive (or inf to disable), got {hang_timeout_s!r}")
    return float(hang_timeout_s)


def start_watchdog(rdzv: Rendezvous, backend: str, hang_timeout_s: float | None,
                   collective_timeout_minutes: float | None, store: Store | None = None) -> Watchdog | None:
    """Start this rank's watchdog (the runtime's one line); None when detection is off.

    ``store`` is the store given to the runtime, if any (its port is never aborted).
    """
    if collective_timeout_minutes is not None:
        collective_s = collective_timeout_minutes * 60
    else:
        default = getattr(dist.distributed_c10d, "_get_default_timeout", None)
        try:
            collective_s = default(backend).total_seconds() if default else 1800.0
        except (TypeError, ValueError, RuntimeError):
            collective_s = 600.0 if "nccl" in backend else 1800.0
    threshold = hang_threshold(hang_timeout_s, collective_s)
    if math.isinf(threshold):
        logger.debug("hang detection is off")
        return None
    ports = frozenset(int(p) for p in (rdzv.launch.master_port, _port_of(store), _port_of(rdzv.store)) if p)
    launch = rdzv.launch
    config = WatchdogConfig(launch.rank, launch.world_size, threshold, backend, ports, rdzv.namespace)
    watchdog = Watchdog(rdzv.store, config)
    watchdog.start()
    logger.debug("%r started", watchdog)
    return watchdog


def _port_of(store: Store | None) -> int | None:
    """The TCP port behind a store, through any PrefixStore wrappers."""
    while store is not None and not hasattr(store, "port"):
        store = getattr(store, "underlying_store", None)
    return int(store.port) if store is not None else None


def stack_file_path(pid: int) -> str:
    """Where the watchdog of process ``pid`` has faulthandler write its stacks."""
    return os.path.join(_STACK_DIR, f"{pid}.txt")


@dataclass(frozen=True)
class WatchdogConfig:
    """What one rank's watchdog needs to know."""

    rank: int
    world_size: int
    threshold_s: float
    backend: str
    keep_ports: frozenset[int]  # the rendezvous store's port: never aborted
    namespace: str = ""  # the rendezvous key prefix, announced for ``distruntime where``

    @property
    def tick_s(self) -> float:
        return min(max(self.threshold_s / 10, 0.2), 1.0)


class Watchdog:
    """One rank's hang watchdog (see the module docstring). Started and stopped by the runtime."""

    def __init__(self, store: Store, config: WatchdogConfig) -> None:
        self.store = store
        self.config = config
        self.report: HangReport | None = None  # set once a hang verdict is in
        self.ticks = 0  # healthy-path cost, for benchmarks: ticks run and their CPU time
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._thread: DaemonThread | None = None  # started by start()
        self._host = socket.gethostname()
        self._pid = os.getpid()
        self._main = threading.main_thread().ident or 0
        self._pending: dict[tuple[str, int], float] = {}
        self._round = 0
        self._quiet_until = 0.0
        self._stack_file: IO[str] | None = None
        self._previous_handler: Any = None
        self._handler_installed = False
        self._raised = False
        self._group_names: dict[str, str] = {}
        self._described: dict[tuple[str, int], dict[str, Any]] = {}
        self._kill_lock = threading.Lock()
        self._kill_done = False

    def __repr__(self) -> str:
        running = self._thread is not None and self._thread.is_alive()
        state = "hang decided" if self.report else ("running" if running else "stopped")
        return (f"Watchdog(rank={self.config.rank}, threshold_s={self.config.threshold_s:g}, "
                f"tick_s={self.config.tick_s:g}, {state})")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        os.makedirs(_STACK_DIR, exist_ok=True)
        self._stack_file = open(stack_file_path(self._pid), "w+", encoding="utf-8")  # noqa: SIM115 - lives with the thread
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(INTERRUPT_SIGNAL, self._on_interrupt)
            self._handler_installed = True
        # Armed now, not at the first tick: a main thread that takes the GIL for good right
        # after start-up must still leave its stack behind.
        self._rearm_stack_dump()
        self._thread = DaemonThread(self._run, "distruntime-watchdog")

    def stop(self) -> None:
        """Stop the thread (bounded), mark this rank as gone from the job, restore SIGURG."""
        self._closing.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)  # returns at once when called from the thread itself
        with contextlib.suppress(RuntimeError):
            faulthandler.cancel_dump_traceback_later()
        if self.report is None:
            with contextlib.suppress(dist.DistError):
                self.store.set(f"watch/hb/{self.config.rank}", json.dumps({"left": True, "t": time.time()}))
        if self._handler_installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(INTERRUPT_SIGNAL) == self._on_interrupt:
                signal.signal(INTERRUPT_SIGNAL, self._previous_handler)
            self._handler_installed = False
        if self._stack_file is not None:
            self._stack_file.close()
            self._stack_file = None
            with contextlib.suppress(OSError):
                os.unlink(stack_file_path(self._pid))

    def verdict_after_failure(self, wait_s: float = 6.0) -> HangReport | None:
        """The hang verdict, waiting (bounded) for the one an open incident is about to publish.

        Called by the runtime when its block raised: a collective that failed because a
        peer was aborted for a hang must raise the verdict, not a transport error.
        """
        if self.report is not None:
            return self.report
        try:
            opened = int(self.store.add("watch/round", 0))
        except dist.DistError:
            return None
        deadline = time.monotonic() + wait_s
        while opened and time.monotonic() < deadline and self.report is None:
            try:
                report = self._read_verdict(opened)
            except dist.DistError:
                break
            if report is not None:
                if report.is_hang:
                    self.report = report
                    # This rank's main thread may take the verdict before its watchdog
                    # thread acts on it (and stop() ends that thread): the duty to end
                    # the local ranks that cannot answer must not be lost with it.
                    self._kill_local_silent(report)
                break
            time.sleep(0.05)
        return self.report

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        tick = self.config.tick_s
        # The first tick comes one tick after start-up: nothing here runs on the start-up path.
        if not self._stop.wait(tick) and self.config.rank == 0:
            self._announce()
        while not self._stop.is_set():
            started = time.thread_time()
            try:
                self._tick()
            except dist.DistError as error:
                logger.debug("watchdog: store unavailable (%s); stopping", error)
                return
            except Exception:
                logger.debug("watchdog tick failed", exc_info=True)
            self.ticks += 1
            self.cpu_s += time.thread_time() - started
            if self.report is not None:
                self._end_if_still_here()
                return
            self._stop.wait(tick)

    def _announce(self) -> None:
        root = getattr(self.store, "underlying_store", None)
        if root is None or not self.config.namespace:
            return
        pointer = {"namespace": self.config.namespace, "world_size": self.config.world_size,
                   "threshold_s": self.config.threshold_s, "started": time.time()}
        with contextlib.suppress(dist.DistError):
            root.set(POINTER_KEY, json.dumps(pointer))

    def _tick(self) -> None:
        self._rearm_stack_dump()
        now = time.time()
        groups = self._progress(now)
        beat = self._heartbeat(now, groups)
        self.store.set(f"watch/hb/{self.config.rank}", json.dumps(beat))
        opened = int(self.store.add("watch/round", 0))
        if opened > self._round:
            self._handle_round(opened, assembler=False)
            return
        waited = max((now - since for since in self._pending.values()), default=0.0)
        if waited >= self.config.threshold_s and time.monotonic() >= self._quiet_until:
            me = str(self.config.rank)
            if self.store.compare_set(f"watch/open/{self._round + 1}", "", me).decode() == me:
                self.store.add("watch/round", 1)
                logger.warning("rank %d waited %.1f s in a collective: asking every rank where it stands",
                               self.config.rank, waited)
                self._handle_round(self._round + 1, assembler=True)

    def _rearm_stack_dump(self) -> None:
        handle = self._stack_file
        if handle is None:
            return
        if handle.tell() or os.fstat(handle.fileno()).st_size:
            handle.seek(0)
            handle.truncate()  # a stall that has passed: keep the file for the next one
        faulthandler.dump_traceback_later(2 * self.config.tick_s + 0.5, repeat=False, file=handle)

    def _progress(self, now: float) -> dict[str, dict[str, Any]]:
        groups = _flight_progress()
        pending = {}
        for gid, g in groups.items():
            if g["enqueued"] > g["completed"]:
                key = (gid, g["completed"] + 1)
                pending[key] = self._pending.get(key, now)
            g["desc"] = self._group_name(gid)
        if _flight_dump is None and _collective_in(own_stack()):
            # No Flight Recorder (older torch): a main thread inside a c10d collective is
            # the only sign; the collective number stays unknown (-1).
            pending[("0", -1)] = self._pending.get(("0", -1), now)
        self._pending = pending
        return groups

    def _pending_detail(self, now: float) -> dict[str, dict[str, Any]]:
        """The oldest pending collective of each group, for the heartbeat.

        Op, shapes and dtypes cost a full Flight Recorder dump, so they are read once per
        collective, and only for one pending longer than a quarter of the threshold (what
        ``distruntime where`` shows of a slow job).
        """
        detail: dict[str, dict[str, Any]] = {}
        for (gid, seq), since in sorted(self._pending.items()):
            if gid in detail:
                continue
            entry: dict[str, Any] = {"seq": seq, "since": since}
            op = _collective_in(own_stack()) if _flight_dump is None else ""
            if op:  # no Flight Recorder: the op of the main thread's frame, cheap
                entry["op"] = op
            elif now - since > max(self.config.threshold_s / 4, 2 * self.config.tick_s):
                if (gid, seq) not in self._described:
                    unfinished = [e for e in _entries() if not e["completed"]]
                    self._described = {(str(e["group"]), int(e["seq"])): e for e in unfinished}
                found = self._described.get((gid, seq))
                if found is not None:
                    entry.update(op=found["op"], sizes=found["sizes"], dtypes=found["dtypes"],
                                 since=found["created"])
            detail[gid] = entry
        return detail

    def _group_name(self, gid: str) -> str:
        if gid not in self._group_names:
            self._group_names.update(_group_names())
        return self._group_names.get(gid, "default" if gid == "0" else f"group {gid}")

    def _heartbeat(self, now: float, groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "rank": self.config.rank, "host": self._host, "pid": self._pid, "main": self._main, "t": now,
            "where": innermost_user_frame(own_stack()), "groups": groups, "tick": self.config.tick_s,
            "pending": self._pending_detail(now),
            "error_file": os.environ.get("TORCHELASTIC_ERROR_FILE", ""),
        }

    # ------------------------------------------------------------------ incidents
    def _handle_round(self, k: int, assembler: bool) -> None:
        self._round = k
        record = self._state_record()
        self.store.set(f"watch/state/{k}/{self.config.rank}", json.dumps(record))
        report: HangReport | None
        if assembler:
            report = self._assemble(k)
            self.store.set(f"watch/verdict/{k}", report.to_json())
        else:
            report = self._await_verdict(k)
        if report is None:
            return
        if not report.is_hang:
            logger.warning("watchdog: %s", report.summary)
            self._quiet_until = time.monotonic() + self.config.threshold_s
            return
        self._act(report, record)

    def _state_record(self) -> dict[str, Any]:
        now = time.time()
        groups = self._progress(now)
        record = self._heartbeat(now, groups)
        record["stack"] = own_stack()
        record["entries"] = _entries()
        op = _collective_in(record["stack"])
        if not record["entries"] and op and ("0", -1) in self._pending:
            record["entries"] = [{"group": "0", "seq": -1, "op": op, "sizes": [], "dtypes": [],
                                  "completed": False, "created": self._pending[("0", -1)]}]
        record["local"] = self._local_views(now)
        return record

    def _heartbeats(self) -> dict[int, dict[str, Any]]:
        keys = [f"watch/hb/{r}" for r in range(self.config.world_size)]
        beats: dict[int, dict[str, Any]] = {}
        for rank, key in enumerate(keys):
            if self.store.check([key]):
                beats[rank] = json.loads(self.store.get(key))
        return beats

    def _whereabouts(self) -> dict[int, tuple[str, int]]:
        found = {}
        for rank in range(self.config.world_size):
            key = f"who/{rank}"
            if self.store.check([key]):
                data = json.loads(self.store.get(key))
                found[rank] = (str(data["host"]), int(data["pid"]))
        return found

    def _local_views(self, now: float) -> dict[str, dict[str, Any]]:
        """``/proc`` state and faulthandler stack of same-host ranks whose heartbeat is stale."""
        stale_after = max(3 * self.config.tick_s, 1.5)
        beats = self._heartbeats()
        views: dict[str, dict[str, Any]] = {}
        for rank, (host, pid) in self._whereabouts().items():
            beat = beats.get(rank, {})
            if rank == self.config.rank or host != self._host or beat.get("left"):
                continue
            if "t" in beat and now - float(beat["t"]) < stale_after:
                continue
            views[str(rank)] = local_view(pid, beat.get("main"))
        return views

    def _assemble(self, k: int) -> HangReport:
        started = time.monotonic()
        deadline = started + 2 * self.config.tick_s + _ANSWER_WINDOW_S
        world = self.config.world_size
        answered: dict[int, dict[str, Any]] = {}
        while True:
            for rank in range(world):
                key = f"watch/state/{k}/{rank}"
                if rank not in answered and self.store.check([key]):
                    answered[rank] = json.loads(self.store.get(key))
            if len(answered) == world or time.monotonic() >= deadline or self._stop.is_set():
                break
            # Ranks whose heartbeat stopped will not answer either: once every rank still
            # silent is one of them, and live ones had a tick to answer, stop waiting.
            if time.monotonic() - started > 1.5 * self.config.tick_s and self._only_stale_left(answered):
                break
            time.sleep(0.05)
        return collect_report(self.store, answered, world, self.config.threshold_s, "hang")

    def _only_stale_left(self, answered: dict[int, dict[str, Any]]) -> bool:
        now, beats = time.time(), self._heartbeats()
        stale_after = max(3 * self.config.tick_s, 1.5)
        silent = [beats.get(rank, {}) for rank in range(self.config.world_size) if rank not in answered]
        return all(beat.get("left") or now - float(beat.get("t", 0)) > stale_after for beat in silent)

    def _await_verdict(self, k: int) -> HangReport | None:
        deadline = time.monotonic() + 2 * self.config.tick_s + _ANSWER_WINDOW_S + 4.0
        while time.monotonic() < deadline and not self._stop.is_set():
            found = self._read_verdict(k)
            if found is not None:
                return found
            time.sleep(0.05)
        return None

    def _read_verdict(self, k: int) -> HangReport | None:
        key = f"watch/verdict/{k}"
        if not self.store.check([key]):
            return None
        return HangReport.from_json(self.store.get(key))

    # ------------------------------------------------------------------ ending the job
    def _act(self, report: HangReport, record: dict[str, Any]) -> None:
        self.report = report
        if _responsive(report)[:1] == [self.config.rank]:
            logger.error("distributed job hangs:\n%s", report.format())
        else:
            logger.error("distributed job hangs: %s", report.summary)
        self._kill_local_silent(report)
        waiting = any(not e.get("completed") for e in record.get("entries") or [])
        if self._handler_installed and not waiting:
            signal.pthread_kill(self._main, INTERRUPT_SIGNAL)
        else:
            abort_blocked_collectives(self.config.backend, self.config.keep_ports, self._job_addresses())

    def _kill_local_silent(self, report: HangReport) -> None:
        """SIGKILL the ranks on this host that cannot answer; the lowest live local rank does it, once."""
        with self._kill_lock:
            if self._kill_done:
                return
            self._kill_done = True
        responsive = _responsive(report)
        local_live = [r.rank for r in report.ranks if r.host == self._host and r.rank in responsive]
        if not local_live or local_live[0] != self.config.rank:
            return
        beats = self._heartbeats()
        for row in report.ranks:
            if row.host != self._host or row.kind not in ("unresponsive", "stopped") or not row.pid:
                continue
            error_file = str(beats.get(row.rank, {}).get("error_file") or self._error_file_of(row.rank))
            if error_file:
                _write_error_file(error_file, HangError(report))
            logger.error("killing rank %d (pid %d): %s", row.rank, row.pid, row.detail)
            try:
                os.kill(row.pid, signal.SIGKILL)
            except OSError as error:
                logger.warning("could not kill rank %d (pid %d): %s", row.rank, row.pid, error)

    def _error_file_of(self, rank: int) -> str:
        key = f"who/{rank}"
        return str(json.loads(self.store.get(key)).get("error_file", "")) if self.store.check([key]) else ""

    def _job_addresses(self) -> set[str]:
        addresses = {"127.0.0.1", "::1"}
        for host, _pid in self._whereabouts().values():
            try:
                for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
                    addresses.add(str(info[4][0]))
            except OSError:
                continue
        return addresses

    def _end_if_still_here(self) -> None:
        if self._closing.wait(_EXIT_GRACE_S):
            return
        assert self.report is not None
        error = HangError(self.report)
        logger.error("rank %d did not leave its runtime within %.0f s of the hang verdict; exiting",
                     self.config.rank, _EXIT_GRACE_S)
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if path:
            _write_error_file(path, error)
        for handler in logging.getLogger("distruntime").handlers + logging.getLogger().handlers:
            handler.flush()
        os._exit(_EXIT_CODE)

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.report is not None and not self._raised:
            self._raised = True
            raise HangError(self.report)
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)


# ---------------------------------------------------------------------- shared pieces
def _responsive(report: HangReport) -> list[int]:
    """The ranks that answered the incident, in rank order."""
    return sorted(r.rank for r in report.ranks if r.kind not in ("exited", "stopped", "unresponsive"))


def local_view(pid: int, main_ident: int | None) -> dict[str, Any]:
    """What this host can see of a local process that does not answer."""
    view: dict[str, Any] = {"proc": process_state(pid)}
    try:
        with open(stack_file_path(pid), encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        text = ""
    if text:
        view["stack"] = parse_faulthandler(text, main_ident)
    return view


def collect_report(store: Store, answered: dict[int, dict[str, Any]], world_size: int, threshold_s: float,
                   reason: str) -> HangReport:
    """Build the verdict from answered state records plus what the store and this host know."""
    heartbeats: dict[int, dict[str, Any]] = {}
    left = set()
    for rank in range(world_size):
        key = f"watch/hb/{rank}"
        if store.check([key]):
            beat = json.loads(store.get(key))
            if beat.get("left"):
                left.add(rank)
            elif rank not in answered:
                heartbeats[rank] = beat
    views: dict[int, dict[str, Any]] = {}
    for record in answered.values():
        for rank, view in (record.get("local") or {}).items():
            views.setdefault(int(rank), view)
    here = socket.gethostname()
    for rank in range(world_size):
        key = f"who/{rank}"
        if rank in answered or rank in left or not store.check([key]):
            continue
        who = json.loads(store.get(key))
        heartbeats.setdefault(rank, {"host": who["host"], "pid": who["pid"]})
        if rank not in views and who.get("host") == here:
            views[rank] = local_view(int(who["pid"]), heartbeats[rank].get("main"))
    return build_report(answered, heartbeats, views, world_size=world_size, now=time.time(),
                        threshold_s=threshold_s, reason=reason, left=frozenset(left))


# torch's Flight Recorder dump (entries: bool) -> JSON; absent on older torch.
_flight_dump: Callable[[bool], bytes] | None = getattr(
    torch._C._distributed_c10d, "_dump_fr_trace_json", None)


def job_report(root: Store, *, reason: str, ask: bool, namespace: str | None = None,
               window_s: float = 3.0) -> HangReport | None:
    """The table of the distruntime job whose store is ``root``; None when there is none.

    ``ask=False`` (``distruntime where``) only reads: heartbeats, check-ins, ``/proc``.
    ``ask=True`` (the pytest plugin at a test's deadline) opens an incident, as a rank's
    watchdog would, so every rank that can answer sends its stack and its collectives;
    no verdict is published, so the ranks take no action.
    """
    from torch._C._distributed_c10d import PrefixStore

    threshold, world_size = 0.0, 0
    if namespace is None:
        if not root.check([POINTER_KEY]):
            return None
        pointer = json.loads(root.get(POINTER_KEY))
        namespace, world_size = str(pointer["namespace"]), int(pointer["world_size"])
        threshold = float(pointer.get("threshold_s", 0.0))
    job = PrefixStore(namespace, root)
    while not world_size and job.check([f"who/{world_size}"]):
        world_size += 1
    answered: dict[int, dict[str, Any]] = {}
    if ask:
        current = int(job.get("watch/round")) if job.check(["watch/round"]) else 0
        if job.compare_set(f"watch/open/{current + 1}", "", "deadline").decode() == "deadline":
            k = int(job.add("watch/round", 1))
            deadline = time.monotonic() + window_s
            while len(answered) < world_size and time.monotonic() < deadline:
                for rank in range(world_size):
                    key = f"watch/state/{k}/{rank}"
                    if rank not in answered and job.check([key]):
                        answered[rank] = json.loads(job.get(key))
                time.sleep(0.05)
    return collect_report(job, answered, world_size, threshold, reason)


def flight_recorder_available() -> bool:
    """Whether this torch records collectives in its Flight Recorder for every backend.

    With it the hang table numbers each group's collectives and names their op, shapes and
    dtypes (so a desync in shapes is seen); without it (older torch) the watchdog falls
    back to the main thread's Python frame: the op's name, no number, no shapes.

    Example:
        >>> isinstance(flight_recorder_available(), bool)
        True
    """
    return _flight_dump is not None


def _flight_progress() -> dict[str, dict[str, Any]]:
    if _flight_dump is None:  # an older torch: no Flight Recorder for gloo
        return {}
    try:
        return flight_progress(_flight_dump(False))
    except (RuntimeError, ValueError):
        return {}


def _collective_in(stack: list[str]) -> str:
    """The c10d function the main thread is in (``"all_reduce"``), or ``""``."""
    for frame in reversed(stack):
        if "torch/distributed/distributed_c10d.py" in frame.replace(os.sep, "/"):
            return frame.rsplit(" in ", 1)[-1]
    return ""


def _entries() -> list[dict[str, Any]]:
    if _flight_dump is None:
        return []
    try:
        return parse_entries(_flight_dump(True))[0]
    except (RuntimeError, ValueError):
        return []


def _group_names() -> dict[str, str]:
    """torch's process-group names (``"0"``, ``"1"``...) -> a description for the report."""
    names: dict[str, str] = {}
    try:
        world = dist.distributed_c10d._world
        for pg, name in list(world.pg_names.items()):
            desc = getattr(pg, "group_desc", "") or ""
            if pg is world.default_pg or desc == "default_pg":
                names[str(name)] = "default"
            elif desc and desc != "undefined":
                names[str(name)] = desc.removeprefix("mesh_")
            else:
                ranks = sorted(world.pg_group_ranks.get(pg, {}))
                names[str(name)] = f"group {name} (ranks {', '.join(map(str, ranks))})"
    except (AttributeError, RuntimeError):
        pass
    return names


def abort_blocked_collectives(backend: str, keep_ports: frozenset[int], addresses: set[str]) -> None:
    """Make this rank's blocked collectives fail now, so its main thread can unwind.

    NCCL: abort every process group (torch's documented way; never destroy, which would
    drain the hung communicator). gloo has no abort: its collectives block in socket
    reads, so this rank's TCP connections to the job's hosts (other than the rendezvous
    store's) are shut down, and the blocked read fails at once.
    """
    from distruntime.teardown import run_bounded

    if "nccl" in backend:
        abort: Callable[[], None] | None = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            run_bounded(abort, 10.0, "abort of the NCCL process groups")
    if "gloo" in backend or "nccl" not in backend:
        closed = _shutdown_connections(keep_ports, addresses)
        logger.debug("shut down %d gloo connections to unblock the main thread", closed)


def _shutdown_connections(keep_ports: frozenset[int], addresses: set[str]) -> int:
    sockets = _tcp_sockets()
    closed = 0
    for fd_name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd_name}")
        except OSError:
            continue
        if not target.startswith("socket:["):
            continue
        entry = sockets.get(int(target[8:-1]))
        if entry is None:
            continue
        (_, local_port), (remote_ip, remote_port), state = entry
        # Established only (a listener shut down aborts gloo's accept thread and the process).
        if state != "01" or {local_port, remote_port} & keep_ports or remote_ip not in addresses:
            continue
        try:
            sock = socket.socket(fileno=os.dup(int(fd_name)))
        except OSError:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
            closed += 1
        except OSError:
            pass
        finally:
            sock.close()
    return closed


def _tcp_sockets() -> dict[int, tuple[tuple[str, int], tuple[str, int], str]]:
    """inode -> (local, remote, state) from /proc/self/net/tcp{,6}."""
    found = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/self/net/{name}") as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            try:
                found[int(parts[9])] = (_address(parts[1], family), _address(parts[2], family), parts[3])
            except (IndexError, ValueError):
                continue
    return found


def _address(text: str, family: int) -> tuple[str, int]:
    hex_ip, hex_port = text.split(":")
    raw = bytes.fromhex(hex_ip)
    # /proc prints each 32-bit word in host (little-endian) order.
    ordered = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = socket.inet_ntop(family, ordered)
    if ip.startswith("::ffff:"):
        ip = ip.removeprefix("::ffff:")
    return ip, int(hex_port, 16)


def _write_error_file(path: str, error: Exception) -> None:
    from distruntime.runtime import write_error_file

    write_error_file(error, path)
