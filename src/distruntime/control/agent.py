"""The rank agent: mid-job hang detection that costs nothing per collective and nothing on
the store while the job is healthy.

Each rank runs one daemon thread while its runtime is active. Every *tick*
(``hang_timeout_s / 10``, between 0.2 and 1 s) it

1. re-arms ``faulthandler.dump_traceback_later``: a dead man's switch. If the main thread
   holds the GIL in native code, this thread cannot re-arm it, and faulthandler's own C
   thread writes every Python stack to the rank's file in the node-local channel;
2. reads torch's Flight Recorder progress counters and notes since when a collective is
   pending;
3. rewrites its slot in the node-local channel (:mod:`distruntime.control.channel`) --
   a file in memory: **no store request**;
4. reads what its host's waiter learned from the store (an event, a verdict).

When a rank has waited in a collective for longer than the threshold it claims a hang
incident and assembles the verdict (:mod:`distruntime.control.incident`): every host
answers once for all its ranks, O(N) requests in all.

Acting on a verdict needs evidence this host holds itself (``docs/security.md``): a rank
that waits in a collective past half the threshold unblocks it (NCCL abort; gloo: its
connections to the job's hosts are shut down) and raises
:class:`~distruntime.HangError`; a rank running Python is interrupted (SIGURG, ignored by
default) only once its peers have hung up on it or a local peer with that first-hand
evidence has acted; a local rank that cannot answer (GIL held, stopped) is killed by the
lowest live rank of its host, only if its own slot has gone stale and ``/proc`` still shows
the process that wrote it (:mod:`distruntime.control.hostactions`). Whatever is still in
its runtime ``_EXIT_GRACE_S`` after acting is ended by its own agent.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import IO, Any

import torch.distributed as dist
from torch._C._distributed_c10d import Store

from distruntime.control import incident
from distruntime.control.channel import HostChannel, process_start_time
from distruntime.control.hostactions import kill_local_peer
from distruntime.control.progress import collective_in, entries, group_names, main_stack, progress
from distruntime.control.protocol import POINTER_KEY, as_float, as_int, as_str, store_alive
from distruntime.control.unblock import (
    abort_blocked_collectives,
    job_addresses,
    open_connections,
    peers_hung_up,
)
from distruntime.control.verdict import HangReport, build_report, innermost_user_frame, parse_report
from distruntime.control.waiter import HostWaiter, WaiterConfig, leader_of
from distruntime.errorfile import write_error_file
from distruntime.errors import HangError, LaunchEnvError
from distruntime.rendezvous import Rendezvous
from distruntime.teardown import DaemonThread, run_bounded

__all__ = ["AgentConfig", "RankAgent", "hang_threshold", "start_agent"]

logger = logging.getLogger("distruntime")

ENV_VAR = "DISTRUNTIME_HANG_TIMEOUT_S"
# The signal that interrupts a rank's main thread once a hang is decided. Its default
# action is "ignore", so a delivery meant for someone else is harmless.
INTERRUPT_SIGNAL = signal.SIGURG
# After acting on a verdict, how long a rank may take to leave its runtime before its
# agent ends the process itself (a main thread that swallowed HangError, a native call
# that ignores signals).
_EXIT_GRACE_S = 5.0
_EXIT_CODE = 1
# How long hosts get to answer an incident, beyond two ticks.
_ANSWER_WINDOW_S = 1.0
# How long a rank waits for local evidence that a verdict concerns it before ignoring it.
_EVIDENCE_WINDOW_S = 8.0
# Past the threshold and the answer window by this much with no verdict, a rank whose store
# no longer answers ends on its own evidence (_maybe_act_alone).
_OVERDUE_S = 2.0
# ... and this much later, a rank whose store still answers but brought no verdict (the host's
# waiter lost its own connection) ends on its own evidence too: hang_timeout_s + 10 s holds.
_NO_VERDICT_S = 3.0
# The round a rank that acted alone records in its slot (verdict rounds count from 1): its
# local peers see it and follow, since no verdict will reach them either.
_ALONE = -1
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
                raise LaunchEnvError(
                    f"{ENV_VAR}={raw!r} is not a number of seconds. Fix: set it to e.g. 300, or "
                    "'off' to disable hang detection.", variable=ENV_VAR, value=raw) from None
    if hang_timeout_s is None:
        lead = min(_DEFAULT_LEAD_S, collective_timeout_s * 0.25)
        return max(collective_timeout_s - lead, 1.0)
    if not hang_timeout_s > 0:
        raise ValueError(f"hang_timeout_s must be positive (or inf to disable), got {hang_timeout_s!r}")
    return float(hang_timeout_s)


@dataclass(frozen=True)
class AgentConfig:
    """What one rank's agent needs to know."""

    rank: int
    world_size: int
    threshold_s: float
    backend: str
    keep_ports: frozenset[int]  # the rendezvous store's port: never shut down
    namespace: str = ""  # the rendezvous key prefix, announced for ``distruntime where``
    host: str = field(default_factory=socket.gethostname)

    @property
    def tick_s(self) -> float:
        return min(max(self.threshold_s / 10, 0.2), 1.0)

    @property
    def answer_window_s(self) -> float:
        return 2 * self.tick_s + _ANSWER_WINDOW_S


