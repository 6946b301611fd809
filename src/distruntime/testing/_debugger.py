"""``pytest --pdb`` for N-rank tests: the failing rank's debugger on the person's terminal.

A rank process has no terminal of its own (its own session, output in a log file). With
``--pdb`` and a terminal, the controller forwards ``--pdb`` to the ranks and tells them
the terminal's device (:func:`terminal_path`). When pytest enters the debugger in a rank
(a failure, or ``breakpoint()``), the rank asks the controller first (public hooks
``pytest_enter_pdb``/``pytest_leave_pdb``, :class:`RankDebugger`):

* the first rank of a test to ask gets the terminal: its debugger reads and writes the
  terminal device; the controller stops the other ranks of the test (SIGSTOP to their
  process groups, so nothing times out or prints meanwhile) and pauses the test's
  deadline and grace period (:class:`DebugGate`);
* when that debugger ends (``c``: the test goes on; ``q``: the session stops, as with
  pytest's own ``--pdb``), the other ranks are continued (SIGCONT) and the clocks
  restart;
* a later rank of the same test (e.g. a peer that failed because of the first) gets no
  debugger: one post-mortem per test, on the rank that failed first.

Without a terminal (CI, ``nohup``, output piped with no controlling terminal) nothing is
forwarded, nothing waits for input, and the failure says how to debug it from a
terminal (:func:`rerun_command`). Python 3.11 has no way to attach a debugger to a
running process (``python -m pdb -p PID`` comes with 3.14), so that is a command to
re-run the test, not to attach.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import pytest

__all__ = ["DebugGate", "RankDebugger", "rerun_command", "terminal_path"]

logger = logging.getLogger("distruntime.testing")


def terminal_path() -> str | None:
    """The device of this process's controlling terminal (``/dev/pts/3``), or ``None``.

    Found from the kernel's record of the controlling terminal, not from file
    descriptor 0 (pytest's capture replaced it), and checked by opening it: there is
    no terminal to debug on exactly when that fails (CI, ``setsid``, ``nohup``).

    Example::

        tty = terminal_path()   # None in CI
    """
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)  # ENXIO: no controlling terminal
        os.close(fd)
        # Field 7 of /proc/self/stat: the device number of the controlling terminal.
        tty_nr = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[4])  # noqa: SIM115
    except (OSError, ValueError, IndexError):
        return None
    major, minor = (tty_nr >> 8) & 0xFFF, (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    for candidate in [*sorted(Path("/dev/pts").glob("[0-9]*")), *sorted(Path("/dev").glob("tty*"))]:
        with contextlib.suppress(OSError):
            if candidate.stat().st_rdev == os.makedev(major, minor):
                fd = os.open(candidate, os.O_RDWR | os.O_NOCTTY)
                os.close(fd)
                return str(candidate)
    return None


def rerun_command(config: pytest.Config, nodeid: str) -> str:
    """The command that debugs one test interactively, from the directory pytest ran in.

    Example::

        rerun_command(config, "test_m.py::test_x")
        # "cd /src/proj && /venv/bin/python -m pytest --pdb 'test_m.py::test_x'"
    """
    where = shlex.quote(str(config.invocation_params.dir))
    return f"cd {where} && {shlex.quote(sys.executable)} -m pytest --pdb {shlex.quote(nodeid)}"


class DebugGate:
    """Controller side: at most one rank of a test in its debugger, the others held.

    Example::

        gate.new_test()
        reply = gate.request(rank=1, peers=[(0, pid0)])   # SIGSTOPs pid0's group
        gate.release()                                   # SIGCONT; the pause is counted
        deadline += gate.take_pause()
    """

    def __init__(self) -> None:
        self.rank: int | None = None
        self._started = 0.0
        self._held: list[tuple[int, int]] = []
        self._used = False
        self._paused_s = 0.0

    def __repr__(self) -> str:
        return f"DebugGate(rank={self.rank}, held={[r for r, _ in self._held]})"

    @property
    def active(self) -> bool:
        return self.rank is not None

    def new_test(self) -> None:
        self.release()
        self._used = False
        self._paused_s = 0.0

    def request(self, rank: int, peers: list[tuple[int, int]]) -> dict[str, Any]:
        """Grant the terminal to ``rank`` (the first of this test to ask) and hold ``peers``."""
        if self._used:
            return {"granted": False}
        self._used = True
        self.rank, self._started, self._held = rank, time.monotonic(), []
        for peer_rank, pid in peers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGSTOP)
                self._held.append((peer_rank, pid))
        logger.debug("rank %d is in its debugger; holding %s", rank, self._held)
        return {"granted": True, "held": list(self._held)}

    def release(self) -> None:
        """The debugger ended (or its rank did): continue the held ranks, count the pause."""
        if self.rank is None:
            return
        for _, pid in self._held:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGCONT)
        self._paused_s += time.monotonic() - self._started
        self.rank, self._held = None, []

    def take_pause(self) -> float:
        """Seconds spent in debuggers since the last call: the deadline moves by this much."""
        paused, self._paused_s = self._paused_s, 0.0
        return paused


class RankDebugger:
    """Rank side (a pytest plugin in the rank's session): the debugger on the terminal."""

    def __init__(self, conn: Connection, rank: int, world_size: int, tty: str) -> None:
        self.conn = conn
        self.rank = rank
        self.world_size = world_size
        self.tty = tty
        self.active = False
        self._streams: tuple[TextIO, TextIO] | None = None

    def __repr__(self) -> str:
        return f"RankDebugger(rank={self.rank}, tty={self.tty!r}, active={self.active})"

    def _terminal(self) -> tuple[TextIO, TextIO]:
        if self._streams is None:
            # O_NOCTTY: this rank leads a session of its own and must not take the
            # terminal over as its controlling terminal.
            fd = os.open(self.tty, os.O_RDWR | os.O_NOCTTY)
            self._streams = (open(fd, encoding="utf-8", closefd=False),  # noqa: SIM115
                             open(fd, "w", encoding="utf-8", buffering=1))  # noqa: SIM115
        return self._streams

    @pytest.hookimpl
    def pytest_enter_pdb(self, config: pytest.Config, pdb: Any) -> None:
        self.conn.send(("pdb", {"pid": os.getpid()}))
        kind, reply = self.conn.recv()
        if kind != "pdb-reply" or not reply.get("granted"):
            # Another rank of this test had the debugger: continue at once.
            pdb.stdin, pdb.stdout, pdb.use_rawinput = io.StringIO("continue\n"), io.StringIO(), False
            return
        self.active = True
        stdin, stdout = self._terminal()
        pdb.stdin, pdb.stdout, pdb.use_rawinput = stdin, stdout, False
        held = ", ".join(f"{rank} (pid {pid})" for rank, pid in reply.get("held", [])) or "none"
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        stdout.write(
            f"\n>>> distruntime: debugger of rank {self.rank} of {self.world_size} (pid {os.getpid()}), "
            f"test {test}\n>>> other ranks held until it ends: {held}. "
            "'c' continues the session, 'q' stops it.\n"
        )

    @pytest.hookimpl
    def pytest_leave_pdb(self, config: pytest.Config, pdb: Any) -> None:
        self.end()

    def end(self) -> None:
        """Tell the controller this rank's debugger ended (also on 'q', which raises)."""
        if self.active:
            self.active = False
            self.conn.send(("pdb-done", None))
