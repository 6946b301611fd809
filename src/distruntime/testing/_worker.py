"""A rank process: a long-lived pytest session that runs the tests the controller sends.

Forked by the zygote (``_zygote.py``, which imported torch once) into a session of its
own, so the controller can kill its whole process tree. It connects to the
controller's store, then runs
``pytest.main`` on the nodeids its pool may serve, with the controller's rootdir, ini
file, plugins and capture mode, so fixtures, assertion rewriting, captured output,
skips and xfails behave as in any pytest run. Each test is run with pytest's own
``pytest_runtest_protocol``; every report is sent back serialised, as pytest-xdist does.

Protocol (pickled tuples over a pipe): controller -> worker ``("init", dict)``,
``("run", dict)``, ``("stop", None)``; worker -> controller ``("ready", dict)``,
``("report", dict, time)``, ``("done", dict)``, ``("fatal", str)``.

SIGUSR1 dumps every thread's Python stack to STACKFILE (``faulthandler``), which works
even while the main thread is blocked inside a C++ collective.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

import pytest

from distruntime.testing import _context, _coverage, _pytest_compat
from distruntime.testing._debugger import RankDebugger

__all__ = ["RankServer", "preload", "serve"]

logger = logging.getLogger("distruntime.testing")

# How often a rank checks that its controller is still alive.
_ORPHAN_POLL_S = 0.2
# Variables the worker compares before/after each test (pytest sets this one itself).
_ENV_IGNORED = frozenset({"PYTEST_CURRENT_TEST"})


def _watch_parent() -> None:
    """Kill this rank's whole process group as soon as the controller is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(_ORPHAN_POLL_S)
            if os.getppid() != parent:
                os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="distruntime-orphan-watch", daemon=True).start()


def _connect_store(host: str, port: int) -> Any:
    """This rank's one client connection to the controller's store."""
    from torch._C._distributed_c10d import TCPStore

    return TCPStore(host, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=300))


def _reset_runtime_generation() -> None:
    """Every test starts the runtime's per-process counter from zero.

    ``DistributedRuntime`` namespaces its store keys with a per-process counter of the
    runtimes it started. Rank processes are reused, and one rank may have started more
    runtimes than another in earlier tests (a rank-dependent skip, a setup error);
    starting each test from zero keeps the ranks of one test in the same namespace. The
    test's own store prefix keeps tests apart.
    """
    from distruntime import registry

    with registry.REGISTRY.lock:
        if registry.REGISTRY.session is None:
            registry.REGISTRY.generation = 0


