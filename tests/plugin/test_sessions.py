"""End-to-end: inner pytest sessions using the plugin, run as subprocesses.

Each inner session holds several tests, so the cost of starting rank processes (an
interpreter and ``import torch`` per rank) is paid a few times for the whole file.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest
from inner_pytest import InnerRunner, alive

from distruntime.control.progress import flight_recorder_available

pytestmark = pytest.mark.processes

# Records what each rank saw, one JSON line per (test, rank), for the outer assertions.
RECORDER = textwrap.dedent("""
    import json, os, threading

    def record(test, rank, **extra):
        path = os.path.join(os.environ["DRT_RECORD_DIR"], f"{test}.{rank}.json")
        with open(path, "w") as f:
            json.dump({"pid": os.getpid(), **extra}, f)
""")

MAIN_SUITE = textwrap.dedent("""
    import os, threading, time
    import pytest
    import torch
    import torch.distributed as dist
    from distruntime import DistributedRuntime
    from distruntime.testing import assert_all_ranks
    from recorder import record

    THREADS_AT_IMPORT = threading.active_count()

    @pytest.fixture(scope="module")
    def module_token():
        return os.urandom(8).hex()

    @pytest.mark.distributed(world_size=2)
    def test_pass(dist_info, module_token):
        t = torch.tensor([float(dist_info.rank + 1)])
        dist.all_reduce(t)
        assert t.item() == 3.0
        record("pass", dist_info.rank, token=module_token, backend=dist_info.backend,
               world_size=dist_info.world_size)

    @pytest.mark.distributed(world_size=2)
    def test_pass_again(dist_info, module_token):
        dist.barrier()
        record("pass_again", dist_info.rank, token=module_token)

    @pytest.mark.distributed(world_size=[2, 4])
    def test_sizes(dist_info):
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == dist_info.world_size
        record(f"sizes{dist_info.world_size}", dist_info.rank)

    @pytest.mark.distributed(world_size=2)
    def test_fail_on_rank1(dist_info):
        value = dist_info.rank * 10
        print(f"stdout of rank {dist_info.rank}")
        assert value < 5
        dist.barrier()

    @pytest.mark.distributed(world_size=2)
    def test_skip_everywhere(dist_info):
        pytest.skip("no such hardware here")

    @pytest.mark.distributed(world_size=2)
    def test_skip_on_rank1(dist_info):
        if dist_info.rank == 1:
            pytest.skip("rank-dependent condition")
        dist.barrier()

    @pytest.mark.distributed(world_size=2)
    def test_shared_tmp(dist_info, dist_tmp_path, tmp_path):
        if dist_info.rank == 0:
            (dist_tmp_path / "from-rank-0.txt").write_text("hello")
        dist.barrier()
        assert (dist_tmp_path / "from-rank-0.txt").read_text() == "hello"
        record("shared_tmp", dist_info.rank, shared=str(dist_tmp_path), private=str(tmp_path))

    @pytest.mark.distributed(world_size=2)
    def test_collective_assert(dist_info):
        assert_all_ranks(dist_info.rank != 1, f"value on rank {dist_info.rank} is off")

    @pytest.mark.distributed(world_size=2)
    def test_collective_assert_passes(dist_info):
        assert_all_ranks(True, "never shown")
        assert_all_ranks(torch.tensor(True), "never shown")

    @pytest.mark.distributed(world_size=2, init=False)
    def test_builds_runtime_itself(dist_env):
        assert not dist.is_initialized()
        assert os.environ["RANK"] == dist_env["RANK"]
        with DistributedRuntime("gloo") as info:
            t = torch.ones(1)
            dist.all_reduce(t)
            assert t.item() == 2.0
            assert info.rank == int(dist_env["RANK"])
        assert not dist.is_initialized()
        record("init_false", info.rank, launcher=info.launcher)

    @pytest.mark.distributed(world_size=2, init=False)
    def test_runtime_reports_peer_failure(dist_env):
        with DistributedRuntime("gloo") as info:
            if info.rank == 1:
                raise ValueError("boom on rank 1")
            dist.barrier()

    @pytest.mark.distributed(world_size=2, init=False)
    def test_dist_info_refused_without_init(dist_info):
        pass

    @pytest.mark.distributed(world_size=2)
    @pytest.mark.xfail(reason="known collective bug", strict=True)
    def test_xfail_everywhere(dist_info):
        assert False

    @pytest.mark.distributed(world_size=64, backend="nccl")
    def test_needs_64_gpus(dist_info):
        pass

    @pytest.mark.distributed(world_size=2, isolation="fresh")
    def test_fresh(dist_info):
        dist.barrier()
        record("fresh", dist_info.rank)

    @pytest.mark.distributed(world_size=2)
    def test_group_without_asking():
        assert dist.is_initialized() and dist.get_world_size() == 2
        dist.barrier()

    @pytest.mark.distributed(world_size=2)
    def test_leaves_env_behind(dist_info):
        os.environ["DRT_LEFT_BEHIND"] = "1"

    def test_single_rank(dist_info):
        assert (dist_info.rank, dist_info.world_size, dist_info.backend) == (0, 1, "gloo")
        assert dist_info.master_port is None
        assert dist.is_initialized()

    def test_single_rank_left_nothing():
        assert not dist.is_initialized()
        for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            assert name not in os.environ
        assert threading.active_count() == THREADS_AT_IMPORT
