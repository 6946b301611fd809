"""The node-local channel: what the ranks of one host share without the store.

One private directory per job and host (``/dev/shm/distruntime-<uid>/<digest>``, mode
0700, checked to be ours and not a link) holds

* ``rank-<r>.json`` -- a *slot* each rank rewrites in place every watchdog tick (atomic
  rename): pid and process start time (written by that process itself: the local evidence
  that a pid is a rank of this job), collective progress, where its main thread is, and,
  during an incident, its full state record;
* ``host.json`` -- what this host's waiter learned from the store: the last event, the
  incident's verdict;
* ``leader.lock`` -- the ``flock`` that makes one process per host the one that waits on
  the store for events (released by the kernel when that process dies).

Healthy ranks therefore cost the store nothing: a tick is a file write in memory.

Example:
    >>> import os
    >>> ch = HostChannel.open("example-job", "host-a")
    >>> ch.write_slot(3, {"rank": 3, "pid": os.getpid()})
    >>> sorted(ch.read_slots()), ch.read_slots()[3]["pid"] == os.getpid()
    ([3], True)
    >>> ch.close(3)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
from typing import IO, Any

from distruntime.control.protocol import MAX_RECORD_BYTES

__all__ = ["HostChannel", "process_start_time"]

logger = logging.getLogger("distruntime")

_HOST_FILE = "host.json"
_LOCK_FILE = "leader.lock"


def _base_dir() -> str:
    shm = "/dev/shm"
    root = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    return os.path.join(root, f"distruntime-{os.getuid()}")


def _private_dir(path: str) -> bool:
    """Create ``path`` (mode 0700) or accept it only if it is ours, a real directory, private."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        logger.warning("node-local channel disabled: %s is not a private directory of this user", path)
        return False
    return True


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (clock ticks since boot): with the pid, names one process.

    Example:
        >>> process_start_time(os.getpid()) == process_start_time(os.getpid()) is not None
        True
    """
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[19])  # fields after the command: state is 3rd field overall
    except (OSError, IndexError, ValueError):
        return None


class HostChannel:
    """This host's shared directory for one job (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"HostChannel({self.path!r}, leader={self.is_leader})"

    @classmethod
    def open(cls, namespace: str, host: str, create: bool = True) -> HostChannel | None:
        """The channel of job ``namespace`` on ``host``; None where no private directory can be had
        (or, with ``create=False``, where the job has none on this host)."""
        base = _base_dir()
        digest = hashlib.sha1(f"{namespace}\0{host}".encode()).hexdigest()[:20]
        path = os.path.join(base, digest)
        if not create and not os.path.isdir(path):
            return None
        try:
            if not (_private_dir(base) and _private_dir(path)):
                return None
        except OSError as error:
            logger.warning("node-local channel disabled: %s", error)
            return None
        return cls(path)

    # ------------------------------------------------------------------ files
    def _write(self, name: str, data: dict[str, Any]) -> None:
        try:
            self._write_once(name, data)
        except FileNotFoundError:
            # The last rank of an earlier runtime on this host removed the directory between
            # our open() and this write (it saw only "left" slots): make it again, once.
            if not _private_dir(self.path):
                raise
            self._write_once(name, data)

    def open_file(self, name: str) -> IO[str]:
        """A private read-write file of this channel (created, truncated, never a symlink)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        try:
            fd = os.open(os.path.join(self.path, name), flags, 0o600)
        except FileNotFoundError:  # removed under us, as in _write
            if not _private_dir(self.path):
                raise
            fd = os.open(os.path.join(self.path, name), flags, 0o600)
        return os.fdopen(fd, "w+", encoding="utf-8")

    def _write_once(self, name: str, data: dict[str, Any]) -> None:
        target = os.path.join(self.path, name)
        temp = f"{target}.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, separators=(",", ":"))
        os.replace(temp, target)

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            fd = os.open(os.path.join(self.path, name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def write_slot(self, rank: int, data: dict[str, Any]) -> None:
        """Rewrite this rank's slot (only the rank itself writes it)."""
        try:
            self._write(f"rank-{rank}.json", data)
        except OSError as error:
            logger.debug("could not write the node-local slot: %s", error)

    def read_slots(self) -> dict[int, dict[str, Any]]:
        """Every local rank's slot, by rank."""
        slots: dict[int, dict[str, Any]] = {}
        try:
            names = os.listdir(self.path)
        except OSError:
            return slots
        for name in names:
            if not (name.startswith("rank-") and name.endswith(".json")):
                continue
            number = name[5:-5]
            data = self._read(name) if number.isdigit() else None
            if data is not None:
                slots[int(number)] = data
        return slots

    def read_host(self) -> dict[str, Any]:
        return self._read(_HOST_FILE) or {}

    def write_host(self, data: dict[str, Any]) -> None:
        try:
            self._write(_HOST_FILE, data)
        except OSError as error:
            logger.debug("could not write the node-local host state: %s", error)

    # ------------------------------------------------------------------ leadership
    @property
    def is_leader(self) -> bool:
        return self._lock is not None

    def try_lead(self) -> bool:
        """Take the host's leader lock if it is free (non-blocking); True if this process holds it."""
        if self._lock is not None:
            return True
        try:
            fd = os.open(os.path.join(self.path, _LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            return False
        handle = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock = handle
        return True

    def close(self, rank: int, final: dict[str, Any] | None = None) -> None:
        """Leave: mark this rank's slot as left (``final``), give up leadership; the last rank
        out removes the directory."""
        self.write_slot(rank, final or {"rank": rank, "left": True})
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
        slots = self.read_slots()
        if slots and all(slot.get("left") for slot in slots.values()):
            with contextlib.suppress(OSError):
                for name in os.listdir(self.path):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.path, name))
                os.rmdir(self.path)
