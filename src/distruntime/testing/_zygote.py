"""The zygote: one process that imports torch once and forks every rank process.

``import torch`` costs 1.5-2.5 s of CPU per process; a rank forked from a process that
has already imported it starts in milliseconds. The zygote imports torch, pytest and
the rank worker, never touches a device or starts a thread, and then serves requests
from the controller over a pipe:

* ``("fork", {"log": path, "stacks": path, "redirect": bool})`` followed by the rank's
  end of a fresh pipe (passed as a file descriptor): forks a rank process, which calls
  ``setsid()`` (its own process group, killed as a whole by the controller), points its
  stdout/stderr at its log and runs :func:`distruntime.testing._worker.serve`. Reply:
  ``("forked", pid)``.
* ``("stop", None)`` or the controller going away (end of file): kill every rank's
  process group and exit.

The zygote reaps its children and reports each exit as ``("exited", pid, code)``
(negative code: killed by that signal), since the controller is not their parent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle
from typing import Any, NoReturn

__all__ = ["main"]


def main() -> None:
    """Entry point: ``python -c "from distruntime.testing._zygote import main; main()" FD``."""
    conn = Connection(int(sys.argv[1]))
    from distruntime.testing import _worker

    _worker.preload()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake the loop up
    children: set[int] = set()
    conn.send(("ready", os.getpid()))
    try:
        while True:
            ready = wait([conn, wake_r])
            if wake_r in ready:
                os.read(wake_r, 4096)
                _reap(conn, children)
            if conn in ready:
                try:
                    kind, request = conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "stop":
                    break
                if kind == "fork":
                    rank_fd = recv_handle(conn)
                    pid = _fork(conn, (wake_r, wake_w), rank_fd, request)
                    children.add(pid)
                    conn.send(("forked", pid))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    os._exit(0)


def _reap(conn: Connection, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        with contextlib.suppress(OSError):
            conn.send(("exited", pid, os.waitstatus_to_exitcode(status)))


def _fork(conn: Connection, wake: tuple[int, int], rank_fd: int, request: dict[str, Any]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _become_rank(conn, wake, rank_fd, request)
    os.close(rank_fd)
    return pid


def _become_rank(conn: Connection, wake: tuple[int, int], rank_fd: int, request: dict[str, Any]) -> NoReturn:
    """In the forked child: drop the zygote's state, then serve as a rank process."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        conn.close()
        for fd in wake:
            os.close(fd)
        os.setsid()
        if request["redirect"]:
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()  # a fork shares the zygote's global numpy state
        from distruntime.testing import _worker

        _worker.serve(rank_fd, request["stacks"])
    finally:
        os._exit(70)
