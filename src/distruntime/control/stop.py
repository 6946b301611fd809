"""Coordinated stop: every rank agrees on the step to stop at when any rank is told to.

A preemption warning (SLURM's ``--signal=USR1@60``, torchrun's SIGTERM, a spot-instance
notice) often reaches one rank, or reaches ranks at different steps. With
``DistributedRuntime(graceful_stop=True)`` the first stop signal is only recorded (see
:class:`~distruntime.teardown.SignalScope`); :func:`should_stop`, called once per step on
every rank, turns those local flags into one decision that every rank sees at the same
call::

    with DistributedRuntime("auto", graceful_stop=True) as info:
        for step in range(start, steps):
            train_step()
            if distruntime.should_stop():
                save_checkpoint(step)
                logger.info("stopping at step %d: %s", step, distruntime.stop_reason())
                break

How: each call hands one integer (``world - rank`` of a rank that wants to stop, else 0)
to a helper thread, which MAX-all-reduces it on a private gloo group (CPU, created only
when ``graceful_stop`` is on), and reads the result of the *previous* call's all-reduce,
which had a whole step to finish. So the call never waits for a GPU, nor (when ranks
keep pace) for the network: it costs a queue put and an event check (tens of
microseconds; ``benchmarks/bench_stop.py``). The price is one step of latency: a stop
recorded before call ``n`` is agreed at call ``n + 1`` (``n + 2`` if it lands during
call ``n``). The result is sticky: once True, every later call returns True without
communicating.

The n-th call of one rank is paired with the n-th call of every other rank, so all
ranks must call it equally often; a rank that is left waiting for a peer's call learns
through the rendezvous store which peer stopped calling (it left the runtime, or is
stuck elsewhere) and raises :class:`~distruntime.errors.UnevenStopCallsError` instead of
hanging.
"""

from __future__ import annotations

import logging
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Store

from distruntime.control.protocol import append, claim, read
from distruntime.errors import DistRuntimeError, UnevenStopCallsError
from distruntime.registry import stop_coordinator
from distruntime.teardown import SignalScope

__all__ = ["StopReason", "request_stop", "should_stop", "stop_reason"]

logger = logging.getLogger("distruntime")

DEFAULT_STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)

# A rank blocked on a peer's call looks at the store this often for the reason, once it
# has waited _QUIET_S.
_POLL_S = 0.5
_QUIET_S = 5.0
# At exit, how long a rank waits for its peers' final call counts (to report uneven
# calls on every rank, not only on the one left waiting).
_EXIT_CHECK_S = 30.0
_REQUEUE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class StopReason:
    """Why and where the ranks agreed to stop.

    Attributes:
        rank: the lowest rank that asked for the stop.
        reason: ``"SIGUSR1"``, ``"SIGTERM"``, or the text given to :func:`request_stop`.
        call: the :func:`should_stop` call (1-based) that first returned True; with one
            call per step, the step at which every rank stopped.

    Example:
        >>> str(StopReason(rank=2, reason="SIGUSR1", call=1234))
        'SIGUSR1 on rank 2'
    """

    rank: int
    reason: str
    call: int

    def __str__(self) -> str:
        return f"{self.reason} on rank {self.rank}"


