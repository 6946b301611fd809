"""Launch-environment discovery: pure functions of an environment mapping.

Each launcher is one small unit: a table of the variables it sets and a function that
reads them into a :class:`LaunchEnv` (or returns ``None`` when the launcher is absent).
:func:`discover` asks them in a fixed priority order:

1. **torchrun** (``TORCHELASTIC_RUN_ID``) first: it is often started *inside* a SLURM
   step, whose ``SLURM_PROCID``/``SLURM_NTASKS`` then describe the torchrun agent,
   not the worker.
2. **MPI launchers** keyed on variables only their own runtime sets
   (``OMPI_COMM_WORLD_RANK``, Hydra's ``MPI_LOCALRANKID``, ``MV2_COMM_WORLD_RANK``,
   ``JSM_NAMESPACE_RANK``): ``mpirun`` inside a SLURM job starts its daemons with
   ``srun``, so the ``SLURM_*`` variables describe the daemons, not the ranks.
   ``srun --mpi=pmi2`` sets ``PMI_RANK`` but not ``MPI_LOCALRANKID``, so it stays SLURM.
3. **SLURM** ``srun`` tasks (``SLURM_PROCID`` *and* ``SLURM_STEP_ID``). A batch script
   has ``SLURM_PROCID`` and ``SLURM_NTASKS=N`` but no step: it is one process, and
   treating it as rank 0 of N would wait forever for peers that never come.
4. Hand-set ``RANK``/``WORLD_SIZE`` (Kubeflow PyTorchJob, ``subprocess``,
   ``torch.multiprocessing.spawn`` with env vars): launcher ``"env"``. When an external
   launcher is also present, the two must agree, or :class:`LaunchEnvError` names both.
5. Nothing: one process, no port.

A new launcher is one function plus one entry in ``_EXTERNAL_LAUNCHERS``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from distruntime.errors import LaunchEnvError
from distruntime.hostlist import first_host, tasks_on_node

__all__ = ["LaunchEnv", "discover", "missing_mpi_rendezvous", "LAUNCHER_NAMES"]

LOOPBACK = "127.0.0.1"

# Variables torch's env:// rendezvous and torchrun use; RANK/WORLD_SIZE and
# LOCAL_RANK/LOCAL_WORLD_SIZE must come in complete pairs.
_TORCH_PAIRS = (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE"))


@dataclass(frozen=True)
class LaunchEnv:
    """What the environment says about this process, and where each value came from.

    Attributes:
        launcher: ``"torchrun"``, ``"slurm"``, ``"openmpi"``, ``"mpich"``, ``"mvapich"``,
            ``"lsf"``, ``"env"`` (hand-set ``RANK``/``WORLD_SIZE``) or ``"none"``.
        reason: the variables that decided the launcher, in words.
        sources: ``(field, origin)`` pairs; origin is a variable name such as
            ``"SLURM_PROCID"``, or a phrase such as ``"default: single process"``.
        agent_store: torchrun's agent already hosts the rendezvous store at
            ``master_addr:master_port``; ranks must connect to it as clients.
        run_id: an id shared by every rank of this job (namespaces store keys).
        restart_count: how often the job was restarted: torchrun's round
            (``TORCHELASTIC_RESTART_COUNT``) or SLURM's requeues (``SLURM_RESTART_COUNT``).

    Example:
        >>> env = discover({"RANK": "1", "WORLD_SIZE": "2",
        ...                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})
        >>> (env.launcher, env.rank, env.source("rank"))
        ('env', 1, 'RANK')
    """

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str | None
    master_port: int | None
    reason: str
    sources: tuple[tuple[str, str], ...] = ()
    agent_store: bool = False
    run_id: str = ""
    restart_count: int = 0

    def source(self, field: str) -> str:
        """Where ``field`` (e.g. ``"rank"``) came from: a variable name or a phrase.

        Example:
            >>> env = discover({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "node1",
            ...                 "MASTER_PORT": "29500"})
            >>> env.source("rank"), env.source("world_size")
            ('RANK', 'WORLD_SIZE')
        """
        return dict(self.sources).get(field, "default")


class _Reader:
    """Reads values from an env mapping and records which variable gave each one."""

    def __init__(self, env: Mapping[str, str], launcher: str) -> None:
        self.env = env
        self.launcher = launcher
        self.sources: dict[str, str] = {}

    def first(self, names: tuple[str, ...]) -> str | None:
        """The first of ``names`` that is set (non-empty)."""
        return next((n for n in names if self.env.get(n, "").strip()), None)

    def integer(self, field: str, names: tuple[str, ...], *, minimum: int = 0) -> int | None:
        """Parse the first set variable of ``names`` as an int >= ``minimum``."""
        name = self.first(names)
        if name is None:
            return None
        raw = self.env[name]
        try:
            value = int(raw.strip())
        except ValueError:
            value = None
        if value is None or value < minimum:
            kind = "a positive integer" if minimum > 0 else "a non-negative integer"
            raise LaunchEnvError(
                f"{name}={raw!r} is not {kind} (read as this process's {field.replace('_', ' ')}"
                f" under {self.launcher}). Fix: set {name} to {kind}, or unset it.",
                variable=name,
                value=raw,
            )
        self.sources[field] = name
        return value

    def need_int(self, field: str, names: tuple[str, ...], *, minimum: int = 0) -> int:
        value = self.integer(field, names, minimum=minimum)
        if value is None:
            raise LaunchEnvError(
                f"{' or '.join(names)} is not set, but {self.launcher} needs it for this "
                f"process's {field.replace('_', ' ')}. Fix: export {names[0]}.",
                variable=names[0],
            )
        return value

    def derived(self, field: str, value: int, how: str) -> int:
        self.sources[field] = how
        return value

    def address(self, default: str | None, default_origin: str) -> str | None:
        addr = self.env.get("MASTER_ADDR", "").strip()
        if addr:
            self.sources["master_addr"] = "MASTER_ADDR"
            return addr
        if default is not None:
            self.sources["master_addr"] = default_origin
        return default

    def port(self, *job_ids: str) -> int | None:
        """``MASTER_PORT`` if set; else a port derived from the job's id variables."""
        port = self.integer("master_port", ("MASTER_PORT",), minimum=1)
        if port is not None:
            if port > 65535:
                raise LaunchEnvError(
                    f"MASTER_PORT={self.env['MASTER_PORT']!r} is above 65535. "
                    "Fix: choose a free TCP port in 1024-65535.",
                    variable="MASTER_PORT",
                    value=self.env["MASTER_PORT"],
                )
            return port
        if not job_ids or not all(self.env.get(n, "").strip() for n in job_ids):
            return None
        key = "/".join(self.env[n].strip() for n in job_ids)
        return self.derived_port(key, f"derived from {'+'.join(job_ids)}")

    def derived_port(self, key: str, origin: str) -> int:
        """A port from ``key`` (a job id all ranks share), in ``DISTRUNTIME_PORT_RANGE``."""
        raw = self.env.get(PORT_RANGE_VARIABLE, "").strip()
        ports = _DEFAULT_PORTS
        if raw:
            low, _, high = raw.partition("-")
            try:
                ports = (int(low), int(high or low))
            except ValueError:
                ports = (0, 0)
            if not 1024 <= ports[0] <= ports[1] <= 65535:
                raise LaunchEnvError(
                    f"{PORT_RANGE_VARIABLE}={raw!r} is not a port range such as '20000-39999' "
                    "within 1024-65535 (read to derive this job's rendezvous port). Fix: set it "
                    "to LOW-HIGH, or unset it.",
                    variable=PORT_RANGE_VARIABLE,
                    value=raw,
                )
        return self.derived("master_port", derive_port(key, ports), origin)