""")


def _records(directory: Path) -> dict[str, dict[str, object]]:
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json")}


def test_main_suite(inner: InnerRunner, tmp_path: Path) -> None:
    inner.write(recorder=RECORDER, test_main=MAIN_SUITE)
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    result = inner.run("test_main.py", timeout=150, env={"DRT_RECORD_DIR": str(record_dir)})
    out = result.output
    seen = _records(record_dir)

    # Outcomes, pytest-style, with one item per world size of the list form.
    for passed in (
        "test_pass",
        "test_pass_again",
        "test_sizes[ws2]",
        "test_sizes[ws4]",
        "test_shared_tmp",
        "test_collective_assert_passes",
        "test_builds_runtime_itself",
        "test_fresh",
        "test_single_rank",
        "test_single_rank_left_nothing",
        "test_leaves_env_behind",
        "test_group_without_asking",
    ):
        assert f"PASSED test_main.py::{passed}\n" in out, (passed, out)
    assert (
        "SKIPPED [1] test_main.py:" in result.line_of("SKIPPED [1] test_main.py:")
        and "no such hardware here" in out
    )
    assert "backend 'nccl' needs 64 CUDA devices" in out
    assert "XFAIL test_main.py::test_xfail_everywhere - known collective bug" in out
    summary = result.output.strip().splitlines()[-1]
    assert "4 failed, 12 passed, 2 skipped, 1 xfailed, 2 warnings, 1 error" in summary, summary

    # 1. The single-rank fixture is real and leaves nothing behind (checked by the next test).
    # 2. Backend auto is gloo on this CPU machine; world sizes come from the marker.
    assert seen["pass.0"]["backend"] == "gloo" and seen["pass.1"]["world_size"] == 2
    assert {k for k in seen if k.startswith("sizes4.")} == {"sizes4.0", "sizes4.1", "sizes4.2", "sizes4.3"}

    # 3. The failing rank comes first with its rewritten assertion; its peer is collateral.
    fail = result.line_of("FAILED test_main.py::test_fail_on_rank1")
    assert "[rank 1] assert 10 < 5" in fail
    assert result.has(
        "rank 1 failed first (in call); rank(s) 0 failed because of it",
        "rank 1: call (first failure)",
        ">       assert value < 5",
        "E       assert 10 < 5",
        "rank 0: call failed because rank 1 failed first",
        "Captured stdout call (rank 1)",
        "stdout of rank 1",
    )
    # Skips: on every rank a skip with the real reason; on one rank a failure that says so.
    assert "[rank 1] non-collective skip: Skipped: rank-dependent condition" in result.line_of(
        "FAILED test_main.py::test_skip_on_rank1"
    )
    assert "non-collective skip: rank(s) 1 skipped while rank(s) 0 did not" in out
    # A runtime built in the body tells its peer which rank failed.
    assert "[rank 1] ValueError: boom on rank 1" in result.line_of(
        "FAILED test_main.py::test_runtime_reports_peer_failure"
    )
    assert "rank 0: call failed because rank 1 failed first" in out
    assert "PeerFailureError" in out
    assert "dist_info is not available in a @pytest.mark.distributed(init=False) test" in out
    assert seen["init_false.0"]["launcher"] == "torchrun"

    # 6. Pooled tests reuse the rank processes (and module fixtures); fresh ones do not.
    assert seen["pass.0"]["pid"] == seen["pass_again.0"]["pid"] == seen["shared_tmp.0"]["pid"]
    assert seen["pass.1"]["pid"] == seen["pass_again.1"]["pid"]
    assert seen["pass.0"]["token"] == seen["pass_again.0"]["token"]
    assert seen["fresh.0"]["pid"] != seen["pass.0"]["pid"]
    assert seen["fresh.1"]["pid"] != seen["pass.1"]["pid"]

    # 7. dist_tmp_path is one directory for all ranks; tmp_path stays private.
    assert seen["shared_tmp.0"]["shared"] == seen["shared_tmp.1"]["shared"]
    assert seen["shared_tmp.0"]["private"] != seen["shared_tmp.1"]["private"]
    collective = result.line_of("FAILED test_main.py::test_collective_assert ")
    assert (
        "assert_all_ranks: false on rank(s) 1 of 2 (true on rank(s) 0): rank 1: value on rank 1 is off" in out
    ), collective
    assert "rank(s) 0, 1 failed in call, each with the same error (shown once)" in out

    # Hygiene: a test that leaves a variable set is named in a warning.
    assert "rank 0: the test changed environment variables DRT_LEFT_BEHIND (restored)" in out


HANG_SUITE = textwrap.dedent("""
    import os, signal, time
    import pytest
    import torch.distributed as dist

    @pytest.mark.distributed(world_size=2, timeout=2)
    def test_rank1_sleeps(dist_info):
        if dist_info.rank == 1:
            time.sleep(120)

    @pytest.mark.distributed(world_size=2)
    def test_both_block(dist_info):
        if dist_info.rank == 0:
            dist.barrier()
        else:
            time.sleep(120)

    @pytest.mark.distributed(world_size=2)
    def test_after_hangs(dist_info):
        dist.barrier()

    def crash_deep(depth):  # a crash dump longer than a few kB: its header must still show
        if depth == 0:
            os.kill(os.getpid(), signal.SIGSEGV)
        crash_deep(depth - 1)

    @pytest.mark.distributed(world_size=2)
    def test_rank1_segfaults(dist_info):
        if dist_info.rank == 1:
            crash_deep(80)
        dist.barrier()

    @pytest.mark.distributed(world_size=2)
    def test_after_crash(dist_info):
        dist.barrier()
