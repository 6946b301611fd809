"""Real processes: torchrun, torch.multiprocessing.spawn, hand-set env, plain python.

Each test bounds its processes (tests/procs.py kills the whole tree at the deadline).
Bounds are generous for a loaded 2-core machine. The failure paths with their promised
bounds (an exception, os._exit, SIGKILL on one rank...) are the fault matrix's
(test_faults.py); here, SIGTERM is also checked to run teardown before the exit.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from procs import PYTHON, REPO, TORCHRUN, WORKERS, Result, clean_env, finish, free_port, rank_envs, run, start

pytestmark = pytest.mark.processes

SCENARIO = str(WORKERS / "scenario.py")
PROBE = str(REPO / "examples" / "launch_probe.py")
JOB_TIMEOUT_S = 120


def results(result: Result) -> list[dict[str, object]]:
    lines = [line[7:] for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted((json.loads(line) for line in lines), key=lambda r: int(r["rank"]))  # type: ignore[arg-type]


def read_probe(out: Path, world_size: int) -> list[dict[str, object]]:
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert sorted(r["rank"] for r in records) == list(range(world_size))
    return sorted(records, key=lambda r: r["rank"])


@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun(nproc: int, tmp_path: Path) -> None:
    result = run([TORCHRUN, "--nproc-per-node", str(nproc), PROBE, "--out", str(tmp_path)], JOB_TIMEOUT_S)
    assert result.returncode == 0, result.output
    for record in read_probe(tmp_path, nproc):
        assert record["world_size"] == nproc
        assert record["local_rank"] == record["rank"]
        assert (record["local_world_size"], record["node_rank"], record["num_nodes"]) == (nproc, 0, 1)
        assert (record["launcher"], record["backend"], record["device"]) == ("torchrun", "gloo", "cpu")
        assert record["allreduce"] == nproc * (nproc + 1) / 2
    assert f"all {nproc} ranks joined" in result.stderr


def test_multiprocessing_spawn_with_env(tmp_path: Path) -> None:
    result = run([PYTHON, str(WORKERS / "spawn_job.py"), "2", str(free_port()), str(tmp_path)], JOB_TIMEOUT_S)
    assert result.returncode == 0, result.output
    for record in read_probe(tmp_path, 2):
        assert (record["world_size"], record["launcher"], record["allreduce"]) == (2, "env", 3.0)
        assert record["local_rank"] == record["rank"]


def test_plain_python_is_one_rank_and_opens_no_rendezvous_port() -> None:
    result = run([PYTHON, SCENARIO, "single"], JOB_TIMEOUT_S)
    assert result.returncode == 0, result.output
    (record,) = results(result)
    listening = record.pop("listening")
    assert record == {"rank": 0, "world_size": 1, "launcher": "none", "sum": 0.0}
    # No store, no MASTER_PORT: the only listener is gloo's own transport socket, on a
    # port the kernel picks from the ephemeral range (raw torch opens the same one).
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert isinstance(listening, list) and len(listening) <= 1
    assert all(low <= port <= high for port in listening), listening
    assert "EXIT group_alive=False" in result.stdout


def test_exception_under_torchrun_reaches_its_summary() -> None:
    example = str(REPO / "examples" / "decorated_main.py")
    result = run([TORCHRUN, "--nproc-per-node", "2", example, "--fail-rank", "1"], JOB_TIMEOUT_S)
    assert result.returncode != 0
    # The root cause section shows rank 1's own error file, or (when both error files
    # carry the same second and torchrun picks the lower rank) rank 0's, which names it.
    summary = result.stderr[result.stderr.index("Root Cause"):]
    assert "ValueError: rank 1 failed on purpose" in summary


def test_sigterm_inside_the_with_block_tears_down_and_exits_143() -> None:
    port = free_port()
    envs = rank_envs(2, port)
    procs = [start([PYTHON, SCENARIO, "wait", "1"], env) for env in envs]
    deadline = time.monotonic() + 90
    # Wait until rank 1 is inside the with block (its READY line), then signal it.
    assert procs[1].stdout is not None
    line = procs[1].stdout.readline()
    while line and not line.startswith("READY") and time.monotonic() < deadline:
        line = procs[1].stdout.readline()
    assert line.startswith("READY"), "rank 1 never reached the with block"
    signalled = time.monotonic()
    procs[1].send_signal(signal.SIGTERM)
    outcomes = [finish(p, 30) for p in procs]
    assert outcomes[1].returncode == 143, outcomes[1].output
    assert "received SIGTERM" in outcomes[1].stderr
    assert "EXIT group_alive=False" in outcomes[1].stdout  # teardown ran before exit
    assert outcomes[0].returncode != 0
    assert "rank 1 failed first (terminated by signal 15)" in outcomes[0].stderr, outcomes[0].output
    assert time.monotonic() - signalled < 10


def test_train_ddp_example_converges() -> None:
    result = run([TORCHRUN, "--nproc-per-node", "4", str(REPO / "examples" / "train_ddp.py")], JOB_TIMEOUT_S)
    assert result.returncode == 0, result.output
    assert "(converged)" in result.stderr


def test_decorated_main_example() -> None:
    example = str(REPO / "examples" / "decorated_main.py")
    result = run([TORCHRUN, "--nproc-per-node", "2", example], JOB_TIMEOUT_S)
    assert result.returncode == 0, result.output
    assert result.stderr.count("sum of ranks 1 (expected 1)") == 2


def test_decorated_main_as_plain_python() -> None:
    result = run([PYTHON, str(REPO / "examples" / "decorated_main.py")], JOB_TIMEOUT_S, env=clean_env())
    assert result.returncode == 0, result.output
    assert "rank 0/1: sum of ranks 0" in result.stderr
