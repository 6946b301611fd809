"""The exceptions distruntime raises.

Every error names what was wrong (the variable, rank or value) and how to fix it.
They all derive from :class:`DistRuntimeError`, so ``except DistRuntimeError``
catches anything the library raises on purpose.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "DeviceSelectionError",
    "DistRuntimeError",
    "GroupMismatchError",
    "HangError",
    "LaunchEnvError",
    "MeshConfigError",
    "MeshMismatchError",
    "PeerFailureError",
    "RendezvousError",
    "SignalExit",
    "UnevenStopCallsError",
]


def _see_note(exc: BaseException) -> None:
    """Add ``See: distruntime explain NAME`` to the traceback (``__notes__``, PEP 678)."""
    note = f"See: distruntime explain {type(exc).__name__}"
    add_note = getattr(exc, "add_note", None)
    if callable(add_note):
        add_note(note)
    else:  # Python 3.10: no add_note; tracebacks there do not show notes, pytest does
        exc.__notes__ = [note]  # type: ignore[attr-defined]


class DistRuntimeError(RuntimeError):
    """Base class of every error distruntime raises on purpose.

    Each instance carries the note ``See: distruntime explain NAME``: its traceback ends
    with the command that prints what the error means, its usual causes and the fix
    (:mod:`distruntime.troubleshooting`).

    Example:
        >>> err = DistRuntimeError("something went wrong")
        >>> err.__notes__
        ['See: distruntime explain DistRuntimeError']
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        _see_note(self)


