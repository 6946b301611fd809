"""Rendezvous: open the store, let every rank check in, and explain failures.

torch alone reports a missing rank as "1/3 clients joined" after its timeout. Here
every rank writes who it is (host, pid) under its rank's key before anything blocks,
so the ranks that did arrive can name the ones that did not, and a second process
claiming the same rank, or ranks that disagree on the world size, are caught as such.

All keys live under a namespace made of the job's ``run_id`` and a per-process
generation counter, so a store that outlives one runtime (torchrun's agent store, or
the next runtime in the same process) never mixes two rendezvous.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from distruntime.control.protocol import as_int, as_str, claim, parse_record, read, read_many
from distruntime.errors import MeshMismatchError, RendezvousError
from distruntime.launchers import LaunchEnv

__all__ = ["Rendezvous", "arrive", "await_all", "barrier", "leave", "open_rendezvous"]

logger = logging.getLogger("distruntime")

# Shown in full up to this many ranks; longer lists are cut with a count.
_MAX_LISTED = 16

# From torch 2.5 a TCPStore client pings the server while connecting (pytorch#129985),
# so a port held by a program that is not a store blocks the (bounded) constructor.
# Before, the constructor returns at once and the first request waits instead.
_CONNECT_PINGS = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass(frozen=True)
class Rendezvous:
    """An open rendezvous: the namespaced store and whether this process hosts it."""

    store: Store
    hosts_store: bool
    address: str
    launch: LaunchEnv
    started: float
    namespace: str = ""  # the key prefix of this rendezvous (``distruntime where`` finds it)
    rank0_hosts: bool = False  # rank 0 hosts the store: it must outlive every peer's use of it


def _seconds_left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _listed(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:_MAX_LISTED]))
    return shown + (f", ... ({len(ranks)} in all)" if len(ranks) > _MAX_LISTED else "")


def _whoami(launch: LaunchEnv, mesh: str) -> str:
    # The claim every rank must agree on travels in the check-in record: the last rank to
    # arrive compares them all (one multi_get) instead of every rank asking the store.
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "world_size": launch.world_size,
                       "ws_source": launch.source("world_size"), "mesh": mesh})


def _host_bytes(address: str) -> bytes | str:
    """``address`` for the socket module: ASCII names as bytes, because a ``str`` is
    IDNA-encoded first, and the first IDNA use imports ``encodings.idna`` and compiles
    its tables -- about 2 ms of every process's start-up that torch's own lookup skips."""
    return address.encode("ascii") if address.isascii() else address


def _check_resolvable(launch: LaunchEnv, address: str, port: int) -> None:
    try:
        socket.getaddrinfo(_host_bytes(address), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RendezvousError(
            f"MASTER_ADDR={address!r} (from {launch.source('master_addr')}) does not resolve "
            f"on {socket.gethostname()}: {exc.strerror}. Fix: use rank 0's IP address, or a "
            "host name every node can resolve.",
            reason="unresolvable",
        ) from None


def open_rendezvous(
    launch: LaunchEnv,
    deadline: float,
    namespace: str,
    store: Store | None = None,
    mesh: str = "",
) -> Rendezvous:
    """Connect to (or, on rank 0, host) the rendezvous store and check in.

    ``store`` is a store every rank already shares (a test controller's); otherwise
    torchrun's agent store, or a TCPStore that rank 0 hosts at ``MASTER_ADDR:MASTER_PORT``.
    ``mesh`` is this rank's resolved mesh shape (``""``: none); it travels with the
    world-size claim, so ranks that disagree fail here rather than hang in ``new_group``.
    Returns once every rank has checked in; raises :class:`RendezvousError` otherwise.
    """
    started = time.monotonic()
    address = f"{launch.master_addr}:{launch.master_port}"
    hosts_store = False
    if store is None:
        store, hosts_store = _connect(launch, deadline)
    else:
        address = "the store given to DistributedRuntime"
    rank0_hosts = address != "the store given to DistributedRuntime" and not launch.agent_store
    rdzv = Rendezvous(PrefixStore(namespace, store), hosts_store, address, launch, started, namespace,
                      rank0_hosts)
    _check_in(rdzv, deadline, mesh)
    return rdzv


def _connect(launch: LaunchEnv, deadline: float) -> tuple[Store, bool]:
    assert launch.master_addr is not None and launch.master_port is not None  # validated by discover
    host, port = launch.master_addr, launch.master_port
    if not launch.agent_store:  # else checked only if the connection fails (the agent resolved it)
        _check_resolvable(launch, host, port)
    is_host = launch.rank == 0 and not launch.agent_store
    waited = _seconds_left(deadline)
    # torchrun's agent listened before it started this worker: no need to wait for it.
    if not is_host and not launch.agent_store and not _wait_for_listener(host, port, deadline):
        raise _unreachable(launch, host, port, waited)
    made: list[TCPStore] = []
    failed: list[BaseException] = []

    def construct() -> None:
        try:
            store = TCPStore(
                host, port, is_master=is_host, timeout=timedelta(seconds=_seconds_left(deadline)),
                wait_for_workers=False,
            )
            if not is_host and not _CONNECT_PINGS:
                store.check(["distruntime/hello"])  # one round trip: does a store answer?
            made.append(store)
        except BaseException as error:
            failed.append(error)

    if launch.agent_store:
        # torchrun's agent, this worker's parent, made this store before starting it:
        # no foreign program can hold the port, so no thread (each hand-off costs a
        # scheduler slice when many ranks share few cores).
        construct()
    else:
        # A client whose port is held by a program that accepts but never answers blocks
        # in TCPStore's handshake with no timeout at all; the thread bounds it (it releases
        # the GIL, and a daemon thread stuck there does not keep the process alive).
        builder = threading.Thread(target=construct, name="distruntime-store", daemon=True)
        builder.start()
        builder.join(_seconds_left(deadline) + 0.2)
    if made:
        if launch.source("master_port").startswith("derived"):
            _check_owner(made[0], launch, is_host, deadline)
        return made[0], is_host
    if not failed:
        raise RendezvousError(
            f"rank {launch.rank}: something listens at {host}:{port} but does not answer as a "
            f"rendezvous store within {waited:.1f}s: MASTER_PORT={port} is probably held by "
            "another program (rank 0 then reports it in use). Fix: choose another MASTER_PORT.",
            reason="not_a_store",
        )
    if launch.agent_store:
        _check_resolvable(launch, host, port)
    try:
        raise failed[0]
    except RuntimeError as exc:  # DistNetworkError; a bare RuntimeError before torch 2.5
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc):
            derived = launch.source("master_port").startswith("derived")
            raise RendezvousError(
                f"MASTER_PORT={port} ({launch.source('master_port')}) is already in use on "
                f"{socket.gethostname()}, so rank 0 cannot host the rendezvous store there "
                + ("(another job on this node derived the same port, or a program holds it). "
                   "Fix: export MASTER_PORT=<a free port> for this job (the same on every rank), "
                   if derived else "(another job or program holds it). Fix: choose another MASTER_PORT, ")
                + "or stop the program listening on it (`ss -ltnp | grep :PORT` shows which).",
                reason="port_in_use",
            ) from None
        raise _unreachable(launch, host, port, waited) from None


# Outside every namespace: the run id of the job whose rank 0 hosts a store on a
# derived port, so that a rank of another job that derived the same port finds out.
_OWNER_KEY = "distruntime/owner"


def _check_owner(store: Store, launch: LaunchEnv, is_host: bool, deadline: float) -> None:
    """On a derived port, make sure the store is this job's, not another job's."""
    if is_host:
        store.set(_OWNER_KEY, launch.run_id)
        return
    try:
        owner = store.get(_OWNER_KEY).decode()  # waits (bounded) for the host to say
    except dist.DistError:
        owner = "(a store that never named its job: not a distruntime job)"
    if owner != launch.run_id:
        port = launch.master_port
        raise RendezvousError(
            f"rank {launch.rank}: the rendezvous store on port {port} ({launch.source('master_port')}) "
            f"belongs to another job, {owner}, not to this one ({launch.run_id}): two jobs on "
            f"{socket.gethostname()} derived the same port. Fix: export MASTER_PORT=<a free port> "
            "for one of them (the same on all its ranks), or narrow DISTRUNTIME_PORT_RANGE differently "
            "for each.",
            reason="port_collision",
        )


def _wait_for_listener(host: str, port: int, deadline: float) -> bool:
    """Poll until something listens at ``host:port``, or the deadline passes.

    TCPStore's own connect loop backs off past its timeout (a 6 s timeout took 10 s
    here); this loop keeps the start-up bound exact.
    """
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            # bytes work at run time (typeshed says str): see _host_bytes.
            address = (_host_bytes(host), port)
            with socket.create_connection(address, timeout=min(left, 1.0)):  # type: ignore[arg-type]
                return True
        except OSError:
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))


def _unreachable(launch: LaunchEnv, host: str, port: int, waited: float) -> RendezvousError:
    host_desc = "torchrun's agent" if launch.agent_store else "rank 0"
    return RendezvousError(
        f"rank {launch.rank} on {socket.gethostname()} could not reach the rendezvous store "
        f"at {host}:{port} within {waited:.1f}s: {host_desc}, which hosts it, never came up "
        f"(missing rank: 0), or {host} is unreachable from here. Fix: check {host_desc}'s log "
        f"for an earlier error, and that MASTER_ADDR={host!r} is rank 0's address.",
        reason="unreachable",
    )


def _abort(store: Store, phase: str, message: str) -> None:
    """Wake every rank waiting in ``phase`` with an error instead of a timeout."""
    claim(store, f"{phase}/go", f"abort:{message}")


def _check_in(rdzv: Rendezvous, deadline: float, mesh: str) -> None:
    """Claim the rank and check in: four store requests per rank.

    ``compare_set who/<r>`` (the claim, with host, pid, world size and mesh), ``add
    join/count``, then ``wait join/go`` and one read of it; the last rank to arrive instead
    compares every check-in record (``multi_get``) and opens (or aborts) the phase.
    """
    store, launch = rdzv.store, rdzv.launch
    rank = launch.rank
    me = _whoami(launch, mesh)
    # Claim the rank and say who holds it in one round trip: the first claimer's record stays.
    other = store.compare_set(f"who/{rank}", "", me).decode(errors="replace")
    if other != me:
        message = (
            f"rank {rank} is claimed by two processes: {_holder(other)} and {_holder(me)}. Two processes "
            f"got the same {launch.source('rank')}. Fix: give every process its own rank in "
            f"0..{launch.world_size - 1} (check the launcher command or the script that sets it)."
        )
        _refuse_join(store, "duplicate_rank", message)
    barrier(rdzv, "join", deadline, verify=_compare_claims)


def _holder(record: str) -> str:
    data = parse_record(record.encode(), "who") or {}
    return f"pid {as_int(data.get('pid'))} on {as_str(data.get('host'), '?', 255)!r}"


def _compare_claims(rdzv: Rendezvous) -> str:
    """Run by the last rank to check in: ``"ok"``, or the abort naming the first disagreement."""
    launch = rdzv.launch
    keys = [f"who/{r}" for r in range(launch.world_size)]
    if not rdzv.store.check(keys):
        return "ok"  # ranks count differently (a world-size mismatch): the timeout explains it
    records = {int(key[4:]): parse_record(raw, key) or {} for key, raw in read_many(rdzv.store, keys).items()}
    mine = records.get(launch.rank, {})
    for other, record in sorted(records.items()):
        if as_int(record.get("world_size")) != launch.world_size:
            return "abort:world_size_mismatch:" + _size_mismatch(launch, other, record)
        if as_str(record.get("mesh")) != as_str(mine.get("mesh")):
            return "abort:mesh_mismatch:" + (
                f"ranks asked for different device meshes: rank {other} has mesh "
                f"{as_str(record.get('mesh')) or 'none'}, rank {launch.rank} has mesh "
                f"{as_str(mine.get('mesh')) or 'none'}. Fix: pass the same mesh= to DistributedRuntime "
                "on every rank.")
    return "ok"


def _size_mismatch(launch: LaunchEnv, other: int, record: dict[str, object]) -> str:
    return (
        f"ranks disagree on the world size: rank {other} has "
        f"{as_str(record.get('ws_source'), 'WORLD_SIZE', 64)}={as_int(record.get('world_size'))}, rank "
        f"{launch.rank} has {launch.source('world_size')}={launch.world_size}. Fix: start every "
        "rank with the same world size."
    )


def _join_error(reason: str, message: str) -> RendezvousError:
    return (MeshMismatchError if reason == "mesh_mismatch" else RendezvousError)(message, reason=reason)


def _refuse_join(store: Store, reason: str, message: str) -> NoReturn:
    """Wake every rank waiting to check in with this error (not a timeout), and raise it here."""
    _abort(store, "join", f"{reason}:{message}")
    raise _join_error(reason, message)


def barrier(rdzv: Rendezvous, phase: str, deadline: float,
            verify: Callable[[Rendezvous], str] | None = None) -> None:
    """Store-based barrier that names the missing ranks when it times out.

    Only used at start-up (bounded by ``deadline``): it needs no process group, so a
    rank stuck before ``init_process_group`` is reported, not waited on forever.
    ``verify`` runs on the last rank to arrive and decides the phase's verdict.
    """
    store = rdzv.store
    verdict = arrive(rdzv, phase, verify)
    if verdict is None:  # not the last to arrive: wait for the verdict
        try:
            store.wait([f"{phase}/go"], timedelta(seconds=_seconds_left(deadline)))
            verdict = (read(store, f"{phase}/go") or b"").decode(errors="replace")
        except dist.DistError as exc:
            raise _waiting_error(rdzv, phase, exc) from None
    if verdict != "ok":
        reason, _, message = verdict.removeprefix("abort:").partition(":")
        raise _join_error(reason, message)


def arrive(rdzv: Rendezvous, phase: str, verify: Callable[[Rendezvous], str] | None = None) -> str | None:
    """Say this rank reached ``phase``, without waiting for the others (see :func:`await_all`).

    The last rank to arrive opens the phase and gets its verdict back (``"ok"``, or an
    abort a failing rank left there); the others get ``None``.
    """
    if rdzv.store.add(f"{phase}/count", 1) >= rdzv.launch.world_size:
        verdict = verify(rdzv) if verify is not None else "ok"
        return claim(rdzv.store, f"{phase}/go", verdict)
    return None


def await_all(rdzv: Rendezvous, phase: str, timeout_s: float) -> int | None:
    """Wait until every rank has :func:`arrive`-d at ``phase``.

    Returns ``None`` when they have, or when the store is gone (its host left, which
    it does only after the agreement); else, after ``timeout_s``, how many had arrived.
    """
    try:
        rdzv.store.wait([f"{phase}/go"], timedelta(seconds=timeout_s))
        return None
    except dist.DistError as error:
        try:
            return int(rdzv.store.add(f"{phase}/count", 0))
        except dist.DistError:
            logger.debug("no agreement on '%s': the store is gone (%s)", phase, error)
            return None


def _waiting_error(rdzv: Rendezvous, phase: str, exc: Exception) -> RendezvousError:
    """The error of a start-up barrier that timed out (error path: its requests don't count)."""
    launch = rdzv.launch
    waited = time.monotonic() - rdzv.started
    what = "check in" if phase == "join" else f"reach the '{phase}' point"
    try:
        arrived = int(rdzv.store.add(f"{phase}/count", 0))
        present = [r for r in range(launch.world_size) if rdzv.store.check([f"who/{r}"])]
        missing = [r for r in range(launch.world_size) if r not in set(present)] if phase == "join" else []
        records = {int(key[4:]): parse_record(raw, key) or {}
                   for key, raw in read_many(rdzv.store, [f"who/{r}" for r in present[:_MAX_LISTED]]).items()}
    except dist.DistError:
        return RendezvousError(
            f"rank {launch.rank} lost the rendezvous store at {rdzv.address} after {waited:.1f}s "
            f"while waiting for all {launch.world_size} ranks to {what}: the process hosting it "
            f"(rank 0, or torchrun's agent) exited. Its log has the cause. ({exc})",
            reason="store_lost",
        )
    for other, record in sorted(records.items()):
        if "world_size" in record and as_int(record.get("world_size")) != launch.world_size:
            return RendezvousError(_size_mismatch(launch, other, record), reason="world_size_mismatch")
    hosts = ", ".join(f"{r}@{as_str(record.get('host'), '?', 255)}" for r, record in sorted(records.items()))
    missing_text = f"missing ranks: {_listed(missing)}; " if missing else ""
    return RendezvousError(
        f"rank {launch.rank}: only {arrived} of {launch.world_size} ranks managed to {what} at "
        f"{rdzv.address} ({launch.launcher}) within {waited:.1f}s; {missing_text}joined "
        f"(rank@host): {hosts}. Fix: look for an error in the missing ranks' logs, check that "
        "they were started, or raise timeout_minutes if they are just slow to start.",
        reason="missing_ranks",
    )


def leave(rdzv: Rendezvous, timeout_s: float) -> None:
    """Teardown: every rank says it is done with the store; rank 0, when it hosts the store,
    stays (bounded by ``timeout_s``) until every peer has said so.

    One ``add`` per rank (the last one also opens ``done/go``); one ``wait`` on the host.
    Nothing at all under torchrun's agent or a given store, which outlive the ranks.
    """
    if not rdzv.rank0_hosts:
        return
    try:
        verdict = arrive(rdzv, "done")
        if verdict is not None or not rdzv.hosts_store:
            return
        arrived = await_all(rdzv, "done", timeout_s)
    except dist.DistError as error:
        logger.debug("leaving without the store: %s", error)
        return
    if arrived is not None:
        logger.warning(
            "rank %d leaves after waiting %.1fs although only %d of %d ranks are done with the store",
            rdzv.launch.rank, timeout_s, arrived, rdzv.launch.world_size,
        )
