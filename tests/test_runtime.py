"""DistributedRuntime in one process (world size 1): lifecycle, ownership, signals, shims."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distruntime
from distruntime import (
    DistInfo,
    DistributedRuntime,
    DistRuntimeError,
    GroupMismatchError,
    SignalExit,
    init_utils,
)
from distruntime.teardown import SignalScope


def test_context_manager_initialises_and_tears_down() -> None:
    with DistributedRuntime("gloo", env={}) as info:
        assert dist.is_initialized()
        assert info == DistInfo("gloo", 0, 1, torch.device("cpu"), True)
        assert (info.master_addr, info.master_port) == (None, None)
        tensor = torch.ones(2)
        dist.all_reduce(tensor)
        assert tensor.tolist() == [1.0, 1.0]
    assert not dist.is_initialized()


def test_distinfo_positional_seed_fields() -> None:
    info = DistInfo("gloo", 1, 2, torch.device("cpu"), False)
    assert (info.local_rank, info.local_world_size, info.node_rank, info.launcher) == (0, 1, 0, "none")
    with pytest.raises(AttributeError):
        info.rank = 3  # type: ignore[misc]


def test_exception_propagates_unchanged_and_tears_down() -> None:
    error = ValueError("boom")
    with pytest.raises(ValueError) as caught, DistributedRuntime("gloo", env={}):
        raise error
    assert caught.value is error
    assert not dist.is_initialized()


def test_nccl_without_cuda_reports_gloo() -> None:
    with DistributedRuntime("nccl", env={}) as info:
        assert info.backend == "gloo"
        assert dist.get_backend() == "gloo"


def test_decorator_and_current() -> None:
    @DistributedRuntime("gloo", env={})
    def main(x: int) -> tuple[int, int]:
        return x, distruntime.current().world_size

    assert main(7) == (7, 1)
    assert not dist.is_initialized()
    with pytest.raises(DistRuntimeError, match="no DistributedRuntime is active"):
        distruntime.current()


def test_decorator_writes_torchelastic_error_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    error_file = str(tmp_path / "error.json")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", error_file)

    @DistributedRuntime("gloo", env={})
    def main() -> None:
        raise KeyError("the real cause")

    with pytest.raises(KeyError):
        main()
    with open(error_file) as handle:
        assert "the real cause" in handle.read()


def test_nested_runtimes_share_and_only_the_outer_destroys() -> None:
    outer = DistributedRuntime("gloo", env={})
    with outer as info:
        with DistributedRuntime("auto", env={}) as inner_info:
            assert inner_info is info
        assert dist.is_initialized()
        assert "state='active'" in repr(outer)
    assert not dist.is_initialized()
    assert "state='idle'" in repr(outer)


def test_nested_runtime_contradicting_the_live_group_raises() -> None:
    other = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    with DistributedRuntime("gloo", env={}):
        with pytest.raises(GroupMismatchError, match=r"rank=0, but RANK=1"):
            DistributedRuntime("gloo", env=other).__enter__()
        assert dist.is_initialized()


def test_adopted_foreign_group_survives() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with DistributedRuntime("gloo", env={}) as info:
            assert info.launcher == "external"
            assert info.world_size == 1
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_two_consecutive_runtimes_and_reentry() -> None:
    runtime = DistributedRuntime("gloo", env={})
    for _ in range(2):
        with runtime as info:
            assert info.world_size == 1
        with DistributedRuntime("gloo", env={}):
            assert dist.is_initialized()
        assert not dist.is_initialized()


def test_hand_set_environment_is_exported_and_restored() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "1"}
    assert "LOCAL_RANK" not in os.environ
    with DistributedRuntime("gloo", env=env) as info:
        assert info.launcher == "env"
        assert os.environ["LOCAL_RANK"] == "0"
        assert os.environ["RANK"] == "0"
    assert "LOCAL_RANK" not in os.environ
    assert "RANK" not in os.environ


def test_sigterm_becomes_signal_exit_and_handlers_are_restored() -> None:
    def mine(signum: int, frame: object) -> None:  # a user handler that must come back
        raise AssertionError("not expected to run")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(SignalExit) as caught, DistributedRuntime("gloo", env={}):
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(5)  # the handler interrupts this wait
        assert caught.value.code == 128 + signal.SIGTERM
        assert not dist.is_initialized()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_runtime_in_a_worker_thread_leaves_signals_alone() -> None:
    results: list[object] = []
    before = signal.getsignal(signal.SIGTERM)

    def work() -> None:
        try:
            with DistributedRuntime("gloo", env={}) as info:
                results.append(signal.getsignal(signal.SIGTERM) == before)
                results.append(info.world_size)
        except BaseException as exc:
            results.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert results == [True, 1]


def test_two_threads_share_one_session() -> None:
    inside = threading.Barrier(2, timeout=30)
    seen: list[DistInfo] = []

    def work() -> None:
        with DistributedRuntime("gloo", env={}) as info:
            seen.append(info)
            inside.wait()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(seen) == 2 and seen[0] is seen[1]
    assert not dist.is_initialized()


def test_collective_timeout_is_separate_from_startup() -> None:
    with DistributedRuntime("gloo", timeout_minutes=0.5, collective_timeout_minutes=90, env={}):
        gloo = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert gloo.options._timeout == datetime.timedelta(minutes=90)


def test_invalid_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_minutes must be positive"):
        DistributedRuntime("gloo", timeout_minutes=0)


def test_bad_environment_raises_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(distruntime.LaunchEnvError, match="WORLD_SIZE"):
        DistributedRuntime("gloo").__enter__()
    assert not distruntime.is_active()


def test_info_log_line_on_rank_0(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="distruntime"), DistributedRuntime("gloo", env={}):
        pass
    assert "all 1 ranks joined" in caplog.text


# ---------------------------------------------------------------- the seed API shims
def test_seed_api_importable_from_both_places() -> None:
    for name in ("DistInfo", "get_rank_safe", "get_world_size_safe", "get_local_rank_preinit",
                 "initialize_distributed", "destroy_global_state"):
        assert getattr(init_utils, name) is getattr(distruntime, name)


def test_safe_getters_before_and_after_init(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (distruntime.get_rank_safe(), distruntime.get_world_size_safe()) == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert (distruntime.get_rank_safe(), distruntime.get_world_size_safe()) == (2, 4)
    assert distruntime.get_local_rank_preinit() == 1
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert (distruntime.get_rank_safe(), distruntime.get_world_size_safe()) == (0, 1)
    finally:
        dist.destroy_process_group()


def test_safe_getters_reject_partial_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(distruntime.LaunchEnvError, match="WORLD_SIZE"):
        distruntime.get_rank_safe()


def test_initialize_and_destroy_global_state() -> None:
    sigint = signal.getsignal(signal.SIGINT)
    info = distruntime.initialize_distributed("gloo", timeout_minutes=1)
    assert isinstance(info.device, torch.device)
    assert distruntime.initialize_distributed("gloo") is info  # idempotent
    distruntime.destroy_global_state()
    distruntime.destroy_global_state()  # twice is fine
    assert not dist.is_initialized()
    assert signal.getsignal(signal.SIGINT) is sigint


def test_destroy_global_state_with_nothing_initialised() -> None:
    distruntime.destroy_global_state()


def test_destroy_global_state_from_a_worker_thread() -> None:
    sigterm = signal.getsignal(signal.SIGTERM)
    distruntime.initialize_distributed("gloo")
    errors: list[BaseException] = []

    def destroy() -> None:
        try:
            distruntime.destroy_global_state()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=destroy)
    thread.start()
    thread.join(60)
    assert errors == []
    assert not dist.is_initialized()
    # Off the main thread the handler cannot be swapped back; it is left inert and
    # hands signals to the previous handler. Put it back here, on the main thread.
    current = signal.getsignal(signal.SIGTERM)
    scope = getattr(current, "__self__", None)
    assert isinstance(scope, SignalScope) and not scope.active, current
    signal.signal(signal.SIGTERM, sigterm)


def test_teardown_that_would_block_is_abandoned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_destroy = dist.destroy_process_group
    release = threading.Event()

    def blocking_destroy(group: object = None) -> None:
        release.wait(60)  # stands in for a destroy stuck on a peer

    monkeypatch.setattr(dist, "destroy_process_group", blocking_destroy)
    # A lone rank's destroy runs inline (no peer can block it): pretend there are peers.
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    runtime = DistributedRuntime("gloo", env={}, teardown_timeout_s=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="distruntime"), runtime:
        pass
    assert time.monotonic() - started < 5
    assert "destroy_process_group did not finish within 0.5s; abandoned" in caplog.text
    release.set()
    monkeypatch.undo()
    real_destroy()
