"""The plugin in a CI pipeline: coverage inside ranks, JUnit XML, pytest's own flags.

Each test runs real inner pytest sessions (subprocesses, the plugin loaded through its
entry point) and checks what a CI job would see: coverage reports, XML files, exit
codes, the files left in the project.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from inner_pytest import InnerRunner

pytestmark = pytest.mark.processes

# Line numbers matter: the reports below name them.
PKG = textwrap.dedent("""\
    def on_every_rank(x):
        y = x + 1
        return y


    def only_on_rank_one():
        return 42


    def only_in_a_fresh_rank():
        return "fresh"


    def never_called():
        return 0
""")

COV_TESTS = textwrap.dedent("""
    import pytest
    import pkg

    @pytest.mark.distributed(world_size=2)
    def test_ranks(dist_info):
        assert pkg.on_every_rank(1) == 2
        if dist_info.rank == 1:
            assert pkg.only_on_rank_one() == 42

    @pytest.mark.distributed(world_size=2, isolation="fresh")
    def test_fresh(dist_info):
        if dist_info.rank == 0:
            assert pkg.only_in_a_fresh_rank() == "fresh"
""")


def _write_pkg(inner: InnerRunner) -> None:
    (inner.path / "pkg").mkdir()
    (inner.path / "pkg" / "__init__.py").write_text(PKG)
    inner.write(test_cov=COV_TESTS)


def _missing(output: str) -> str:
    """The coverage report's row for pkg/__init__.py."""
    rows = [line for line in output.splitlines() if line.startswith("pkg/__init__.py")]
    assert len(rows) == 1, output
    return " ".join(rows[0].split())


def _leftovers(project: Path) -> list[str]:
    return sorted(p.name for p in project.iterdir() if p.name.startswith(".coverage."))


def test_pytest_cov_counts_lines_of_every_rank(inner: InnerRunner) -> None:
    _write_pkg(inner)
    result = inner.run(
        "test_cov.py", "--cov=pkg", "--cov-report=term-missing", "--cov-context=test", timeout=180,
    )
    assert "2 passed" in result.output.strip().splitlines()[-1], result.output
    # Statements 1, 2, 3, 6, 7, 10, 11, 14, 15; only never_called's body (15) is missed:
    # 7 ran on rank 1 of a pooled test, 11 on rank 0 of a fresh one.
    assert _missing(result.output) == "pkg/__init__.py 9 1 89% 15", result.output
    assert _leftovers(inner.path) == []
    # Per-rank contexts: which rank ran a line, and in which test and phase.
    db = sqlite3.connect(inner.path / ".coverage")
    rows = db.execute(
        "select context.context, line_bits.numbits from line_bits "
        "join context on context.id = line_bits.context_id"
    ).fetchall()
    from coverage.numbits import numbits_to_nums

    by_context = {ctx: set(numbits_to_nums(bits)) for ctx, bits in rows}
    assert 7 in by_context["rank1|test_cov.py::test_ranks|run"]
    assert 7 not in by_context["rank0|test_cov.py::test_ranks|run"]
    assert 11 in by_context["rank0|test_cov.py::test_fresh|run"]
    assert 2 in by_context["rank0|test_cov.py::test_ranks|run"]


def test_coverage_under_xdist_and_coverage_run(inner: InnerRunner) -> None:
    _write_pkg(inner)
    result = inner.run("test_cov.py", "-n", "2", "--cov=pkg", "--cov-report=term-missing", timeout=180)
    assert "2 passed" in result.output.strip().splitlines()[-1], result.output
    assert _missing(result.output) == "pkg/__init__.py 9 1 89% 15", result.output
    assert _leftovers(inner.path) == []

    (inner.path / ".coverage").unlink()
    result = inner.run("test_cov.py", runner=("-m", "coverage", "run", "--source=pkg", "-m", "pytest"),
                       timeout=180)
    assert "2 passed" in result.output.strip().splitlines()[-1], result.output
    assert _leftovers(inner.path) == []
    report = subprocess.run([sys.executable, "-m", "coverage", "report", "-m"], cwd=inner.path,
                            capture_output=True, text=True, timeout=60, check=True)
    assert _missing(report.stdout) == "pkg/__init__.py 9 1 89% 15", report.stdout


FLAGS_TESTS = textwrap.dedent("""
    import time
    import pytest
    import torch.distributed as dist

    @pytest.mark.distributed(world_size=[2, 4])
    def test_sizes(dist_info):
        dist.barrier()

    @pytest.mark.distributed(world_size=2)
    def test_fails_on_rank1(dist_info):
        print(f"out of rank {dist_info.rank}")
        assert dist_info.rank != 1, "rank 1 is wrong"

    @pytest.mark.distributed(world_size=2)
    def test_slow_rank1(dist_info):
        print(f"slow test, rank {dist_info.rank}")
        if dist_info.rank == 1:
            time.sleep(1.5)

    @pytest.mark.distributed(world_size=2)
    def test_last(dist_info):
        dist.barrier()
""")


def _summary(result: object) -> str:
    return result.output.strip().splitlines()[-1]  # type: ignore[attr-defined]


