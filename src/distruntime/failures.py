"""Telling peers why the job stopped.

When a rank fails, its peers usually see only a transport symptom ("Connection closed
by peer", a collective timeout) that names no rank. Every failing rank therefore writes
one record to the rendezvous store before it shuts its group down:

* a **root** record when its own code failed (an exception, SIGTERM, Ctrl-C);
* a **peer** record when its error is a transport symptom of someone else's failure.

A rank with a peer record waits a short, bounded window for a root record. If none
comes, the ranks that never reported are the suspects: on the same host, a vanished pid
proves the rank exited without a word (``os._exit``, SIGKILL, a crash); a live one hangs
or has not reached the collective yet. The result is a :class:`PeerFailureError` that
names the rank and, where it reported one, its exception.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch._C._distributed_c10d import Store

from distruntime.errors import PeerFailureError, SignalExit
from distruntime.rendezvous import Rendezvous

__all__ = ["linger_for_peers", "report_failure"]

logger = logging.getLogger("distruntime")

# How long a peer waits for the failed rank's record, or for every rank to report.
PEER_WINDOW_S = 2.0
# How long a failing rank that hosts the store stays, so peers can still read it.
LINGER_S = 3.0
# Bound on each store operation on the failure path (its host may be gone).
_STORE_TIMEOUT = timedelta(seconds=2)
# Text of the errors a rank sees when a *peer* failed (gloo, NCCL, the TCP store).
_PEER_SYMPTOMS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "NCCL communicator was aborted",
    "remote process exited",
    "Socket Timeout",
)


@dataclass(frozen=True)
class _Record:
    rank: int
    root: bool
    what: str


def describe(exc: BaseException) -> str:
    """One line: the exception type and the first line of its message."""
    if isinstance(exc, SignalExit):
        return f"terminated by signal {exc.signum}"
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_peer_symptom(exc: BaseException) -> bool:
    """Whether ``exc`` is what a rank sees when another rank failed."""
    if isinstance(exc, PeerFailureError):
        return True
    if not isinstance(exc, RuntimeError):  # DistError subclasses RuntimeError
        return False
    return any(symptom in str(exc) for symptom in _PEER_SYMPTOMS)


def _records(store: Store) -> list[_Record]:
    found = []
    for index in range(int(store.add("failed/count", 0))):
        data = json.loads(store.get(f"failed/{index}"))
        found.append(_Record(int(data["rank"]), bool(data["root"]), str(data["what"])))
    return found


def _publish(store: Store, rank: int, root: bool, what: str) -> None:
    index = int(store.add("failed/count", 1)) - 1
    store.set(f"failed/{index}", json.dumps({"rank": rank, "root": root, "what": what}))


def _whereabouts(store: Store, rank: int) -> tuple[str, int]:
    data = json.loads(store.get(f"who/{rank}"))
    return str(data["host"]), int(data["pid"])


def _pid_gone(pid: int) -> bool:
    """Whether a local pid has exited (a zombie not yet reaped by its parent counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def _exited_ranks(store: Store, ranks: list[int], known: dict[int, str]) -> dict[int, str]:
    """Of ``ranks``, those on this host whose process is gone, with a description."""
    here = socket.gethostname()
    for other in ranks:
        if other not in known:
            host, pid = _whereabouts(store, other)
            if host == here and _pid_gone(pid):
                known[other] = f"exited without reporting an error (pid {pid} on {host} is gone)"
    return known


def report_failure(
    rdzv: Rendezvous, rank: int, exc: BaseException, where: str = ""
) -> PeerFailureError | None:
    """Publish this rank's failure; if it only suffered a peer's, return the error naming it.

    ``where`` is appended to the exception's description, e.g. the mesh dim of the
    collective that failed (``" (in a collective over mesh dim 'tp')"``).
    """
    store, world = rdzv.store, rdzv.launch.world_size
    what = describe(exc) + where
    try:
        store.set_timeout(_STORE_TIMEOUT)
        if not is_peer_symptom(exc):
            _publish(store, rank, root=True, what=what)
            return None
        _publish(store, rank, root=False, what=what)
        return _find_cause(rdzv, rank, what, world)
    except dist.DistError as store_error:
        if rdzv.hosts_store or not is_peer_symptom(exc):
            logger.warning("could not record this failure for peers: %s", store_error)
            return None
        host = "torchrun's agent" if rdzv.launch.agent_store else "rank 0"
        return PeerFailureError(
            f"{host}, which hosts the rendezvous store at {rdzv.address}, is gone (it exited or "
            f"crashed: see its log); rank {rank} stopped because of it. This rank saw: "
            f"{what}",
            {0: "lost"} if not rdzv.launch.agent_store else {},
        )


def _find_cause(rdzv: Rendezvous, rank: int, saw: str, world: int) -> PeerFailureError:
    store = rdzv.store
    deadline = time.monotonic() + PEER_WINDOW_S
    exited: dict[int, str] = {}
    while True:
        records = _records(store)
        roots = {r.rank: r.what for r in records if r.root and r.rank != rank}
        if roots:
            named = "; ".join(f"rank {r} failed first ({what})" for r, what in sorted(roots.items()))
            return PeerFailureError(
                f"{named}; rank {rank} stopped because of it. The failed rank's log has the "
                f"full traceback. This rank saw: {saw}",
                roots,
                root_reported=True,
            )
        silent = [r for r in range(world) if r not in {rec.rank for rec in records}]
        _exited_ranks(store, silent, exited)
        # A rank that exited without a word is the cause: the other silent ranks are
        # alive and most likely still blocked with it, not at fault.
        if exited or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    suspects = exited or {r: "alive but never reported: it hangs or has not reached this point"
                          for r in silent}
    named = "; ".join(f"rank {r} {what}" for r, what in sorted(suspects.items()))
    return PeerFailureError(
        f"{named or 'every rank reported only peer errors'}; rank {rank} stopped because of it. "
        f"(os._exit, a signal such as SIGKILL, or a crash end a rank without a report.) "
        f"This rank saw: {saw}",
        suspects,
    )


def linger_for_peers(rdzv: Rendezvous) -> None:
    """Keep the store (hosted here) up until every peer reported, at most ``LINGER_S``."""
    deadline = time.monotonic() + LINGER_S
    world = rdzv.launch.world_size
    exited: dict[int, str] = {}
    try:
        while time.monotonic() < deadline:
            reported = {record.rank for record in _records(rdzv.store)}
            silent = [r for r in range(world) if r not in reported]
            if len(_exited_ranks(rdzv.store, silent, exited)) >= len(silent):
                return
            time.sleep(0.05)
    except dist.DistError as error:
        logger.debug("stopped waiting for peers: %s", error)
