"""Acting on this host: signalling a process and writing its error file, on local evidence only.

The store is unauthenticated, so nothing read from it may pick a process to signal or a
path to write. A rank may end a *local peer* of its job only when this host itself shows
that the pid is that peer:

* the peer wrote its pid and process start time into its own node-local slot (a file in a
  private 0700 directory of this user: :mod:`distruntime.control.channel`);
* ``/proc/PID/stat`` still shows that start time (so the pid was not reused), checked again
  through a ``pidfd`` taken before the signal (``os.pidfd_open`` +
  ``signal.pidfd_send_signal`` signal exactly the process that was opened; without them,
  the start time is re-read right before ``os.kill``);
* never a pid <= 1 and never a process group.

The peer's torchrun error file comes from that process's own environment
(``/proc/PID/environ``), never from the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

from distruntime.control.channel import process_start_time
from distruntime.control.protocol import as_int
from distruntime.errorfile import ENV_VAR, write_error_file

__all__ = ["environ_of", "kill_local_peer"]

logger = logging.getLogger("distruntime")

_pidfd_open = getattr(os, "pidfd_open", None)
_pidfd_send_signal = getattr(signal, "pidfd_send_signal", None)


def environ_of(pid: int) -> dict[str, str]:
    """The environment a local process was started with (``/proc/PID/environ``); ``{}`` if unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read(1 << 20)
    except OSError:
        return {}
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if sep:
            env[name.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _same_process(pid: int, start: int) -> bool:
    return pid > 1 and start > 0 and process_start_time(pid) == start


def kill_local_peer(slot: Mapping[str, Any], error: BaseException, why: str) -> bool:
    """SIGKILL the local rank described by its own ``slot``, after writing ``error`` to its error file.

    Returns True when the signal was sent. Refuses (logs, returns False) when the slot does
    not name a live process with the start time it recorded itself.

    Example:
        >>> kill_local_peer({"rank": 1, "pid": 1, "start": 5}, RuntimeError("x"), "test")
        False
    """
    rank = as_int(slot.get("rank"), -1)
    pid = as_int(slot.get("pid"), 0, low=0)
    start = as_int(slot.get("start"), 0, low=0)
    if not _same_process(pid, start):
        logger.warning("not killing rank %d: pid %d is not the process that checked in on this host "
                       "(gone, reused, or not recorded)", rank, pid)
        return False
    pidfd: int | None = None
    if _pidfd_open is not None:
        try:
            pidfd = _pidfd_open(pid)
        except OSError as exc:
            logger.warning("not killing rank %d (pid %d): %s", rank, pid, exc)
            return False
    try:
        if not _same_process(pid, start):  # the pidfd (or, without one, the pid) is still the rank
            logger.warning("not killing rank %d: pid %d changed hands", rank, pid)
            return False
        path = environ_of(pid).get(ENV_VAR, "")
        if path:
            write_error_file(error, path)
        logger.error("killing rank %d (pid %d): %s", rank, pid, why)
        if pidfd is not None and _pidfd_send_signal is not None:
            _pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except OSError as exc:
        logger.warning("could not kill rank %d (pid %d): %s", rank, pid, exc)
        return False
    finally:
        if pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(pidfd)