class LaunchEnvError(DistRuntimeError, ValueError):
    """The launch environment is invalid, partial or contradictory.

    Attributes:
        variable: the environment variable at fault (``""`` when several are).
        value: its value as found (``None`` when it is missing).

    Example:
        >>> from distruntime import discover
        >>> try:
        ...     discover({"RANK": "1"})
        ... except LaunchEnvError as err:
        ...     print(err.variable, err.value)
        WORLD_SIZE None
    """

    def __init__(self, message: str, *, variable: str = "", value: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable
        self.value = value


class BackendUnavailableError(DistRuntimeError):
    """The requested backend cannot run on this machine (e.g. ``nccl`` without CUDA).

    Example::

        try:
            with DistributedRuntime("nccl") as info:   # 2 ranks on a machine without CUDA
                ...
        except BackendUnavailableError as err:
            print(err)   # backend 'nccl' needs cuda, which is not available ... Fix: ...
    """


class DeviceSelectionError(DistRuntimeError):
    """No device can be chosen for this rank (e.g. local rank beyond the visible GPUs).

    Example::

        # torchrun --nproc-per-node 8 on a node with 4 GPUs: local ranks 4-7 raise
        # DeviceSelectionError("local rank 4 has no cuda device: this process sees 4 devices ...")
    """


class RendezvousError(DistRuntimeError):
    """The ranks could not meet: missing rank, port in use, unreachable address,
    duplicate rank, or ranks that disagree on the world size.

    Attributes:
        reason: a machine-readable cause: ``"port_in_use"``, ``"unresolvable"``,
            ``"unreachable"``, ``"not_a_store"``, ``"missing_ranks"``, ``"store_lost"``,
            ``"duplicate_rank"``, ``"world_size_mismatch"``, ``"port_collision"`` (another job's
            store on a derived port), ``"mesh_mismatch"`` (``""`` when unknown).

    Example::

        try:
            with DistributedRuntime("gloo", timeout_minutes=0.5) as info:
                ...
        except RendezvousError as err:
            if err.reason == "missing_ranks":
                print(err)   # only 3 of 4 ranks managed to check in ... missing ranks: 2
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class MeshConfigError(DistRuntimeError, ValueError):
    """A ``mesh=`` spec that cannot be built: unknown dim, bad size, sizes that do not fit
    the world size, or (with ``mesh_strict=True``) a ``tp``/``cp`` group spanning nodes.
    Raised on every rank before any process group exists.

    Example:
        >>> from distruntime.mesh import plan_mesh
        >>> try:
        ...     plan_mesh({"tp": 3}, world_size=8)
        ... except MeshConfigError:
        ...     print("8 ranks do not split into tp=3")
        8 ranks do not split into tp=3
    """


class MeshMismatchError(RendezvousError):
    """Ranks asked for different meshes (caught at the rendezvous check-in, on every rank,
    before any group exists). ``reason`` is ``"mesh_mismatch"``.

    Example::

        # rank 0 asks mesh={"tp": 2, "dp_shard": -1}, rank 1 mesh={"tp": 4, ...}: every rank
        # raises MeshMismatchError (reason "mesh_mismatch") naming which ranks asked for what.
    """


class GroupMismatchError(DistRuntimeError):
    """A live process group contradicts what this runtime was asked for.

    Example:
        >>> from distruntime import DistributedRuntime
        >>> with DistributedRuntime("gloo"):
        ...     try:
        ...         with DistributedRuntime("gloo", mesh={"tp": 1}):
        ...             pass
        ...     except GroupMismatchError:
        ...         print("the outer runtime has no mesh")
        the outer runtime has no mesh
    """


class PeerFailureError(DistRuntimeError):
    """Another rank failed; this rank stopped because of it.

    Attributes:
        failed_ranks: the failed (or silent) ranks, with what is known of each.
        root_reported: the failed rank reported its own exception (so its log, and
            torchrun's summary, hold the root cause); False when it died or hung silently.

    Example::

        try:
            with DistributedRuntime("auto") as info:
                train()
        except PeerFailureError as err:
            log.error("stopped because of ranks %s", sorted(err.failed_ranks))
            raise
    """

    def __init__(self, message: str, failed_ranks: dict[int, str], *, root_reported: bool = False) -> None:
        super().__init__(message)
        self.failed_ranks = failed_ranks
        self.root_reported = root_reported


class HangError(DistRuntimeError):
    """The job stopped making progress: a rank waited in a collective longer than
    ``hang_timeout_s`` while a peer had not arrived (or arrived at another collective).

    Raised on every rank with the same verdict: a per-rank table, the culprit first (where
    it stands: ``file.py:LINE``, in which collective, stopped, holding the GIL, exited),
    each group's progress and the first collective at which ranks disagree (desync).

    Attributes:
        report: the :class:`distruntime.control.verdict.HangReport` behind the message.

    Example::

        with DistributedRuntime("gloo", hang_timeout_s=60) as info:
            if info.rank == 1:
                time.sleep(3600)      # rank 1 never reaches the all_reduce
            dist.all_reduce(t)        # every rank raises HangError: "rank 1 running Python at ..."
    """

    def __init__(self, report: object) -> None:
        format_report = getattr(report, "format", None)
        super().__init__(format_report() if callable(format_report) else str(report))
        self.report = report

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.report,))


class SignalExit(SystemExit):
    """Raised inside an active runtime when SIGTERM arrives.

    A ``SystemExit`` so that ``except Exception`` in user code does not swallow it;
    its exit code is the shell convention ``128 + signal number`` (143 for SIGTERM).

    Attributes:
        signum: the signal that arrived (15 for SIGTERM).

    Example:
        >>> import signal
        >>> SignalExit(signal.SIGTERM).code
        143
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        _see_note(self)


class UnevenStopCallsError(DistRuntimeError):
    """Ranks called :func:`distruntime.should_stop` a different number of times.

    The agreement pairs each rank's n-th call with every other rank's n-th call, so
    every rank must call it once per step, unconditionally.

    Attributes:
        calls: ``{rank: number of calls}`` as far as known when the error was raised.

    Example::

        while training:
            if info.rank == 0 and distruntime.should_stop():   # wrong: rank 0 only
                break
        # -> UnevenStopCallsError on the way out; call should_stop() on every rank, every step
    """

    def __init__(self, message: str, calls: dict[int, int]) -> None:
        super().__init__(message)
        self.calls = calls