# Where derived ports fall; DISTRUNTIME_PORT_RANGE=LOW-HIGH narrows it (e.g. to what a
# firewall allows between nodes).
PORT_RANGE_VARIABLE = "DISTRUNTIME_PORT_RANGE"
_DEFAULT_PORTS = (20000, 39999)


def derive_port(key: str, ports: tuple[int, int] = _DEFAULT_PORTS) -> int:
    """A port in ``ports`` (inclusive; default 20000-39999) that every rank computes
    alike from a job id.

    Deterministic so that ranks agree without talking; spread by CRC32 so that two
    jobs on one node rarely collide (and when they do, the rendezvous says so).
    ``MASTER_PORT`` always wins over it.

    Example:
        >>> derive_port("job-7", (30000, 30000))
        30000
    """
    low, high = ports
    return low + zlib.crc32(key.encode()) % (high - low + 1)


def _record(
    reader: _Reader,
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    node_rank: int,
    num_nodes: int,
    master_addr: str | None,
    master_port: int | None,
    reason: str,
    agent_store: bool = False,
    run_id: str = "",
) -> LaunchEnv:
    restart = reader.integer("restart_count", _RESTART_VARS.get(reader.launcher, _SLURM_RESTART)) or 0
    return LaunchEnv(
        launcher=reader.launcher,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=master_addr,
        master_port=master_port,
        reason=reason,
        sources=tuple(sorted(reader.sources.items())),
        agent_store=agent_store,
        run_id=run_id,
        restart_count=restart,
    )


