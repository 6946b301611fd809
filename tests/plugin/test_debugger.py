"""``pytest --pdb`` with N-rank tests, in a real pseudo-terminal (pexpect) and without one."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from inner_pytest import _DROPPED, InnerRunner, alive, kill_tree

pytestmark = pytest.mark.processes

PDB_TESTS = textwrap.dedent("""
    import pytest
    import torch.distributed as dist

    @pytest.mark.distributed(world_size=2)
    def test_fails_on_rank1(dist_info):
        secret = 40 + dist_info.rank
        if dist_info.rank == 1:
            assert secret == 0
        dist.barrier()

    @pytest.mark.distributed(world_size=2)
    def test_after(dist_info):
        dist.barrier()
""")


@pytest.fixture
def terminal(inner: InnerRunner) -> Iterator[list[pexpect.spawn]]:
    """pytest sessions in pseudo-terminals of their own; their process trees killed after."""
    inner.write(test_pdb=PDB_TESTS)
    children: list[pexpect.spawn] = []
    yield children
    for child in children:
        if child.isalive():
            kill_tree(child.pid)
        child.close(force=True)


def _spawn(inner: InnerRunner, children: list[pexpect.spawn], *args: str) -> pexpect.spawn:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pytest", "-p", "no:cacheprovider", "--color=no", f"--basetemp={inner.path / 'tmp'}", *args],
        cwd=str(inner.path), env=env, encoding="utf-8", timeout=90, dimensions=(50, 250),
    )
    children.append(child)
    return child


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_pdb_on_the_failing_rank(inner: InnerRunner, terminal: list[pexpect.spawn]) -> None:
    # A grace of 1 s and a deadline of 4 s: without the pause, the 5 s spent in the
    # debugger would have stopped the test.
    child = _spawn(inner, terminal, "--pdb", "--drt-grace=1", "--drt-timeout=4", "test_pdb.py")
    child.expect(r"debugger of rank 1 of 2 \(pid (\d+)\), test test_pdb.py::test_fails_on_rank1")
    debugged = int(child.match.group(1))
    child.expect(r"other ranks held until it ends: 0 \(pid (\d+)\)")
    held = int(child.match.group(1))
    child.expect_exact("(Pdb) ")
    # A usable post-mortem: the failing frame of rank 1, its locals.
    child.sendline("p secret, dist_info.rank")
    child.expect_exact("(41, 1)")
    child.expect_exact("(Pdb) ")
    assert _state(held) == "T"  # rank 0 is held while rank 1 is debugged
    assert _state(debugged) != "T"
    time.sleep(5)
    child.sendline("c")
    child.expect(pexpect.EOF)
    out = child.before
    assert "1 failed, 1 passed" in out, out
    # Released: rank 0 went on and failed because of rank 1, no deadline or grace expired.
    assert "rank 1 failed first (in call); rank(s) 0 failed because of it" in out, out
    assert "timed out" not in out and "still running" not in out, out


def test_pdb_quit_stops_the_session(inner: InnerRunner, terminal: list[pexpect.spawn]) -> None:
    child = _spawn(inner, terminal, "--pdb", "test_pdb.py")
    child.expect(r"other ranks held until it ends: 0 \(pid (\d+)\)")
    held = int(child.match.group(1))
    child.expect_exact("(Pdb) ")
    started = time.monotonic()
    child.sendline("q")
    child.expect(pexpect.EOF)
    out = child.before
    assert "Quitting debugger" in out, out
    assert "test_after" not in out.split("short test summary info")[-1], out
    assert "[rank 1] assert 41 == 0" in out
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while alive(held):  # the held rank was not left stopped
        assert time.monotonic() < deadline, f"rank 0 (pid {held}) outlived the session"
        time.sleep(0.1)


def test_pdb_without_a_terminal_does_not_wait(inner: InnerRunner) -> None:
    inner.write(test_pdb=PDB_TESTS)
    # InnerRunner starts pytest in a new session: no controlling terminal, as in CI.
    result = inner.run("--pdb", "test_pdb.py", timeout=120)
    out = result.output
    assert "1 failed, 1 passed" in out.strip().splitlines()[-1], out
    assert "no terminal to open the failing rank's debugger on" in out
    assert f"cd {inner.path} && {sys.executable} -m pytest --pdb test_pdb.py::test_fails_on_rank1" in out
    assert result.seconds < 90


BREAKPOINT_TEST = textwrap.dedent("""
    import pytest
    import torch.distributed as dist

    @pytest.mark.distributed(world_size=2)
    def test_breakpoint(dist_info):
        value = 7 * (dist_info.rank + 1)
        if dist_info.rank == 0:
            breakpoint()
        dist.barrier()
""")


def test_breakpoint_in_a_rank(inner: InnerRunner, terminal: list[pexpect.spawn]) -> None:
    inner.write(test_bp=BREAKPOINT_TEST)
    child = _spawn(inner, terminal, "--pdb", "--drt-grace=1", "--drt-timeout=4", "test_bp.py")
    child.expect(r"debugger of rank 0 of 2 \(pid \d+\), test test_bp.py::test_breakpoint")
    child.expect(r"other ranks held until it ends: 1 \(pid (\d+)\)")
    assert _state(int(child.match.group(1))) == "T"
    child.expect_exact("(Pdb) ")
    child.sendline("p value")
    child.expect_exact("7")
    child.expect_exact("(Pdb) ")
    time.sleep(5)  # past the 4 s deadline: paused while the debugger is open
    child.sendline("c")
    child.expect(pexpect.EOF)
    assert "1 passed" in child.before, child.before