class RankServer:
    """pytest plugin object of a rank process: serves ``run`` requests in the test loop."""

    def __init__(self, conn: Connection, init: dict[str, Any]) -> None:
        self.conn = conn
        self.rank: int = init["rank"]
        self.world_size: int = init["world_size"]
        self.client = _connect_store(init["store_host"], init["store_port"])
        self._config: pytest.Config | None = None
        self.served = False
        self.collect_errors: list[str] = []
        self.sending = False
        self.expected_next: str | None = None
        self.broken = False
        self.coverage: Any = None  # this rank's coverage.Coverage when the session measures
        self.debugger: RankDebugger | None = None  # with --pdb and a terminal

    def __repr__(self) -> str:
        return f"RankServer(rank={self.rank}, world_size={self.world_size})"

    @pytest.hookimpl
    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_errors.append(f"{report.nodeid}: {report.longreprtext}"[-4000:])

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        config = self._config
        if not self.sending or config is None:
            return
        data = config.hook.pytest_report_to_serializable(config=config, report=report)
        self.conn.send(("report", data, time.time()))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        self.served = True
        self._config = session.config
        items = {item.nodeid: item for item in session.items}
        ready = {"pid": os.getpid(), "collected": list(items), "errors": self.collect_errors}
        self.conn.send(("ready", ready))
        while not self.broken:
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                break
            if kind == "stop":
                break
            if kind == "run":
                self._run(session, items, payload)
        self._teardown_all(session)
        if self.coverage is not None:
            _coverage.save_in_rank(self.coverage)
        # The rest of pytest's shutdown (summary, unconfigure, gc passes) is of no use
        # here and costs about a second with torch loaded.
        _exit_now(0)
        return True

    # ------------------------------------------------------------------ one test
    def _run(self, session: pytest.Session, items: dict[str, pytest.Item], job: dict[str, Any]) -> None:
        from torch._C._distributed_c10d import PrefixStore

        nodeid: str = job["nodeid"]
        item = items.get(nodeid)
        if item is None:
            errors = "; ".join(self.collect_errors) or "none"
            message = f"rank {self.rank} did not collect {nodeid!r}. Collection errors: {errors}"
            self.conn.send(("done", {"error": message}))
            return
        next_id: str | None = job["next_nodeid"]
        nextitem = items.get(next_id) if next_id is not None else None
        self._fix_setup_stack(session, item)
        timeout = float(job["timeout"])
        # One connection per rank process (a TCPStore client costs a connect and a
        # handshake); its timeout is reset for every test, since a runtime's failure
        # path shortens it through the prefix store.
        self.client.set_timeout(timedelta(seconds=timeout))
        ctx = _context.RankContext(
            rank=self.rank,
            world_size=self.world_size,
            backend=job["backend"],
            init=job["init"],
            store=PrefixStore(job["namespace"], self.client),
            launch_env=dict(job["launch_env"]),
            shared_tmp=Path(job["shared_tmp"]),
            deadline=time.monotonic() + timeout,
        )
        env_before = dict(os.environ)
        if not ctx.init:
            os.environ.update(ctx.launch_env)
        elif isinstance(item, pytest.Function):
            # The group is set up first, so a failing fixture on one rank is reported
            # to its peers (they are past the rendezvous) instead of stranding them in it.
            _pytest_compat.move_fixture_first(item, "dist_info")
        env_expected = dict(os.environ)
        _reset_runtime_generation()
        _context.activate(ctx)
        self.sending = True
        result: dict[str, Any] = {}
        try:
            item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        except pytest.exit.Exception as exc:  # 'q' in the debugger: the session stops
            result["exit"] = str(exc.msg) or "pytest.exit() in a rank"
            self.broken = True  # the test's teardown did not run
        except BaseException:  # an internal error: report it, keep serving if possible
            result["error"] = f"rank {self.rank}: internal error in {nodeid}:\n{traceback.format_exc()}"
            self.broken = True
        finally:
            self.sending = False
            _context.deactivate()
            if self.debugger is not None:
                self.debugger.end()
        self.expected_next = next_id
        result["notes"] = self._hygiene(env_expected, env_before)
        result["peer_failures"] = ctx.peer_failures
        result["broken"] = self.broken
        if self.coverage is not None:
            _coverage.save_in_rank(self.coverage)
        self.conn.send(("done", result))

    def _fix_setup_stack(self, session: pytest.Session, item: pytest.Item) -> None:
        """The previous test was told another next item: tear down what this one does not share."""
        if self.expected_next is None or self.expected_next == item.nodeid:
            return
        self._teardown_exact(session, item, f"fixture teardown before {item.nodeid}")

    def _teardown_all(self, session: pytest.Session) -> None:
        self._teardown_exact(session, None, "session fixture teardown")

    def _teardown_exact(self, session: pytest.Session, item: pytest.Item | None, what: str) -> None:
        """Tear fixtures down to what ``item`` shares (``None``: everything); log failures."""
        try:
            _pytest_compat.teardown_exact(session, item)
        except _pytest_compat.PytestCompatError:
            raise  # an unsupported pytest: loud (a "fatal" message), never a silent leak
        except BaseException as exc:
            logger.warning("rank %d: %s failed: %s", self.rank, what, exc)

    def _hygiene(self, env_expected: dict[str, str], env_before: dict[str, str]) -> list[str]:
        """What the test left behind in this process; undone where possible."""
        import torch.distributed as dist

        from distruntime.runtime import is_active
        from distruntime.teardown import shutdown_group

        notes = []
        if is_active():
            notes.append("left a DistributedRuntime open (its rank process is replaced)")
            self.broken = True
        elif dist.is_available() and dist.is_initialized():
            notes.append("left the default process group initialised (destroyed it)")
            shutdown_group(failed=True, timeout_s=10.0)
        changed = sorted(
            name for name in set(env_expected) | set(os.environ)
            if name not in _ENV_IGNORED and env_expected.get(name) != os.environ.get(name)
        )
        if changed:
            notes.append(f"changed environment variables {', '.join(changed)} (restored)")
        for name in set(os.environ) - set(env_before):
            del os.environ[name]
        os.environ.update(env_before)
        return notes


def _exit_now(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def preload() -> None:
    """What every rank needs, imported once in the zygote before it forks ranks."""
    import torch
    import torch.distributed

    import distruntime.runtime
    import distruntime.testing.helpers
    import distruntime.testing.plugin  # noqa: F401

    del torch


def serve(fd: int, stack_path: str) -> NoReturn:
    """Run this rank process: connect, start the pytest session, serve tests; never returns."""
    conn = Connection(fd)
    stack_file = open(stack_path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process lifetime
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True, chain=False)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    _watch_parent()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s rank-worker %(name)s: %(message)s")
    try:
        kind, init = conn.recv()
    except (EOFError, OSError):
        _exit_now(0)
    assert kind == "init", kind
    _context.mark_rank_process()
    server = RankServer(conn, init)
    plugins: list[object] = []
    if init.get("coverage"):
        # Started before the session collects, so import-time lines of test modules count.
        server.coverage, plugins = _coverage.start_in_rank(init["coverage"], server.rank, os.getpid())
    if init.get("pdb_tty"):
        server.debugger = RankDebugger(conn, server.rank, server.world_size, init["pdb_tty"])
        plugins.append(server.debugger)
    code: int | pytest.ExitCode = 0
    try:
        code = pytest.main(list(init["pytest_args"]), plugins=[server, *plugins])
    except BaseException:
        conn.send(("fatal", traceback.format_exc()))
        code = 3
    if not server.served:
        conn.send(("fatal", f"pytest in the rank process exited with {code!r} before running tests; "
                            "its log has the cause"))
    _exit_now(0)
