"""Launch discovery on environment dicts: every launcher, its provenance, and bad input.

The env dicts follow what each launcher really set on this machine kind
(../shared/launchers/dumps/); the real launchers run in tests/launchers/.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distruntime.errors import LaunchEnvError
from distruntime.launchers import LaunchEnv, derive_port, discover, missing_mpi_rendezvous

TORCHRUN = {
    "TORCHELASTIC_RUN_ID": "4082ed9b", "TORCHELASTIC_USE_AGENT_STORE": "True",
    "TORCHELASTIC_RESTART_COUNT": "0", "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
    "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2",
    "MASTER_ADDR": "node1", "MASTER_PORT": "36425",
}
# srun -N 2 --ntasks-per-node 2, task 2 (first task on n2)
SLURM_STEP = {
    "SLURM_JOB_ID": "3", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NNODES": "2",
    "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_GTIDS": "2,3", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NAME": "probe",
}
SLURM_BATCH = {
    "SLURM_JOB_ID": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
    "SLURM_GTIDS": "0", "SLURM_NODELIST": "n[1-2]", "SLURM_NNODES": "2",
}
OPENMPI_2NODES = {
    "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_ess_base_jobid": "963051521",
    "PMIX_RANK": "2", "MASTER_ADDR": "127.0.0.1",
}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4",
         "PMI_FD": "8", "MASTER_PORT": "29541"}
MVAPICH = {"MV2_COMM_WORLD_RANK": "5", "MV2_COMM_WORLD_SIZE": "8", "MV2_COMM_WORLD_LOCAL_RANK": "1",
           "MV2_COMM_WORLD_LOCAL_SIZE": "4", "MPIRUN_ID": "77", "MASTER_ADDR": "h1"}
LSF = {"LSB_JOBID": "4242", "JSM_NAMESPACE_RANK": "6", "JSM_NAMESPACE_SIZE": "8",
       "JSM_NAMESPACE_LOCAL_RANK": "2", "JSM_NAMESPACE_LOCAL_SIZE": "4",
       "LSB_MCPU_HOSTS": "batch1 1 c01 4 c02 4"}
KUBEFLOW = {"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}


def fields(env: LaunchEnv) -> tuple[object, ...]:
    return (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size,
            env.node_rank, env.num_nodes, env.master_addr, env.master_port)


def test_plain_python_is_one_process_without_port() -> None:
    env = discover({"HOME": "/root", "PATH": "/usr/bin"})
    assert fields(env) == ("none", 0, 1, 0, 1, 0, 1, None, None)
    assert "single process" in env.reason


def test_torchrun_multi_node() -> None:
    env = discover(TORCHRUN)
    assert fields(env) == ("torchrun", 3, 4, 1, 2, 1, 2, "node1", 36425)
    assert env.agent_store
    assert env.source("node_rank") == "GROUP_RANK"
    assert env.run_id == "torchrun-4082ed9b-0-4@36425"  # round: restart count, world, store port


def test_torchrun_inside_slurm_step_wins() -> None:
    # The agent task's SLURM values describe the agent, not the worker (dumps/slurm-torchrun.txt).
    agent_slurm = {**SLURM_STEP, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                   "SLURM_NTASKS_PER_NODE": "1", "SLURM_GTIDS": "1"}
    env = discover({**agent_slurm, **TORCHRUN})
    assert fields(env)[:3] == ("torchrun", 3, 4)


def test_slurm_srun_task() -> None:
    env = discover(SLURM_STEP)
    assert fields(env)[:7] == ("slurm", 2, 4, 0, 2, 1, 2)
    assert env.master_addr == "n1"
    assert env.source("master_addr") == "SLURM_STEP_NODELIST (first host)"
    assert env.master_port == derive_port("3/0")
    assert env.source("rank") == "SLURM_PROCID"


def test_slurm_port_and_address_overrides() -> None:
    env = discover({**SLURM_STEP, "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29400"})
    assert (env.master_addr, env.master_port) == ("10.0.0.9", 29400)


def test_slurm_uneven_split_uses_tasks_per_node() -> None:
    # srun -N 2 -n 4 places 3+1 (SLURM_TASKS_PER_NODE=3,1); no SLURM_GTIDS here.
    env = {**SLURM_STEP, "SLURM_PROCID": "3", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "3,1"}
    del env["SLURM_GTIDS"]
    assert discover(env).local_world_size == 1


def test_slurm_batch_script_is_a_single_process() -> None:
    env = discover(SLURM_BATCH)
    assert fields(env)[:3] == ("none", 0, 1)
    assert "batch script" in env.reason


def test_openmpi_two_nodes() -> None:
    env = discover(OPENMPI_2NODES)
    assert fields(env) == ("openmpi", 2, 4, 0, 2, 1, 2, "127.0.0.1", derive_port("963051521"))
    assert env.source("node_rank").startswith("derived")


def test_openmpi_single_node_uses_loopback() -> None:
    env = {**OPENMPI_2NODES, "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
    del env["MASTER_ADDR"]
    assert discover(env).master_addr == "127.0.0.1"


def test_mpi_on_several_nodes_needs_master_addr() -> None:
    env = dict(OPENMPI_2NODES)
    del env["MASTER_ADDR"]
    with pytest.raises(LaunchEnvError, match=r"MASTER_ADDR not set: openmpi started 4 ranks on 2 nodes"
                       r".*pip install 'distruntime\[mpi\]'.*export MASTER_ADDR on every rank"
                       r" \(mpirun -x MASTER_ADDR") as info:
        discover(env)
    assert info.value.variable == "MASTER_ADDR"
    assert missing_mpi_rendezvous(env) == ("MASTER_ADDR", "MASTER_PORT")
    assert missing_mpi_rendezvous(OPENMPI_2NODES) == ("MASTER_PORT",)


def test_mpich_on_several_nodes_names_both_variables() -> None:
    env = {k: v for k, v in MPICH.items() if not k.startswith("MASTER_")}
    env["MPI_LOCALNRANKS"] = "2"
    with pytest.raises(LaunchEnvError, match=r"MASTER_ADDR and MASTER_PORT not set: mpich started 4 ranks "
                       r"on 2 nodes.*-genv MASTER_ADDR"):
        discover(env)
    assert missing_mpi_rendezvous(env) == ("MASTER_ADDR", "MASTER_PORT")
    assert missing_mpi_rendezvous(MPICH) == ()  # one node: derived, not broadcast


def test_openmpi5_port_from_pmix_namespace() -> None:
    env = {k: v for k, v in OPENMPI_2NODES.items() if k not in ("OMPI_MCA_ess_base_jobid", "MASTER_PORT")}
    env["PMIX_NAMESPACE"] = "prterun-vm-123@1"
    launch = discover(env)
    assert launch.master_port == derive_port("prterun-vm-123@1")
    assert launch.source("master_port") == "derived from PMIX_NAMESPACE"
    assert launch.run_id == "openmpi-prterun-vm-123@1"


def test_port_range_narrows_derived_ports() -> None:
    env = {**OPENMPI_2NODES, "DISTRUNTIME_PORT_RANGE": "31000-31000"}
    assert discover(env).master_port == 31000
    with pytest.raises(LaunchEnvError, match=r"DISTRUNTIME_PORT_RANGE='80-90' is not a port range") as info:
        discover({**env, "DISTRUNTIME_PORT_RANGE": "80-90"})
    assert info.value.variable == "DISTRUNTIME_PORT_RANGE"


def test_mpich_hydra() -> None:
    assert fields(discover(MPICH)) == ("mpich", 1, 4, 1, 4, 0, 1, "127.0.0.1", 29541)


def test_mpich_without_port_says_how_to_pass_one() -> None:
    env = {k: v for k, v in MPICH.items() if k != "MASTER_PORT"}
    # No MPI launcher process above this test process: nothing to derive a port from.
    with pytest.raises(LaunchEnvError, match=r"MASTER_PORT not set: mpich sets no job id variable and no "
                       r"MPI launcher process .* was found.*-genv MASTER_PORT"):
        discover(env)


def test_srun_pmi2_is_slurm_not_mpich() -> None:
    env = discover({**SLURM_STEP, "PMI_RANK": "2", "PMI_SIZE": "4", "PMI_FD": "5"})
    assert env.launcher == "slurm"


def test_mpirun_inside_slurm_is_mpi() -> None:
    # Open MPI starts its daemons with srun: the SLURM step describes a daemon.
    daemon_step = {**SLURM_STEP, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}
    assert discover({**daemon_step, **OPENMPI_2NODES}).launcher == "openmpi"


def test_mvapich() -> None:
    assert fields(discover(MVAPICH)) == ("mvapich", 5, 8, 1, 4, 1, 2, "h1", derive_port("77"))


def test_lsf_uses_first_compute_host() -> None:
    env = discover(LSF)
    assert fields(env) == ("lsf", 6, 8, 2, 4, 1, 2, "c01", derive_port("4242"))


def test_kubeflow_one_process_per_pod() -> None:
    env = discover(KUBEFLOW)
    assert fields(env) == ("env", 2, 3, 0, 1, 2, 3, "job-master-0", 23456)


def test_hand_set_env_agreeing_with_slurm() -> None:
    env = discover({**SLURM_STEP, "RANK": "2", "WORLD_SIZE": "4"})
    assert (env.launcher, env.rank) == ("slurm", 2)


@pytest.mark.parametrize(
    ("extra", "named"),
    [({"RANK": "1", "WORLD_SIZE": "4"}, r"RANK=1 contradicts SLURM_PROCID=2"),
     ({"RANK": "2", "WORLD_SIZE": "8"}, r"WORLD_SIZE=8 contradicts SLURM_STEP_NUM_TASKS=4")],
)
def test_conflict_between_launchers_names_both(extra: dict[str, str], named: str) -> None:
    with pytest.raises(LaunchEnvError, match=named):
        discover({**SLURM_STEP, **extra})


BAD_ENVS = [
    ({"RANK": "1"}, "WORLD_SIZE", "partial"),
    ({"WORLD_SIZE": "4"}, "RANK", "partial"),
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, "RANK", "RANK and WORLD_SIZE are not"),
    ({**KUBEFLOW, "LOCAL_RANK": "0"}, "LOCAL_WORLD_SIZE", "partial"),
    ({**KUBEFLOW, "RANK": "two"}, "RANK", "not a non-negative integer"),
    ({**KUBEFLOW, "RANK": "-1"}, "RANK", "not a non-negative integer"),
    ({**KUBEFLOW, "WORLD_SIZE": "0"}, "WORLD_SIZE", "not a positive integer"),
    ({**KUBEFLOW, "RANK": "3"}, "RANK", "RANK=3 is not below WORLD_SIZE=3"),
    ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK", "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "8"}, "LOCAL_WORLD_SIZE", "exceeds"),
    ({**KUBEFLOW, "MASTER_PORT": "http"}, "MASTER_PORT", "not a positive integer"),
    ({**KUBEFLOW, "MASTER_PORT": "70000"}, "MASTER_PORT", "above 65535"),
    ({k: v for k, v in KUBEFLOW.items() if k != "MASTER_ADDR"}, "MASTER_ADDR", "MASTER_ADDR is not set"),
    ({**TORCHRUN, "MASTER_PORT": ""}, "MASTER_PORT", "MASTER_PORT is not set"),
    ({**SLURM_STEP, "SLURM_PROCID": "x"}, "SLURM_PROCID", "SLURM_PROCID='x'"),
    ({**SLURM_STEP, "SLURM_STEP_NODELIST": "n[1-"}, "SLURM_STEP_NODELIST", "not a valid SLURM hostlist"),
]


@pytest.mark.parametrize(("env", "variable", "message"), BAD_ENVS, ids=[m for _, _, m in BAD_ENVS])
def test_bad_input_names_variable_value_and_fix(env: dict[str, str], variable: str, message: str) -> None:
    with pytest.raises(LaunchEnvError) as info:
        discover(env)
    text = str(info.value)
    assert message in text
    assert variable in text
    assert "Fix" in text or "Expected" in text
    assert info.value.variable == variable


_NAMES = st.sampled_from([
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
    "GROUP_WORLD_SIZE", "NODE_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
    "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID",
    "SLURM_NNODES", "SLURM_GTIDS", "SLURM_STEP_NODELIST", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
    "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "JSM_NAMESPACE_RANK", "JSM_NAMESPACE_LOCAL_RANK",
    "LSB_MCPU_HOSTS", "LSB_JOBID",
])
_VALUES = st.one_of(
    st.integers(min_value=-3, max_value=70000).map(str),
    st.text(alphabet=string.ascii_letters + string.digits + "[]-,() x", max_size=12),
)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(_NAMES, _VALUES, max_size=14))
def test_any_environment_yields_a_launch_env_or_our_error(env: dict[str, str]) -> None:
    try:
        found = discover(env)
    except LaunchEnvError as exc:
        assert str(exc)
        return
    assert 0 <= found.rank < found.world_size
    assert 0 <= found.local_rank < found.local_world_size <= found.world_size
    assert 0 <= found.node_rank < found.num_nodes
    if found.world_size > 1:
        assert found.master_addr and found.master_port and 0 < found.master_port <= 65535
