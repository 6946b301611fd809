"""Real launcher runs of examples/launch_probe.py: 4 ranks under each launcher.

torchrun (one node, and two nodes in two network namespaces), SLURM (srun,
sbatch, torchrun under srun, and a batch script running the worker as a
single process), Open MPI and MPICH (one node and two simulated nodes).
Each rank writes rank<R>.json; every rank's placement, the launcher name and
the all_reduce result are checked. Every job is bounded (JOB_TIMEOUT_S) and
killed as a whole tree if it overruns. Needs root: the fixtures install the
apt packages and start SLURM / the namespaces, and FAIL if they cannot.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# harness.py sits next to this file; importable under any pytest import mode
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    REPO,
    TORCHRUN,
    NetnsPair,
    Placement,
    SlurmCluster,
    assert_ranks,
    ensure_installed,
    job_context,
    mpich_prefix,
    openmpi_prefix,
    probe_args,
    probe_cmd,
    probe_out_dir,
    require_probe,
    require_tools,
    run_checked,
    run_parallel_checked,
)

from procs import clean_env, free_port, run_bounded

pytestmark = pytest.mark.launchers

JOB_TIMEOUT_S = 120.0


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def openmpi() -> str:
    ensure_installed()
    require_tools("mpirun.openmpi")
    return str(shutil.which("mpirun.openmpi"))


@pytest.fixture(scope="session")
def mpich() -> str:
    ensure_installed()
    require_tools("mpiexec.hydra")
    return str(shutil.which("mpiexec.hydra"))


@pytest.fixture
def probe_out() -> Iterator[Path]:
    require_probe()
    with probe_out_dir() as out:
        yield out


def _torchrun_multinode(endpoint: str, out_dir: Path) -> list[str]:
    return [
        TORCHRUN,
        "--nnodes", "2",
        "--nproc-per-node", "2",
        "--rdzv-backend", "c10d",
        "--rdzv-id", f"drt-{uuid.uuid4().hex[:8]}",
        "--rdzv-endpoint", endpoint,
        *probe_args(out_dir),
    ]  # fmt: skip


def _hosts_by_node(ranks: dict[int, dict[str, object]]) -> dict[int, set[str]]:
    hosts: dict[int, set[str]] = {}
    for d in ranks.values():
        hosts.setdefault(int(str(d["node_rank"])), set()).add(str(d["hostname"]))
    return hosts


# ----------------------------------------------------------------- torchrun


def test_torchrun_single_node(probe_out: Path) -> None:
    result = run_checked(
        [TORCHRUN, "--nproc-per-node", "4", *probe_args(probe_out)],
        JOB_TIMEOUT_S,
        env=clean_env(),
        cwd=REPO,
        what="torchrun --nproc-per-node 4",
    )
    assert_ranks(probe_out, "torchrun", Placement.block(1, 4), context=job_context(result))


def test_torchrun_two_nodes_in_netns(netns_pair: NetnsPair, probe_out: Path) -> None:
    """One torchrun agent per namespace; the rendezvous goes over the veth pair."""
    cmd = _torchrun_multinode(f"node1:{free_port()}", probe_out)
    results = run_parallel_checked(
        [netns_pair.exec_prefix(1) + cmd, netns_pair.exec_prefix(2) + cmd],
        JOB_TIMEOUT_S,
        env=clean_env(),
        cwd=REPO,
        what="torchrun --nnodes 2 in two namespaces",
    )
    context = job_context(*results)
    # c10d does not promise which namespace gets group rank 0, but ranks are
    # always numbered node by node: 0 0 1 1
    ranks = assert_ranks(probe_out, "torchrun", Placement.block(2, 2), context=context)
    hosts = _hosts_by_node(ranks)
    assert all(len(h) == 1 for h in hosts.values()), f"one node rank on several hosts: {hosts}\n{context}"
    assert set().union(*hosts.values()) == set(netns_pair.hostnames), f"hosts {hosts}\n{context}"


# -------------------------------------------------------------------- SLURM


def test_slurm_srun_two_nodes(slurm_cluster: SlurmCluster, probe_out: Path) -> None:
    # -N 2 -n 4 alone splits 3+1; --ntasks-per-node 2 gives 2+2
    result = slurm_cluster.srun(
        ["-N", "2", "-n", "4", "--ntasks-per-node", "2", *probe_cmd(probe_out)], "srun", JOB_TIMEOUT_S
    )
    assert_ranks(probe_out, "slurm", Placement.block(2, 2), context=job_context(result))


def test_slurm_sbatch_with_srun(slurm_cluster: SlurmCluster, probe_out: Path, tmp_path: Path) -> None:
    body = f"srun {shlex.join(probe_cmd(probe_out))}"
    job_id, job_out = slurm_cluster.sbatch(
        body, ["--nodes=2", "--ntasks-per-node=2"], "sbatch", tmp_path, JOB_TIMEOUT_S
    )
    assert_ranks(probe_out, "slurm", Placement.block(2, 2), context=f"job {job_id} output:\n{job_out}")


def test_slurm_srun_torchrun(slurm_cluster: SlurmCluster, probe_out: Path) -> None:
    """One torchrun agent per SLURM node: the workers must report torchrun, not slurm."""
    inner = _torchrun_multinode(f"n1:{free_port()}", probe_out)
    result = slurm_cluster.srun(["-N", "2", "--ntasks-per-node", "1", *inner], "torchrun", JOB_TIMEOUT_S)
    assert_ranks(probe_out, "torchrun", Placement.block(2, 2), context=job_context(result))


def test_slurm_batch_script_single_process(
    slurm_cluster: SlurmCluster, probe_out: Path, tmp_path: Path
) -> None:
    """The batch script itself is ONE process although it sees SLURM_PROCID=0 and
    SLURM_NTASKS=4 (but no SLURM_STEP_ID): the worker must run as world size 1
    and must not wait for 3 peers that never come."""
    body = shlex.join(probe_cmd(probe_out))
    job_id, job_out = slurm_cluster.sbatch(
        body, ["--nodes=2", "--ntasks-per-node=2"], "batch-single", tmp_path, 90.0
    )
    assert_ranks(
        probe_out,
        {"slurm", "none"},
        Placement.block(1, 1),
        context=f"job {job_id} output:\n{job_out}",
        check_num_nodes=False,
    )


# ---------------------------------------------------------------------- MPI


def _mpi_env(port: int, nodes: int) -> dict[str, str]:
    if nodes == 1:
        return clean_env()  # no MASTER_*: loopback, and a port derived from the job
    # the two "nodes" are 127.0.0.1 and 127.0.0.2 on this host; an MPI launcher names
    # no rank-0 host, so the caller must (or mpi4py: test_mpi_rendezvous.py)
    return clean_env({"MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1"})


def _run_mpi(prefix: list[str], probe_out: Path, env: dict[str, str], what: str) -> str:
    result: subprocess.CompletedProcess[str] = run_checked(
        [*prefix, *probe_cmd(probe_out)], JOB_TIMEOUT_S, env=env, cwd=REPO, what=what
    )
    return job_context(result)


@pytest.mark.parametrize("nodes", [1, 2], ids=["1node", "2nodes"])
def test_openmpi(openmpi: str, probe_out: Path, nodes: int) -> None:
    port = free_port()
    env = _mpi_env(port, nodes)
    forward = [k for k in ("MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "OMP_NUM_THREADS") if k in env]
    context = _run_mpi(openmpi_prefix(4, nodes, forward=forward), probe_out, env, f"mpirun ({nodes} node)")
    assert_ranks(
        probe_out,
        "openmpi",
        Placement.block(nodes, 4 // nodes),
        context=context,
        master_addr="127.0.0.1",
        master_port=port if nodes == 2 else None,
    )


@pytest.mark.parametrize("nodes", [1, 2], ids=["1node", "2nodes"])
def test_mpich(mpich: str, probe_out: Path, nodes: int) -> None:
    port = free_port()
    env = _mpi_env(port, nodes)
    context = _run_mpi(mpich_prefix(4, nodes), probe_out, env, f"mpiexec.hydra ({nodes} node)")
    assert_ranks(
        probe_out,
        "mpich",
        Placement.block(nodes, 4 // nodes),
        context=context,
        master_addr="127.0.0.1",
        master_port=port if nodes == 2 else None,
    )


# ------------------------------------------------------------- mid-job hangs
# A rank blocked in C with the GIL held (it cannot answer, its watchdog cannot run):
# every rank must name it, and every process, the stuck one included, must be gone
# within hang_timeout_s + 10 s of the fault, under each launcher for real.

HANG_S = 5.0
FAULT_WORKER = REPO / "tests" / "workers" / "fault.py"


def _hang_env(fault_rank: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"FAULT_RANK": str(fault_rank), "HANG_TIMEOUT_S": str(HANG_S), **(extra or {})}


def _check_hang(result: subprocess.CompletedProcess[str], ended: float, culprit: str) -> None:
    out = result.stdout + result.stderr
    context = job_context(result)
    assert result.returncode != 0, context
    assert f"in a collective; {culprit}" in out, context
    faults = [float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("FAULT ")]
    assert faults, context
    assert ended - faults[0] <= HANG_S + 10, f"out {ended - faults[0]:.1f} s after the fault\n{context}"


def test_hang_under_srun(slurm_cluster: SlurmCluster) -> None:
    try:
        result = run_bounded(
            ["srun", f"--job-name={slurm_cluster.new_job_name('hang')}", "-N", "2", "-n", "4",
             "--ntasks-per-node", "2", sys.executable, str(FAULT_WORKER), "gil"],
            JOB_TIMEOUT_S, env=slurm_cluster.job_env(_hang_env(2)), cwd=REPO,
        )
    finally:
        for name in slurm_cluster.job_names:
            slurm_cluster.cancel(name)
    _check_hang(result, time.time(), "rank 2 blocked in native code holding the GIL")


def test_hang_under_mpich(mpich: str) -> None:
    env = {**_mpi_env(free_port(), 1), **_hang_env(1)}
    result = run_bounded([*mpich_prefix(3, 1), sys.executable, str(FAULT_WORKER), "sleep"], JOB_TIMEOUT_S,
                         env=env, cwd=REPO)
    _check_hang(result, time.time(), "rank 1 running Python at")