class StopCoordinator:
    """The per-runtime state behind :func:`should_stop` (one per runtime session).

    Args:
        rank, world_size: this rank and the job's size.
        group: the private gloo group the flags are all-reduced on.
        store: the runtime's namespaced rendezvous store (``None`` for one process).
        signals: the runtime's signal scope, whose ``received`` records a stop signal.
        timeout_s: the longest a call waits for a peer's matching call.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        group: dist.ProcessGroup,
        store: Store | None,
        signals: SignalScope,
        timeout_s: float,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self._group = group
        self._store = store
        self._signals = signals
        self._timeout_s = timeout_s
        self._requested: str | None = None
        self._sent: str | None = None  # the reason this rank sent (peers read the same)
        self._calls = 0  # all-reduces started (the agreement stops them once True)
        # One all-reduce at a time is in flight: call n waits for call n-1's before
        # handing over its own, so one slot (result, error, done) is enough.
        self._pending = False
        self._done = threading.Event()
        self._result = 0
        self._error: BaseException | None = None
        self._flags: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        # The helper thread: a blocking all-reduce costs ~10x less in the caller's
        # thread than an async one's launch (gloo's work object), and the caller only
        # ever touches a queue and an event.
        self._thread = threading.Thread(target=self._reduce_flags, name="distruntime-stop", daemon=True)
        self._thread.start()
        self.agreed: StopReason | None = None

    def __repr__(self) -> str:
        return (
            f"StopCoordinator(rank={self.rank}, world_size={self.world_size}, calls={self._calls}, "
            f"local={self.local_reason()!r}, agreed={self.agreed!r})"
        )

    # ------------------------------------------------------------------ the API
    def request(self, reason: str) -> None:
        if self._requested is None:
            self._requested = reason
            logger.warning("rank %d requested a stop: %s", self.rank, reason)

    def local_reason(self) -> str | None:
        """Why this rank wants to stop (a signal first), or None."""
        received = self._signals.received
        if received is not None:
            return signal.Signals(received).name
        return self._requested

    def should_stop(self) -> bool:
        if self.agreed is not None:
            return True
        if self._pending:
            code = self._wait(f"should_stop() call {self._calls + 1}")
            if code > 0:
                self._agree(self.world_size - code)
                return True
        code = 0
        if self._sent is None and (reason := self.local_reason()) is not None:
            if self._store is not None:
                # Written before the flag goes out, so it is there when peers read it.
                self._store.set(f"stop/reason/{self.rank}", reason)
            self._sent = reason
        if self._sent is not None:
            code = self.world_size - self.rank
        self._pending = True
        self._flags.put(code)
        self._calls += 1
        return False

    # ------------------------------------------------------------------ internals
    def _agree(self, first_rank: int) -> None:
        if first_rank == self.rank or self._store is None:
            reason = self._sent or "stop"
        else:
            reason = self._store.get(f"stop/reason/{first_rank}").decode()
        self.agreed = StopReason(rank=first_rank, reason=reason, call=self._calls + 1)
        log = logger.warning if self.rank == 0 else logger.info
        log("all %d ranks agreed to stop at should_stop() call %d: %s",
            self.world_size, self.agreed.call, self.agreed)

    def _reduce_flags(self) -> None:
        """The helper thread: all-reduce each flag handed over, until None."""
        buffer = torch.zeros(1, dtype=torch.int64)
        while (code := self._flags.get()) is not None:
            try:
                buffer.fill_(code)
                dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self._group)
                self._result = int(buffer.item())
            except BaseException as exc:  # handed to the caller, raised in its thread
                self._error = exc
                self._done.set()
                return
            self._done.set()

    def _wait(self, what: str) -> int:
        """The pending all-reduce's result; names the peer instead of hanging on it."""
        done = self._done
        if self._error is not None:  # the helper thread has ended on it
            raise self._error
        if not done.is_set():  # the peers are behind: wait, but not blindly
            started = time.monotonic()
            published = False
            while not done.wait(_POLL_S):
                waited = time.monotonic() - started
                # Steps of uneven length keep a rank waiting here for a while: the store is
                # asked only once the wait is long (then one read every _POLL_S).
                if self._store is not None and waited >= _QUIET_S:
                    if not published:
                        append(self._store, "stop/waiting", f"{self.rank}:{self._calls}\n")
                        published = True
                    self._check_peers_left(what)
                if waited > self._timeout_s:
                    self._raise_stuck(what, waited)
        done.clear()
        self._pending = False
        if self._error is not None:
            raise self._error  # the group failed (a peer died): the runtime reports it
        return self._result

    def _left_calls(self) -> dict[int, int]:
        """Final call counts of the ranks that have left the runtime (one read of one log)."""
        assert self._store is not None
        return _parse_counts(read(self._store, "stop/left"), self.world_size)

    def _check_peers_left(self, what: str) -> None:
        left = {r: n for r, n in self._left_calls().items() if n < self._calls}
        if left:
            rank, calls = min(left.items())
            raise UnevenStopCallsError(
                f"rank {rank} left the runtime after {calls} calls to should_stop(), but rank "
                f"{self.rank} made {self._calls} (now in {what}): the ranks called it a different "
                "number of times, so this call can never be matched. Fix: call "
                "distruntime.should_stop() exactly once per step on every rank (not under an "
                "`if` that depends on the rank, nor in loops of different lengths).",
                {**left, self.rank: self._calls},
            )

    def _raise_stuck(self, what: str, waited: float) -> None:
        assert self._store is not None or self.world_size == 1
        waiting = {self.rank}
        left: dict[int, int] = {}
        if self._store is not None:
            left = self._left_calls()
            waiting |= set(_parse_counts(read(self._store, "stop/waiting"), self.world_size))
        missing = [r for r in range(self.world_size) if r not in waiting and r not in left]
        raise UnevenStopCallsError(
            f"rank {self.rank} waited {waited:.1f}s in {what} for ranks {missing} to make their "
            f"call {self._calls}: they call should_stop() fewer times than this rank, or are stuck "
            "elsewhere (their stack shows where). Fix: call distruntime.should_stop() exactly once "
            "per step on every rank; raise collective_timeout_minutes if a step can take longer.",
            {self.rank: self._calls, **left},
        )

    # ------------------------------------------------------------------ runtime hooks
    def close(self, clean: bool, hosts_store: bool) -> UnevenStopCallsError | None:
        """Leave: publish this rank's call count; on a clean exit, compare the peers'.

        Returns (does not raise) the error to raise once teardown is done, so that an
        uneven count is reported on every rank, not only on the one left waiting.
        ``hosts_store``: this process hosts the store, so it stays until every peer has
        read the counts.
        """
        pending = self._pending
        store = self._store
        try:
            return self._leave(clean, hosts_store, pending, store)
        finally:
            self._flags.put(None)  # ends the helper thread once its all-reduce returns
            if not self._pending:  # else it may be blocked until the group is destroyed
                self._thread.join(timeout=1.0)
            self._pending = False

    def _leave(
        self, clean: bool, hosts_store: bool, pending: bool, store: Store | None
    ) -> UnevenStopCallsError | None:
        try:
            if store is None:
                if clean and pending:
                    self._wait("the runtime's exit")
                return None
            # Per rank: append, add, one blocking wait (or the last one's claim), one
            # read; and one add + wait so the store's host stays until every peer has read.
            append(store, "stop/left", f"{self.rank}:{self._calls}\n")
            if int(store.add("stop/left_count", 1)) >= self.world_size:
                # Published before this rank's own wait below, which may end in an error:
                # the peers blocked on it would otherwise wait out _EXIT_CHECK_S.
                claim(store, "stop/all_left", "1")
            if not clean:
                return None
            if pending:
                self._wait("the runtime's exit (the last should_stop() all-reduce)")
            store.wait(["stop/all_left"], timedelta(seconds=_EXIT_CHECK_S))
            left = self._left_calls()
            if int(store.add("stop/checked", 1)) >= self.world_size:
                claim(store, "stop/all_checked", "1")
            elif hosts_store:  # peers still reading the counts from this process's store
                store.wait(["stop/all_checked"], timedelta(seconds=_EXIT_CHECK_S))
        except UnevenStopCallsError as exc:
            return exc
        except Exception as exc:  # a peer (or the store's host) is gone: teardown goes on
            logger.debug("stop check at exit skipped: %s: %s", type(exc).__name__, exc)
            return None
        uneven = {r: n for r, n in left.items() if n != self._calls}
        if not uneven:
            return None
        return UnevenStopCallsError(
            f"the ranks called should_stop() a different number of times: rank {self.rank} "
            f"made {self._calls} calls, " + ", ".join(f"rank {r} {n}" for r, n in sorted(uneven.items()))
            + ". Fix: call distruntime.should_stop() exactly once per step on every rank.",
            left,
        )