def test_junit_xml_and_durations(inner: InnerRunner) -> None:
    inner.write(test_flags=FLAGS_TESTS)
    result = inner.run("test_flags.py", "--junitxml=report.xml", "--durations=0", timeout=180)
    assert "1 failed, 4 passed" in _summary(result), result.output
    root = ET.parse(inner.path / "report.xml").getroot()
    cases = {case.get("name"): case for case in root.iter("testcase")}
    assert set(cases) == {"test_sizes[ws2]", "test_sizes[ws4]", "test_fails_on_rank1", "test_slow_rank1",
                          "test_last"}
    failure = cases["test_fails_on_rank1"].find("failure")
    assert failure is not None
    # The failing rank in the message (what CI test views list), its traceback and every
    # rank's captured output in the text.
    assert failure.get("message", "").startswith("[rank 1] AssertionError: rank 1 is wrong")
    text = failure.text or ""
    for fragment in (
        "distributed test failed (world size 2, backend gloo): rank 1 failed first (in call)",
        "rank 1: call (first failure)",
        '>       assert dist_info.rank != 1, "rank 1 is wrong"',
        "E       AssertionError: rank 1 is wrong",
        "test_flags.py:13: AssertionError",
        "ranks that passed",
        "Captured stdout call (rank 0)",
        "out of rank 0",
        "Captured stdout call (rank 1)",
        "out of rank 1",
    ):
        assert fragment in text, (fragment, text)
    # The terminal shows each rank's output once (it is part of the failure text).
    assert result.output.count("out of rank 1") == 1, result.output
    # Each rank's time, as JUnit properties and in the --durations summary.
    props = {p.get("name"): float(p.get("value", "nan")) for p in cases["test_sizes[ws4]"].iter("property")}
    assert set(props) == {f"distruntime:rank{k}:duration_s" for k in range(4)}, props
    slow = {p.get("name"): float(p.get("value", "nan")) for p in cases["test_slow_rank1"].iter("property")}
    assert slow["distruntime:rank1:duration_s"] >= 1.5 > slow["distruntime:rank0:duration_s"], slow
    assert "slowest distributed tests, time per rank" in result.output
    lines = result.output.splitlines()
    line = next(ln for ln in lines if " test_flags.py::test_slow_rank1: " in ln)
    per_rank = dict(re.findall(r"rank (\d) ([\d.]+)s", line))
    assert set(per_rank) == {"0", "1"} and float(per_rank["1"]) >= 1.5, line
    # pytest's own --durations lists the call phase with the slowest rank's time.
    calls = [ln.split() for ln in lines if ln.split()[1:] == ["call", "test_flags.py::test_slow_rank1"]]
    assert len(calls) == 1 and float(calls[0][0].rstrip("s")) >= 1.5, result.output


def test_selection_and_stop_flags(inner: InnerRunner, tmp_path: Path) -> None:
    inner.write(test_flags=FLAGS_TESTS, test_plain="""
        import sys

        def test_plugin_not_loaded():
            assert "distruntime.testing.plugin" not in sys.modules
            assert "torch" not in sys.modules
    """)
    # -k on the [ws4] id: only that item runs.
    result = inner.run("test_flags.py", "-k", "ws4", timeout=120)
    assert "1 passed, 4 deselected" in _summary(result), result.output
    assert "PASSED test_flags.py::test_sizes[ws4]" in result.output
    # A run that fails, then --lf (only the failure) and --ff -x (the failure first, then stop).
    result = inner.run("test_flags.py", timeout=180, cache=True)
    assert "1 failed, 4 passed" in _summary(result), result.output
    result = inner.run("test_flags.py", "--lf", timeout=120, cache=True)
    assert "1 failed, 4 deselected" in _summary(result), result.output
    # -x is --maxfail=1: the session stops after the first (the previously failed) test.
    result = inner.run("test_flags.py", "--ff", "--maxfail=1", timeout=120, cache=True)
    assert _summary(result).startswith("=") and "1 failed in" in _summary(result), result.output
    assert "stopping after 1 failures" in result.output
    # -p no:distruntime: the plugin (and torch) are not loaded at all.
    result = inner.run("test_plain.py", "-p", "no:distruntime", timeout=60)
    assert "1 passed" in _summary(result), result.output


TIMEOUT_TESTS = textwrap.dedent("""
    import time
    import pytest

    @pytest.mark.distributed(world_size=2)
    def test_rank1_sleeps(dist_info):
        if dist_info.rank == 1:
            time.sleep(60)

    @pytest.mark.distributed(world_size=2, timeout=1)
    @pytest.mark.timeout(30)
    def test_marker_deadline_shorter(dist_info):
        if dist_info.rank == 0:
            time.sleep(60)
""")


def test_pytest_timeout_next_to_the_plugin_deadline(inner: InnerRunner) -> None:
    inner.write(test_timeouts=TIMEOUT_TESTS)
    result = inner.run("test_timeouts.py", "--timeout=2", "--drt-timeout=50", timeout=120)
    out = result.output
    assert "2 failed" in _summary(result), out
    # The smaller deadline wins, whichever plugin set it; the report is the plugin's own:
    # the ranks still running with their stacks, then the session goes on.
    assert "timed out after 2s (--timeout=2 (pytest-timeout)): rank(s) 1 still running" in out
    assert 'test_timeouts.py", line 8 in test_rank1_sleeps' in out
    assert "timed out after 1s (marker timeout=1): rank(s) 0 still running" in out
    assert "Timeout (>" not in out  # pytest-timeout itself never fired
    assert result.seconds < 90, result.seconds  # loaded machine: two pool starts, two stack dumps