def start_agent(rdzv: Rendezvous, backend: str, *, hang_timeout_s: float | None,
                collective_timeout_minutes: float | None, store: Store | None = None,
                channel: HostChannel | None = None) -> RankAgent | None:
    """Start this rank's agent (the runtime's one line); None when hang detection is off.

    ``store`` is the store given to the runtime, if any (its port is never shut down);
    ``channel`` this host's node-local channel.
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
    config = AgentConfig(rdzv.launch.rank, rdzv.launch.world_size, threshold, backend, ports, rdzv.namespace)
    agent = RankAgent(rdzv.store, config, channel)
    agent.start()
    logger.debug("%r started", agent)
    return agent


def _port_of(store: Store | None) -> int | None:
    """The TCP port behind a store, through any PrefixStore wrappers."""
    tcp = _tcp_of(store)
    return int(tcp.port) if tcp is not None else None


def _tcp_of(store: Store | None) -> Any:
    while store is not None and not hasattr(store, "port"):
        store = getattr(store, "underlying_store", None)
    return store


class RankAgent:
    """One rank's control-plane agent (see the module docstring). Started and stopped by the runtime."""

    def __init__(self, store: Store, config: AgentConfig, channel: HostChannel | None) -> None:
        self.store = store
        self.config = config
        self.channel = channel
        self.report: HangReport | None = None  # set once this rank acted on a hang verdict
        self.ticks = 0  # healthy-path cost, for benchmarks: ticks run and their CPU time
        self.cpu_s = 0.0
        self.store_requests = 0  # requests this agent's thread made (the simulator counts them)
        self.waiter: HostWaiter | None = None
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._thread: DaemonThread | None = None
        self._pid = os.getpid()
        self._start = process_start_time(self._pid) or 0
        self._main = threading.main_thread().ident or 0
        self._pending: dict[tuple[str, int], float] = {}
        self._described: dict[tuple[str, int], dict[str, Any]] = {}
        self._group_names: dict[str, str] = {}
        self._answered = 0  # the last incident this rank answered
        self._claimed = 0  # the last event this rank tried to claim
        self._verdict_seen = 0
        self._candidate: HangReport | None = None
        self._candidate_round = 0
        self._candidate_until = 0.0
        self._quiet_until = 0.0
        self._record: dict[str, Any] | None = None
        self._acted = 0
        self._stack_path = ""
        self._stack_file: IO[str] | None = None
        self._previous_handler: Any = None
        self._handler_installed = False
        self._raised = False
        self._kill_lock = threading.Lock()
        self._kill_done = False
        self._backup_started = False
        self._addresses: set[str] = set()
        self._connections: set[int] = set()

    def __repr__(self) -> str:
        running = self._thread is not None and self._thread.is_alive()
        state = "hang decided" if self.report else ("running" if running else "stopped")
        return (f"RankAgent(rank={self.config.rank}, threshold_s={self.config.threshold_s:g}, "
                f"tick_s={self.config.tick_s:g}, {state})")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.channel is not None:
            name = f"stack-{self.config.rank}.txt"
            try:
                self._stack_file = self.channel.open_file(name)
                self._stack_path = os.path.join(self.channel.path, name)
            except OSError as error:  # the verdict then lacks this rank's dumped stack, no more
                logger.warning("no node-local stack file for rank %d: %s", self.config.rank, error)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(INTERRUPT_SIGNAL, self._on_interrupt)
            self._handler_installed = True
        # Armed now, not at the first tick: a main thread that takes the GIL for good right
        # after start-up must still leave its stack behind.
        self._rearm_stack_dump()
        self._write_slot(time.time(), {})
        self._thread = DaemonThread(self._run, "distruntime-watchdog")

    def stop(self) -> None:
        """Stop the thread (bounded), leave the host channel, restore SIGURG."""
        self._closing.set()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)  # returns at once when called from the thread itself
        with contextlib.suppress(RuntimeError):
            faulthandler.cancel_dump_traceback_later()
        if self.waiter is not None:
            self.waiter.close()
        if self.channel is not None:
            # The slot stays, marked: a peer still weighing a verdict reads that this rank acted.
            self.channel.close(self.config.rank, {"rank": self.config.rank, "pid": self._pid, "left": True,
                                                  "acted": self._acted, "t": time.time()})
        if self._handler_installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(INTERRUPT_SIGNAL) == self._on_interrupt:
                signal.signal(INTERRUPT_SIGNAL, self._previous_handler)
            self._handler_installed = False
        if self._stack_file is not None:
            self._stack_file.close()
            self._stack_file = None
            with contextlib.suppress(OSError):
                os.unlink(self._stack_path)

    def verdict_after_failure(self, wait_s: float = 6.0) -> HangReport | None:
        """The hang verdict behind a failed collective, waiting (bounded) for one being assembled.

        Called by the runtime when its block raised: a collective that failed because a
        peer was unblocked for a hang must raise the verdict, not a transport error. Only a
        rank that itself waited past half the threshold takes a verdict it has not acted on
        (local evidence); the wait reads the node-local channel, not the store.
        """
        if self.report is not None:
            return self.report
        if self._longest_wait() < 0.5 * self.config.threshold_s:
            wait_s = 0.0
        deadline = time.monotonic() + wait_s
        while True:
            report = self._candidate or self._read_local_verdict()
            if report is not None and report.is_hang:
                self.report = report
                # This rank's main thread may take the verdict before its agent acts on it
                # (and stop() ends that thread): the duty to end the local ranks that
                # cannot answer must not be lost with it -- and a signal to the main thread
                # must not cut it short, so it runs in a thread of its own.
                run_bounded(functools.partial(self._kill_local_silent, report), 10.0,
                            "kill of stuck local ranks")
                return report
            if time.monotonic() >= deadline or self.channel is None:
                return None
            time.sleep(0.05)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        tick = self.config.tick_s
        if not self._stop.wait(tick) and self.config.rank == 0:
            self._announce()
        while not self._stop.is_set():
            started = time.thread_time()
            try:
                self._tick()
            except dist.DistError as error:  # ticking goes on: a rank can still act alone
                logger.debug("watchdog: store unavailable (%s)", error)
            except Exception:
                logger.debug("watchdog tick failed", exc_info=True)
            self.ticks += 1
            self.cpu_s += time.thread_time() - started
            if self.report is not None:
                self._end_if_still_here()
                return
            # While an incident or a verdict is under way, look at the host file often.
            self._stop.wait(0.05 if self._candidate is not None or self._claimed > self._answered else tick)

    def _announce(self) -> None:
        root = getattr(self.store, "underlying_store", None)
        if root is None or not self.config.namespace:
            return
        pointer = {"namespace": self.config.namespace, "world_size": self.config.world_size,
                   "threshold_s": self.config.threshold_s, "started": time.time()}
        with contextlib.suppress(dist.DistError):
            self.store_requests += 1
            root.set(POINTER_KEY, json.dumps(pointer))

    def _tick(self) -> None:
        self._rearm_stack_dump()
        now = time.time()
        groups = self._progress(now)
        host = self.channel.read_host() if self.channel is not None else {}
        self._follow(host)
        if self.report is not None:
            return
        self._write_slot(now, groups)
        self._maybe_claim(now, host)
        self._maybe_lead(host, now)
        self._maybe_act_alone(now)
        self._maybe_follow_alone(now)

    def _maybe_act_alone(self, now: float) -> None:
        """No verdict came: the store lost this rank's connection, or the connection that
        gathers its host's answers (a foreign value under a counter key makes torch's store
        server drop the client that adds to it). The rank's own wait is the evidence; it ends
        with what it alone can say rather than wait out the collective."""
        overdue = self.config.threshold_s + self.config.answer_window_s + _OVERDUE_S
        waited = self._longest_wait()
        if self._candidate is not None or waited < overdue:
            return
        if waited < overdue + _NO_VERDICT_S:
            self.store_requests += 1
            if store_alive(self.store):
                return  # the incident is under way or will be claimed: the verdict decides
            why = "the store no longer answers this rank"
        else:
            why = f"none came within {_NO_VERDICT_S + _OVERDUE_S:.0f} s of the answer window"
        report = build_report({self.config.rank: self._state_record()}, {}, {},
                              world_size=self.config.world_size, now=now,
                              threshold_s=self.config.threshold_s)
        summary = (f"no hang verdict could be had ({why}); rank "
                   f"{self.config.rank} waited {waited:.0f} s: {report.summary}")
        self._candidate, self._candidate_round = replace(report, summary=summary), _ALONE
        self._candidate_until = time.monotonic() + _EVIDENCE_WINDOW_S
        self._act_if_evidence()

    def _maybe_follow_alone(self, now: float) -> None:
        """A rank on this host ended on its own evidence (its slot says so: the host's own
        record, not the store's): no verdict will come, so this rank ends too, wherever it is."""
        if self._candidate is not None or self.channel is None:
            return
        alone = sorted(rank for rank, slot in self.channel.read_slots().items()
                       if rank != self.config.rank and as_int(slot.get("acted")) == _ALONE)
        if not alone:
            return
        report = build_report({self.config.rank: self._state_record()}, {}, {},
                              world_size=self.config.world_size, now=now,
                              threshold_s=self.config.threshold_s)
        where = innermost_user_frame(main_stack()) or "an unknown place"
        summary = (f"no hang verdict could be had; rank {alone[0]} on this host waited past the "
                   f"threshold ({self.config.threshold_s:g} s) and ended on its own evidence, so rank "
                   f"{self.config.rank} ends too (it was at {where})")
        self._candidate, self._candidate_round = replace(report, summary=summary), _ALONE
        self._candidate_until = time.monotonic() + _EVIDENCE_WINDOW_S
        self._act_if_evidence()

    def _rearm_stack_dump(self) -> None:
        handle = self._stack_file
        if handle is None:
            return
        if handle.tell() or os.fstat(handle.fileno()).st_size:
            handle.seek(0)
            handle.truncate()  # a stall that has passed: keep the file for the next one
        faulthandler.dump_traceback_later(2 * self.config.tick_s + 0.5, repeat=False, file=handle)

    def _progress(self, now: float) -> dict[str, dict[str, Any]]:
        groups = progress()
        pending = {}
        for gid, g in groups.items():
            if g["enqueued"] > g["completed"]:
                key = (gid, g["completed"] + 1)
                pending[key] = self._pending.get(key, now)
            g["desc"] = self._group_name(gid)
        if not groups and collective_in(main_stack()):
            # No Flight Recorder (older torch): a main thread inside a c10d collective is
            # the only sign; the collective number stays unknown (-1).
            pending[("0", -1)] = self._pending.get(("0", -1), now)
        self._pending = pending
        return groups

    def _longest_wait(self) -> float:
        now = time.time()
        return max((now - since for since in self._pending.values()), default=0.0)

    def _pending_detail(self, now: float) -> dict[str, dict[str, Any]]:
        """The oldest pending collective of each group, for the slot.

        Op, shapes and dtypes cost a full Flight Recorder dump, so they are read once per
        collective, and only for one pending longer than a quarter of the threshold.
        """
        detail: dict[str, dict[str, Any]] = {}
        for (gid, seq), since in sorted(self._pending.items()):
            if gid in detail:
                continue
            entry: dict[str, Any] = {"seq": seq, "since": since}
            op = collective_in(main_stack()) if seq < 0 else ""
            if op:  # no Flight Recorder: the op of the main thread's frame, cheap
                entry["op"] = op
            elif now - since > max(self.config.threshold_s / 4, 2 * self.config.tick_s):
                if (gid, seq) not in self._described:
                    unfinished = [e for e in entries() if not e["completed"]]
                    self._described = {(str(e["group"]), int(e["seq"])): e for e in unfinished}
                found = self._described.get((gid, seq))
                if found is not None:
                    entry.update(op=found["op"], sizes=found["sizes"], dtypes=found["dtypes"],
                                 since=found["created"])
            detail[gid] = entry
        return detail

    def _group_name(self, gid: str) -> str:
        if gid not in self._group_names:
            self._group_names.update(group_names())
        return self._group_names.get(gid, "default" if gid == "0" else f"group {gid}")

    def _beat(self, now: float, groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "rank": self.config.rank, "host": self.config.host, "pid": self._pid, "start": self._start,
            "main": self._main, "t": now, "where": innermost_user_frame(main_stack()), "groups": groups,
            "tick": self.config.tick_s, "pending": self._pending_detail(now),
            "waited": self._longest_wait(), "stack_file": self._stack_path,
        }

    def _write_slot(self, now: float, groups: dict[str, dict[str, Any]]) -> None:
        if self.channel is None:
            return
        slot = self._beat(now, groups)
        slot.update(answered=self._answered, acted=self._acted)
        if self._record is not None:
            slot["record"] = self._record
        self.channel.write_slot(self.config.rank, slot)

    def _state_record(self) -> dict[str, Any]:
        now = time.time()
        record = self._beat(now, self._progress(now))
        record["stack"] = main_stack()
        record["entries"] = entries()
        op = collective_in(record["stack"])
        if not record["entries"] and op and ("0", -1) in self._pending:
            record["entries"] = [{"group": "0", "seq": -1, "op": op, "sizes": [], "dtypes": [],
                                  "completed": False, "created": self._pending[("0", -1)]}]
        return record

    def _answer(self, k: int) -> None:
        self._record = self._state_record()
        self._answered = k
        self._write_slot(time.time(), self._record.get("groups") or {})

    # ------------------------------------------------------------------ incidents
    def _follow(self, host: dict[str, Any]) -> None:
        """Act on what this host's waiter learned: answer an incident, weigh a verdict."""
        k = as_int(host.get("round"), 0, low=0)
        event = host.get("event")
        event = event if isinstance(event, dict) else {}
        if k > self._answered and as_str(event.get("kind")) == "hang":
            self._answer(k)
        verdict_round = as_int(host.get("verdict_round"), 0, low=0)
        if verdict_round > self._verdict_seen:
            self._verdict_seen = verdict_round
            self._consider(verdict_round, parse_report(as_str(host.get("verdict"), limit=8 << 20)))
        if self._candidate is not None:
            self._act_if_evidence()

    def _read_local_verdict(self) -> HangReport | None:
        if self.channel is None:
            return None
        host = self.channel.read_host()
        report = parse_report(as_str(host.get("verdict"), limit=8 << 20))
        return report if report is not None and report.reason == "hang" else None

    def _consider(self, k: int, report: HangReport | None) -> None:
        self._record = None
        if report is None or report.reason != "hang":
            return
        if not report.is_hang:
            logger.warning("watchdog: %s", report.summary)
            self._quiet_until = time.monotonic() + self.config.threshold_s
            return
        self._candidate, self._candidate_round = report, k
        self._candidate_until = time.monotonic() + _EVIDENCE_WINDOW_S
        self._addresses = job_addresses(report.hosts)
        self._connections = open_connections(self.config.keep_ports, self._addresses)

    def _act_if_evidence(self) -> None:
        """Act on the verdict only once this host shows that it concerns this rank."""
        report = self._candidate
        assert report is not None
        waiting = self._longest_wait() >= 0.5 * self.config.threshold_s
        evidence = waiting or self._local_peer_acted() or self._peers_hung_up()
        if not evidence:
            if time.monotonic() > self._candidate_until:
                logger.warning("ignored a hang verdict that nothing on this host confirms: %s",
                               report.summary)
                self._candidate = None
            return
        self._candidate = None
        self.report = report
        self._acted = self._candidate_round
        self._write_slot(time.time(), {})
        if _responsive(report)[:1] == [self.config.rank]:
            logger.error("distributed job hangs:\n%s", report.format())
        else:
            logger.error("distributed job hangs: %s", report.summary)
        self._kill_local_silent(report)
        if self._handler_installed and not waiting:
            signal.pthread_kill(self._main, INTERRUPT_SIGNAL)
        else:
            abort_blocked_collectives(self.config.backend, self.config.keep_ports,
                                      job_addresses(report.hosts))

    def _peers_hung_up(self) -> bool:
        """The kernel's word: peers closed connections to this process (or they are gone)."""
        if peers_hung_up(self.config.keep_ports, self._addresses):
            return True
        return bool(self._connections - open_connections(self.config.keep_ports, self._addresses))

    def _local_peer_acted(self) -> bool:
        if self.channel is None:
            return False
        # A peer that acted alone counts for any verdict: no other word will reach it.
        return any(as_int(slot.get("acted")) in (self._candidate_round, _ALONE) and rank != self.config.rank
                   for rank, slot in self.channel.read_slots().items())

    def _maybe_claim(self, now: float, host: dict[str, Any]) -> None:
        waited = self._longest_wait()
        if waited < self.config.threshold_s or time.monotonic() < self._quiet_until:
            return
        k = max(as_int(host.get("round"), 0, low=0), self._answered, self._claimed)
        if k > as_int(host.get("verdict_round"), 0, low=0) or self._candidate is not None:
            return  # an incident is under way
        self._claimed = k + 1
        self.store_requests += 1
        won, _event = incident.open_event(self.store, k + 1, {"kind": "hang", "rank": self.config.rank,
                                                              "t": now})
        if not won:
            return  # another rank opened it: this host's waiter will say so
        logger.warning("rank %d waited %.1f s in a collective: asking every rank where it stands",
                       self.config.rank, waited)
        self._answer(k + 1)
        # Assembled in a thread of its own, so this rank keeps ticking (and answering).
        threading.Thread(target=self._assemble, args=(k + 1,), name="distruntime-assembler",
                         daemon=True).start()

    def _assemble(self, k: int) -> None:
        try:
            report = incident.assemble(self.store, k, self.config.world_size, self.config.threshold_s,
                                       window_s=self.config.answer_window_s)
            incident.publish_verdict(self.store, k, report)
        except dist.DistError as error:
            logger.warning("could not assemble the hang verdict: %s", error)

    def _maybe_lead(self, host: dict[str, Any], now: float) -> None:
        """Become this host's waiter when the lock is free, or a backup when its holder is stuck."""
        if self.channel is None or self.waiter is not None:
            return
        if not self.channel.try_lead():
            if self._backup_started or not self._leader_stuck(host, now):
                return
            self._backup_started = True
            logger.warning("rank %d waits on the store for this host: its waiter (rank %d) is stuck",
                           self.config.rank, leader_of(host))
        self._start_waiter()

    def _leader_stuck(self, host: dict[str, Any], now: float) -> bool:
        assert self.channel is not None
        leader = leader_of(host)
        slots = self.channel.read_slots()
        slot = slots.get(leader)
        if leader < 0 or slot is None or slot.get("left"):
            return False
        if now - as_float(slot.get("t")) < incident.stale_after(self.config.tick_s):
            return False
        live = [r for r, s in slots.items()
                if not s.get("left")
                and now - as_float(s.get("t")) < incident.stale_after(self.config.tick_s)]
        return bool(live) and min(live) == self.config.rank

    def _start_waiter(self) -> None:
        assert self.channel is not None
        tcp = _tcp_of(self.store)
        if tcp is None:
            return
        config = WaiterConfig(str(tcp.host), int(tcp.port), self.config.namespace, self.config.host,
                              self.config.rank, self.config.world_size, self.config.tick_s,
                              self.config.answer_window_s)
        self.waiter = HostWaiter(self.channel, config)
        # torch without Store.clone (before 2.5): the waiter connects itself
        self.waiter.start(clone=getattr(self.store, "clone", None), shared=self.store)

    # ------------------------------------------------------------------ ending the job
    def _kill_local_silent(self, report: HangReport) -> None:
        """SIGKILL the local ranks that cannot answer; the lowest live local rank does it, once."""
        with self._kill_lock:
            if self._kill_done or self.channel is None:
                return
            self._kill_done = True
        named = {r.rank: r for r in report.ranks if r.kind in ("unresponsive", "stopped")}
        if not named:
            return
        now = time.time()
        slots = self.channel.read_slots()
        stale = incident.stale_after(self.config.tick_s)
        live = [r for r, s in slots.items() if not s.get("left") and now - as_float(s.get("t")) < stale]
        if not live or min(live) != self.config.rank:
            return
        for rank, row in sorted(named.items()):
            slot = slots.get(rank)
            # The host's own evidence: the rank's slot has gone stale (its agent cannot run).
            if slot is None or slot.get("left") or now - as_float(slot.get("t")) < stale:
                continue
            kill_local_peer(slot, HangError(report), row.detail)

    def _end_if_still_here(self) -> None:
        if self._closing.wait(_EXIT_GRACE_S):
            return
        assert self.report is not None
        error = HangError(self.report)
        logger.error("rank %d did not leave its runtime within %.0f s of the hang verdict; exiting",
                     self.config.rank, _EXIT_GRACE_S)
        write_error_file(error)
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


def _responsive(report: HangReport) -> list[int]:
    """The ranks that answered the incident, in rank order."""
    return sorted(r.rank for r in report.ranks if r.kind not in ("exited", "stopped", "unresponsive"))

