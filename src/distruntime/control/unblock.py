"""Making a rank's blocked collectives fail now, so that its main thread can unwind.

NCCL: abort every process group (torch's documented way; never destroy, which drains the
hung communicator). gloo has no abort: its collectives block in socket reads, so this
rank's established TCP connections to the job's hosts -- other than the store's -- are shut
down, and the blocked read fails at once. That reaches every group of the process, also
those a wrapper or DTensor keeps alive that the runtime never owned.

:func:`peers_hung_up` is the converse, local evidence: the kernel shows that peers closed
their end of this process's connections to them.

:func:`release_peers` is the same shutdown on the runtime's failure path: torch's destroy
frees only the groups nobody else references, and a group that Lightning Fabric,
Accelerate or DTensor's caches keep alive would otherwise hold every peer blocked in it
with this rank until this process exits -- which is when torchrun SIGTERMs them all.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch.distributed as dist
from torch._C._distributed_c10d import Store

from distruntime.rendezvous import Rendezvous
from distruntime.teardown import run_bounded

__all__ = ["abort_blocked_collectives", "job_addresses", "peers_hung_up", "release_peers", "store_ports"]

logger = logging.getLogger("distruntime")

_ESTABLISHED = "01"
_CLOSE_WAIT = "08"


def job_addresses(hosts: Iterable[str]) -> set[str]:
    """The IP addresses of ``hosts`` (and loopback), as the kernel prints them."""
    addresses = {"127.0.0.1", "::1"}
    for host in set(hosts):
        if not host:
            continue
        try:
            for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM):
                addresses.add(str(info[4][0]))
        except (OSError, UnicodeError):
            continue
    return addresses


def abort_blocked_collectives(backend: str, keep_ports: frozenset[int], addresses: set[str]) -> None:
    """Fail this rank's blocked collectives (see the module docstring)."""
    if "nccl" in backend:
        abort: Callable[[], None] | None = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            run_bounded(abort, 10.0, "abort of the NCCL process groups")
    if "gloo" in backend or "nccl" not in backend:
        closed = _shutdown_connections(keep_ports, addresses)
        logger.debug("shut down %d gloo connections to unblock the main thread", closed)


def store_ports(rdzv: Rendezvous) -> frozenset[int]:
    """The ports of the job's store (``MASTER_PORT`` and the TCP store behind any prefix):
    their connections are never shut down, the failure report goes through them."""
    ports = {rdzv.launch.master_port}
    store: Store | None = rdzv.store
    while store is not None and not hasattr(store, "port"):
        store = getattr(store, "underlying_store", None)
    if store is not None:
        ports.add(int(cast(Any, store).port))  # a TCPStore's; Store's stubs have no port
    return frozenset(int(port) for port in ports if port)


def release_peers(rdzv: Rendezvous | None, backend: str, timeout_s: float = 5.0) -> int:
    """The failure path: shut down this rank's gloo connections to the job's hosts, bounded.

    After the failure record is out and the runtime's groups are shut down: every group of the
    process -- also one a wrapper or DTensor keeps alive -- then fails at once on the peers
    blocked in it with this rank. The hosts are this one and ``MASTER_ADDR``'s (peers on other
    nodes, under a launcher that names no node list, are freed when this process exits). NCCL
    needs nothing here: its abort covers every group. Returns the connections shut down.

    Example:
        >>> release_peers(None, "gloo")  # one process: no peers
        0
    """
    if rdzv is None or ("gloo" not in backend and "nccl" in backend):
        return 0
    closed = [0]
    hosts = [socket.gethostname(), rdzv.launch.master_addr or ""]

    def release() -> None:
        closed[0] = _shutdown_connections(store_ports(rdzv), job_addresses(hosts))

    run_bounded(release, timeout_s, "shutdown of the connections other groups keep")
    logger.debug("failure path: shut down %d connections to peers", closed[0])
    return closed[0]


def peers_hung_up(keep_ports: frozenset[int], addresses: set[str]) -> int:
    """How many of this process's connections to the job's hosts the peer side has closed."""
    return sum(1 for _fd, _entry in _job_sockets(keep_ports, addresses, _CLOSE_WAIT))


def open_connections(keep_ports: frozenset[int], addresses: set[str]) -> set[int]:
    """The socket inodes of this process's established connections to the job's hosts."""
    sockets = _socket_fds()
    return {sockets[fd] for fd, _entry in _job_sockets(keep_ports, addresses, _ESTABLISHED) if fd in sockets}


def _job_sockets(keep_ports: frozenset[int], addresses: set[str],
                 state: str) -> Iterable[tuple[int, tuple[tuple[str, int], tuple[str, int], str]]]:
    sockets = _tcp_sockets()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return
    for fd_name in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd_name}")
        except OSError:
            continue
        if not target.startswith("socket:["):
            continue
        entry = sockets.get(int(target[8:-1]))
        if entry is None:
            continue
        (_, local_port), (remote_ip, remote_port), found = entry
        # Never a listener (shutting one down aborts gloo's accept thread and the process).
        if found != state or {local_port, remote_port} & keep_ports or remote_ip not in addresses:
            continue
        yield int(fd_name), entry


def _shutdown_connections(keep_ports: frozenset[int], addresses: set[str]) -> int:
    closed = 0
    for fd, _entry in list(_job_sockets(keep_ports, addresses, _ESTABLISHED)):
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
            closed += 1
        except OSError:
            pass
        finally:
            sock.close()
    return closed


def shutdown_socket_to(port: int, inodes_before: set[int]) -> bool:
    """Shut down this process's one connection to ``port`` opened since ``inodes_before`` was taken."""
    tcp = _tcp_sockets()
    for fd, inode in _socket_fds().items():
        if inode in inodes_before:
            continue
        entry = tcp.get(inode)
        if entry is None or entry[1][1] != port:
            continue
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            sock.close()
    return False


def _socket_fds() -> dict[int, int]:
    """fd -> socket inode, for this process."""
    found: dict[int, int] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd_name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{fd_name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(fd_name)] = int(target[8:-1])
    return found


def socket_inodes() -> set[int]:
    """The socket inodes this process holds now (to find a connection opened after)."""
    return set(_socket_fds().values())


def _tcp_sockets() -> dict[int, tuple[tuple[str, int], tuple[str, int], str]]:
    """inode -> (local, remote, state) from /proc/self/net/tcp{,6}."""
    found = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/self/net/{name}") as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            try:
                found[int(parts[9])] = (_address(parts[1], family), _address(parts[2], family), parts[3])
            except (IndexError, ValueError):
                continue
    return found


def _address(text: str, family: int) -> tuple[str, int]:
    hex_ip, hex_port = text.split(":")
    raw = bytes.fromhex(hex_ip)
    # /proc prints each 32-bit word in host (little-endian) order.
    ordered = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = socket.inet_ntop(family, ordered)
    if ip.startswith("::ffff:"):
        ip = ip.removeprefix("::ffff:")
    return ip, int(hex_port, 16)
