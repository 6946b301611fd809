"""``distruntime.init_utils`` as a drop-in for NeMo Automodel's ``init_utils``.

Written from the reference's documented behaviour (its docstrings and how its recipes,
components and tests call it), function by function, against real single-process gloo
groups of three origins: none, a raw ``dist.init_process_group``, and
``initialize_distributed``. Deliberate differences are asserted as such and listed in
``docs/migrating-from-nemo.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest
import torch
import torch.distributed as dist

import distruntime
from distruntime import DistInfo, DistributedRuntime, DistRuntimeError, LaunchEnvError, init_utils
from distruntime.hooks import PROCESS_HOOKS
from procs import clean_env

SEED = ("DistInfo", "get_rank_safe", "get_world_size_safe", "get_local_rank_preinit",
        "get_local_world_size_preinit", "initialize_distributed", "destroy_global_state")
TORCHRUN_4 = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SLURM_STEP = {
    "SLURM_JOB_ID": "3", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NNODES": "2",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_GTIDS": "2,3", "SLURM_TASKS_PER_NODE": "2(x2)",
}


@pytest.fixture(autouse=True)
def _no_process_hooks_left() -> Iterator[None]:
    assert len(PROCESS_HOOKS) == 0, "a process teardown hook leaked in from an earlier test"
    yield
    assert len(PROCESS_HOOKS) == 0, "this test left a process teardown hook registered"


@pytest.fixture
def hooks() -> Iterator[Callable[[Callable[[], object]], Callable[[], object]]]:
    """Register process hooks for one test; unregistered afterwards whatever happens."""
    registered: list[Callable[[], object]] = []

    def register(fn: Callable[[], object]) -> Callable[[], object]:
        distruntime.on_teardown(fn, scope="process")
        registered.append(fn)
        return fn

    yield register
    for fn in registered:
        distruntime.remove_teardown(fn)


def _raw_group(tmp_path: Path) -> None:
    """A default group made the way a user would without any library: FileStore, gloo."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)


# ---------------------------------------------------------------------- module surface
def test_seed_names_exist_in_init_utils_and_top_level() -> None:
    for name in SEED:
        assert name in init_utils.__all__ and name in distruntime.__all__
        assert getattr(init_utils, name) is getattr(distruntime, name)
    for name in ("on_teardown", "remove_teardown"):
        assert name in distruntime.__all__ and callable(getattr(distruntime, name))


def test_module_attributes_the_seed_tests_patch() -> None:
    # The reference's tests patch init_utils.signal.signal and init_utils.torch.distributed.*.
    assert init_utils.signal is signal
    assert init_utils.torch.distributed is dist


# ---------------------------------------------------------------------- get_rank_safe / get_world_size_safe
def test_rank_and_world_size_without_group_or_environment() -> None:
    assert (init_utils.get_rank_safe(), init_utils.get_world_size_safe()) == (0, 1)


