"""The controller: the pytest process (or each pytest-xdist worker) running N-rank tests.

It owns

* one ``TCPStore`` server bound to ``127.0.0.1`` port 0 (the port is read back, so
  there is no free-port guessing); each test gets its own key prefix ``drt/<n>``;
* pools of rank processes keyed by world size, started on first use and reused (torch
  is imported once per rank process), at most ``--drt-max-pools`` at a time;
* the deadline of every test: on expiry the ranks still running dump their Python
  stacks (SIGUSR1), then every rank's process group is killed and the pool replaced.

torch is imported here only when the first distributed test runs.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import send_handle
from pathlib import Path
from typing import Any, cast

import pytest

from distruntime.testing import _coverage
from distruntime.testing._debugger import DebugGate, rerun_command, terminal_path
from distruntime.testing._merge import MergeInfo, RankResult, keywords, merge
from distruntime.testing._spec import OUTER_TIMEOUT_KEY, SPEC_KEY, DistSpec

__all__ = ["Controller", "Settings"]

logger = logging.getLogger("distruntime.testing")

_LOOPBACK = "127.0.0.1"
# Variables of an outer launcher that must not leak into rank processes.
_DROPPED_VARS = frozenset({
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT",
    "PYTEST_ADDOPTS",
})
_DROPPED_PREFIXES = ("TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "MV2_", "JSM_")
# How long ranks get to write their stacks after SIGUSR1.
_STACK_WAIT_S = 2.0
# How long a stopping rank process gets to tear down its session before it is killed.
_STOP_WAIT_S = 10.0
# Bound on starting a pool (interpreter, torch import, collection).
_STARTUP_TIMEOUT_S = 180.0
# A pool that fails to start this many times in a row is not tried again.
_MAX_START_FAILURES = 2
# Enough for a whole faulthandler crash dump (up to 100 frames per thread, each line with
# its full path: 6 kB of one pytest stack cut the dump's header off on a long checkout path).
_LOG_TAIL_BYTES = 256 * 1024


@dataclass(frozen=True)
class Settings:
    """The controller's options (from the command line and ini file).

    Example:
        >>> Settings(timeout_s=60.0, timeout_origin="--drt-timeout").grace_s
        5.0
    """

    timeout_s: float
    timeout_origin: str
    grace_s: float = 5.0
    max_pools: int = 3
    fresh: bool = False
    full_report: bool = False


class PoolStartError(Exception):
    """A pool of rank processes could not be started."""


class _Zygote:
    """The process that imported torch once and forks the rank processes (``_zygote.py``)."""

    def __init__(self, basedir: Path, env: dict[str, str], cwd: str, capture_off: bool) -> None:
        parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
        self.log_path = basedir / "zygote.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from distruntime.testing._zygote import main; main()",
                 str(child_conn.fileno())],
                pass_fds=(child_conn.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=None if capture_off else log,
                stderr=None if capture_off else subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        child_conn.close()
        self.conn = parent_conn
        self.capture_off = capture_off
        self.exits: dict[int, int] = {}
        self.ready = False

    def __repr__(self) -> str:
        return f"_Zygote(pid={self.proc.pid}, ready={self.ready})"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _next(self, deadline: float) -> tuple[Any, ...] | None:
        """The next message that is not an exit report (those are recorded)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.conn.poll(min(left, 0.5)):
                if left <= 0 or not self.alive():
                    return None
                continue
            try:
                message: tuple[Any, ...] = self.conn.recv()
            except (EOFError, OSError):
                return None
            if message[0] == "exited":
                self.exits[int(message[1])] = int(message[2])
                continue
            return message

    def await_ready(self, timeout_s: float) -> None:
        message = self._next(time.monotonic() + timeout_s)
        if message is None or message[0] != "ready":
            tail = _tail_lines(self.log_path)
            raise PoolStartError(f"the zygote process (which imports torch once for all ranks) did not start "
                                 f"within {timeout_s:.0f}s or exited. Its log:\n{tail}")
        self.ready = True

    def fork(self, rank_conn: Connection, log: Path, stacks: Path) -> int:
        """A new rank process holding ``rank_conn``; returns its pid."""
        self.conn.send(("fork", {"log": str(log), "stacks": str(stacks), "redirect": not self.capture_off}))
        send_handle(self.conn, rank_conn.fileno(), self.proc.pid)
        message = self._next(time.monotonic() + 30.0)
        if message is None or message[0] != "forked":
            tail = _tail_lines(self.log_path)
            raise PoolStartError(f"the zygote process did not fork a rank. Its log:\n{tail}")
        return int(message[1])

    def poll_exits(self) -> None:
        while True:
            try:
                if not self.conn.poll(0):
                    return
                message = self.conn.recv()
            except (EOFError, OSError):
                return
            if message[0] == "exited":
                self.exits[int(message[1])] = int(message[2])

    def exit_code(self, pid: int, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while pid not in self.exits and time.monotonic() < deadline and self.alive():
            if self.conn.poll(0.05):
                self.poll_exits()
        return self.exits.get(pid)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop", None))
        try:
            self.proc.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.conn.close()


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - _LOG_TAIL_BYTES, 0))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _tail_lines(path: Path, lines: int = 80) -> str:
    """The end of a log, for an error message about a process that did not start."""
    return "\n".join(_tail(path).splitlines()[-lines:])