def _node_layout(reader: _Reader, rank: int, world: int, local_world: int) -> tuple[int, int]:
    """Node rank and count when the launcher gives none: block placement assumed."""
    node_rank = reader.derived("node_rank", rank // local_world, "derived: rank // local world size")
    num_nodes = reader.derived("num_nodes", -(-world // local_world), "derived: world / local world size")
    return node_rank, num_nodes


# --------------------------------------------------------------------------- torchrun
# torchrun / torchelastic workers: every value is set by the agent.
_TORCHRUN_VARS = {
    "rank": "RANK",
    "world_size": "WORLD_SIZE",
    "local_rank": "LOCAL_RANK",
    "local_world_size": "LOCAL_WORLD_SIZE",
    "node_rank": "GROUP_RANK",
    "num_nodes": "GROUP_WORLD_SIZE",
    "restart_count": "TORCHELASTIC_RESTART_COUNT",
}


def _torchrun(env: Mapping[str, str]) -> LaunchEnv | None:
    if not env.get("TORCHELASTIC_RUN_ID"):
        return None
    r = _Reader(env, "torchrun")
    rank = r.need_int("rank", (_TORCHRUN_VARS["rank"],))
    world = r.need_int("world_size", (_TORCHRUN_VARS["world_size"],), minimum=1)
    local_rank = r.need_int("local_rank", (_TORCHRUN_VARS["local_rank"],))
    local_world = r.need_int("local_world_size", (_TORCHRUN_VARS["local_world_size"],), minimum=1)
    node_rank = r.integer("node_rank", (_TORCHRUN_VARS["node_rank"],))
    num_nodes = r.integer("num_nodes", (_TORCHRUN_VARS["num_nodes"],), minimum=1)
    if node_rank is None or num_nodes is None:
        node_rank, num_nodes = _node_layout(r, rank, world, local_world)
    addr = r.address(None, "")
    port = r.port()
    # Workers are not told the agent's rendezvous round. The restart count alone repeats
    # when a round follows a membership change (no failure: the count does not move),
    # and torch 2.13 keeps the agent's shared store (and its port) across rounds; so
    # the namespace also takes the round's world size and store port.
    restart = env.get(_TORCHRUN_VARS["restart_count"], "0")
    return _record(
        r, rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=node_rank, num_nodes=num_nodes, master_addr=addr, master_port=port,
        reason="TORCHELASTIC_RUN_ID is set (a torchrun/torchelastic worker)",
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
        run_id=f"torchrun-{env['TORCHELASTIC_RUN_ID']}-{restart}-{world}@{port}",
    )


# --------------------------------------------------------------------------- SLURM
_SLURM_VARS = {
    "rank": ("SLURM_PROCID",),
    "world_size": ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
    "local_rank": ("SLURM_LOCALID",),
    "node_rank": ("SLURM_NODEID",),
    "num_nodes": ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"),
    "nodelist": ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    "tasks_per_node": ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
    "step": ("SLURM_STEP_ID", "SLURM_STEPID"),
    "job": ("SLURM_JOB_ID", "SLURM_JOBID"),
    "restart_count": ("SLURM_RESTART_COUNT",),
}
# Restarts: torchrun's own round count under torchrun (even inside a SLURM job);
# SLURM's requeue count for every other launcher (mpirun inside sbatch included).
_SLURM_RESTART = _SLURM_VARS["restart_count"]
_RESTART_VARS = {"torchrun": (_TORCHRUN_VARS["restart_count"],)}


def _slurm(env: Mapping[str, str]) -> LaunchEnv | None:
    r = _Reader(env, "slurm")
    step_var = r.first(_SLURM_VARS["step"])
    if r.first(_SLURM_VARS["rank"]) is None or step_var is None:
        return None
    rank = r.need_int("rank", _SLURM_VARS["rank"])
    world = r.need_int("world_size", _SLURM_VARS["world_size"], minimum=1)
    local_rank = r.need_int("local_rank", _SLURM_VARS["local_rank"])
    node_rank = r.need_int("node_rank", _SLURM_VARS["node_rank"])
    num_nodes = r.need_int("num_nodes", _SLURM_VARS["num_nodes"], minimum=1)
    local_world = _slurm_local_world(r, node_rank)
    addr = r.address(*_slurm_first_host(r))
    job_var = r.first(_SLURM_VARS["job"]) or "SLURM_JOB_ID"
    port = r.port(job_var, step_var)
    job = env.get(job_var, "")
    return _record(
        r, rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=node_rank, num_nodes=num_nodes, master_addr=addr, master_port=port,
        reason=f"SLURM_PROCID and {step_var} are set (an srun task)",
        run_id=f"slurm-{job}.{env[step_var]}",
    )


def _slurm_local_world(r: _Reader, node_rank: int) -> int:
    """Tasks on this node: SLURM_GTIDS lists them; else the tasks-per-node form."""
    gtids = r.env.get("SLURM_GTIDS", "").strip()
    if gtids:
        return r.derived("local_world_size", len(gtids.split(",")), "SLURM_GTIDS (count)")
    name = r.first(_SLURM_VARS["tasks_per_node"])
    if name is not None:
        count = tasks_on_node(r.env[name], node_rank, variable=name)
        if count is not None:
            return r.derived("local_world_size", count, f"{name}[SLURM_NODEID]")
    return r.need_int("local_world_size", ("SLURM_NTASKS_PER_NODE",), minimum=1)


def _slurm_first_host(r: _Reader) -> tuple[str | None, str]:
    name = r.first(_SLURM_VARS["nodelist"])
    if name is None or r.env.get("MASTER_ADDR", "").strip():
        return None, ""
    return first_host(r.env[name], variable=name), f"{name} (first host)"


def _slurm_batch_script(env: Mapping[str, str]) -> bool:
    """A batch script or allocation shell: SLURM_PROCID but no job step."""
    return bool(env.get("SLURM_PROCID")) and not any(env.get(v) for v in _SLURM_VARS["step"])


# --------------------------------------------------------------------------- MPI family
@dataclass(frozen=True)
class _MpiSpec:
    """The variables one MPI launcher sets for each rank."""

    launcher: str
    rank: str
    world_size: str
    local_rank: str
    local_world_size: str
    # Job id variables, any one of which all ranks of a job share: used to derive a
    # port. Where a launcher sets none (Hydra), a one-node job uses its launcher process.
    job_ids: tuple[str, ...]
    hint: str  # how to pass a variable through this launcher


_OPENMPI = _MpiSpec("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
                    ("OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE"),
                    "mpirun -x MASTER_ADDR=<host of rank 0> -x MASTER_PORT=<free port>")
_MPICH = _MpiSpec("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                  (), "mpiexec -genv MASTER_ADDR <host of rank 0> -genv MASTER_PORT <free port>")
_MVAPICH = _MpiSpec("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
                    "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE",
                    ("MPIRUN_ID",), "mpirun_rsh ... MASTER_ADDR=<host of rank 0>")
_LSF = _MpiSpec("lsf", "JSM_NAMESPACE_RANK", "JSM_NAMESPACE_SIZE",
                "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_LOCAL_SIZE",
                ("LSB_JOBID",), "jsrun -E MASTER_ADDR=<host of rank 0>")


def _mpi(spec: _MpiSpec, env: Mapping[str, str]) -> LaunchEnv | None:
    # Detection needs the local-rank variable too: srun --mpi=pmi2 sets PMI_RANK alone.
    if not (env.get(spec.rank) and env.get(spec.local_rank)):
        return None
    r = _Reader(env, spec.launcher)
    rank = r.need_int("rank", (spec.rank,))
    world = r.need_int("world_size", (spec.world_size,), minimum=1)
    local_rank = r.need_int("local_rank", (spec.local_rank,))
    local_world = r.need_int("local_world_size", (spec.local_world_size,), minimum=1)
    node_rank, num_nodes = _node_layout(r, rank, world, local_world)
    if spec is _LSF:
        host, origin = _lsf_first_compute_host(env)
    else:
        host, origin = (LOOPBACK, "loopback: all ranks on one node") if num_nodes == 1 else (None, "")
    addr = r.address(host, origin)
    job_var = r.first(spec.job_ids)
    port, job = r.port(job_var) if job_var else r.port(), env.get(job_var or "", "")
    if port is None and num_nodes == 1:
        from distruntime.mpi import launcher_process  # reads /proc: only when needed

        job = launcher_process() or ""
        if job:
            port = r.derived_port(job, f"derived from the {spec.launcher} launcher process ({job})")
    missing = [n for n, v in (("MASTER_ADDR", addr), ("MASTER_PORT", port)) if v is None]
    if missing and world > 1:
        raise _no_mpi_rendezvous(spec, missing, world, num_nodes, local_world)
    return _record(
        r, rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=node_rank, num_nodes=num_nodes, master_addr=addr, master_port=port,
        reason=f"{spec.rank} and {spec.local_rank} are set (a {spec.launcher} rank)",
        run_id=f"{spec.launcher}-{job}",
    )


def _no_mpi_rendezvous(
    spec: _MpiSpec, missing: list[str], world: int, nodes: int, local_world: int
) -> LaunchEnvError:
    names = " and ".join(missing)
    if nodes > 1:
        why = (f"{spec.launcher} started {world} ranks on {nodes} nodes ({spec.local_world_size}"
               f"={local_world}) and names no host or port for the rendezvous, and mpi4py (which "
               "would let rank 0 broadcast its own) is not installed")
        fix = (f"pip install 'distruntime[mpi]' (mpi4py, built for this MPI), or export {names} on "
               f"every rank ({spec.hint}; MASTER_ADDR: an address of rank 0's node all nodes reach)")
    else:
        why = (f"{spec.launcher} sets no job id variable and no MPI launcher process "
               "(hydra_pmi_proxy, orted, mpirun, ...) was found above this rank to derive a port from")
        fix = f"export {names} on every rank ({spec.hint})"
    return LaunchEnvError(f"{names} not set: {why}. Fix: {fix}.", variable=missing[0])


def missing_mpi_rendezvous(env: Mapping[str, str]) -> tuple[str, ...]:
    """The ``MASTER_*`` variables an MPI launch over several nodes lacks (else ``()``).

    Only what rank 0 must broadcast (:func:`distruntime.mpi.broadcast_rendezvous`):
    a one-node job derives both, and a job that is not MPI has other sources.

    Example:
        >>> missing_mpi_rendezvous({"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0",
        ...                         "MPI_LOCALNRANKS": "2"})
        ('MASTER_ADDR', 'MASTER_PORT')
    """
    if env.get("TORCHELASTIC_RUN_ID"):
        return ()
    for spec in (_OPENMPI, _MPICH, _MVAPICH):  # LSF names its hosts
        if env.get(spec.rank) and env.get(spec.local_rank):
            world, local = env.get(spec.world_size, ""), env.get(spec.local_world_size, "")
            if not (world.isdigit() and local.isdigit()) or int(local) >= int(world):
                return ()  # one node, or invalid: discovery says which
            return tuple(n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n, "").strip())
    return ()


def _lsf_first_compute_host(env: Mapping[str, str]) -> tuple[str | None, str]:
    """LSB_MCPU_HOSTS is 'host n host n ...'; the first pair is the launch node
    when there are several, and jsrun does not place ranks there."""
    words = env.get("LSB_MCPU_HOSTS", "").split()
    hosts = words[0::2]
    if not hosts:
        return None, ""
    host = hosts[1] if len(hosts) > 1 else hosts[0]
    return host, "LSB_MCPU_HOSTS (first compute host)"


def _openmpi(env: Mapping[str, str]) -> LaunchEnv | None:
    return _mpi(_OPENMPI, env)


def _mpich(env: Mapping[str, str]) -> LaunchEnv | None:
    return _mpi(_MPICH, env)


def _mvapich(env: Mapping[str, str]) -> LaunchEnv | None:
    return _mpi(_MVAPICH, env)


def _lsf(env: Mapping[str, str]) -> LaunchEnv | None:
    return _mpi(_LSF, env)


# Priority order after torchrun; see the module docstring for why.
_EXTERNAL_LAUNCHERS: tuple[tuple[str, Callable[[Mapping[str, str]], LaunchEnv | None]], ...] = (
    ("openmpi", _openmpi),
    ("mpich", _mpich),
    ("mvapich", _mvapich),
    ("lsf", _lsf),
    ("slurm", _slurm),
)

LAUNCHER_NAMES = ("torchrun", *(name for name, _ in _EXTERNAL_LAUNCHERS), "env", "none")


# --------------------------------------------------------------------------- hand-set env
def _check_torch_pairs(env: Mapping[str, str]) -> None:
    for first, second in _TORCH_PAIRS:
        has_first, has_second = bool(env.get(first, "").strip()), bool(env.get(second, "").strip())
        if has_first != has_second:
            present, missing = (first, second) if has_first else (second, first)
            raise LaunchEnvError(
                f"{present}={env[present]!r} is set but {missing} is not: a partial launch "
                f"environment. Refusing to guess ({missing} missing would silently make this "
                f"a single process). Fix: export {missing} too, or unset {present}.",
                variable=missing,
            )
    if env.get("LOCAL_RANK", "").strip() and not env.get("RANK", "").strip():
        raise LaunchEnvError(
            f"LOCAL_RANK={env['LOCAL_RANK']!r} is set but RANK and WORLD_SIZE are not. "
            "Fix: export RANK and WORLD_SIZE as well (or launch with torchrun).",
            variable="RANK",
        )


def _hand_set(env: Mapping[str, str]) -> LaunchEnv | None:
    if not env.get("RANK", "").strip():
        return None
    r = _Reader(env, "env")
    rank = r.need_int("rank", ("RANK",))
    world = r.need_int("world_size", ("WORLD_SIZE",), minimum=1)
    local_rank = r.integer("local_rank", ("LOCAL_RANK",))
    local_world = r.integer("local_world_size", ("LOCAL_WORLD_SIZE",), minimum=1)
    if local_rank is None or local_world is None:
        # One process per node/pod, as Kubeflow's PyTorchJob runs it.
        local_rank = r.derived("local_rank", 0, "default: one process per node (no LOCAL_RANK)")
        local_world = r.derived("local_world_size", 1, "default: one process per node")
    node_rank = r.integer("node_rank", ("NODE_RANK", "GROUP_RANK"))
    num_nodes = r.integer("num_nodes", ("NNODES", "GROUP_WORLD_SIZE"), minimum=1)
    if node_rank is None or num_nodes is None:
        node_rank, num_nodes = _node_layout(r, rank, world, local_world)
    addr = r.address(None, "")
    port = r.port()
    return _record(
        r, rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
        node_rank=node_rank, num_nodes=num_nodes, master_addr=addr, master_port=port,
        reason="RANK and WORLD_SIZE are set (no launcher variables)",
        run_id=f"env-{addr}:{port}",
    )


def _merge(hand: LaunchEnv, external: LaunchEnv) -> LaunchEnv:
    """Hand-set torch variables next to a launcher's: they must say the same."""
    for field in ("rank", "world_size", "local_rank", "local_world_size"):
        if not hand.source(field).isupper():  # only compare values read from variables
            continue
        mine, theirs = getattr(hand, field), getattr(external, field)
        if mine != theirs:
            raise LaunchEnvError(
                f"{hand.source(field)}={mine} contradicts {external.source(field)}={theirs} "
                f"({external.launcher}): both claim this process's {field.replace('_', ' ')}. "
                f"Fix: unset {hand.source(field)}, or set it to {theirs}. (Under torchrun "
                "inside a job, torchrun's variables win; this is not that case.)",
                variable=hand.source(field),
                value=str(mine),
            )
    sources = dict(external.sources)
    for field in ("master_addr", "master_port"):
        if hand.source(field).isupper():
            sources[field] = hand.source(field)
    return LaunchEnv(
        launcher=external.launcher,
        rank=external.rank,
        world_size=external.world_size,
        local_rank=external.local_rank,
        local_world_size=external.local_world_size,
        node_rank=external.node_rank,
        num_nodes=external.num_nodes,
        master_addr=hand.master_addr or external.master_addr,
        master_port=hand.master_port or external.master_port,
        reason=external.reason + "; RANK/WORLD_SIZE also set and agree",
        sources=tuple(sorted(sources.items())),
        run_id=external.run_id,
        restart_count=external.restart_count,
    )


def _single_process(reason: str, restart_count: int = 0) -> LaunchEnv:
    return LaunchEnv(
        launcher="none", rank=0, world_size=1, local_rank=0, local_world_size=1,
        node_rank=0, num_nodes=1, master_addr=None, master_port=None, reason=reason,
        sources=tuple((f, "default: single process") for f in ("rank", "world_size")),
        run_id="single",
        restart_count=restart_count,
    )


# --------------------------------------------------------------------------- entry point
def discover(env: Mapping[str, str]) -> LaunchEnv:
    """Work out this process's place in the job from an environment mapping.

    Reads only ``env`` (pass ``os.environ`` for the real one), except for a one-node MPI
    job whose launcher sets no job id (MPICH/Hydra, Intel MPI): its port is derived from
    the launcher process above this rank, found in /proc (:mod:`distruntime.mpi`).

    Raises:
        LaunchEnvError: a partial set (``RANK`` without ``WORLD_SIZE``), a non-integer
            or negative value, ``RANK >= WORLD_SIZE``, two launchers that disagree, or a
            multi-rank job without a rendezvous address or port. The message names the
            variable, its value and the fix.

    Example:
        >>> discover({}).launcher
        'none'
        >>> discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}).world_size  # batch script
        1
    """
    _check_torch_pairs(env)
    found = _torchrun(env)
    if found is None:
        hand = _hand_set(env)
        external = next((e for _, unit in _EXTERNAL_LAUNCHERS if (e := unit(env)) is not None), None)
        found = _merge(hand, external) if hand and external else (hand or external)
    if found is None:
        if _slurm_batch_script(env):
            return _single_process(
                "SLURM_PROCID without SLURM_STEP_ID: a SLURM batch script or allocation "
                "shell, which is one process (use srun to start ranks)",
                _Reader(env, "slurm").integer("restart_count", _SLURM_RESTART) or 0,
            )
        return _single_process("no launcher variables are set: a single process")
    _validate(found)
    return found


def _validate(le: LaunchEnv) -> None:
    checks = (
        ("rank", le.rank, "world_size", le.world_size),
        ("local_rank", le.local_rank, "local_world_size", le.local_world_size),
        ("node_rank", le.node_rank, "num_nodes", le.num_nodes),
    )
    for field, value, bound_field, bound in checks:
        if value >= bound:
            raise LaunchEnvError(
                f"{le.source(field)}={value} is not below {le.source(bound_field)}={bound} "
                f"({le.launcher}): a {field.replace('_', ' ')} must be in 0..{bound - 1}. "
                f"Fix: correct one of the two variables.",
                variable=le.source(field),
                value=str(value),
            )
    if le.local_world_size > le.world_size:
        raise LaunchEnvError(
            f"{le.source('local_world_size')}={le.local_world_size} exceeds "
            f"{le.source('world_size')}={le.world_size} ({le.launcher}): a node cannot hold "
            "more ranks than the job has. Fix: correct one of the two variables.",
            variable=le.source("local_world_size"),
            value=str(le.local_world_size),
        )
    if le.world_size > 1:
        for field, name in (("master_addr", "MASTER_ADDR"), ("master_port", "MASTER_PORT")):
            if getattr(le, field) is None:
                raise LaunchEnvError(
                    f"{name} is not set, and {le.launcher} ({le.reason}) gives no way to "
                    f"derive it, but this job has {le.world_size} ranks that must meet. "
                    f"Fix: export {name} (the same value on every rank"
                    + (", e.g. 29500" if name == "MASTER_PORT" else ": rank 0's host")
                    + ").",
                    variable=name,
                )