""")


def test_deadline_and_crash(inner: InnerRunner) -> None:
    inner.write(test_hang=HANG_SUITE)
    result = inner.run("test_hang.py", "--drt-timeout=3", timeout=120)
    out = result.output
    # 4. Marker deadline: the rank still running is named with its Python stack, and killed.
    line = result.line_of("FAILED test_hang.py::test_rank1_sleeps")
    assert "timed out after 2s; rank(s) 1 still running" in line
    assert "timed out after 2s (marker timeout=2): rank(s) 1 still running" in out
    assert "rank 1: still running in call at the deadline; its Python stacks" in out
    assert 'test_hang.py", line 9 in test_rank1_sleeps' in out
    # Option deadline, both ranks stuck: both named, each with where it waits.
    assert "timed out after 3s (--drt-timeout=3): rank(s) 0, 1 still running" in out
    assert 'test_hang.py", line 14 in test_both_block' in out  # rank 0, in dist.barrier()
    assert "distributed_c10d.py" in out and " in barrier" in out
    assert 'test_hang.py", line 16 in test_both_block' in out  # rank 1, in time.sleep()
    # The watchdog's cross-rank table (the one a hang raises) heads the deadline report.
    assert "the test's deadline passed; rank 1 running Python at " in out
    assert "test_hang.py:16 in test_both_block" in out
    assert ("waiting in collective #1 barrier (group default)" if flight_recorder_available()
            else "waiting in collective #? barrier (group default)") in out
    # A rank that dies: its signal, and the crash dump from its log.
    crash = result.line_of("FAILED test_hang.py::test_rank1_segfaults")
    assert "[rank 1] its process was killed by SIGSEGV during call" in crash
    assert "Fatal Python error: Segmentation fault" in out
    assert "rank 0: call failed because rank 1 failed first" in out
    # The session goes on: the next tests get new rank processes and pass.
    assert "PASSED test_hang.py::test_after_hangs" in out
    assert "PASSED test_hang.py::test_after_crash" in out
    assert "3 failed, 2 passed" in out.strip().splitlines()[-1]
    # Bounded: 2 s + 3 s of deadlines, three pool starts, stack dumps; no 120 s sleep.
    assert result.seconds < 60, result.seconds


XDIST_SUITE = textwrap.dedent("""
    import pytest
    import torch
    import torch.distributed as dist

    @pytest.mark.distributed(world_size=2)
    @pytest.mark.parametrize("n", range(6))
    def test_many(dist_info, n, dist_tmp_path):
        t = torch.full((1,), float(n))
        dist.all_reduce(t)
        assert t.item() == 2 * n
        (dist_tmp_path / f"rank{dist_info.rank}").write_text(str(n))
""")


def test_xdist(inner: InnerRunner) -> None:
    inner.write(test_x=XDIST_SUITE)
    result = inner.run("test_x.py", "-n", "2", timeout=150)
    assert "6 passed" in result.output.strip().splitlines()[-1], result.output
    assert "Address already in use" not in result.output
    assert (
        "[gw0] PASSED" in result.output
        or "[gw1] PASSED" in result.output
        or "PASSED test_x.py" in result.output
    )


ORPHAN_SUITE = textwrap.dedent("""
    import os, time
    import pytest

    @pytest.mark.distributed(world_size=2, timeout=100)
    def test_waits(dist_info):
        with open(os.path.join(os.environ["DRT_RECORD_DIR"], f"rank{dist_info.rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
        time.sleep(100)
""")


def test_killing_pytest_kills_the_ranks(inner: InnerRunner, tmp_path: Path) -> None:
    inner.write(test_orphans=ORPHAN_SUITE)
    proc = inner.start("test_orphans.py", env={"DRT_RECORD_DIR": str(tmp_path)})
    deadline = time.monotonic() + 60
    pid_files = [tmp_path / "rank0.pid", tmp_path / "rank1.pid"]
    while not all(p.exists() and p.read_text() for p in pid_files):
        assert time.monotonic() < deadline, "the ranks never started"
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    ranks = [int(p.read_text()) for p in pid_files]
    assert all(alive(pid) for pid in ranks)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: the ranks must notice by themselves
    proc.communicate()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks):
        assert time.monotonic() < deadline, f"rank processes outlived pytest: {ranks}"
        time.sleep(0.05)