@dataclass
class _Worker:
    rank: int
    pid: int
    zygote: _Zygote
    conn: Connection
    log_path: Path
    stack_path: Path

    def alive(self) -> bool:
        self.zygote.poll_exits()
        if self.pid in self.zygote.exits:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the rank's whole process group (its own session)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.zygote.exit_code(self.pid, 10.0) is None and self.zygote.alive():
            logger.warning("rank %d (pid %d) was not seen to exit after SIGKILL", self.rank, self.pid)
        self.conn.close()

    def exit_code(self, timeout_s: float) -> int | None:
        return self.zygote.exit_code(self.pid, timeout_s)

    def log_tail(self) -> str:
        return _tail(self.log_path)


@dataclass
class _Pool:
    ident: int
    world_size: int
    workers: list[_Worker]
    fresh: bool
    broken: bool = False
    collected: set[str] = field(default_factory=set)

    def healthy(self) -> bool:
        return not self.broken and all(w.alive() for w in self.workers)

    def kill(self) -> None:
        for w in self.workers:
            w.kill()

    def stop(self) -> None:
        """Ask every rank to tear its session down and exit; kill what is left."""
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.send(("stop", None))
        deadline = time.monotonic() + _STOP_WAIT_S
        for w in self.workers:
            if w.exit_code(max(deadline - time.monotonic(), 0.01)) is None:
                logger.warning("rank %d of pool %d did not stop within %.0fs; killed", w.rank, self.ident,
                               _STOP_WAIT_S)
        self.kill()


def _rank_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items()
        if k not in _DROPPED_VARS and k not in _coverage.AUTOSTART_VARS
        and not k.startswith(_DROPPED_PREFIXES)
    }
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the machine's cores
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this host
    return env


def _nodeid_arg(item: pytest.Item) -> str:
    """The item as a command-line argument, independent of the working directory."""
    _, _, rest = item.nodeid.partition("::")
    return f"{item.path}::{rest}" if rest else str(item.path)