def test_rank_and_world_size_from_the_environment_before_init(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TORCHRUN_4.items():
        monkeypatch.setenv(name, value)
    assert (init_utils.get_rank_safe(), init_utils.get_world_size_safe()) == (2, 4)


def test_rank_and_world_size_from_a_raw_group_win_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in TORCHRUN_4.items():
        monkeypatch.setenv(name, value)
    _raw_group(tmp_path)
    try:
        assert (init_utils.get_rank_safe(), init_utils.get_world_size_safe()) == (0, 1)
    finally:
        dist.destroy_process_group()


def test_rank_and_world_size_from_initialize_distributed() -> None:
    init_utils.initialize_distributed("gloo")
    try:
        assert (init_utils.get_rank_safe(), init_utils.get_world_size_safe()) == (0, 1)
    finally:
        init_utils.destroy_global_state()


def test_partial_environment_is_an_error_not_rank_0(monkeypatch: pytest.MonkeyPatch) -> None:
    # Deliberate difference: the reference reads RANK without WORLD_SIZE as a 1-rank job.
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(LaunchEnvError, match="WORLD_SIZE"):
        init_utils.get_world_size_safe()


# ---------------------------------------------------------------------- get_local_rank_preinit
def test_local_rank_default_torchrun_and_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    assert init_utils.get_local_rank_preinit() == 0
    with monkeypatch.context() as m:
        for name, value in TORCHRUN_4.items():
            m.setenv(name, value)
        assert init_utils.get_local_rank_preinit() == 1
    with monkeypatch.context() as m:
        for name, value in SLURM_STEP.items():
            m.setenv(name, value)
        assert init_utils.get_local_rank_preinit() == 0  # SLURM_LOCALID; no LOCAL_RANK set


# ---------------------------------------------------------------------- get_local_world_size_preinit
def test_local_world_size_defaults_to_1() -> None:
    assert init_utils.get_local_world_size_preinit() == 1
    assert distruntime.get_local_world_size_preinit() == 1


def test_local_world_size_from_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TORCHRUN_4.items():
        monkeypatch.setenv(name, value)
    assert init_utils.get_local_world_size_preinit() == 2


def test_local_world_size_is_launcher_aware(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SLURM_STEP.items():
        monkeypatch.setenv(name, value)
    assert init_utils.get_local_world_size_preinit() == 2  # two of SLURM_GTIDS on this node


def test_local_world_size_with_a_live_group_is_still_the_environment(tmp_path: Path) -> None:
    _raw_group(tmp_path)
    try:
        assert init_utils.get_local_world_size_preinit() == 1
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("bad", ["abc", "0", "-2", "2.5"])
def test_bad_local_world_size_names_variable_value_and_fix(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", bad)
    with pytest.raises(LaunchEnvError) as caught:
        init_utils.get_local_world_size_preinit()
    message = str(caught.value)
    assert f"LOCAL_WORLD_SIZE={bad!r}" in message and "Fix:" in message


def test_local_world_size_without_local_rank_is_a_partial_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(LaunchEnvError, match=r"LOCAL_WORLD_SIZE='4' is set but LOCAL_RANK is not.*Fix:"):
        init_utils.get_local_world_size_preinit()


# ---------------------------------------------------------------------- DistInfo
def test_distinfo_positional_five_fields_and_attribute_access() -> None:
    info = DistInfo("nccl", 3, 8, torch.device("cuda", 3), False)
    assert (info.backend, info.rank, info.world_size, info.device, info.is_main) == (
        "nccl", 3, 8, torch.device("cuda", 3), False)


def test_distinfo_device_none_is_cpu() -> None:
    info = DistInfo("gloo", 0, 1, None, True)  # type: ignore[arg-type]  # the seed's CPU value
    assert info.device == torch.device("cpu")
    assert (info.device or torch.device("cpu")) == torch.device("cpu")  # a recipe idiom
    assert DistInfo("nccl", 0, 1, 1, True).device == torch.device("cuda", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"DistInfo\.device"):
        DistInfo("gloo", 0, 1, 1.5, True)  # type: ignore[arg-type]


def test_distinfo_replace_and_asdict() -> None:
    info = DistInfo("gloo", 0, 2, torch.device("cpu"), True)
    other = dataclasses.replace(info, rank=1, is_main=False)
    assert (other.rank, other.is_main, other.world_size) == (1, False, 2)
    as_dict = dataclasses.asdict(info)
    assert {k: as_dict[k] for k in ("backend", "rank", "world_size", "device", "is_main")} == {
        "backend": "gloo", "rank": 0, "world_size": 2, "device": torch.device("cpu"), "is_main": True}
    assert [f.name for f in dataclasses.fields(DistInfo)][:5] == [
        "backend", "rank", "world_size", "device", "is_main"]


def test_distinfo_equality_and_hash_on_the_seed_fields() -> None:
    a = DistInfo("gloo", 0, 1, torch.device("cpu"), True)
    b = DistInfo("gloo", 0, 1, None, True, launcher="torchrun", local_world_size=1)  # type: ignore[arg-type]
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != DistInfo("gloo", 1, 2, torch.device("cpu"), False)


def test_distinfo_is_frozen() -> None:
    # Deliberate difference: the reference's record is mutable.
    info = DistInfo("gloo", 0, 1, torch.device("cpu"), True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.rank = 1  # type: ignore[misc]


# ---------------------------------------------------------------------- initialize_distributed
def test_initialize_without_a_group_creates_one() -> None:
    info = init_utils.initialize_distributed(backend="gloo", timeout_minutes=1)
    try:
        assert info == DistInfo("gloo", 0, 1, torch.device("cpu"), True)
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        assert init_utils.initialize_distributed("gloo") is info  # idempotent
    finally:
        init_utils.destroy_global_state()
    assert not dist.is_initialized()


def test_initialize_over_a_raw_group_reuses_it(tmp_path: Path) -> None:
    _raw_group(tmp_path)
    world = dist.group.WORLD
    info = init_utils.initialize_distributed("gloo")
    try:
        assert (info.rank, info.world_size, info.is_main, info.backend) == (0, 1, True, "gloo")
        assert dist.group.WORLD is world  # not re-created
    finally:
        init_utils.destroy_global_state()  # destroys it, as the reference does
    assert not dist.is_initialized()


# ---------------------------------------------------------------------- destroy_global_state
def test_destroy_with_no_group_runs_the_hooks(hooks: Callable[..., object]) -> None:
    seen: list[bool] = []
    hooks(lambda: seen.append(dist.is_initialized()))
    init_utils.destroy_global_state()
    init_utils.destroy_global_state()
    assert seen == [False, False]  # every call, with no group


def test_destroy_destroys_a_raw_group_after_the_hooks(tmp_path: Path, hooks: Callable[..., object]) -> None:
    seen: list[bool] = []
    hooks(lambda: seen.append(dist.is_initialized()))
    _raw_group(tmp_path)
    init_utils.destroy_global_state()
    assert seen == [True] and not dist.is_initialized()


def test_destroy_destroys_the_group_of_initialize_after_the_hooks(hooks: Callable[..., object]) -> None:
    seen: list[bool] = []
    hooks(lambda: seen.append(dist.is_initialized()))
    init_utils.initialize_distributed("gloo")
    init_utils.destroy_global_state()
    assert seen == [True] and not dist.is_initialized() and not distruntime.is_active()
    init_utils.destroy_global_state()  # twice is fine: hooks run again, nothing else
    assert seen == [True, False]


def test_hooks_run_last_registered_first(hooks: Callable[..., object]) -> None:
    order: list[str] = []
    hooks(lambda: order.append("first"))
    hooks(lambda: order.append("last"))
    init_utils.destroy_global_state()
    assert order == ["last", "first"]


def test_a_failing_hook_is_logged_and_the_group_still_goes(
    tmp_path: Path, hooks: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    def free_buffer() -> None:
        raise RuntimeError("deep_ep unavailable")

    hooks(free_buffer)
    _raw_group(tmp_path)
    with caplog.at_level(logging.WARNING, logger="distruntime"):
        init_utils.destroy_global_state()
    assert not dist.is_initialized()
    assert "free_buffer failed: RuntimeError: deep_ep unavailable" in caplog.text


def test_sigint_is_ignored_during_destroy_and_restored_exactly(hooks: Callable[..., object]) -> None:
    def mine(signum: int, frame: FrameType | None) -> None: ...

    during: list[object] = []
    hooks(lambda: during.append(signal.getsignal(signal.SIGINT)))
    previous = signal.signal(signal.SIGINT, mine)
    try:
        init_utils.initialize_distributed("gloo")
        init_utils.destroy_global_state()
        assert during == [signal.SIG_IGN]
        assert signal.getsignal(signal.SIGINT) is mine  # not SIG_DFL, as the reference leaves it
    finally:
        signal.signal(signal.SIGINT, previous)


def test_destroy_off_the_main_thread_leaves_sigint_alone(hooks: Callable[..., object]) -> None:
    during: list[object] = []
    hooks(lambda: during.append(signal.getsignal(signal.SIGINT)))
    before, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    init_utils.initialize_distributed("gloo")
    errors: list[BaseException] = []

    def destroy() -> None:
        try:
            init_utils.destroy_global_state()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=destroy)
    thread.start()
    thread.join(60)
    assert errors == [] and not dist.is_initialized()
    assert during == [before] and signal.getsignal(signal.SIGINT) is before
    # The runtime's SIGTERM handler cannot be put back off the main thread; it is left
    # inert (tests/test_runtime.py). Put it back here, on the main thread.
    signal.signal(signal.SIGTERM, sigterm)


def test_destroy_inside_a_with_block_closes_it(hooks: Callable[..., object]) -> None:
    seen: list[bool] = []
    hooks(lambda: seen.append(dist.is_initialized()))
    with DistributedRuntime("gloo", env={}):
        init_utils.destroy_global_state()
        assert not dist.is_initialized() and not distruntime.is_active()
    assert seen == [True]  # the block's exit tore nothing down a second time


# ---------------------------------------------------------------------- ownership (unchanged)
def test_a_with_block_leaves_a_raw_group_alone_but_destroy_does_not(
    tmp_path: Path, hooks: Callable[..., object]
) -> None:
    seen: list[bool] = []
    hooks(lambda: seen.append(dist.is_initialized()))
    _raw_group(tmp_path)
    with DistributedRuntime("gloo", env={}) as info:
        assert info.launcher == "external"
    assert dist.is_initialized() and seen == []  # adopted: not the runtime's to destroy
    init_utils.destroy_global_state()
    assert not dist.is_initialized() and seen == [True]


# ---------------------------------------------------------------------- on_teardown / remove_teardown
def test_process_hook_runs_at_every_runtime_teardown(hooks: Callable[..., object]) -> None:
    ran: list[str] = []
    hooks(lambda: ran.append("hook"))

    with DistributedRuntime("gloo", env={}):
        pass

    @DistributedRuntime("gloo", env={})
    def main() -> None:
        pass

    main()
    with pytest.raises(ValueError, match="boom"), DistributedRuntime("gloo", env={}):
        raise ValueError("boom")  # the failure path
    assert ran == ["hook", "hook", "hook"] and not dist.is_initialized()


def test_process_hook_registered_before_any_runtime_with_the_default_scope() -> None:
    ran: list[str] = []

    def release() -> None:
        ran.append("released")

    distruntime.on_teardown(release)  # no runtime active: process scope
    try:
        for _ in range(2):
            with DistributedRuntime("gloo", env={}):
                pass
        assert ran == ["released", "released"]
    finally:
        assert distruntime.remove_teardown(release)
    with DistributedRuntime("gloo", env={}):
        pass
    assert ran == ["released", "released"]
    assert not distruntime.remove_teardown(release)


def test_registering_a_process_hook_twice_runs_it_once(hooks: Callable[..., object]) -> None:
    ran: list[int] = []

    def once() -> None:
        ran.append(1)

    hooks(once)
    hooks(once)
    init_utils.destroy_global_state()
    assert ran == [1]


def test_default_scope_inside_a_runtime_is_the_session() -> None:
    ran: list[str] = []
    with DistributedRuntime("gloo", env={}):
        distruntime.on_teardown(lambda: ran.append("session"))
        assert len(PROCESS_HOOKS) == 0
    with DistributedRuntime("gloo", env={}):
        pass
    assert ran == ["session"]


def test_remove_teardown_also_unregisters_a_session_hook() -> None:
    ran: list[str] = []

    def hook() -> None:
        ran.append("ran")

    with DistributedRuntime("gloo", env={}):
        distruntime.on_teardown(hook, scope="session")
        assert distruntime.remove_teardown(hook)
    assert ran == []


def test_scope_errors() -> None:
    with pytest.raises(DistRuntimeError, match=r"scope='session'.*Fix:"):
        distruntime.on_teardown(lambda: None, scope="session")
    with pytest.raises(ValueError, match="scope must be"):
        distruntime.on_teardown(lambda: None, scope="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        distruntime.on_teardown(lambda: None, 0.0, scope="process")
    with pytest.raises(TypeError, match="callable"):
        distruntime.on_teardown("free_buffer", scope="process")  # type: ignore[arg-type]


_AT_EXIT = """
import distruntime, torch.distributed as dist
distruntime.on_teardown(lambda: print("hook at exit, group live:", dist.is_initialized()), scope="process")
distruntime.initialize_distributed("gloo")
print("leaving without destroy_global_state")
"""


def test_process_hook_runs_on_the_at_exit_path() -> None:
    done = subprocess.run([sys.executable, "-c", _AT_EXIT], env=clean_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["leaving without destroy_global_state",
                                        "hook at exit, group live: True"]


def test_cuda_is_synchronised_before_the_hooks_which_run_on_the_ranks_device(
    monkeypatch: pytest.MonkeyPatch, hooks: Callable[..., object]
) -> None:
    # No GPU here: torch.cuda is stubbed to look initialised on device 3.
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    hooks(lambda: calls.append(("free_buffer", None)))
    init_utils.destroy_global_state()
    assert calls == [("synchronize", 3), ("set_device", 3), ("free_buffer", None)]

    calls.clear()  # the failure path: no synchronize (a stuck kernel would hold it up)
    with pytest.raises(ValueError, match="boom"), DistributedRuntime("gloo", env={}):
        raise ValueError("boom")
    assert calls == [("set_device", 3), ("free_buffer", None)]


def test_initialize_again_after_a_raw_destroy_creates_a_new_group() -> None:
    # Callers of the seed may end with dist.destroy_process_group() instead of
    # destroy_global_state(), and initialise again later in the same process.
    first = init_utils.initialize_distributed("gloo")
    dist.destroy_process_group()
    assert (init_utils.get_rank_safe(), init_utils.get_world_size_safe()) == (0, 1)
    second = init_utils.initialize_distributed("gloo")
    try:
        assert dist.is_initialized() and second == first and second is not first
    finally:
        init_utils.destroy_global_state()
    assert not dist.is_initialized() and not distruntime.is_active()
