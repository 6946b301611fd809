"""Telling peers why the job stopped, in O(N) store requests.

When a rank fails, its peers usually see only a transport symptom ("Connection closed
by peer", a collective timeout) that names no rank. Every failing rank therefore writes
one record to the rendezvous store before it shuts its group down:

* a **root** record when its own code failed (an exception, SIGTERM, Ctrl-C): appended to
  ``failed/log``, and the first one also claims ``failed/root``;
* a **peer** record when its error is a transport symptom of someone else's failure.

A rank with a peer error first looks at its own host: a local rank whose process is gone
(the node-local channel holds its pid and start time, written by that rank itself) exited
without a word (``os._exit``, SIGKILL, a crash), and is recorded as the root cause on its
behalf. Then it waits -- one blocking request, bounded -- for ``failed/root`` and reads it.
Per rank that is four requests, whatever the world size; nothing is read once per peer.
The result is a :class:`PeerFailureError` naming the rank and, where it reported one, its
exception.

The launcher's stop is no root cause when one is already on record: torchrun SIGTERMs every
rank once the failed one exits, and a rank that learns of the failure second-hand (blocked in
a group a wrapper keeps alive) may see that SIGTERM first. A :class:`SignalExit` with a peer's
root failure on record (:func:`root_failure_on_record`, one request) is reported as that
peer's failure, and recorded as a peer record, not a second root.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch._C._distributed_c10d import Store

from distruntime.control.channel import HostChannel, process_start_time
from distruntime.control.protocol import append, as_int, as_str, claim, parse_record, read
from distruntime.errorfile import write_error_file
from distruntime.errors import PeerFailureError, SignalExit
from distruntime.rendezvous import Rendezvous
from distruntime.teardown import run_bounded

__all__ = [
    "describe", "is_peer_symptom", "linger_for_peers", "report_failure", "report_now",
    "root_failure_on_record",
]

logger = logging.getLogger("distruntime")

# How long a peer waits for the failed rank's record.
PEER_WINDOW_S = 2.0
# How long a failing rank that hosts the store stays, so peers can still read it.
LINGER_S = 3.0
# Bound on each store operation on the failure path (its host may be gone).
_STORE_TIMEOUT = timedelta(seconds=2)
_ROOT_KEY = "failed/root"
_LOG_KEY = "failed/log"
_COUNT_KEY = "failed/n"
# Above this world size a rank that finds no root cause counts the silent ranks instead
# of reading every record (the log grows with N; a full read per rank would be O(N^2)).
_LIST_SILENT_UP_TO = 4096
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


def describe(exc: BaseException) -> str:
    """One line: the exception type and the first line of its message.

    Example:
        >>> describe(ValueError("bad batch\\nmore"))
        'ValueError: bad batch'
    """
    if isinstance(exc, SignalExit):
        return f"terminated by signal {exc.signum}"
    text = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_peer_symptom(exc: BaseException) -> bool:
    """Whether ``exc`` is what a rank sees when another rank failed.

    Example:
        >>> closed = RuntimeError("Connection closed by peer [127.0.0.1]:1234")
        >>> is_peer_symptom(closed), is_peer_symptom(KeyError())
        (True, False)
    """
    if isinstance(exc, PeerFailureError):
        return True
    if not isinstance(exc, RuntimeError):  # DistError subclasses RuntimeError
        return False
    return any(symptom in str(exc) for symptom in _PEER_SYMPTOMS)


# A root record a local peer publishes for a rank that vanished (the host's own evidence).
_EXITED = "exited without reporting an error"


def _record(rank: int, root: bool, what: str) -> str:
    return json.dumps({"rank": rank, "root": root, "what": what[:600]})


def _publish_root(store: Store, rank: int, what: str) -> None:
    line = _record(rank, True, what)
    append(store, _LOG_KEY, line + "\n")
    claim(store, _ROOT_KEY, line)
    _count(store)


def _publish_peer(store: Store, rank: int, what: str) -> None:
    try:
        append(store, _LOG_KEY, _record(rank, False, what) + "\n")
        _count(store)
    except dist.DistError as error:  # the report this rank raises stands without it
        logger.debug("could not record this rank's peer failure: %s", error)


def _count(store: Store) -> None:
    """Count this rank's report. The last request: a foreign value under the counter makes
    the store drop this connection, and by then the record is in."""
    try:
        store.add(_COUNT_KEY, 1)
    except dist.DistError as error:
        logger.debug("could not count this failure report: %s", error)


def _caused_by(culprit: int, what: str, rank: int, saw: str) -> PeerFailureError:
    first = (f"rank {culprit} {what}; rank {rank} stopped because of it. (os._exit, a signal such "
             "as SIGKILL, or a crash end a rank without a report.)" if what.startswith(_EXITED)
             else f"rank {culprit} failed first ({what}); rank {rank} stopped because of it. "
             "The failed rank's log has the full traceback.")
    return PeerFailureError(
        f"{first} This rank saw: {saw}",
        {culprit: what},
        root_reported=True,
    )


def root_failure_on_record(store: Store, rank: int, saw: str) -> PeerFailureError | None:
    """The error naming another rank's root failure, if one is on record: one request, never waits.

    ``saw`` is what this rank itself saw (e.g. ``"terminated by signal 15"``). The record is
    untrusted store content: a malformed one, or this rank's own, counts as none.

    Example:
        >>> from torch.distributed import HashStore
        >>> store = HashStore()
        >>> root_failure_on_record(store, 2, "terminated by signal 15") is None
        True
        >>> _ = store.set("failed/root", '{"rank": 1, "root": true, "what": "ValueError: bad"}')
        >>> print(root_failure_on_record(store, 2, "terminated by signal 15"))  # doctest: +ELLIPSIS
        rank 1 failed first (ValueError: bad); rank 2 stopped because of it. ...
    """
    root = _parse(read(store, _ROOT_KEY), _ROOT_KEY)
    if root is None or root[0] == rank:
        return None
    return _caused_by(root[0], root[2], rank, saw)


def report_now(rdzv: Rendezvous | None, rank: int, exc: BaseException | None) -> None:
    """The last words of a rank ended during teardown (a second SIGTERM): log and write its error.

    The error is this rank's own root failure, else a peer's root failure on record (one
    request, bounded), else what this rank saw. Never raises.
    """
    error: BaseException | None = exc
    if rdzv is not None and (exc is None or is_peer_symptom(exc) or isinstance(exc, SignalExit)):
        found: list[PeerFailureError | None] = [None]

        def look() -> None:
            found[0] = root_failure_on_record(rdzv.store, rank, describe(exc) if exc else "a stop signal")

        run_bounded(look, _STORE_TIMEOUT.total_seconds() + 1, "reading the root failure")
        error = found[0] or exc
    if error is None:
        return
    logger.error("rank %d ends during teardown (a second stop signal): %s", rank, describe(error))
    write_error_file(error)


def _parse(raw: bytes | str | None, key: str) -> tuple[int, bool, str] | None:
    data = parse_record(raw, key, limit=4096)
    if data is None:
        return None
    rank = as_int(data.get("rank"), -1, low=0)
    what = as_str(data.get("what"), limit=600)
    if rank < 0 or not isinstance(data.get("root"), bool):
        logger.warning("ignored a malformed failure record under %r", key)
        return None
    return rank, bool(data["root"]), what


def exited_local_ranks(channel: HostChannel | None, world_size: int, me: int) -> dict[int, str]:
    """Ranks on this host whose process is gone, by the host's own evidence (their slots)."""
    if channel is None:
        return {}
    gone: dict[int, str] = {}
    for rank, slot in channel.read_slots().items():
        pid = as_int(slot.get("pid"), 0, low=0)
        if rank == me or rank >= world_size or slot.get("left") or pid <= 1:
            continue
        start = process_start_time(pid)
        if start is None or start != as_int(slot.get("start"), -1) or _zombie(pid):
            gone[rank] = f"{_EXITED} (pid {pid} on {socket.gethostname()} is gone)"
    return gone


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def report_failure(
    rdzv: Rendezvous, rank: int, exc: BaseException, where: str = "", channel: HostChannel | None = None
) -> PeerFailureError | None:
    """Publish this rank's failure; if it only suffered a peer's, return the error naming it.

    ``where`` is appended to the exception's description, e.g. the mesh dim of the
    collective that failed (``" (in a collective over mesh dim 'tp')"``).
    """
    what = describe(exc) + where
    try:
        return _report(rdzv.store, rdzv.launch.world_size, rank, exc, what, channel=channel)
    except dist.DistError as error:
        lost: BaseException = error
    # The store may have dropped this connection alone (its server drops a client whose
    # request fails): once more on a new one, where torch can open it (Store.clone).
    clone = getattr(rdzv.store, "clone", None)
    if clone is not None and _accepts_connections(rdzv.address):
        try:
            return _report(clone(), rdzv.launch.world_size, rank, exc, what, channel=channel)
        except dist.DistError as error:
            lost = error
    return _store_lost(rdzv, rank, exc, what, lost)


