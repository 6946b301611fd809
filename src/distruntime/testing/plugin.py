"""pytest plugin: single-rank and N-rank distributed tests that are fast, clear and never hang.

Registered through the ``pytest11`` entry point. Importing it imports neither torch nor
the rank machinery; they load when a test first asks for a distributed fixture or carries
the ``distributed`` marker.

Fixtures:

* ``dist_info``: the rank's :class:`~distruntime.DistInfo`. Outside an N-rank test, a
  real single-rank runtime (gloo, world size 1, no port), torn down after the test.
* ``dist_tmp_path``: a directory shared by every rank of the test (``tmp_path`` outside).
* ``dist_store``: the test's namespaced store, shared by its ranks.
* ``dist_env``: the rank's launch variables (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT``...).

Marker ``@pytest.mark.distributed(world_size=2, *, backend="auto", timeout=None,
init=True, isolation="pooled")`` runs the test on N rank processes. Example::

    import pytest
    import torch
    import torch.distributed as dist
    from distruntime.testing import assert_all_ranks

    @pytest.mark.distributed(world_size=[2, 4])    # test_sum[ws2], test_sum[ws4]
    def test_sum(dist_info):
        t = torch.tensor([float(dist_info.rank)])
        dist.all_reduce(t)
        assert_all_ranks(t.item() == sum(range(dist_info.world_size)), f"got {t.item()}")

Options: ``--drt-timeout`` (ini ``drt_timeout``, default 60 s), ``--drt-grace``,
``--drt-fresh``, ``--drt-max-pools``, ``--drt-report``. See ``docs/testing.md``.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from distruntime.testing import _context
from distruntime.testing._spec import (
    MARKER_HELP,
    SPEC_KEY,
    expand_world_sizes,
    spec_for_item,
    take_over_pytest_timeout,
)

if TYPE_CHECKING:
    from distruntime.info import DistInfo
    from distruntime.testing._controller import Controller

# The exception of the setup or call phase, for the runtime's exit in dist_info's teardown.
_PHASE_EXC = pytest.StashKey[BaseException | None]()


class _State:
    """Per-session plugin state; the controller (and torch) are created on first use."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.controller: Controller | None = None
        # nodeid -> [(rank, seconds)] of every N-rank test, for the --durations summary.
        self.rank_durations: dict[str, list[tuple[int, float]]] = {}

    def __repr__(self) -> str:
        return f"_State(controller={self.controller!r}, timed={len(self.rank_durations)})"

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Remember each rank's time of an N-rank test (its teardown report carries them)."""
        if report.when == "teardown" and not _context.in_rank_process():
            times = _rank_durations(report.user_properties)
            if times:
                self.rank_durations[report.nodeid] = times

    def get_controller(self) -> Controller:
        if self.controller is None:
            from distruntime.testing._controller import Controller, Settings

            config = self.config
            cli_timeout = config.getoption("drt_timeout")
            if cli_timeout is not None:
                timeout, origin = float(cli_timeout), f"--drt-timeout={cli_timeout:g}"
            else:
                raw = config.getini("drt_timeout")
                timeout, origin = float(raw), f"drt_timeout={raw}"
            grace = config.getoption("drt_grace")
            max_pools = config.getoption("drt_max_pools")
            self.controller = Controller(config, Settings(
                timeout_s=timeout,
                timeout_origin=origin,
                grace_s=float(grace if grace is not None else config.getini("drt_grace")),
                max_pools=int(max_pools if max_pools is not None else config.getini("drt_max_pools")),
                fresh=bool(config.getoption("drt_fresh")),
                full_report=config.getoption("drt_report") == "all",
            ))
        return self.controller


_STATE_KEY = pytest.StashKey[_State]()