def _coordinator() -> StopCoordinator:
    return stop_coordinator()


def should_stop() -> bool:
    """Whether every rank has agreed to stop; call it once per step on every rank.

    Returns the same value on every rank at the same call: True from the first call at
    which the ranks agreed that some rank was told to stop (a stop signal, or
    :func:`request_stop`), at most two calls after that, and at every call after it.

    Raises:
        DistRuntimeError: no runtime with ``graceful_stop=True`` is active.
        UnevenStopCallsError: the ranks call it a different number of times.

    Example:
        >>> import distruntime
        >>> with distruntime.DistributedRuntime("gloo", graceful_stop=True, env={}):
        ...     first = distruntime.should_stop()
        ...     distruntime.request_stop("loss is NaN")
        ...     calls = [distruntime.should_stop() for _ in range(2)]
        ...     str(distruntime.stop_reason())
        'loss is NaN on rank 0'
        >>> first, calls
        (False, [False, True])
    """
    return _coordinator().should_stop()


def request_stop(reason: str) -> None:
    """Ask every rank to stop soon, from code on any rank (e.g. a NaN loss on one rank).

    The stop is agreed like a signal: :func:`should_stop` returns True on every rank at
    the same call, at most two calls later. Only the first request of a rank counts.

    Raises:
        DistRuntimeError: no runtime with ``graceful_stop=True`` is active.

    Example:
        >>> import distruntime
        >>> with distruntime.DistributedRuntime("gloo", graceful_stop=True, env={}):
        ...     distruntime.request_stop("out of budget")
        ...     [distruntime.should_stop() for _ in range(2)]
        [False, True]
    """
    if not isinstance(reason, str) or not reason:
        raise DistRuntimeError(
            f"request_stop(reason={reason!r}): the reason must be a non-empty string (it is "
            "logged on every rank). Fix: pass a short text, e.g. request_stop('loss is NaN')."
        )
    _coordinator().request(reason)


