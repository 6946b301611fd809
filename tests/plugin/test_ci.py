"""The plugin in a CI pipeline: coverage inside ranks, JUnit XML, pytest's own flags.

Each test runs real inner pytest sessions (subprocesses, the plugin loaded through its
entry point) and checks what a CI job would see: coverage reports, XML files, exit
codes, the files left in the project.
"""

from __future__ import annotations

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