def _report(store: Store, world: int, rank: int, exc: BaseException, what: str, *,
            channel: HostChannel | None) -> PeerFailureError | None:
    store.set_timeout(_STORE_TIMEOUT)
    if isinstance(exc, SignalExit):  # the launcher's stop, after a peer's failure?
        named = root_failure_on_record(store, rank, what)
        if named is not None:
            _publish_peer(store, rank, what)
            return named
        # A local peer died, not yet on record; or the signal landed as this rank was already
        # unwinding from a peer's failure (a broken collective): wait for the root like a victim.
        context = exc.__context__
        if exited_local_ranks(channel, world, rank) or (context is not None and is_peer_symptom(context)):
            return _find_cause(store, rank, what, world, channel)
    if not is_peer_symptom(exc):
        _publish_root(store, rank, what)
        return None
    return _find_cause(store, rank, what, world, channel)


def _store_lost(rdzv: Rendezvous, rank: int, exc: BaseException, what: str,
                store_error: BaseException) -> PeerFailureError | None:
    if rdzv.hosts_store or not is_peer_symptom(exc):
        logger.warning("could not record this failure for peers: %s", store_error)
        return None
    host = "torchrun's agent" if rdzv.launch.agent_store else "rank 0"
    if _accepts_connections(rdzv.address):
        return PeerFailureError(
            f"the rendezvous store at {rdzv.address} dropped rank {rank}'s connection while "
            f"{host}, which hosts it, is still up (torch's store server drops a client whose "
            "request fails, e.g. an add on a key something other than the job wrote: see "
            f"docs/security.md); rank {rank} stopped without learning which rank failed "
            f"first. This rank saw: {what}",
            {},
        )
    return PeerFailureError(
        f"{host}, which hosts the rendezvous store at {rdzv.address}, is gone (it exited or "
        f"crashed: see its log); rank {rank} stopped because of it. This rank saw: "
        f"{what}",
        {0: "lost"} if not rdzv.launch.agent_store else {},
    )


