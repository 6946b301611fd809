"""MPI jobs that name no MASTER_ADDR / MASTER_PORT, under real launchers.

* Two jobs on one node that derive the same port (forced with DISTRUNTIME_PORT_RANGE)
  fail at once and say so, and the first job is unaffected.
* Open MPI across the two network-namespace hosts of netns.sh (a real mpirun, orted
  started on node2 through ompi_fake_ssh.sh): with mpi4py (the ``distruntime[mpi]`` extra,
  put on PYTHONPATH) rank 0 broadcasts its address and a port; without it every rank
  fails with the error that names the extra and the variables.
* MPICH's Hydra across the same hosts without mpi4py: the same error.

(One-node ``mpirun -np 4`` and ``mpiexec.hydra -n 4`` without MASTER_* are
``test_real_launchers.py::test_openmpi[1node]`` / ``test_mpich[1node]``.)
Every job is bounded and killed as a whole tree if it overruns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    PYTHON,
    REPO,
    SCRIPTS,
    NetnsPair,
    Placement,
    assert_ranks,
    check_ok,
    ensure_installed,
    job_context,
    mpich_prefix,
    probe_cmd,
    probe_out_dir,
    require_tools,
    run_checked,
)

from procs import BoundedProcess, clean_env, free_port, kill_session_leftovers, run_bounded

pytestmark = pytest.mark.launchers

JOB_TIMEOUT_S = 120.0
HOLD = str(REPO / "tests" / "workers" / "mpi_hold.py")
FAKE_SSH = SCRIPTS / "ompi_fake_ssh.sh"  # "ssh" to node1/node2 = run in its namespace
EXTRA = "pip install 'distruntime[mpi]'"


@pytest.fixture(scope="module")
def mpi4py_dir() -> str:
    """mpi4py installed by the project's own script, in a folder of its own (not the venv)."""
    ensure_installed()
    result = check_ok(run_bounded(["bash", str(SCRIPTS / "mpi4py.sh"), PYTHON], 660), "mpi4py.sh")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def out() -> Iterator[Path]:
    with probe_out_dir() as path:
        yield path


def _openmpi_netns(np: int, extra_forward: tuple[str, ...] = ()) -> list[str]:
    """mpirun on node1 placing 2 ranks on node1 and 2 on node2, over the veth pair."""
    cmd = ["bash", str(SCRIPTS / "netns.sh"), "exec", "1",
           "mpirun.openmpi", "--allow-run-as-root", "--oversubscribe",
           "--mca", "plm_rsh_agent", str(FAKE_SSH),
           "--mca", "oob_tcp_if_include", "eth0", "--mca", "btl_tcp_if_include", "eth0",
           "--host", "node1:2,node2:2", "-np", str(np), "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
    for name in extra_forward:
        cmd += ["-x", name]
    return cmd


def test_two_jobs_on_one_derived_port(out: Path) -> None:
    """Job B derives job A's port: B's rank 0 cannot bind it and B's rank 1, which reaches
    A's store, is told the store is another job's. Neither waits; A finishes normally."""
    ensure_installed()
    require_tools("mpiexec.hydra")
    port = free_port()
    env = clean_env(DISTRUNTIME_PORT_RANGE=f"{port}-{port}")
    first, second = out / "a", out / "b"
    first.mkdir()
    second.mkdir()
    job_a = BoundedProcess([*mpich_prefix(2), PYTHON, HOLD, "--out", str(first)], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not all((first / f"ready{r}").exists() for r in (0, 1)):
            assert job_a.poll() is None, f"job A ended early\n{job_context(job_a.result())}"
            assert time.monotonic() < deadline, "job A never entered its runtime"
            time.sleep(0.1)
        assert (first / "ready0").read_text() == str(port)
        started = time.monotonic()
        job_b = run_bounded([*mpich_prefix(2), PYTHON, HOLD, "--out", str(second)], 60, env=env, cwd=REPO)
        took = time.monotonic() - started
        text = job_b.stdout + job_b.stderr
        assert job_b.returncode != 0, job_context(job_b)
        assert "derived the same port" in text, job_context(job_b)
        assert f"MASTER_PORT={port}" in text and "export MASTER_PORT" in text, job_context(job_b)
        # The start-up bound is 30 s; a collision must not wait for it.
        assert took < 25, f"job B took {took:.1f}s to fail\n{job_context(job_b)}"
        assert not list(second.glob("ready*")), "a rank of job B entered a runtime on A's port"
        (first / "release").touch()
        job_a.popen.wait(timeout=JOB_TIMEOUT_S)
        assert job_a.poll() == 0, job_context(job_a.result())
    finally:
        if job_a.poll() is None:
            job_a.kill()
        kill_session_leftovers(job_a.popen.pid)
        job_a.close()


def test_openmpi_netns_with_mpi4py(netns_pair: NetnsPair, mpi4py_dir: str, out: Path) -> None:
    env = clean_env()
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{mpi4py_dir}"
    result = run_checked([*_openmpi_netns(4), *probe_cmd(out)], JOB_TIMEOUT_S, env=env, cwd=REPO,
                         what="mpirun across node1/node2 with mpi4py")
    context = job_context(result)
    ranks = assert_ranks(out, "openmpi", Placement.block(2, 2), context=context, master_addr="node1")
    assert {str(d["hostname"]) for d in ranks.values()} == set(netns_pair.hostnames), context
    assert len({d["master_port"] for d in ranks.values()}) == 1, context
    assert "rendezvous from rank 0 over MPI (mpi4py)" in context


def test_openmpi_netns_without_mpi4py(netns_pair: NetnsPair, out: Path) -> None:
    result = run_bounded([*_openmpi_netns(4), *probe_cmd(out)], JOB_TIMEOUT_S, env=clean_env(), cwd=REPO)
    context = job_context(result)
    assert result.returncode != 0, context
    # Open MPI's job id still gives every rank the same port: only the address is missing.
    assert EXTRA in context and "export MASTER_ADDR on every rank" in context, context
    assert "openmpi started 4 ranks on 2 nodes" in context, context
    assert not list(out.glob("rank*.json")), context


def test_mpich_netns_without_mpi4py(netns_pair: NetnsPair, out: Path) -> None:
    """Hydra reaches node2 through the same ssh stand-in; a rank there fails clearly."""
    require_tools("mpiexec.hydra")
    cmd = ["bash", str(SCRIPTS / "netns.sh"), "exec", "1", "mpiexec.hydra", "-iface", "eth0",
           "-launcher", "ssh", "-launcher-exec", str(FAKE_SSH), "-hosts", "node1:2,node2:2", "-n", "4",
           *probe_cmd(out)]
    result = run_bounded(cmd, JOB_TIMEOUT_S, env=clean_env(), cwd=REPO)
    context = job_context(result)
    assert result.returncode != 0, context
    assert EXTRA in context and "export MASTER_ADDR and MASTER_PORT on every rank" in context, context
    assert "mpich started 4 ranks on 2 nodes" in context, context
