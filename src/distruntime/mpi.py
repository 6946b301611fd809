"""MPI launches that name no rendezvous: where ``MASTER_ADDR`` / ``MASTER_PORT`` come from.

``mpirun`` / ``mpiexec`` give every rank its rank and sizes but no address or port for
torch's store. Two cases:

* **One node** (local size = world size): the address is loopback, and the port is
  derived from something every local rank sees alike: the launcher's job id variable
  (Open MPI's ``OMPI_MCA_ess_base_jobid``, MVAPICH's ``MPIRUN_ID``, LSF's ``LSB_JOBID``),
  or, where the launcher sets none (MPICH/Hydra, Intel MPI), the launcher's own process
  on this node -- the nearest ancestor that is an MPI launcher or proxy
  (``hydra_pmi_proxy``, ``orted``, ``mpirun``, ...), identified by pid and start time.
  :func:`launcher_process` finds it.
* **Several nodes**: nothing the ranks share names a host. With the optional extra
  ``distruntime[mpi]`` (mpi4py), :func:`broadcast_rendezvous` has rank 0 broadcast its
  address and a free port over MPI itself; without it, :func:`distruntime.discover`
  raises an error naming the extra and the variables to export.

Example:
    >>> launcher_process(ancestors=[("bash", 10, 1), ("hydra_pmi_proxy", 7, 99)])
    'hydra_pmi_proxy pid 7 (started at tick 99)'
    >>> launcher_process(ancestors=[("bash", 10, 1)]) is None
    True
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Mapping

__all__ = ["broadcast_rendezvous", "launcher_process"]

logger = logging.getLogger("distruntime")

# Process names (/proc/PID/comm, at most 15 characters) of the programs that start MPI
# ranks on a node: Hydra's proxy (MPICH, Intel MPI, MVAPICH2), Open MPI's daemons and
# mpirun itself (the ranks' parent on the node mpirun runs on), MVAPICH's mpispawn.
_LAUNCHER_NAMES = frozenset({
    "hydra_pmi_proxy", "pmi_proxy", "orted", "prted", "prterun", "mpispawn", "mpirun_rsh",
})
_LAUNCHER_PREFIXES = ("mpirun", "mpiexec")
_MAX_DEPTH = 32  # a rank is a few levels below its launcher (shells, wrappers)


def _ancestors(pid: int) -> Iterable[tuple[str, int, int]]:
    """(name, pid, start time in clock ticks) of ``pid``'s ancestors, nearest first."""
    current = pid
    for _ in range(_MAX_DEPTH):
        try:
            with open(f"/proc/{current}/stat", encoding="utf-8", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            return
        # "PID (comm) state PPID ..." -- comm may hold spaces and parentheses.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        parent, started = int(fields[1]), int(fields[19])
        if current != pid:
            yield name, current, started
        if parent <= 1:
            return
        current = parent


def launcher_process(ancestors: Iterable[tuple[str, int, int]] | None = None) -> str | None:
    """The MPI launcher process above this rank on this node, as a stable description.

    Every rank an MPI launcher starts on one node descends from the same launcher
    process (``hydra_pmi_proxy``, ``orted``, ``mpirun``...), so its pid and start time
    are a job id all local ranks share without talking -- and no two live jobs share.
    ``None`` when no ancestor looks like one (the caller then asks for ``MASTER_PORT``).

    ``ancestors``: ``(name, pid, start_ticks)`` nearest first; default: read from /proc.
    """
    chain = _ancestors(os.getpid()) if ancestors is None else ancestors
    for name, pid, started in chain:
        if name in _LAUNCHER_NAMES or name.startswith(_LAUNCHER_PREFIXES):
            return f"{name} pid {pid} (started at tick {started})"
    return None


def _reachable_address() -> str:
    """An address of this host that other nodes can use: its name when that resolves
    to a non-loopback address, else the address of the interface of the default route."""
    name = socket.gethostname()
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except socket.gaierror:
        resolved = set()
    if resolved and not any(str(a).startswith("127.") for a in resolved):
        return name
    # Debian maps the host name to 127.0.1.1: ask the kernel which source address it
    # would use for an outside destination (a UDP "connect" sends nothing).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return str(probe.getsockname()[0])
        except OSError:
            return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def broadcast_rendezvous(env: Mapping[str, str], missing: tuple[str, ...]) -> dict[str, str]:
    """``env`` plus the ``missing`` ``MASTER_*`` variables, broadcast from rank 0 by mpi4py.

    Collective: every rank of the job must call it (the runtime does, once per start).
    Returns ``env`` unchanged (as a dict) when mpi4py is not installed; discovery then
    raises the error that names the ``distruntime[mpi]`` extra.

    Example (one process, nothing missing)::

        >>> broadcast_rendezvous({"A": "1"}, ())
        {'A': '1'}
    """
    if not missing:
        return dict(env)
    try:
        from mpi4py import MPI  # initialises MPI (MPI_Init_thread) on first import
    except ImportError:
        logger.debug("mpi4py is not installed: cannot broadcast %s", ", ".join(missing))
        return dict(env)
    comm = MPI.COMM_WORLD
    values: dict[str, str] | None = None
    if comm.Get_rank() == 0:
        values = {}
        if "MASTER_ADDR" in missing:
            values["MASTER_ADDR"] = _reachable_address()
        if "MASTER_PORT" in missing:
            values["MASTER_PORT"] = str(_free_port())
    values = comm.bcast(values, root=0)
    assert values is not None  # rank 0 always sends a dict
    logger.info("rendezvous from rank 0 over MPI (mpi4py): %s", values)
    return {**env, **values}