def _accepts_connections(address: str) -> bool:
    """Whether something still listens at ``host:port`` (one TCP connect, 1 s at most)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _find_cause(store: Store, rank: int, saw: str, world: int,
                channel: HostChannel | None) -> PeerFailureError:
    exited = exited_local_ranks(channel, world, rank)
    for other, what in sorted(exited.items()):  # the host's own evidence, recorded for every peer
        claim = f"{rank}"
        if bytes(store.compare_set(f"failed/exited/{other}", "", claim)).decode() == claim:
            _publish_root(store, other, what)  # once, by the first local peer to see it
    deadline = time.monotonic() + PEER_WINDOW_S
    try:
        store.wait([_ROOT_KEY], timedelta(seconds=PEER_WINDOW_S))
        root = _parse(read(store, _ROOT_KEY), _ROOT_KEY)
        if root is None:  # a foreign value holds the key: the log still has the real root
            root = _root_from_log(store, deadline)
    except dist.DistError:
        root = None
    _publish_peer(store, rank, saw)
    if root is not None and root[0] != rank:
        return _caused_by(root[0], root[2], rank, saw)
    suspects = _silent_ranks(store, world, rank)
    named = "; ".join(f"rank {r} {what}" for r, what in sorted(suspects.items())[:16])
    more = f" ... ({len(suspects)} in all)" if len(suspects) > 16 else ""
    return PeerFailureError(
        f"{named + more or 'every rank reported only peer errors'}; rank {rank} stopped because of it. "
        f"(os._exit, a signal such as SIGKILL, or a crash end a rank without a report.) "
        f"This rank saw: {saw}",
        suspects,
    )


def _root_from_log(store: Store, deadline: float) -> tuple[int, bool, str] | None:
    """The first well-formed root record of the log, polled until ``deadline``.

    Only when ``failed/root`` holds something distruntime did not write (the store is
    unauthenticated): garbage there must not hide the real root failure.
    """
    while True:
        for line in (read(store, _LOG_KEY) or b"").splitlines()[:1024]:
            parsed = _parse(line, _LOG_KEY)
            if parsed is not None and parsed[1]:
                return parsed
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _silent_ranks(store: Store, world: int, me: int) -> dict[int, str]:
    """Ranks that never reported (read once, after the window, only when no root came)."""
    if world > _LIST_SILENT_UP_TO:
        return {}
    reported = {me}
    for line in (read(store, _LOG_KEY) or b"").splitlines()[: 4 * world]:
        parsed = _parse(line, _LOG_KEY)
        if parsed is not None:
            reported.add(parsed[0])
    return {r: "alive but never reported: it hangs or has not reached this point"
            for r in range(world) if r not in reported}


def linger_for_peers(rdzv: Rendezvous, channel: HostChannel | None = None) -> None:
    """Keep the store (hosted here) up until every peer reported, at most ``LINGER_S``."""
    deadline = time.monotonic() + LINGER_S
    world = rdzv.launch.world_size
    try:
        while time.monotonic() < deadline:
            if int(rdzv.store.add(_COUNT_KEY, 0)) >= world:
                return
            time.sleep(0.1)
    except dist.DistError as error:
        logger.debug("stopped waiting for peers: %s", error)


def failure_log(store: Store) -> list[dict[str, Any]]:
    """Every failure record of the job (for tests and tools; one read)."""
    records = []
    for line in (read(store, _LOG_KEY) or b"").splitlines():
        parsed = _parse(line, _LOG_KEY)
        if parsed is not None:
            records.append({"rank": parsed[0], "root": parsed[1], "what": parsed[2]})
    return records


