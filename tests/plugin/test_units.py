"""The plugin's pieces without rank processes: marker parsing, report merging, helpers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field

import pytest
import torch.distributed as dist
from inner_pytest import InnerRunner

from distruntime.testing import assert_all_ranks
from distruntime.testing._merge import MergeInfo, RankResult, merge, trim_stacks
from distruntime.testing._spec import DistSpec, parse_marker

# ---------------------------------------------------------------------- marker


def test_marker_defaults_and_list_form() -> None:
    sizes, is_list, spec = parse_marker(pytest.mark.distributed.mark, "t")
    assert (sizes, is_list, spec) == ([2], False, DistSpec(2))
    sizes, is_list, spec = parse_marker(
        pytest.mark.distributed(
            world_size=[2, 4], backend="gloo", timeout=5, init=False, isolation="fresh"
        ).mark,
        "t",
    )
    assert (sizes, is_list) == ([2, 4], True)
    assert spec == DistSpec(2, backend="gloo", timeout=5.0, init=False, isolation="fresh")
    assert parse_marker(pytest.mark.distributed(3).mark, "t")[0] == [3]


@pytest.mark.parametrize(
    ("mark", "message"),
    [
        (pytest.mark.distributed(world_size=0), "world_size must be a positive int"),
        (pytest.mark.distributed(world_size=[]), "names no size"),
        (pytest.mark.distributed(world_size=[2, 2]), "repeats a size"),
        (pytest.mark.distributed(world_size=True), "world_size must be a positive int"),
        (pytest.mark.distributed(2, world_size=2), "given twice"),
        (pytest.mark.distributed(worldsize=2), "unknown argument(s) ['worldsize']"),
        (pytest.mark.distributed(timeout=0), "timeout must be a positive number"),
        (pytest.mark.distributed(init="yes"), "init must be True or False"),
        (pytest.mark.distributed(isolation="forked"), "isolation must be one of"),
        (pytest.mark.distributed(backend=""), "backend must be a string"),
    ],
)
def test_marker_errors_name_the_test_and_the_fix(mark: pytest.MarkDecorator, message: str) -> None:
    with pytest.raises(pytest.fail.Exception) as info:
        parse_marker(mark.mark, "test_x.py::test_y")
    assert message in str(info.value)
    assert "@pytest.mark.distributed on test_x.py::test_y" in str(info.value)


@pytest.mark.processes
def test_collection_ids_and_marker_errors(inner: InnerRunner) -> None:
    inner.write(
        test_c="""
        import pytest

        @pytest.mark.distributed(world_size=[2, 4])
        @pytest.mark.parametrize("x", [1, 2])
        def test_grid(x):
            pass

        @pytest.mark.distributed(world_size=2)
        def test_plain():
            pass
    """,
        test_bad="""
        import pytest

        @pytest.mark.distributed(world_size=-1)
        def test_bad():
            pass
    """,
    )
    result = inner.run("--collect-only", "-q", timeout=60)
    for nodeid in (
        "test_c.py::test_grid[ws2-1]",
        "test_c.py::test_grid[ws2-2]",
        "test_c.py::test_grid[ws4-1]",
        "test_c.py::test_grid[ws4-2]",
        "test_c.py::test_plain",
    ):
        assert nodeid in result.output.splitlines(), result.output
    assert (
        "@pytest.mark.distributed on test_bad.py::test_bad: world_size must be a positive int"
        in result.output
    )
    assert "5 tests collected, 1 error" in result.output


@pytest.mark.processes
def test_importing_the_plugin_does_not_import_torch() -> None:
    """The plugin module and the testing package import torch lazily.

    The parent package is stubbed so that only ``distruntime.testing`` is measured
    (``distruntime/__init__.py`` itself imports the runtime, hence torch).
    """
    code = textwrap.dedent("""
        import importlib.util, sys, types
        spec = importlib.util.find_spec("distruntime")
        stub = types.ModuleType("distruntime")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["distruntime"] = stub
        import distruntime.testing.plugin
        import distruntime.testing
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("LOADED", loaded)
        assert not loaded, loaded
    """)
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LOADED []" in done.stdout


# ---------------------------------------------------------------------- merging


@dataclass
class FakeItem:
    nodeid: str = "test_m.py::test_x"
    location: tuple[str, int, str] = ("test_m.py", 9, "test_x")
    keywords: dict[str, int] = field(default_factory=lambda: {"test_x": 1})


def _rep(when: str, outcome: str = "passed", longrepr: object = None, **extra: object) -> pytest.TestReport:
    return pytest.TestReport(
        "test_m.py::test_x",
        ("test_m.py", 9, "test_x"),
        {"test_x": 1},
        outcome,  # type: ignore[arg-type]
        longrepr,
        when,
        sections=[(f"Captured stdout {when}", f"out {when}")],
        duration=0.5,
        **extra,  # type: ignore[arg-type]
    )


def _rank(
    rank: int, *reports: pytest.TestReport, times: list[float] | None = None, **kw: object
) -> RankResult:
    result = RankResult(
        rank, reports=list(reports), report_times=times or [float(i) for i in range(len(reports))]
    )
    result.done = True
    for name, value in kw.items():
        setattr(result, name, value)
    return result


def _passed(rank: int) -> RankResult:
    return _rank(rank, _rep("setup"), _rep("call"), _rep("teardown"))


INFO = MergeInfo(
    world_size=2,
    backend="gloo",
    timeout_s=10.0,
    timeout_origin="--drt-timeout=10",
    elapsed_s=1.0,
    grace_s=5.0,
)


def _text(report: pytest.TestReport) -> str:
    return report.longreprtext


def test_merge_all_passed_tags_output_with_ranks() -> None:
    reports = merge(FakeItem(), [_passed(0), _passed(1)], INFO)  # type: ignore[arg-type]
    assert [(r.when, r.outcome) for r in reports] == [
        ("setup", "passed"),
        ("call", "passed"),
        ("teardown", "passed"),
    ]
    assert ("Captured stdout call (rank 1)", "out call") in reports[1].sections
    assert reports[1].duration == 0.5


def test_merge_skips_on_every_rank_keep_the_reason() -> None:
    ranks = [
        _rank(
            r,
            _rep("setup"),
            _rep("call", "skipped", ("test_m.py", 12, f"Skipped: reason {r}")),
            _rep("teardown"),
        )
        for r in (0, 1)
    ]
    reports = merge(FakeItem(), ranks, INFO)  # type: ignore[arg-type]
    assert [(r.when, r.outcome) for r in reports] == [
        ("setup", "passed"),
        ("call", "skipped"),
        ("teardown", "passed"),
    ]
    path, line, reason = reports[1].longrepr  # type: ignore[misc]
    assert (path, line) == ("test_m.py", 12)
    assert (
        reason == "Skipped: reason 0 (reasons differ: rank 0: Skipped: reason 0; rank 1: Skipped: reason 1)"
    )


def test_merge_xfail_and_xpass() -> None:
    xfailed = [
        _rank(r, _rep("setup"), _rep("call", "skipped", ("f", 1, "x"), wasxfail="bug"), _rep("teardown"))
        for r in (0, 1)
    ]
    call = merge(FakeItem(), xfailed, INFO)[1]  # type: ignore[arg-type]
    assert (call.outcome, call.wasxfail) == ("skipped", "bug")
    xpassed = [_rank(r, _rep("setup"), _rep("call", wasxfail="bug"), _rep("teardown")) for r in (0, 1)]
    call = merge(FakeItem(), xpassed, INFO)[1]  # type: ignore[arg-type]
    assert (call.outcome, call.wasxfail) == ("passed", "bug")
    mixed = [xfailed[0], xpassed[1]]
    call = merge(FakeItem(), mixed, INFO)[1]  # type: ignore[arg-type]
    assert call.outcome == "failed"
    assert "non-collective skip: rank(s) 0 skipped while rank(s) 1 did not" in _text(call)


def test_merge_root_cause_first_and_collateral_in_one_line() -> None:
    root = _rank(
        1,
        _rep("setup"),
        _rep("call", "failed", "long traceback of rank 1\nE   AssertionError: x"),
        _rep("teardown"),
        times=[0.0, 1.0, 1.1],
    )
    fallout = _rank(
        0,
        _rep("setup"),
        _rep("call", "failed", "trace\nRuntimeError: Connection closed by peer"),
        _rep("teardown"),
        times=[0.0, 2.0, 2.1],
    )
    reports = merge(FakeItem(), [fallout, root], INFO)  # type: ignore[arg-type]
    assert [(r.when, r.outcome) for r in reports] == [
        ("setup", "passed"),
        ("call", "failed"),
        ("teardown", "passed"),
    ]
    text = _text(reports[1])
    assert text.splitlines()[0] == "[rank 1] E   AssertionError: x"
    assert "rank 1 failed first (in call); rank(s) 0 failed because of it" in text
    assert text.index("rank 1: call (first failure)") < text.index(
        "rank 0: call failed because rank 1 failed"
    )
    assert "long traceback of rank 1" in text
    assert "\ntrace\n" not in text  # the collateral rank gets one line
    full = merge(FakeItem(), [fallout, root], MergeInfo(**{**INFO.__dict__, "full_report": True}))  # type: ignore[arg-type]
    assert "\ntrace\n" in _text(full[1])
    # Each rank's captured output is part of the failure text (JUnit <failure> carries it),
    # not repeated as report sections; --show-capture still filters it.
    assert reports[1].sections == []
    assert "- Captured stdout teardown (rank 0) -" in text and "\nout teardown" in text
    assert str(reports[1].longrepr) == text.strip()
    hidden = merge(FakeItem(), [fallout, root], MergeInfo(**{**INFO.__dict__, "show_capture": "no"}))  # type: ignore[arg-type]
    assert "Captured stdout" not in _text(hidden[1])


def test_merge_independent_failures_are_shown_in_full() -> None:
    first = _rank(
        0, _rep("setup"), _rep("call", "failed", "tb0\nValueError: a"), _rep("teardown"), times=[0, 1, 2]
    )
    second = _rank(
        1, _rep("setup"), _rep("call", "failed", "tb1\nKeyError: b"), _rep("teardown"), times=[0, 3, 4]
    )
    text = _text(merge(FakeItem(), [first, second], INFO)[1])  # type: ignore[arg-type]
    assert "rank 0 failed first (in call); rank(s) 1 also failed" in text
    assert "tb0" in text and "tb1" in text


def test_merge_death_and_ranks_stopped_after_the_grace_period() -> None:
    dead = RankResult(
        0,
        reports=[_rep("setup")],
        report_times=[0.0],
        exit_code=-9,
        died_at=1.0,
        log_tail="noise\nFatal Python error: Aborted\n\nCurrent thread 0x1 (most recent call first):\n"
        '  File "/t/test_m.py", line 3 in test_x\n'
        '  File "/v/_pytest/python.py", line 187 in pytest_pyfunc_call\n',
    )
    stuck = RankResult(
        1,
        reports=[_rep("setup")],
        report_times=[0.0],
        stuck=True,
        stack='Current thread 0x2 (most recent call first):\n  File "/t/test_m.py", line 4 in test_x\n',
    )
    reports = merge(FakeItem(), [dead, stuck], INFO)  # type: ignore[arg-type]
    failure = reports[1]
    assert (failure.when, failure.outcome) == ("call", "failed")
    text = _text(failure)
    assert text.splitlines()[0] == "[rank 0] its process was killed by SIGKILL during call"
    assert "rank(s) 1 still running 5s later were stopped" in text
    assert "rank 1: still running in call 5s after rank 0 failed; its Python stacks" in text
    assert 'File "/t/test_m.py", line 4 in test_x' in text
    assert "Fatal Python error: Aborted" in text and "noise" not in text
    assert "1 frame(s) of pytest and the rank worker" in text


def test_merge_timeout_in_setup_is_an_error_of_setup() -> None:
    stuck = [RankResult(r, stuck=True, stack="") for r in (0, 1)]
    info = MergeInfo(**{**INFO.__dict__, "timed_out": True})
    reports = merge(FakeItem(), stuck, info)  # type: ignore[arg-type]
    assert [(r.when, r.outcome) for r in reports] == [("setup", "failed"), ("teardown", "passed")]
    text = _text(reports[0])
    assert text.splitlines()[0] == "timed out after 10s; rank(s) 0, 1 still running"
    assert "timed out after 10s (--drt-timeout=10): rank(s) 0, 1 still running" in text
    assert "(no stack dump received)" in text


def test_trim_stacks_drops_harness_frames_and_the_watchdog() -> None:
    dump = textwrap.dedent("""\
        Thread 0x01 (most recent call first):
          File "/src/distruntime/testing/_worker.py", line 54 in watch
          File "/usr/lib/python3.11/threading.py", line 982 in run

        Current thread 0x02 (most recent call first):
          File "/t/test_a.py", line 7 in test_a
          File "/v/_pytest/python.py", line 187 in pytest_pyfunc_call
          File "/v/pluggy/_callers.py", line 103 in _multicall
    """)
    assert trim_stacks(dump) == (
        "Current thread 0x02 (most recent call first):\n"
        '  File "/t/test_a.py", line 7 in test_a\n'
        "  ... 2 frame(s) of pytest and the rank worker"
    )


# ---------------------------------------------------------------------- helpers and fixtures


def test_assert_all_ranks_in_a_single_process() -> None:
    assert_all_ranks(True)
    with pytest.raises(AssertionError, match=r"assert_all_ranks: false on rank\(s\) 0 of 1: rank 0: why"):
        assert_all_ranks(0, "why")


def test_single_rank_dist_info(dist_info: object) -> None:
    from distruntime import DistInfo

    assert isinstance(dist_info, DistInfo)
    assert (dist_info.rank, dist_info.world_size, dist_info.backend) == (0, 1, "gloo")
    assert dist_info.master_port is None and dist_info.launcher == "none"
    assert dist.is_initialized() and dist.get_world_size() == 1
    # A one-rank group: the collective assert takes the process-group path.
    assert_all_ranks(True)
    with pytest.raises(AssertionError, match="false on rank"):
        assert_all_ranks(False)