def stop_reason() -> StopReason | None:
    """Why the ranks agreed to stop (rank, reason, call), or None while they have not.

    Example:
        >>> import distruntime
        >>> with distruntime.DistributedRuntime("gloo", graceful_stop=True, env={}):
        ...     distruntime.stop_reason() is None
        True
    """
    return _coordinator().agreed


def _parse_counts(raw: bytes | None, world_size: int) -> dict[int, int]:
    """``rank:calls`` lines (untrusted: malformed lines and ranks outside the job are skipped).

    Example:
        >>> _parse_counts(b"1:5\\n0:7\\nx:y\\n9:1\\n", 4)
        {1: 5, 0: 7}
    """
    counts: dict[int, int] = {}
    for line in (raw or b"").decode(errors="replace").splitlines()[: 4 * world_size]:
        rank_text, _, calls_text = line.partition(":")
        if rank_text.isdigit() and calls_text.isdigit() and int(rank_text) < world_size:
            counts[int(rank_text)] = int(calls_text)
    return counts


# gloo connects the pairs of a group lazily when this is set (torch >= 2.7): a MAX
# all-reduce (a ring) then connects each rank to two neighbours, O(N) store requests in all,
# instead of the full mesh's 3 per peer per rank at creation, O(N^2).
_LAZY_GLOO = "TORCH_GLOO_LAZY_INIT"


def _new_lazy_gloo_group(timeout: timedelta) -> object:
    previous = os.environ.get(_LAZY_GLOO)
    os.environ[_LAZY_GLOO] = "1"
    try:
        return dist.new_group(backend="gloo", timeout=timeout)
    finally:
        if previous is None:
            del os.environ[_LAZY_GLOO]
        else:
            os.environ[_LAZY_GLOO] = previous


def start(
    rank: int, world_size: int, store: Store | None, signals: SignalScope, timeout_s: float
) -> StopCoordinator:
    """Create the private gloo group (a collective: every rank calls this at start-up)."""
    # The group's own timeout is later than ours, so a peer that never makes its call is
    # reported by _raise_stuck (naming it), not by gloo's bare timeout.
    group = _new_lazy_gloo_group(timedelta(seconds=timeout_s + 60))
    if group is None or not isinstance(group, dist.ProcessGroup):  # only for non-members
        raise DistRuntimeError(f"rank {rank}: could not create the stop group (got {group!r})")
    return StopCoordinator(
        rank=rank, world_size=world_size, group=group, store=store, signals=signals, timeout_s=timeout_s
    )


def requeue_slurm_job(env: dict[str, str] | None = None) -> bool:
    """Run ``scontrol requeue $SLURM_JOB_ID`` (bounded); True when scontrol accepted it.

    SLURM then ends this job and queues it again (``SLURM_RESTART_COUNT`` goes up by one);
    it needs ``sbatch --requeue`` or the cluster's ``JobRequeue=1``.
    """
    environ = os.environ if env is None else env
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    if not job:
        logger.warning("requeue=True but SLURM_JOB_ID is not set (not a SLURM job): not requeued")
        return False
    cmd = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_REQUEUE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("`%s` failed: %s", shlex.join(cmd), exc)
        return False
    if done.returncode != 0:
        logger.warning("`%s` failed (exit %d): %s", shlex.join(cmd), done.returncode, done.stderr.strip())
        return False
    logger.warning("requeued SLURM job %s (`%s`)", job, shlex.join(cmd))
    return True