# ---------------------------------------------------------------------- hooks
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("distruntime", "distributed tests (distruntime)")
    group.addoption("--drt-timeout", type=float, default=None, dest="drt_timeout", metavar="SECONDS",
                    help="Deadline of every N-rank test (marker timeout= overrides it). Default: ini "
                         "drt_timeout, 60 s.")
    group.addoption("--drt-grace", type=float, default=None, dest="drt_grace", metavar="SECONDS",
                    help="How long the other ranks get to finish after one rank failed, before they are "
                         "stopped with their stacks shown. Default: ini drt_grace, 5 s.")
    group.addoption("--drt-fresh", action="store_true", default=False, dest="drt_fresh",
                    help="Start new rank processes for every N-rank test (no pooling).")
    group.addoption("--drt-max-pools", type=int, default=None, dest="drt_max_pools", metavar="N",
                    help="Most pools of rank processes kept warm at once (one per world size). Default: ini "
                         "drt_max_pools, 3.")
    group.addoption("--drt-report", choices=("concise", "all"), default="concise", dest="drt_report",
                    help="concise: full traceback of the first failing rank, one line for ranks that "
                         "failed because of it; all: full tracebacks of every rank.")
    parser.addini("drt_timeout", "Deadline in seconds of every N-rank test.", default="60")
    parser.addini("drt_grace", "Seconds the other ranks get after one rank failed.", default="5")
    parser.addini("drt_max_pools", "Most pools of rank processes kept warm at once.", default="3")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    state = _State(config)
    config.stash[_STATE_KEY] = state
    config.pluginmanager.register(state, "distruntime-state")


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE_KEY, None)
    if state is not None and state.controller is not None:
        state.controller.shutdown()
        state.controller = None


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    """Stop the rank pools as soon as the test loop ends (-x, --maxfail, the last test).

    The innermost wrapper: the ranks' coverage is merged here, before pytest-cov's own
    wrapper saves and combines.
    """
    try:
        return (yield)
    finally:
        state = session.config.stash.get(_STATE_KEY, None)
        if state is not None and state.controller is not None:
            state.controller.shutdown()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    expand_world_sizes(metafunc)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        spec = spec_for_item(item)
        if spec is not None:
            item.stash[SPEC_KEY] = spec
            take_over_pytest_timeout(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """Run a distributed item on its ranks instead of in this process."""
    if _context.in_rank_process():
        return None
    spec = item.stash.get(SPEC_KEY, None)
    if spec is None or item.get_closest_marker("skip") is not None:
        return None  # an unconditionally skipped test needs no ranks
    config = item.config
    if config.getoption("setupplan", False) or config.getoption("setuponly", False):
        return None
    controller = config.stash[_STATE_KEY].get_controller()
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in controller.run(item, nextitem, spec):
        ihook.pytest_runtest_logreport(report=report)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    reason = controller.take_exit()
    if reason is not None:
        pytest.exit(reason)
    return True


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """With ``--durations``: the slowest N-rank tests with each rank's time."""
    count = config.getoption("durations", None)
    state = config.stash.get(_STATE_KEY, None)
    if count is None or state is None or not state.rank_durations:
        return
    slowest = sorted(state.rank_durations.items(), key=lambda kv: -max(s for _, s in kv[1]))
    if count > 0:
        slowest = slowest[:count]
    terminalreporter.write_sep("=", "slowest distributed tests, time per rank")
    for nodeid, times in slowest:
        ranks = ", ".join(f"rank {rank} {seconds:.2f}s" for rank, seconds in times)
        terminalreporter.write_line(f"{max(s for _, s in times):.2f}s {nodeid}: {ranks}")


def _rank_durations(properties: list[tuple[str, object]]) -> list[tuple[int, float]]:
    from distruntime.testing._merge import DURATION_PROPERTY

    prefix, _, suffix = DURATION_PROPERTY.partition("{rank}")
    times = []
    for name, value in properties:
        if name.startswith(prefix) and name.endswith(suffix) and isinstance(value, (int, float)):
            rank = name[len(prefix):len(name) - len(suffix)]
            if rank.isdigit():
                times.append((int(rank), float(value)))
    return sorted(times)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    if call.when in ("setup", "call") and call.excinfo is not None and _context.current() is not None:
        item.stash[_PHASE_EXC] = call.excinfo.value


# ---------------------------------------------------------------------- fixtures
@pytest.fixture
def dist_info(request: pytest.FixtureRequest) -> Iterator[DistInfo]:
    """This rank's ``DistInfo``; a real single-rank runtime outside N-rank tests.

    Outside a ``distributed`` test: gloo, world size 1, no port, no variable exported;
    the process group is destroyed after the test. Inside one: the runtime each rank
    entered before the body (``init=True``); with ``init=False`` it is an error to ask
    for it, since the body builds the runtime itself.

    Example::

        def test_all_reduce(dist_info):
            t = torch.ones(1)
            torch.distributed.all_reduce(t)
            assert t.item() == dist_info.world_size
    """
    from distruntime.runtime import DistributedRuntime

    ctx = _context.current()
    if ctx is None:
        # An explicit empty environment: a single rank whatever the shell exported.
        with DistributedRuntime("gloo", env={}) as info:
            yield info
        return
    if not ctx.init:
        pytest.fail(
            "dist_info is not available in a @pytest.mark.distributed(init=False) test: the body "
            "creates the runtime itself. Use `with DistributedRuntime() as info:` (the rank's "
            "environment points it at the test's store), or the dist_env / dist_store fixtures.",
            pytrace=False,
        )
    yield from _rank_runtime(ctx, request)


def _rank_runtime(ctx: _context.RankContext, request: pytest.FixtureRequest) -> Iterator[DistInfo]:
    import time

    from distruntime.errors import PeerFailureError
    from distruntime.runtime import DistributedRuntime

    node = request.node
    node.stash[_PHASE_EXC] = None
    runtime = DistributedRuntime(
        ctx.backend,
        timeout_minutes=max(ctx.deadline - time.monotonic(), 1.0) / 60,
        env=ctx.launch_env,
        store=ctx.store,
    )
    info = runtime.__enter__()
    try:
        yield info
    finally:
        # Hand the runtime the test's exception, so it tells the peers this rank failed
        # (they then raise PeerFailureError naming it) and shuts the group down at once.
        exc = node.stash.get(_PHASE_EXC, None)
        try:
            runtime.__exit__(type(exc) if exc is not None else None, exc, exc.__traceback__ if exc else None)
        except PeerFailureError as err:
            ctx.peer_failures = dict(err.failed_ranks)


@pytest.fixture
def dist_tmp_path(request: pytest.FixtureRequest) -> Path:
    """A directory shared by every rank of the test (its own ``tmp_path`` outside one).

    Example::

        @pytest.mark.distributed(world_size=2)
        def test_checkpoint(dist_info, dist_tmp_path):
            if dist_info.rank == 0:
                torch.save(state, dist_tmp_path / "ckpt.pt")
            torch.distributed.barrier()
            loaded = torch.load(dist_tmp_path / "ckpt.pt")
    """
    ctx = _context.current()
    if ctx is not None:
        return ctx.shared_tmp
    path = request.getfixturevalue("tmp_path")
    assert isinstance(path, Path)
    return path


@pytest.fixture
def dist_store() -> Any:
    """The test's ``torch.distributed.Store``, shared by its ranks under a prefix of its own.

    Outside an N-rank test: a fresh in-process ``HashStore``.

    Example::

        @pytest.mark.distributed(world_size=2, init=False)
        def test_handshake(dist_store, dist_env):
            dist_store.set(f"hello/{dist_env['RANK']}", "1")
            dist_store.wait(["hello/0", "hello/1"])
    """
    ctx = _context.current()
    if ctx is not None:
        return ctx.store
    from torch._C._distributed_c10d import HashStore

    return HashStore()


@pytest.fixture
def dist_env() -> dict[str, str]:
    """The rank's launch variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_PORT``...).

    With ``init=False`` they are also set in ``os.environ`` for the test, torchrun style
    with the controller's store as the agent store, so ``DistributedRuntime()`` and
    ``init_process_group("gloo")`` find their peers. Empty outside an N-rank test.

    Example::

        @pytest.mark.distributed(world_size=2, init=False)
        def test_rank_var(dist_env):
            assert os.environ["RANK"] == dist_env["RANK"]
    """
    ctx = _context.current()
    return dict(ctx.launch_env) if ctx is not None else {}