class Controller:
    """Runs distributed items on pooled rank processes; one per pytest process.

    Example (what the plugin does for each distributed item)::

        reports = controller.run(item, nextitem, spec)
    """

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self._store: Any = None
        self._pools: OrderedDict[int, _Pool] = OrderedDict()
        self._seq = 0
        self._pool_count = 0
        self._base: Path | None = None
        self._start_failures: dict[int, tuple[int, str]] = {}
        self._cuda_count: int | None = None
        self._zygote: _Zygote | None = None
        self._coverage: _coverage.CoverageSettings | None = None
        self._gate = DebugGate()
        self._tty: str | None = None
        self._exit_reason: str | None = None

    def __repr__(self) -> str:
        return f"Controller(pools={list(self._pools)}, tests={self._seq})"

    # ------------------------------------------------------------------ public
    def run(self, item: pytest.Item, nextitem: pytest.Item | None, spec: DistSpec) -> list[pytest.TestReport]:
        """Run one distributed item on its ranks; returns its merged reports."""
        backend, reason = self.resolve_backend(spec)
        if backend is None:
            return _skip_reports(item, reason)
        fresh = spec.isolation == "fresh" or self.settings.fresh
        timeout_s, origin = self._timeout(spec)
        outer = item.stash.get(OUTER_TIMEOUT_KEY, None)
        if outer is not None and outer[0] < timeout_s:  # pytest-timeout's is shorter: it wins
            timeout_s, origin = outer
        started = time.monotonic()
        try:
            pool = self._pool_for(item, spec, fresh)
        except PoolStartError as exc:
            return _error_reports(item, str(exc))
        self._seq += 1
        results = [RankResult(w.rank) for w in pool.workers]
        timed_out = False
        self._gate.new_test()
        try:
            job = self._job(item, nextitem, spec, backend=backend, timeout_s=timeout_s, fresh=fresh)
            for w in pool.workers:
                w.conn.send(("run", {**job, "launch_env": self._launch_env(w.rank, spec)}))
            timed_out = self._collect(pool, results, timeout_s)
        except (KeyboardInterrupt, SystemExit):
            self._discard(pool)
            raise
        except Exception as exc:  # e.g. pytest-timeout failing the controller: stop the ranks
            self._discard(pool)
            return _error_reports(item, f"the controller was interrupted: {type(exc).__name__}: {exc}")
        if fresh or not pool.healthy():
            self._discard(pool)
        info = MergeInfo(
            world_size=spec.world_size, backend=backend, timeout_s=timeout_s, timeout_origin=origin,
            elapsed_s=time.monotonic() - started, timed_out=timed_out, grace_s=self.settings.grace_s,
            full_report=self.settings.full_report,
            show_capture=str(self.config.getoption("showcapture", "all")),
        )
        reports = merge(item, results, info)
        # What the ranks do not see (starting a pool, dispatch) counts as set-up time,
        # so --durations and JUnit show what the test cost.
        overhead = info.elapsed_s - sum(r.duration for r in reports)
        if overhead > 0:
            reports[0].duration += overhead
        failed = next((r for r in reports if r.failed), None)
        if self.config.getoption("usepdb", False) and self._tty is None and failed is not None:
            failed.sections.append(("distruntime --pdb", (
                "no terminal to open the failing rank's debugger on (this pytest has no controlling "
                f"terminal), so none was opened. To debug it, run from a terminal:\n"
                f"  {rerun_command(self.config, item.nodeid)}")))
        for r in results:
            for note in r.notes:
                text = f"rank {r.rank}: the test {note}"
                reports[-1].sections.append(("distruntime hygiene", text))
                with contextlib.suppress(Warning):  # -W error: the section still says it
                    item.warn(pytest.PytestWarning(text))
        return reports

    def take_exit(self) -> str | None:
        """Why the session must stop now (``q`` in a rank's debugger), once."""
        reason, self._exit_reason = self._exit_reason, None
        return reason

    def resolve_backend(self, spec: DistSpec) -> tuple[str | None, str]:
        """``auto`` -> nccl with enough CUDA devices, else gloo; None + reason: skip."""
        wanted = spec.backend.lower()
        if wanted == "auto":
            return ("nccl" if self._cuda_devices() >= spec.world_size else "gloo"), ""
        if wanted == "nccl" and self._cuda_devices() < spec.world_size:
            return None, (f"backend 'nccl' needs {spec.world_size} CUDA devices, "
                          f"{self._cuda_devices()} visible")
        return spec.backend, ""

    def shutdown(self) -> None:
        """Stop every pool, merge the ranks' coverage data, release the store and scratch files.

        Called when the test loop ends (before pytest-cov combines) and again, as a
        no-op, at unconfigure.
        """
        while self._pools:
            _, pool = self._pools.popitem()
            pool.stop()
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None
        self._store = None
        if self._base is not None:
            if self._coverage is not None:
                _coverage.merge_into_current(self._base / "coverage")
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None

    # ------------------------------------------------------------------ pools
    def _pool_for(self, item: pytest.Item, spec: DistSpec, fresh: bool) -> _Pool:
        if fresh:
            return self._start_pool(spec.world_size, [_nodeid_arg(item)], fresh=True)
        key = spec.pool_key
        pool = self._pools.get(key)
        if pool is not None and not pool.healthy():
            self._discard(pool)
            pool = None
        if pool is None:
            failures, message = self._start_failures.get(key, (0, ""))
            if failures >= _MAX_START_FAILURES:
                raise PoolStartError(f"not retried: the {key}-rank pool failed to start {failures} times. "
                                     f"Last error: {message}")
            while len(self._pools) >= max(self.settings.max_pools, 1):
                _, oldest = self._pools.popitem(last=False)
                oldest.stop()
            nodeids = [
                _nodeid_arg(other) for other in item.session.items
                if (s := other.stash.get(SPEC_KEY, None)) is not None
                and s.pool_key == key and s.isolation == "pooled"
            ]
            try:
                pool = self._start_pool(spec.world_size, nodeids or [_nodeid_arg(item)], fresh=False)
            except PoolStartError as exc:
                self._start_failures[key] = (failures + 1, str(exc))
                raise
            self._start_failures.pop(key, None)
            self._pools[key] = pool
        self._pools.move_to_end(key)
        return pool

    def _discard(self, pool: _Pool) -> None:
        if self._pools.get(pool.world_size) is pool:
            del self._pools[pool.world_size]
        pool.kill()

    def _start_pool(self, world_size: int, nodeids: list[str], fresh: bool) -> _Pool:
        self._pool_count += 1
        ident = self._pool_count
        pool_dir = self._basedir() / f"pool{ident}-ws{world_size}"
        pool_dir.mkdir(parents=True)
        zygote = self._get_zygote()
        workers = []
        for rank in range(world_size):
            parent_conn, child_conn = multiprocessing.Pipe(duplex=True)
            log_path, stack_path = pool_dir / f"rank{rank}.log", pool_dir / f"rank{rank}.stacks"
            try:
                pid = zygote.fork(child_conn, log_path, stack_path)
            finally:
                child_conn.close()
            workers.append(_Worker(rank, pid, zygote, parent_conn, log_path, stack_path))
        pool = _Pool(ident, world_size, workers, fresh)
        try:
            store = self._get_store()
            for w in workers:
                w.conn.send(("init", {
                    "rank": w.rank, "world_size": world_size, "store_host": _LOOPBACK,
                    "store_port": int(store.port),
                    "pytest_args": self._pytest_args(nodeids, pool_dir / f"rank{w.rank}-tmp"),
                    "coverage": self._coverage,
                    "pdb_tty": self._tty,
                }))
            self._await_ready(pool)
        except BaseException:
            pool.kill()
            raise
        logger.debug("started pool %d: %d ranks, pids %s", ident, world_size, [w.pid for w in workers])
        return pool

    def _await_ready(self, pool: _Pool) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        pending = {w.conn: w for w in pool.workers}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PoolStartError(self._start_problem(
                    pool, list(pending.values()), f"did not start within {_STARTUP_TIMEOUT_S:.0f}s"))
            for ready in wait(list(pending), timeout=min(left, 0.5)):
                conn = cast(Connection, ready)
                w = pending[conn]
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    raise PoolStartError(self._start_problem(pool, [w], "exited during start-up")) from None
                if kind == "ready":
                    pool.collected.update(payload["collected"])
                    del pending[conn]
                elif kind == "fatal":
                    raise PoolStartError(self._start_problem(pool, [w], f"failed to start: {payload}"))
            for conn, w in list(pending.items()):
                if not w.alive() and not conn.poll():
                    raise PoolStartError(self._start_problem(pool, [w], "exited during start-up"))

    def _start_problem(self, pool: _Pool, workers: list[_Worker], what: str) -> str:
        ranks = ", ".join(str(w.rank) for w in workers)
        tails = "\n".join(f"--- rank {w.rank} log ({w.log_path}) ---\n{_tail_lines(w.log_path)}"
                          for w in workers)
        return f"rank process(es) {ranks} of a {pool.world_size}-rank pool {what}.\n{tails}"

    # ------------------------------------------------------------------ one test
    def _job(
        self, item: pytest.Item, nextitem: pytest.Item | None, spec: DistSpec, *, backend: str,
        timeout_s: float, fresh: bool,
    ) -> dict[str, Any]:
        name = re.sub(r"\W", "_", item.name)[:40]
        shared = self._basedir() / "shared" / f"{self._seq}-{name}"
        shared.mkdir(parents=True)
        return {
            "nodeid": item.nodeid,
            "next_nodeid": None if fresh else self._next_nodeid(nextitem, spec),
            "namespace": f"drt/{self._seq}",
            "backend": backend,
            "init": spec.init,
            "timeout": timeout_s,
            "shared_tmp": str(shared),
        }

    def _launch_env(self, rank: int, spec: DistSpec) -> dict[str, str]:
        env = {
            "RANK": str(rank), "WORLD_SIZE": str(spec.world_size),
            "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(spec.world_size),
            "MASTER_ADDR": _LOOPBACK, "MASTER_PORT": str(int(self._get_store().port)),
        }
        if not spec.init:
            # A torchrun worker whose agent store is the controller's: DistributedRuntime()
            # and init_process_group("env://") connect to it as clients, under a prefix of
            # their own for this test (the run id; the restart count stays 0, as in a
            # first run, so code under test that reads info.restart_count sees a first run).
            env.update({
                "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
                "TORCHELASTIC_RUN_ID": f"distruntime-{os.getpid()}-{self._seq}",
                "TORCHELASTIC_RESTART_COUNT": "0",
                "TORCHELASTIC_USE_AGENT_STORE": "True",
            })
        return env

    def _next_nodeid(self, nextitem: pytest.Item | None, spec: DistSpec) -> str | None:
        """The next test this pool runs, when known: module fixtures then stay set up."""
        if nextitem is None:
            return None
        other = nextitem.stash.get(SPEC_KEY, None)
        # A next item that is skipped here never reaches the ranks: they then tear down
        # what the test after it does not share (see RankServer._fix_setup_stack).
        if (other is None or other.pool_key != spec.pool_key or other.isolation != "pooled"
                or self.settings.fresh or self.resolve_backend(other)[0] is None):
            return None
        return nextitem.nodeid

    def _collect(self, pool: _Pool, results: list[RankResult], timeout_s: float) -> bool:
        """Gather every rank's reports; returns True when the deadline stopped the test."""
        deadline = time.monotonic() + timeout_s
        grace_end: float | None = None
        pending = {w.conn: w for w in pool.workers}
        while pending and self._exit_reason is None:
            now = time.monotonic()
            limit = deadline if grace_end is None else min(deadline, grace_end)
            if self._gate.active:  # a rank is in its debugger: no deadline, no grace meanwhile
                limit = now + 0.5
            if now >= limit:
                break
            for ready in wait(list(pending), timeout=min(limit - now, 0.5)):
                conn = cast(Connection, ready)
                w = pending[conn]
                if not self._receive(pool, w, results[w.rank]):
                    del pending[conn]
            for conn, w in list(pending.items()):
                if not w.alive() and not conn.poll():
                    self._died(pool, w, results[w.rank])
                    del pending[conn]
            paused = self._gate.take_pause()  # the clocks restart where they stopped
            deadline += paused
            grace_end = grace_end + paused if grace_end is not None else None
            if grace_end is None and any(_has_problem(r) for r in results):
                grace_end = time.monotonic() + self.settings.grace_s
        self._gate.release()
        if not pending:
            return False
        timed_out = time.monotonic() >= deadline
        stuck = list(pending.values())
        verdict = self._deadline_verdict() if timed_out else ""
        stacks = self._dump_stacks(stuck)
        for w in stuck:
            results[w.rank].stuck = True
            results[w.rank].stack = stacks.get(w.rank, "")
        if verdict:  # one table for the test, shown once, above the first stuck rank's stacks
            results[stuck[0].rank].stack = f"{verdict}\n\n{results[stuck[0].rank].stack}"
        pool.broken = True
        return timed_out

    def _receive(self, pool: _Pool, w: _Worker, result: RankResult) -> bool:
        """Handle one message; False when this rank has nothing more to say."""
        try:
            message = w.conn.recv()
        except (EOFError, OSError):
            self._died(pool, w, result)
            return False
        kind = message[0]
        if kind in ("pdb", "pdb-done"):
            self._debugger_message(pool, w, kind)
            return True
        if kind == "report":
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=message[1])
            result.reports.append(report)
            result.report_times.append(float(message[2]))
            return True
        if kind == "done":
            payload = message[1]
            result.done = True
            result.error = payload.get("error")
            result.notes = list(payload.get("notes", []))
            peer = payload.get("peer_failures")
            result.peer_failures = {int(k): str(v) for k, v in peer.items()} if peer else None
            if payload.get("broken") or result.error is not None:
                pool.broken = True
            if payload.get("exit"):  # 'q' in a rank's debugger: stop the session, as pytest does
                self._exit_reason = str(payload["exit"])
            if self._gate.rank == w.rank:
                self._gate.release()
            return False
        if kind == "fatal":
            result.error = str(message[1])
            pool.broken = True
            return False
        logger.warning("unexpected message from rank %d: %r", w.rank, kind)
        return True

    def _debugger_message(self, pool: _Pool, w: _Worker, kind: str) -> None:
        """A rank's pytest enters its debugger (may it have the terminal?) or left it."""
        if kind == "pdb":
            peers = [(o.rank, o.pid) for o in pool.workers if o is not w and o.alive()]
            w.conn.send(("pdb-reply", self._gate.request(w.rank, peers)))
        else:
            self._gate.release()

    def _died(self, pool: _Pool, w: _Worker, result: RankResult) -> None:
        pool.broken = True
        if self._gate.rank == w.rank:
            self._gate.release()
        result.died_at = time.time()
        code = w.exit_code(5.0)
        if code is None:  # its pipe closed, yet the process lives on: make it a death
            w.kill()
            code = w.exit_code(5.0)
        result.exit_code = code if code is not None else -int(signal.SIGKILL)
        result.log_tail = w.log_tail()

    def _deadline_verdict(self) -> str:
        """The watchdog's cross-rank table for this test's job (the same one a hang raises)."""
        from torch._C._distributed_c10d import PrefixStore

        from distruntime.control.snapshot import job_report

        try:
            job = PrefixStore(f"drt/{self._seq}", self._get_store())
            report = job_report(job, reason="deadline", ask=True)
        except Exception as error:  # the stacks below still tell most of it
            logger.debug("no deadline verdict: %s", error)
            return ""
        return report.format(stacks=False) if report is not None else ""

    def _dump_stacks(self, workers: list[_Worker]) -> dict[int, str]:
        """SIGUSR1 -> faulthandler writes every thread's stack to the rank's stack file."""
        sizes = {}
        for w in workers:
            sizes[w.rank] = w.stack_path.stat().st_size if w.stack_path.exists() else 0
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGUSR1)
        deadline = time.monotonic() + _STACK_WAIT_S
        last: dict[int, int] = {}
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = {w.rank: w.stack_path.stat().st_size if w.stack_path.exists() else 0 for w in workers}
            if all(now[r] > sizes[r] for r in now) and now == last:
                break
            last = now
        stacks = {}
        for w in workers:
            try:
                with w.stack_path.open("rb") as f:
                    f.seek(sizes[w.rank])
                    stacks[w.rank] = f.read().decode(errors="replace")
            except OSError:
                stacks[w.rank] = ""
        return stacks

    # ------------------------------------------------------------------ helpers
    def _timeout(self, spec: DistSpec) -> tuple[float, str]:
        if spec.timeout is not None:
            return spec.timeout, f"marker timeout={spec.timeout:g}"
        return self.settings.timeout_s, self.settings.timeout_origin

    def _cuda_devices(self) -> int:
        if self._cuda_count is None:
            import torch

            self._cuda_count = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
        return self._cuda_count

    def _get_zygote(self) -> _Zygote:
        if self._zygote is not None and not self._zygote.alive():
            logger.warning("the zygote process exited; starting another")
            self._zygote = None
        if self._zygote is None:
            # Measured once, when the first pool starts (pytest-cov has started by then).
            self._coverage = _coverage.rank_settings(self.config, self._basedir() / "coverage")
            self._tty = terminal_path() if self.config.getoption("usepdb", False) else None
            zygote = _Zygote(self._basedir(), _rank_env(), str(self.config.invocation_params.dir),
                             capture_off=self.config.getoption("capture", "fd") == "no")
            self._get_store()  # the controller imports torch while the zygote does
            try:
                zygote.await_ready(_STARTUP_TIMEOUT_S)
            except PoolStartError:
                zygote.stop()
                raise
            self._zygote = zygote
        return self._zygote

    def _get_store(self) -> Any:
        if self._store is None:
            from datetime import timedelta

            from torch._C._distributed_c10d import TCPStore

            # Port 0: the kernel picks a free port and the store keeps it bound.
            self._store = TCPStore(
                _LOOPBACK, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=300)
            )
            logger.debug("controller store listening on %s:%d", _LOOPBACK, self._store.port)
        return self._store

    def _basedir(self) -> Path:
        """Scratch space of this controller (logs, shared dirs, rank coverage); removed at shutdown."""
        if self._base is None:
            self._base = Path(tempfile.mkdtemp(prefix="pytest-distruntime-"))
        return self._base

    def _pytest_args(self, nodeids: list[str], basetemp: Path) -> list[str]:
        """The controller's relevant options, for the ranks' own pytest sessions."""
        opt = self.config.getoption  # public accessor; dest names checked by test_pytest_compat
        args = [
            f"--rootdir={self.config.rootpath}",
            "-p", "no:cacheprovider",
            "-o", "addopts=",  # already applied here; re-reading them could start xdist in a rank
            f"--basetemp={basetemp}",
            "--color=no",
            f"--import-mode={opt('importmode', 'prepend')}",
            f"--capture={opt('capture', 'fd')}",
            f"--tb={opt('tbstyle', 'auto')}",
            f"--assert={opt('assertmode', 'rewrite')}",
        ]
        if self.config.inipath is not None:
            args += ["-c", str(self.config.inipath)]
        for plugin in opt("plugins", None) or []:
            args += ["-p", plugin]
        for override in opt("override_ini", None) or []:
            args += ["-o", override]
        for warning in opt("pythonwarnings", None) or []:
            args += ["-W", warning]
        # The rank process imports distruntime before its pytest session starts.
        args += ["-W", "ignore:Module already imported so cannot be rewritten"
                       ":pytest.PytestAssertRewriteWarning"]
        if opt("showlocals", False):
            args.append("-l")
        if opt("confcutdir", None):
            args.append(f"--confcutdir={opt('confcutdir')}")
        if opt("noconftest", False):
            args.append("--noconftest")
        if opt("log_level", None):
            args.append(f"--log-level={opt('log_level')}")
        if self._tty is not None:  # --pdb, and a terminal to debug on (see _debugger.py)
            args.append("--pdb")
            pdbcls = opt("usepdb_cls", None)
            if pdbcls:
                args.append(f"--pdbcls={pdbcls[0]}:{pdbcls[1]}")
        verbose = int(opt("verbose", 0))
        args += ["-v"] * verbose if verbose > 0 else ["-q"] * (-verbose)
        return [*args, *nodeids]


def _has_problem(result: RankResult) -> bool:
    return result.exit_code is not None or result.error is not None or any(
        r.failed or r.skipped for r in result.reports
    )


def _skip_reports(item: pytest.Item, reason: str) -> list[pytest.TestReport]:
    path, lineno, _ = item.location
    return [
        pytest.TestReport(item.nodeid, item.location, keywords(item), "skipped",
                          (path, (lineno or 0) + 1, f"Skipped: {reason}"), "setup"),
        pytest.TestReport(item.nodeid, item.location, keywords(item), "passed", None, "teardown"),
    ]


def _error_reports(item: pytest.Item, message: str) -> list[pytest.TestReport]:
    return [
        pytest.TestReport(item.nodeid, item.location, keywords(item), "failed", message, "setup"),
        pytest.TestReport(item.nodeid, item.location, keywords(item), "passed", None, "teardown"),
    ]
