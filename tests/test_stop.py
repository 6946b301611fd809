"""Coordinated stop (distruntime.stop): agreement on N real ranks, signals, uneven calls.

The multi-rank tests run on the project's own plugin, with fresh rank processes
(``isolation="fresh"``): graceful_stop takes over SIGUSR1, which the plugin's pooled
ranks use for stack dumps. Launcher-level runs (torchrun, the example, SLURM) are in
test_stop_processes.py and tests/launchers/test_stop_slurm.py.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

import distruntime
from distruntime import DistributedRuntime, DistRuntimeError, SignalExit, UnevenStopCallsError, discover
from distruntime.testing import assert_all_ranks

STOP = pytest.mark.distributed(world_size=4, init=False, isolation="fresh", timeout=120)


def _loop(info: distruntime.DistInfo, steps: int, act: dict[int, tuple[int, object]]) -> int | None:
    """Steps 1..steps of a training-like loop; ``act[rank] = (step, action)`` runs before
    that step's should_stop(). Returns the step at which should_stop() said True."""
    for step in range(1, steps + 1):
        work = torch.ones(1)
        dist.all_reduce(work)  # the step's own collective, as in DDP
        when, action = act.get(info.rank, (-1, None))
        if step == when:
            if isinstance(action, int):
                os.kill(os.getpid(), action)  # delivered before the next bytecode
            else:
                distruntime.request_stop(str(action))
        if distruntime.should_stop():
            return step
    return None


def _agreed_step(stopped: int | None) -> list[int | None]:
    gathered: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stopped)
    return gathered


@STOP
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_to_one_rank_stops_every_rank_at_one_step(signum: int) -> None:
    with DistributedRuntime("gloo", graceful_stop=True) as info:
        stopped = _loop(info, 50, {2: (5, signum)})
        steps = _agreed_step(stopped)
        reason = distruntime.stop_reason()
    # Recorded before call 5: call 5 sends the flag, call 6 reads the agreement.
    assert steps == [6] * 4, steps
    assert reason is not None and (reason.rank, reason.call) == (2, 6)
    assert str(reason) == f"{signal.Signals(signum).name} on rank 2"
    assert not dist.is_initialized()


@STOP
def test_request_stop_on_one_rank_and_the_lowest_rank_is_reported() -> None:
    with DistributedRuntime("gloo", graceful_stop=True) as info:
        stopped = _loop(info, 50, {3: (7, "loss is NaN"), 1: (7, signal.SIGUSR1)})
        steps = _agreed_step(stopped)
        reason = distruntime.stop_reason()
    assert steps == [8] * 4, steps
    assert str(reason) == "SIGUSR1 on rank 1"


@STOP
def test_request_stop_reason_text_reaches_every_rank() -> None:
    with DistributedRuntime("gloo", graceful_stop=True) as info:
        stopped = _loop(info, 50, {3: (4, "loss is NaN at step 4")})
        steps = _agreed_step(stopped)
        reason = distruntime.stop_reason()
    assert steps == [5] * 4, steps
    assert str(reason) == "loss is NaN at step 4 on rank 3"


@STOP
def test_no_signal_never_stops() -> None:
    with DistributedRuntime("gloo", graceful_stop=True) as info:
        stopped = _loop(info, 200, {})
        assert distruntime.stop_reason() is None
        assert_all_ranks(stopped is None, f"stopped at {stopped}")


@pytest.mark.distributed(world_size=2, init=False, isolation="fresh", timeout=120)
@pytest.mark.parametrize("where", ["at_exit", "in_a_call"])
def test_uneven_calls_raise_on_every_rank_within_a_bound(where: str) -> None:
    started = time.monotonic()
    extra = 1 if where == "at_exit" else 3  # in_a_call: rank 1 waits on a call rank 0 never makes
    with pytest.raises(UnevenStopCallsError, match="different number of times") as caught, \
            DistributedRuntime("gloo", graceful_stop=True, teardown_timeout_s=5) as info:
        calls = 5 + (extra if info.rank == 1 else 0)
        for _ in range(calls):
            assert not distruntime.should_stop()
    assert time.monotonic() - started < 30
    # in_a_call: rank 1 raises inside its 7th call, having started 6 all-reduces
    assert caught.value.calls[info.rank] == (5 if info.rank == 0 else 6)
    other = 1 - info.rank
    assert f"rank {other}" in str(caught.value), str(caught.value)
    assert not dist.is_initialized()


