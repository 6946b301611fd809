"""``distruntime doctor --nproc N``: start N local ranks, bounded in time.

Each child is ``python -m distruntime doctor`` with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1`` and ``MASTER_PORT`` set;
rank 0 hosts the rendezvous store there.

The port: the parent binds port 0 on loopback, reads the port the kernel gave, closes
the socket and hands the number to the children. Between that close and rank 0's bind
another program may take the port (a time-of-check/time-of-use race: the parent cannot
pass a bound socket to the store of another process). Rank 0 then exits with status
75 (its ``RendezvousError`` says the port is in use) and the parent retries the whole
launch once with a new port.

Each child runs in its own session (``start_new_session``): on the deadline, on an
error, or when the parent is interrupted or sent SIGTERM, the parent signals each
child's process group (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

from distruntime.cli.doctor import EXIT_PORT_IN_USE, EXIT_TIMEOUT

__all__ = ["child_environment", "free_port", "launch_local"]

logger = logging.getLogger("distruntime.doctor")

LOOPBACK = "127.0.0.1"
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers
# Variables other launchers set: removed from the children's environment so that a
# parent started inside a SLURM allocation or an MPI job does not pass them on.
_LAUNCHER_PREFIXES = (
    "SLURM_", "OMPI_COMM_WORLD_", "OMPI_MCA_ess_", "PMI_", "PMIX_", "MPI_LOCAL", "MV2_COMM_WORLD_",
    "JSM_NAMESPACE_", "TORCHELASTIC_",
)
_TORCH_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT",
)
# Time the children get less than the parent, so they report before being killed.
_CHILD_MARGIN_S = 3.0
_KILL_GRACE_S = 3.0
_POLL_S = 0.05


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago (see the module docstring for the race).

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_environment(base: Mapping[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """The environment of local rank ``rank``: ``base`` without other launchers' variables.

    ``OMP_NUM_THREADS`` defaults to 1, as torchrun sets it, so N ranks do not each
    start one thread per core.

    Example:
        >>> env = child_environment({"SLURM_PROCID": "3", "PATH": "/bin"}, 1, 2, 29500)
        >>> sorted(env)  # doctest: +NORMALIZE_WHITESPACE
        ['DISTRUNTIME_DOCTOR_NPROC', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
         'OMP_NUM_THREADS', 'PATH', 'RANK', 'WORLD_SIZE']
    """
    env = {
        name: value
        for name, value in base.items()
        if not name.startswith(_LAUNCHER_PREFIXES) and name not in _TORCH_VARIABLES
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(
        RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), DISTRUNTIME_DOCTOR_NPROC=str(nproc),
    )
    return env


def launch_local(
    nproc: int,
    child_args: Sequence[str],
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    started: float | None = None,
) -> int:
    """Run ``distruntime doctor <child_args>`` as ``nproc`` local ranks; the exit status.

    0 when every rank exited 0; 124 when ``timeout_s`` (counted from ``started``, a
    ``time.monotonic()`` value; default now) expired and the children were killed;
    otherwise the first non-zero status, rank 0's first.

    Example::

        status = launch_local(2, ["--max-bytes", "1K"], timeout_s=60)  # 0 when every rank passed
    """
    base = dict(os.environ if env is None else env)
    deadline = (time.monotonic() if started is None else started) + timeout_s
    previous = _terminate_on_sigterm()
    try:
        for attempt in (1, 2):
            port = free_port()
            status = _run_once(nproc, child_args, base, port, deadline)
            if status == EXIT_PORT_IN_USE and attempt == 1 and time.monotonic() < deadline - 5:
                logger.warning("port %d was taken between choosing it and rank 0 binding it; "
                               "retrying once with a new port", port)
                continue
            return status
        return EXIT_PORT_IN_USE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_on_sigterm() -> _Handler | None:
    """SIGTERM to the parent raises SystemExit, so the ``finally`` killing children runs.

    Returns the handler to put back (``None`` off the main thread: nothing installed).
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, handler)
    return signal.SIG_DFL if previous is None else previous


def _run_once(
    nproc: int, child_args: Sequence[str], base: Mapping[str, str], port: int, deadline: float
) -> int:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(nproc):
            budget = max(deadline - time.monotonic() - _CHILD_MARGIN_S, 1.0)
            cmd = [sys.executable, "-m", "distruntime", "doctor", *child_args, "--timeout", f"{budget:.1f}"]
            procs.append(subprocess.Popen(
                cmd, env=child_environment(base, rank, nproc, port), stdin=subprocess.DEVNULL,
                start_new_session=True,
            ))
        logger.info("started %d local rank(s) (pids %s), rendezvous %s:%d",
                    nproc, " ".join(str(p.pid) for p in procs), LOOPBACK, port)
        return _wait(procs, deadline)
    finally:
        _kill(procs)


def _wait(procs: list[subprocess.Popen[bytes]], deadline: float) -> int:
    while True:
        codes = [p.poll() for p in procs]
        if codes[0] == EXIT_PORT_IN_USE:
            return EXIT_PORT_IN_USE
        if all(c is not None for c in codes):
            break
        if time.monotonic() >= deadline:
            running = [f"rank {r} (pid {p.pid})" for r, p in enumerate(procs) if p.poll() is None]
            logger.error("doctor --nproc: timed out; still running: %s. Killing their process groups.",
                         ", ".join(running))
            return EXIT_TIMEOUT
        time.sleep(_POLL_S)
    failed = [(r, _status(c)) for r, c in enumerate(codes) if c]
    for rank, status in failed:
        logger.error("rank %d exited with status %d", rank, status)
    return failed[0][1] if failed else 0


def _status(code: int | None) -> int:
    """Popen's ``-signum`` for a killed child becomes the shell's ``128 + signum``."""
    if code is None:
        return EXIT_TIMEOUT
    return 128 - code if code < 0 else code


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each live child's process group, then SIGKILL what is left after a grace."""
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        _signal_group(proc, signal.SIGTERM)
    end = time.monotonic() + _KILL_GRACE_S
    for proc in live:
        try:
            proc.wait(max(end - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)  # start_new_session: the child leads its own group
