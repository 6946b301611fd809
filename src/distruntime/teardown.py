"""Leaving the distributed world: signals, environment, bounded group shutdown.

* SIGTERM (torchrun's stop, SLURM's preemption) normally kills Python without running
  ``finally`` blocks. While a runtime is active it raises :class:`SignalExit` instead,
  so the ``with`` block unwinds and teardown runs. Handlers are installed only from the
  main thread, and the exact previous handler is put back afterwards. When a runtime
  is closed from another thread (where ``signal.signal`` is not allowed) the handler
  stays installed but inert: it hands the signal to the previous handler.
  With ``graceful=True`` (``DistributedRuntime(graceful_stop=True)``) the first stop
  signal is only recorded in ``received``, for :mod:`distruntime.control.stop` to agree on a
  step; a second one raises :class:`SignalExit` as above.
* During teardown (:meth:`SignalScope.hold`, and from the first bytecode of the runtime's
  ``__exit__``: ``held_in``) the first stop signal is held: teardown is
  bounded, and it is what writes the rank's report (the peer's root failure, the error
  file), so torchrun's SIGTERM to every rank must not cut it short. A second signal ends the
  rank at once through the previous handler, its report written first. A held signal is
  re-delivered after a clean teardown, dropped after a failed one (the error ends the rank).
* Variables the runtime exported are removed or reset to what they were.
* Destroying the group never waits on peers: on the failure path NCCL groups are
  aborted rather than destroyed, and every shutdown runs in a helper thread with a
  deadline, abandoned with a warning if it would block.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

import torch
import torch.distributed as dist

from distruntime.errors import SignalExit

__all__ = ["DaemonThread", "EnvPatch", "SignalScope", "run_bounded", "shutdown_group"]

logger = logging.getLogger("distruntime")

# Before torch 2.8 (pytorch#154976) a process group's destructor keeps the GIL while it
# joins its worker threads, and a gloo worker dropping the last reference to a finished
# collective's tensor needs the GIL to free its Python object: a destroy that comes right
# after a collective deadlocks, beyond any timeout (seen in this project's torch 2.4 CI,
# gdb: worker in ~AsyncAllreduceWork -> take_gil, destroy in ~ProcessGroupGloo).
_DESTRUCTOR_HOLDS_GIL = torch.__version__ < "2.8"
# How long the GIL and the CPU are left to such workers before a destroy on those versions.
_WORKER_DRAIN_S = 0.0

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class SignalScope:
    """Turns stop signals into :class:`SignalExit` while active; restores what it found.

    Args:
        signals: the signals handled (default SIGTERM alone).
        graceful: record the first signal in ``received`` instead of raising; only a
            second one raises (the coordinated stop of :mod:`distruntime.control.stop`).
        held_in: code (the runtime's ``__exit__``) in which a signal that would raise is
            held instead, as during teardown: that code is the teardown.

    Example:
        >>> scope = SignalScope((signal.SIGTERM, signal.SIGUSR1), graceful=True)
        >>> scope
        SignalScope(active=False, installed=[], graceful=True, received=None)
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), *, graceful: bool = False,
                 held_in: tuple[CodeType, ...] = ()) -> None:
        self.signals = tuple(signals)
        self.graceful = graceful
        self._held_in = held_in
        self.received: int | None = None  # graceful mode: the first stop signal
        self.held: int | None = None  # teardown: the stop signal held until it is done
        self._previous: dict[int, _Handler] = {}
        self._holding = False
        self._last_words: Callable[[], object] | None = None
        self.active = False

    def __repr__(self) -> str:
        text = f"SignalScope(active={self.active}, installed={sorted(self._previous)}"
        if self.graceful:
            name = None if self.received is None else signal.Signals(self.received).name
            text += f", graceful=True, received={name}"
        return text + ")"

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not on the main thread: SIGTERM keeps its current handler")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)  # returns the one it replaced
        self.active = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Holding is asked first: hold() sets it before it clears ``active``, so a signal
        # between the two is held, never raised inside the teardown.
        if self._holding:
            if self.held is None:
                self.held = signum
                logger.warning("received %s during teardown: finishing the failure report first "
                               "(a second signal ends the rank now)", signal.Signals(signum).name)
                return
            self._holding = False
            if self._last_words is not None:
                try:
                    self._last_words()
                except BaseException:  # the rank ends either way
                    logger.debug("the report before the second signal failed", exc_info=True)
        elif self.active:
            name = signal.Signals(signum).name
            if self.graceful and self.received is None:
                # Only a flag: the handler runs between two bytecodes of the main thread,
                # which may hold a lock or be inside a collective; should_stop() acts on it.
                self.received = signum
                logger.warning("received %s: stopping at the next step all ranks agree on "
                               "(a second signal exits at once)", name)
                return
            if _running(frame, self._held_in):
                # Python runs a pending handler at the next function entry; after a collective
                # that failed under the signal, that is the runtime's __exit__, whose teardown
                # writes the rank's report. Raised there, the signal would skip the teardown.
                self.hold()
                self.held = signum
                logger.warning("received %s as the runtime exits: finishing the teardown and its "
                               "report first (a second signal ends the rank now)", name)
                return
            self.active = False  # a second signal during unwinding goes to the old handler
            logger.warning("received %s: unwinding the distributed runtime", name)
            raise SignalExit(signum)
        self._deliver(signum, frame)

    def hold(self, last_words: Callable[[], object] | None = None) -> None:
        """Teardown: hold the first stop signal; a second one runs ``last_words``, then ends the rank.

        Called again, it keeps what is held and replaces ``last_words`` (when given).

        Example:
            >>> scope = SignalScope()
            >>> scope.hold(lambda: None)
            >>> scope.held is None, scope.active
            (True, False)
        """
        self._holding = True
        self.active = False
        if last_words is not None:
            self._last_words = last_words

    def resume(self) -> None:
        """Undo a hold taken as an exit began that turned out not to tear down (a nested
        runtime's): raise :class:`SignalExit` for the signal held, as it would have been."""
        if not self._holding:
            return
        self._holding = False
        self._last_words = None
        held, self.held = self.held, None
        if held is None:
            self.active = True
            return
        logger.warning("received %s: unwinding the distributed runtime", signal.Signals(held).name)
        raise SignalExit(held)  # ``active`` stays off: a second signal goes to the old handler

    def _deliver(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            # SIG_DFL (or a handler set from C, reported as None): re-deliver it.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def restore(self, *, redeliver_held: bool = False) -> None:
        """Put the previous handlers back; a held signal goes to them when ``redeliver_held``."""
        self.active = False
        self._holding = False
        self._last_words = None
        held, self.held = self.held, None
        if held is not None and not redeliver_held:
            logger.info("the %s held during teardown is dropped: the failure ends the rank",
                        signal.Signals(held).name)
        if threading.current_thread() is not threading.main_thread():
            if self._previous:
                logger.debug("closed off the main thread: SIGTERM handler left inert")
            if held is not None and redeliver_held:
                os.kill(os.getpid(), held)  # the inert handler, on the main thread, passes it on
            return
        previous_handlers = dict(self._previous)
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:  # the user may have replaced it since
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        if held is not None and redeliver_held:
            previous = previous_handlers.get(held, signal.SIG_DFL)
            if callable(previous):
                previous(held, None)
            elif previous != signal.SIG_IGN:
                os.kill(os.getpid(), held)


def _running(frame: FrameType | None, codes: tuple[CodeType, ...]) -> bool:
    """Whether one of ``codes`` is on the stack from ``frame`` up."""
    while frame is not None and codes:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


@dataclass
class EnvPatch:
    """Variables exported for libraries that read the torch names; undone on exit."""

    added: dict[str, str] = field(default_factory=dict)

    @classmethod
    def export_missing(cls, values: Mapping[str, str]) -> EnvPatch:
        """Set each variable that is not already set; never overwrite one."""
        patch = cls()
        for name, value in values.items():
            if name not in os.environ:
                os.environ[name] = value
                patch.added[name] = value
                logger.debug("exported %s=%s", name, value)
        return patch

    def restore(self) -> None:
        for name, value in self.added.items():
            if os.environ.get(name) == value:
                del os.environ[name]
                logger.debug("removed %s", name)
        self.added.clear()


class DaemonThread:
    """A daemon thread that runs ``fn`` once: ``join(timeout)`` and ``is_alive()``, nothing more.

    Started with the low-level ``_thread`` module: a ``threading.Thread`` costs 3-4 times
    the CPU to start (its Events and bookkeeping; 0.3-0.6 ms for a process's first), and
    the runtime starts two per process, which many ranks sharing few cores pay together
    (benchmarks/bench_startup.py). Like ``threading.Thread`` it takes on the trace and
    profile functions set with ``threading.settrace``/``setprofile`` (coverage, profilers
    see the code it runs, e.g. teardown hooks). An exception escaping ``fn`` is logged,
    never raised.

    Example:
        >>> done = []
        >>> worker = DaemonThread(lambda: done.append(1), "example")
        >>> worker.join(5.0), done, worker.is_alive()
        (True, [1], False)
    """

    def __init__(self, fn: Callable[[], object], name: str) -> None:
        self.name = name
        self._running = _thread.allocate_lock()
        self._running.acquire()  # held until fn returns
        hooks = (threading.gettrace(), threading.getprofile())
        self.ident: int = _thread.start_new_thread(self._body, (fn, *hooks))

    def __repr__(self) -> str:
        return f"DaemonThread({self.name!r}, {'running' if self.is_alive() else 'done'})"

    def _body(self, fn: Callable[[], object], trace: Any, profile: Any) -> None:
        if trace is not None:
            sys.settrace(trace)
        if profile is not None:
            sys.setprofile(profile)
        try:
            fn()
        except BaseException:
            logger.debug("thread %s failed", self.name, exc_info=True)
        finally:
            self._running.release()

    def join(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for ``fn`` to return; True when it has."""
        if self.ident == _thread.get_ident():
            return False  # the thread itself: it cannot wait for its own end
        if not self._running.acquire(timeout=max(timeout_s, 0.0)):
            return False
        self._running.release()
        return True

    def is_alive(self) -> bool:
        return self._running.locked()


def run_bounded(fn: Callable[[], object], timeout_s: float, what: str) -> bool:
    """Run ``fn`` in a daemon thread; give up after ``timeout_s`` with a warning.

    Returns True when ``fn`` finished (errors are logged, not raised: teardown must go
    on), False when it was abandoned.
    """
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # teardown reports, never raises
            errors.append(exc)

    if not DaemonThread(target, f"distruntime-{what}").join(timeout_s):
        logger.warning("%s did not finish within %.1fs; abandoned so the process can exit", what, timeout_s)
        return False
    if errors:
        logger.warning("%s failed: %s: %s", what, type(errors[0]).__name__, errors[0])
    return True


def shutdown_group(failed: bool, timeout_s: float) -> None:
    """Destroy (success) or abort (failure, NCCL) the default group, bounded in time."""
    if not dist.is_initialized():
        return
    if _DESTRUCTOR_HOLDS_GIL:
        time.sleep(_WORKER_DRAIN_S)  # see _DESTRUCTOR_HOLDS_GIL
    backend = str(dist.get_backend())
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if failed and "nccl" in backend and abort is not None:
        # destroy on NCCL can wait on peers stuck in a collective (torchtitan#1342).
        # After an abort the group object is dead; destroy only unregisters it.
        aborted = run_bounded(abort, timeout_s, "abort of the NCCL process group")
        if not aborted:
            return
    # gloo's destroy is local: it closes this rank's sockets, which makes peers blocked
    # in a collective with it fail at once rather than at the collective timeout.
    if dist.get_world_size() == 1 and "nccl" not in backend:
        # No peer to wait on: a helper thread would only add its start and hand-off.
        dist.destroy_process_group()
        return
    run_bounded(dist.destroy_process_group, timeout_s, "destroy_process_group")