@pytest.mark.distributed(world_size=2, init=False, isolation="fresh", timeout=120)
def test_graceful_stop_off_keeps_today_behaviour() -> None:
    usr1 = signal.getsignal(signal.SIGUSR1)
    with DistributedRuntime("gloo") as info:
        assert signal.getsignal(signal.SIGUSR1) is usr1  # SIGUSR1 is not taken over
        with pytest.raises(DistRuntimeError, match="graceful_stop off"):
            distruntime.should_stop()
        dist.barrier()
        assert info.world_size == 2


# ---------------------------------------------------------------- one process
def test_second_signal_raises_signal_exit_and_handlers_come_back() -> None:
    def mine(signum: int, frame: object) -> None:  # a user handler that must come back
        raise AssertionError("not expected to run")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(SignalExit) as caught, DistributedRuntime("gloo", env={}, graceful_stop=True):
            os.kill(os.getpid(), signal.SIGTERM)  # recorded only
            assert not distruntime.should_stop()
            assert distruntime.should_stop()
            os.kill(os.getpid(), signal.SIGTERM)  # the second one exits at once
            threading.Event().wait(5)
        assert caught.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        assert not dist.is_initialized()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stop_signals_are_settable_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with caplog.at_level(logging.INFO, logger="distruntime"), \
            DistributedRuntime("gloo", env={}, graceful_stop=True, stop_signals=(signal.SIGUSR2,)):
        assert signal.getsignal(signal.SIGUSR1) is before  # not taken over
        os.kill(os.getpid(), signal.SIGUSR2)
        results = [distruntime.should_stop() for _ in range(3)]
    assert results == [False, True, True]
    assert "agreed to stop at should_stop() call 2: SIGUSR2 on rank 0" in caplog.text
    assert "left the runtime after the agreed stop (SIGUSR2 on rank 0, call 2)" in caplog.text


def test_bad_input_is_named() -> None:
    with pytest.raises(DistRuntimeError, match="no DistributedRuntime is active"):
        distruntime.should_stop()
    with DistributedRuntime("gloo", env={}, graceful_stop=True), \
            pytest.raises(DistRuntimeError, match=r"request_stop\(reason=''\)"):
        distruntime.request_stop("")
    with pytest.raises(ValueError, match="stop_signals is empty"):
        DistributedRuntime("gloo", graceful_stop=True, stop_signals=())


def test_should_stop_costs_little_per_call() -> None:
    """The call never waits on its own all-reduce: 2000 calls on one rank stay cheap."""
    with DistributedRuntime("gloo", env={}, graceful_stop=True):
        started = time.perf_counter()
        for _ in range(2000):
            distruntime.should_stop()
        per_call = (time.perf_counter() - started) / 2000
    assert per_call < 2e-3, f"{per_call * 1e6:.0f} us per call"  # loose: a loaded 2-core box


# ---------------------------------------------------------------- restart_count
@pytest.mark.parametrize(
    ("env", "expected", "source"),
    [
        ({}, 0, "default"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_RESTART_COUNT": "2"}, 2, None),
        ({"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
          "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "7",
          "SLURM_NODELIST": "n1", "SLURM_RESTART_COUNT": "1"}, 1, "SLURM_RESTART_COUNT"),
        ({"TORCHELASTIC_RUN_ID": "r", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
          "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
          "TORCHELASTIC_RESTART_COUNT": "3", "SLURM_RESTART_COUNT": "1"}, 3, "TORCHELASTIC_RESTART_COUNT"),
    ],
    ids=["none", "slurm-batch", "srun", "torchrun-in-slurm"],
)
def test_restart_count_from_the_launcher(env: dict[str, str], expected: int, source: str | None) -> None:
    launch = discover(env)
    assert launch.restart_count == expected
    if source is not None:
        assert launch.source("restart_count") == source


def test_bad_restart_count_is_named() -> None:
    with pytest.raises(distruntime.LaunchEnvError, match="SLURM_RESTART_COUNT='x'"):
        discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_RESTART_COUNT": "x"})
