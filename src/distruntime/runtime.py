"""``DistributedRuntime``: initialise on entry, tear down on every exit.

State machine per process (one registry behind one lock, the library's only global
state): *idle* -> *initialising* -> *active* -> *tearing down* -> *idle*.

Ownership: the runtime that created the default process group is the only one that
destroys it. A runtime entered while another is active shares it (nested); one entered
while a group made outside the library is live adopts it and leaves it alive.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from types import TracebackType
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import HashStore, PrefixStore, Store
from typing_extensions import ParamSpec

from distruntime.control.agent import start_agent
from distruntime.control.channel import HostChannel, process_start_time
from distruntime.control.failures import (
    LINGER_S,
    PEER_WINDOW_S,
    describe,
    is_peer_symptom,
    linger_for_peers,
    report_failure,
    report_now,
)
from distruntime.control.stop import DEFAULT_STOP_SIGNALS, requeue_slurm_job
from distruntime.control.stop import start as start_stop
from distruntime.control.unblock import release_peers
from distruntime.device import choose_backend, select_device
from distruntime.errorfile import write_error_file
from distruntime.errors import (
    BackendUnavailableError,
    DistRuntimeError,
    GroupMismatchError,
    HangError,
    PeerFailureError,
    SignalExit,
)
from distruntime.hooks import PROCESS_HOOKS, run_teardown_hooks
from distruntime.info import DistInfo
from distruntime.launchers import LaunchEnv, discover, missing_mpi_rendezvous
from distruntime.mesh import (
    MeshPlan,
    build_mesh,
    flatten_ways,
    mesh_dim_of_failure,
    plan_mesh,
    ranks_per_node,
    release_mesh,
)
from distruntime.mpi import broadcast_rendezvous
from distruntime.registry import REGISTRY, Session, current, is_active
from distruntime.rendezvous import Rendezvous, leave, open_rendezvous
from distruntime.teardown import EnvPatch, SignalScope, run_bounded, shutdown_group

__all__ = ["DistributedRuntime", "current", "is_active", "on_teardown", "remove_teardown"]

logger = logging.getLogger("distruntime")

P = ParamSpec("P")
R = TypeVar("R")


def on_teardown(
    fn: Callable[[], object],
    timeout_s: float | None = None,
    *,
    scope: Literal["auto", "session", "process"] = "auto",
) -> None:
    """Run ``fn`` at teardown, *before* the process groups go.

    For resources bound to process groups (buffers over NCCL sub-groups): hooks run
    last-registered-first on normal exit and on the failure path, each in a thread
    bounded by ``timeout_s`` (default: the runtime's ``teardown_timeout_s``, 30 s
    without one); one that raises or hangs is logged and skipped.

    Args:
        scope: ``"session"``: the active runtime's teardown only, once (it must own
            its process group). ``"process"``: every teardown the library performs
            from now on -- each owned runtime's close (``with``, decorator, at exit,
            failure path) and each :func:`~distruntime.destroy_global_state` call, with
            or without a group -- until :func:`remove_teardown`; registering the same
            function again does not add a second run. ``"auto"``: ``"session"`` while a
            runtime that owns its group is active, else ``"process"`` (so a library may
            register at import time, before any runtime exists). Libraries should say
            ``"process"``: ``"auto"`` inside a runtime runs the hook at that runtime's
            teardown only.

    Raises:
        DistRuntimeError: ``scope="session"`` and no runtime owning its group is active.
        ValueError: an unknown ``scope``, or a ``timeout_s`` that is not positive.
        TypeError: ``fn`` is not callable.

    Example:
        >>> with DistributedRuntime("gloo"):
        ...     on_teardown(lambda: print("released"))
        released
    """
    with REGISTRY.lock:
        session = REGISTRY.session
        owned = session is not None and session.owner is not None
        if scope == "process" or (scope == "auto" and not owned):
            PROCESS_HOOKS.add(fn, timeout_s)
            return
        if scope not in {"session", "auto"}:
            raise ValueError(f"on_teardown scope must be 'auto', 'session' or 'process', got {scope!r}")
        if session is None or session.owner is None:
            raise DistRuntimeError(
                "on_teardown(scope='session') needs an active DistributedRuntime that owns its "
                f"process group (registering {fn!r}). Fix: call it inside `with "
                "DistributedRuntime(...)`, or register it for the process (scope='process')."
            )
        session.hooks.add(fn, session.owner.teardown_timeout_s if timeout_s is None else timeout_s)


def remove_teardown(fn: Callable[[], object]) -> bool:
    """Unregister ``fn`` from the process hooks and the active session's; True when found.

    Example:
        >>> def release() -> None: ...
        >>> on_teardown(release, scope="process")
        >>> remove_teardown(release), remove_teardown(release)
        (True, False)
    """
    with REGISTRY.lock:
        session = REGISTRY.session
        in_session = session is not None and session.hooks.remove(fn)
    return PROCESS_HOOKS.remove(fn) or in_session


class DistributedRuntime:
    """Initialise the default process group on entry; tear it down on exit.

    Use it as a context manager or as a decorator on ``main``::

        with DistributedRuntime("gloo") as info:
            print(info.rank, info.world_size)

        @DistributedRuntime("auto")
        def main() -> None:
            info = distruntime.current()

    Args:
        backend: ``"auto"`` (the accelerator's backend, gloo on CPU), ``"gloo"``,
            ``"nccl"``, or a torch backend string such as ``"cpu:gloo,cuda:nccl"``.
        timeout_minutes: bound on start-up: reaching the store, every rank checking in,
            and creating the group. A missing rank is reported after this long.
        collective_timeout_minutes: the group's timeout for every collective afterwards;
            ``None`` keeps torch's default (10 min NCCL, 30 min gloo) so a long job is
            not capped by the short start-up bound.
        env: the environment to discover the launch from (default ``os.environ``); with
            ``torch.multiprocessing.spawn`` pass ``{**os.environ, "RANK": ..., ...}``.
        store: an existing store all ranks share (e.g. a test controller's); rank 0 then
            hosts nothing.
        bind_device_id: pass ``device_id`` to ``init_process_group`` (eager NCCL
            communicator). ``None``: on for CUDA from torch 2.7.1 (earlier versions
            could hang, pytorch#153960), off otherwise.
        teardown_timeout_s: bound on destroying the group; past it the destroy is
            abandoned with a warning so the process can exit.
        hang_timeout_s: a rank that waits in a collective longer than this while a peer
            has not arrived (or arrived at another collective) ends the job on every rank
            with the same :class:`~distruntime.HangError`: who is stuck where, in which
            collective. ``None``: ``DISTRUNTIME_HANG_TIMEOUT_S``, else just before the
            group's collective timeout (so nothing ends earlier than torch would end it,
            only explained). ``math.inf`` disables the watchdog. A rank legitimately busy
            for longer than this while its peers wait counts as a hang.
        graceful_stop: the first of ``stop_signals`` is only recorded, and every rank
            agrees on the step to stop at through :func:`distruntime.should_stop`
            (docs/preemption.md); a second signal raises ``SignalExit``. Off: the first
            SIGTERM raises ``SignalExit``.
        stop_signals: the signals that ask for a stop when ``graceful_stop`` is on
            (default SIGTERM and SIGUSR1).
        requeue: after an agreed stop and a clean exit, rank 0 runs
            ``scontrol requeue $SLURM_JOB_ID`` (bounded) so SLURM runs the job again.
        mesh: dim name -> size for a device mesh over the dims ``("pp", "dp_replicate",
            "dp_shard", "cp", "tp")``, one size may be ``-1`` (inferred), e.g.
            ``{"tp": 2, "dp_shard": -1}``. Validated before any group exists, agreed by
            every rank at check-in, built after the default group (``info.mesh``,
            ``info.submesh(name)``, ``info.dp_rank``); see ``docs/mesh.md``.
        mesh_strict: a ``tp``/``cp`` group spanning nodes is a ``MeshConfigError``
            instead of a warning.

    On an exception inside the block the runtime does not wait on peers: it records the
    failure for them, shuts its group down so peers blocked with it fail at once, and
    re-raises the original exception. A peer that fails because of it raises
    :class:`~distruntime.PeerFailureError` naming the failed rank.
    """

    def __init__(
        self,
        backend: str | None = "auto",
        timeout_minutes: float = 1.0,
        *,
        collective_timeout_minutes: float | None = None,
        env: Mapping[str, str] | None = None,
        store: Store | None = None,
        bind_device_id: bool | None = None,
        teardown_timeout_s: float = 30.0,
        hang_timeout_s: float | None = None,
        graceful_stop: bool = False,
        stop_signals: tuple[int, ...] = DEFAULT_STOP_SIGNALS,
        requeue: bool = False,
        mesh: Mapping[str, int] | None = None,
        mesh_strict: bool = False,
    ) -> None:
        if timeout_minutes <= 0:
            raise ValueError(f"timeout_minutes must be positive, got {timeout_minutes!r}")
        self.backend = "auto" if backend is None else backend
        self.timeout_minutes = timeout_minutes
        self.collective_timeout_minutes = collective_timeout_minutes
        self.bind_device_id = bind_device_id
        self.teardown_timeout_s = teardown_timeout_s
        self.hang_timeout_s = hang_timeout_s
        if not stop_signals and graceful_stop:
            raise ValueError("stop_signals is empty; graceful_stop=True needs one, e.g. (signal.SIGTERM,)")
        self.graceful_stop = graceful_stop
        self.stop_signals = tuple(stop_signals)
        self.requeue = requeue
        self._env = env
        self._store = store
        self.mesh = None if mesh is None else dict(mesh)
        self.mesh_strict = mesh_strict
        # One entry per __enter__ still open: "owner", "nested" or "adopted".
        self._entries: list[Literal["owner", "nested", "adopted"]] = []
        # idle -> initialising -> active -> tearing down -> idle (entered again freely).
        self._state = "idle"

    def __repr__(self) -> str:
        return (
            f"DistributedRuntime(backend={self.backend!r}, timeout_minutes={self.timeout_minutes!r}, "
            f"{'' if self.mesh is None else f'mesh={self.mesh!r}, '}state={self._state!r})"
        )

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> DistInfo:
        with REGISTRY.lock:
            session = REGISTRY.session
            env = self._environment()
            if session is None and (missing := missing_mpi_rendezvous(env)):
                # MPI over several nodes naming no rendezvous: rank 0 broadcasts one (mpi4py).
                env = broadcast_rendezvous(env, missing)
            launch = discover(env)
            if session is not None:
                _check_compatible(session.info, self.backend, launch)
                self._check_mesh_compatible(session.info)
                session.depth += 1
                self._entries.append("nested")
                return session.info
            if dist.is_available() and dist.is_initialized():
                info = _info_from_live_group(launch)
                _check_compatible(info, self.backend, launch)
                self._check_mesh_compatible(info)
                REGISTRY.session = Session(info=info, owner=None)
                self._entries.append("adopted")
                logger.info("adopted a process group created outside distruntime (%s)", info.backend)
                return info
            self._state = "initialising"
            try:
                REGISTRY.session = self._start(launch)
            except BaseException:
                self._state = "idle"
                raise
            self._entries.append("owner")
            self._state = "active"
            return REGISTRY.session.info

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with REGISTRY.lock:
            if not self._entries:
                return
            self._entries.pop()
            session = REGISTRY.session
            if session is None:  # closed already (e.g. by atexit)
                return
            # The last one out closes the session: with nesting in one thread that is
            # the owner; across threads the owner may leave first, and then waits for
            # nobody -- the group lives until the last runtime using it has left.
            session.depth -= 1
            if session.depth > 0:
                session.signals.resume()  # not this exit's to hold: a signal held at its start raises
                return
            REGISTRY.session = None
            if session.owner is None:  # adopted: the group belongs to someone else
                return
            self._state = session.owner._state = "tearing down"
            # Before anything else: a SIGTERM that now raised SignalExit inside __exit__ would
            # cut the teardown short (no report, no error file) while this rank waits below.
            session.signals.hold(functools.partial(report_now, session.rendezvous, session.info.rank, exc))
            try:
                error = _leave(session, exc, self.teardown_timeout_s)
            finally:
                # Only now, with the report out: the previous handler (often the default,
                # which ends the rank at once) takes the next stop signal.
                session.signals.restore(redeliver_held=exc is None)
                session.env_patch.restore()
                self._state = session.owner._state = "idle"
        if error is not None and error is not exc:
            raise error
        if session.stop is not None and session.stop.agreed is not None and exc is None:
            _after_agreed_stop(session, self.requeue)

    # ------------------------------------------------------------------ decorator
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``main``: run it inside this runtime.

        Inside, :func:`distruntime.current` returns the ``DistInfo``. Under torchrun an
        uncaught exception is written to ``TORCHELASTIC_ERROR_FILE`` (on exit from the
        runtime, whichever form is used), so torchrun's summary names the real error.
        """

        @functools.wraps(fn)
        def run_in_runtime(*args: P.args, **kwargs: P.kwargs) -> R:
            with self:
                return fn(*args, **kwargs)

        return run_in_runtime

    def on_teardown(self, fn: Callable[[], object], timeout_s: float | None = None) -> None:
        """:func:`distruntime.on_teardown` (``scope="session"``) for this runtime, which must be active.

        Example::

            runtime = DistributedRuntime("gloo")
            with runtime:
                runtime.on_teardown(buffer.destroy)   # before the groups are destroyed
        """
        if not self._entries:
            raise DistRuntimeError(
                f"on_teardown: {self!r} is not active (registering {fn!r}). Fix: call it "
                "inside its `with` block."
            )
        on_teardown(fn, timeout_s, scope="session")

    # ------------------------------------------------------------------ internals
    def _check_mesh_compatible(self, info: DistInfo) -> None:
        """A runtime sharing a live group must not ask for another mesh."""
        if self.mesh is None:
            return
        if info.parallel is None:
            raise GroupMismatchError(
                f"mesh={self.mesh!r} was asked for, but the live process group has no mesh (it "
                "was made by an outer runtime without mesh=, or outside distruntime). Fix: give "
                "the outermost DistributedRuntime the mesh= argument."
            )
        wanted = plan_mesh(self.mesh, info.world_size).sizes
        if wanted != info.parallel.plan.sizes:
            raise GroupMismatchError(
                f"mesh={self.mesh!r} contradicts the live mesh ({info.parallel.plan.shape}). "
                "Fix: ask for the same mesh as the outer runtime, or leave it out."
            )

    def _environment(self) -> Mapping[str, str]:
        return os.environ if self._env is None else self._env

    def _start(self, launch: LaunchEnv) -> Session:
        started = time.monotonic()
        deadline = started + self.timeout_minutes * 60
        plan = self._plan_mesh(launch)  # refused here, before any store or group
        choice = choose_backend(self.backend, launch.world_size)
        device = select_device(choice.device_type, launch.local_rank)
        if device.type != "cpu":
            getattr(torch, device.type).set_device(device)
        REGISTRY.generation += 1
        session = Session(
            info=DistInfo(
                backend=choice.backend,
                rank=launch.rank,
                world_size=launch.world_size,
                device=device,
                is_main=launch.rank == 0,
                local_rank=launch.local_rank,
                local_world_size=launch.local_world_size,
                node_rank=launch.node_rank,
                num_nodes=launch.num_nodes,
                launcher=launch.launcher,
                master_addr=launch.master_addr if launch.world_size > 1 else None,
                master_port=launch.master_port if launch.world_size > 1 else None,
                restart_count=launch.restart_count,
            ),
            owner=self,
        )
        teardown = (DistributedRuntime.__exit__.__code__,)
        session.signals = (SignalScope(self.stop_signals, graceful=True, held_in=teardown)
                           if self.graceful_stop else SignalScope(held_in=teardown))
        session.signals.install()
        if launch.launcher != "none":
            session.env_patch = EnvPatch.export_missing(_torch_variables(launch))
        try:
            self._create_group(session, launch, deadline, plan)
        except BaseException:
            shutdown_group(failed=True, timeout_s=self.teardown_timeout_s)
            session.signals.restore()
            session.env_patch.restore()
            raise
        _register_atexit()
        if session.rendezvous is not None:
            session.channel = _open_channel(session.rendezvous)
            session.agent = start_agent(
                session.rendezvous, choice.backend, hang_timeout_s=self.hang_timeout_s,
                collective_timeout_minutes=self.collective_timeout_minutes, store=self._store,
                channel=session.channel,
            )
        if launch.rank == 0:
            logger.info(
                "all %d ranks joined in %.2fs (backend %s, launcher %s%s)",
                launch.world_size, time.monotonic() - started, choice.backend, launch.launcher,
                f", rendezvous {launch.master_addr}:{launch.master_port}" if launch.world_size > 1 else "",
            )
        return session

    def _plan_mesh(self, launch: LaunchEnv) -> MeshPlan | None:
        if self.mesh is None:
            return None
        plan = plan_mesh(
            self.mesh, launch.world_size, ranks_per_node=ranks_per_node(launch), strict=self.mesh_strict
        )
        flatten_ways(plan)  # a torch that cannot build it is refused here too
        if plan.spans and launch.rank == 0:
            logger.warning("device mesh %s: %s (slow; mesh_strict=True makes this an error)",
                           plan.shape, "; ".join(plan.spans))
        return plan

    def _create_group(
        self, session: Session, launch: LaunchEnv, deadline: float, plan: MeshPlan | None
    ) -> None:
        info = session.info
        timeout = (
            None if self.collective_timeout_minutes is None
            else timedelta(minutes=self.collective_timeout_minutes)
        )
        bind = self.bind_device_id
        if bind is None:
            bind = info.device.type == "cuda" and _torch_at_least(2, 7, 1)
        device_id = info.device if bind and info.device.type != "cpu" else None
        if launch.world_size == 1 and self._store is None:
            # One process: an in-process store, no port opened.
            store: Store = HashStore()
        else:
            namespace = f"distruntime/{launch.run_id}/{REGISTRY.generation}"
            session.rendezvous = open_rendezvous(
                launch, deadline, namespace, self._store, plan.shape if plan is not None else ""
            )
            store = PrefixStore("pg", session.rendezvous.store)
        dist.init_process_group(
            info.backend, store=store, rank=info.rank, world_size=info.world_size,
            timeout=timeout, device_id=device_id,
        )
        if self.graceful_stop:
            stop_timeout_s = (self.collective_timeout_minutes or 30.0) * 60
            rdzv_store = session.rendezvous.store if session.rendezvous is not None else None
            session.stop = start_stop(info.rank, info.world_size, rdzv_store, session.signals, stop_timeout_s)
        if plan is not None:
            session.info = replace(info, parallel=build_mesh(plan, info.device.type, info.rank, timeout))


def _open_channel(rdzv: Rendezvous) -> HostChannel | None:
    """This host's node-local channel, with this rank's first slot: its pid and start time,
    written by the process itself (the evidence a peer needs before it may signal it)."""
    channel = HostChannel.open(rdzv.namespace, socket.gethostname())
    if channel is not None:
        pid = os.getpid()
        channel.write_slot(rdzv.launch.rank, {"rank": rdzv.launch.rank, "pid": pid,
                                              "start": process_start_time(pid) or 0, "t": time.time()})
    return channel


def _torch_at_least(*version: int) -> bool:
    parts = []
    for piece in torch.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= version


def _torch_variables(launch: LaunchEnv) -> dict[str, str]:
    """The torch names of the launch values, for libraries that read them."""
    values = {
        "RANK": str(launch.rank),
        "WORLD_SIZE": str(launch.world_size),
        "LOCAL_RANK": str(launch.local_rank),
        "LOCAL_WORLD_SIZE": str(launch.local_world_size),
    }
    if launch.master_addr is not None and launch.master_port is not None:
        values["MASTER_ADDR"] = launch.master_addr
        values["MASTER_PORT"] = str(launch.master_port)
    return values


def _check_compatible(info: DistInfo, backend: str, launch: LaunchEnv) -> None:
    """A runtime joining a live group must not be asked for something else."""
    if backend.lower() != "auto":
        try:
            wanted = choose_backend(backend, info.world_size, quiet=True).backend
        except BackendUnavailableError:
            wanted = backend.lower()  # cannot run here at all; the mismatch is the news
        if wanted not in info.backend:
            raise GroupMismatchError(
                f"a process group is already live with backend {info.backend!r}, but this "
                f"runtime asks for {backend!r}. Fix: ask for 'auto' or {info.backend!r}, or "
                "leave the outer runtime (destroy the existing group) first."
            )
    if launch.launcher == "none":
        return  # the environment says nothing to contradict
    pairs = (("rank", info.rank, launch.rank), ("world_size", info.world_size, launch.world_size))
    for name, live, expected in pairs:
        if live != expected:
            raise GroupMismatchError(
                f"the live process group has {name}={live}, but {launch.source(name)}={expected} "
                f"({launch.launcher}). Fix: create the group with the launcher's values, or "
                "correct the environment."
            )


def _info_from_live_group(launch: LaunchEnv) -> DistInfo:
    """Describe a group created outside the library, as truthfully as possible."""
    backend = str(dist.get_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    agrees = (launch.rank, launch.world_size) == (rank, world)
    if not agrees or launch.launcher == "none":
        return DistInfo(backend, rank, world, device, rank == 0, launcher="external")
    return DistInfo(
        backend, rank, world, device, rank == 0,
        local_rank=launch.local_rank, local_world_size=launch.local_world_size,
        node_rank=launch.node_rank, num_nodes=launch.num_nodes, launcher=launch.launcher,
        master_addr=launch.master_addr, master_port=launch.master_port,
        restart_count=launch.restart_count,
    )


# ---------------------------------------------------------------------- teardown
def _hang_error(session: Session, exc: BaseException | None) -> HangError | None:
    """The hang verdict behind ``exc``, if the watchdog has (or is about to have) one."""
    if exc is None or session.agent is None:
        return None
    if isinstance(exc, HangError):
        return exc
    # A transport error may be the symptom of a peer aborted for a hang: wait (bounded)
    # for the verdict an open incident is about to publish. Anything else only takes
    # a verdict that is already in.
    report = session.agent.verdict_after_failure(6.0 if is_peer_symptom(exc) else 0.0)
    return HangError(report) if report is not None else None


def _leave(session: Session, exc: BaseException | None, timeout_s: float) -> BaseException | None:
    """Close an owned session; the error this rank leaves with (``exc`` itself, or one naming
    the real cause), already in torchrun's error file and in the log."""
    hang = _hang_error(session, exc)
    victim = exc is not None and is_peer_symptom(exc) and hang is None
    if isinstance(exc, Exception) and not victim:
        write_error_file(hang or exc)  # first, so its timestamp is the job's earliest
    stop_error = _leave_stop(session, exc)
    peer_error = _close(session, hang or exc, timeout_s)
    error: BaseException | None = exc
    if hang is not None and hang is not exc:
        hang.__cause__ = exc
        error = hang
    elif stop_error is not None:
        error = stop_error
    elif peer_error is not None:
        peer_error.__cause__ = exc
        # torchrun's summary shows the earliest error file (1 s resolution); should
        # this one tie with the failed rank's, it still names the real cause.
        write_error_file(peer_error)
        error = peer_error
    elif victim and isinstance(exc, Exception):
        write_error_file(exc)
    if error is not None and not _clean_exit(error):
        # The rank's report, before the stop signal's handler is back: torchrun stops every
        # rank once one has failed, and the default handler would end this one silently.
        logger.error("rank %d leaves the runtime on %s", session.info.rank, describe(error))
    return error


def _clean_exit(exc: BaseException) -> bool:
    return isinstance(exc, SystemExit) and not isinstance(exc, SignalExit) and exc.code in (None, 0)


def _leave_stop(session: Session, exc: BaseException | None) -> DistRuntimeError | None:
    """Close the coordinated stop before the group: the error to raise after teardown."""
    if session.stop is None:
        return None
    session.signals.hold()  # as in _close: a first signal now waits for the teardown
    hosts = session.rendezvous is not None and session.rendezvous.hosts_store
    return session.stop.close(clean=exc is None, hosts_store=hosts)


def _after_agreed_stop(session: Session, requeue: bool) -> None:
    """A clean exit after an agreed stop: say why; requeue the SLURM job if asked."""
    assert session.stop is not None and session.stop.agreed is not None
    agreed = session.stop.agreed
    logger.info("left the runtime after the agreed stop (%s, call %d)", agreed, agreed.call)
    if requeue and session.info.rank == 0:
        requeue_slurm_job()


def _close(session: Session, exc: BaseException | None, timeout_s: float) -> PeerFailureError | None:
    """Tear down an owned session. Returns the error to raise when a peer caused ``exc``."""
    rdzv = session.rendezvous
    # A first SIGTERM (torchrun stopping every rank) waits for the report; a second ends the rank.
    session.signals.hold(functools.partial(report_now, rdzv, session.info.rank, exc))
    if session.agent is not None:
        session.agent.stop()
    peer_error: list[PeerFailureError | None] = [None]
    try:
        if exc is not None and rdzv is not None:
            # Before the shutdown: peers learn who failed from this record when the
            # shutdown breaks their collectives.
            def report() -> None:
                where = mesh_dim_of_failure(session.info.parallel, exc)
                peer_error[0] = report_failure(rdzv, session.info.rank, exc, where, session.channel)

            run_bounded(report, PEER_WINDOW_S + 10, "failure report to peers")
        if rdzv is not None and (exc is None or not rdzv.hosts_store):
            leave(rdzv, timeout_s)  # the failing store host lingers for its peers instead
        # User cleanup (session, then process hooks), while the groups its resources use exist.
        run_teardown_hooks(session.hooks, timeout_s, failed=exc is not None)
        shutdown_group(failed=exc is not None, timeout_s=timeout_s)
        if exc is not None:  # groups a wrapper or DTensor keeps alive must not hold peers
            release_peers(rdzv, session.info.backend)
        if session.info.parallel is not None:  # frees the groups: a destructor must not hang us
            run_bounded(lambda: release_mesh(session.info.parallel), timeout_s, "release of the mesh groups")
        if exc is not None and rdzv is not None and rdzv.hosts_store:
            run_bounded(lambda: linger_for_peers(rdzv), LINGER_S + 5, "waiting for peers to read the failure")
    finally:
        if session.channel is not None and session.agent is None:
            session.channel.close(session.info.rank)
    logger.debug("runtime closed (%s)", "after an exception" if exc is not None else "cleanly")
    return peer_error[0]


# ---------------------------------------------------------------------- process-wide
def _register_atexit() -> None:
    if not REGISTRY.atexit_registered:
        atexit.register(_close_at_exit)
        REGISTRY.atexit_registered = True


def _close_at_exit() -> None:
    """A runtime still open at interpreter exit (seed shims without destroy)."""
    with REGISTRY.lock:
        session = REGISTRY.session
        if session is None or session.owner is None:
            return
        REGISTRY.session = None
        REGISTRY.global_runtime = None
        session.owner._entries.clear()
        session.owner._state = "idle"
        try:
            _close(session, None, session.owner.teardown_timeout_s)
        finally:
            session.signals.restore(redeliver_held=True)
            session.env_patch.restore()


def enter_global(backend: str, timeout_minutes: float) -> DistInfo:
    """``initialize_distributed``: enter the process-wide runtime (idempotent)."""
    with REGISTRY.lock:
        runtime = REGISTRY.global_runtime
        if runtime is not None and REGISTRY.session is not None:
            if dist.is_available() and dist.is_initialized():
                _check_compatible(REGISTRY.session.info, backend, discover(os.environ))
                return REGISTRY.session.info
            # Its group was destroyed behind its back (a raw destroy_process_group, as the
            # seed's callers may do): close what is left, then start afresh, as the seed does.
            exit_global()
        runtime = DistributedRuntime(backend, timeout_minutes)
        info = runtime.__enter__()
        REGISTRY.global_runtime = runtime
        return info


def exit_global() -> bool:
    """``destroy_global_state``: close the active session, whoever opened it.

    The shims' runtime closes as its ``with`` block would; a session of another runtime
    (the shim called inside a ``with`` block) is closed as at exit, and that block then
    leaves without a second teardown. Returns True when an owned session was closed (its
    hooks ran); False when there was none, or only an adopted group, which is forgotten
    here and left to the caller to destroy.
    """
    with REGISTRY.lock:
        runtime, REGISTRY.global_runtime = REGISTRY.global_runtime, None
        session = REGISTRY.session
        if session is None:
            return False
        if session.owner is None:
            REGISTRY.session = None
            return False
        if runtime is not session.owner or session.depth != 1:
            _close_at_exit()
            return True
    runtime.__exit__(None, None, None)
    return True
