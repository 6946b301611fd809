"""The ``distruntime`` command: ``env`` on crafted environments, ``doctor`` end to end.

The subprocess tests run the real command (``python -m distruntime``) with ``env=``
set to a crafted environment; each is bounded, and on its deadline every process it
started (the ``--nproc`` parent's children included, which live in their own
sessions) is killed.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence

import pytest

from distruntime.cli import main
from distruntime.cli._format import format_bytes, parse_bytes, render_table
from distruntime.cli.doctor import _lookup_check, bus_bandwidth, iterations_for, message_sizes
from distruntime.cli.envreport import build_env_report, render_env_report, tuning_variables
from distruntime.cli.local import child_environment
from procs import PYTHON, Result, alive, clean_env, finish, kill_tree, start

CLI = [PYTHON, "-m", "distruntime"]

TORCHRUN_ENV = {
    "TORCHELASTIC_RUN_ID": "job42", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2",
    "MASTER_ADDR": "node1", "MASTER_PORT": "29400", "TORCHELASTIC_USE_AGENT_STORE": "True",
}
SLURM_ENV = {
    "SLURM_JOB_ID": "777", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NNODES": "2",
    "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "NCCL_DEBUG": "INFO", "GLOO_SOCKET_IFNAME": "eth0",
}
PARTIAL_ENV = {"RANK": "1"}
CONFLICT_ENV = {**SLURM_ENV, "RANK": "2", "WORLD_SIZE": "8"}


def run_cli(args: Sequence[str], env: Mapping[str, str], timeout_s: float = 60.0) -> Result:
    """``python -m distruntime ARGS`` with exactly ``env`` (plus PATH), bounded in time.

    Past ``timeout_s`` the process's descendants (other sessions included) get SIGKILL,
    then its own group is killed.
    """
    proc = start([*CLI, *args], clean_env(**env))
    started = time.monotonic()
    try:
        return finish(proc, timeout_s, started)
    finally:
        kill_tree(proc.pid, grace_s=1.0)  # descendants in other sessions too


# --------------------------------------------------------------------------- pure helpers
def test_render_table_aligns_columns() -> None:
    text = render_table(["a", "bb"], [["xxx", 1], ["y", None]])
    assert text.splitlines() == ["a    bb", "---  --", "xxx  1", "y    -"]


@pytest.mark.parametrize(("text", "expected"), [("4", 4), ("64K", 65536), ("64M", 64 * 1024**2),
                                                ("1 GiB", 1024**3), ("2kb", 2048)])
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected
    assert parse_bytes(format_bytes(expected).replace(" ", "")) == expected


@pytest.mark.parametrize("text", ["", "M", "-4", "4X", "0", "1.5M"])
def test_parse_bytes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=f"{text!r} (is not a size|must be at least 1 byte)"):
        parse_bytes(text)


def test_message_sizes_cover_4_bytes_to_64_mib() -> None:
    sizes = message_sizes(4, 64 * 1024**2, 4)
    assert sizes[0] == 4 and sizes[-1] == 64 * 1024**2 and len(sizes) == 13
    assert all(b == a * 4 for a, b in itertools.pairwise(sizes))


def test_iterations_shrink_for_large_messages_and_agree_across_ranks() -> None:
    assert iterations_for(4, 20) == 20
    assert iterations_for(64 * 1024**2, 20) == 4
    assert iterations_for(1024**3, 20) == 2


@pytest.mark.parametrize(("world", "factor"), [(1, 0.0), (2, 1.0), (4, 1.5), (8, 1.75)])
def test_bus_bandwidth_follows_nccl_tests(world: int, factor: float) -> None:
    algbw, busbw = bus_bandwidth(2_000_000_000, 2.0, world)
    assert algbw == pytest.approx(1.0)
    assert busbw == pytest.approx(factor)


def test_lookup_check_warns_about_a_slow_resolver() -> None:
    fast = [{"rank": 0, "reverse_lookup_s": 0.001}, {"rank": 1, "reverse_lookup_s": 0.002}]
    assert _lookup_check(fast).status == "OK"
    slow = [{"rank": 0, "reverse_lookup_s": 0.001}, {"rank": 1, "reverse_lookup_s": 2.0},
            {"rank": 2, "reverse_lookup_s": 1.5}]
    check = _lookup_check(slow)
    assert check.status == "WARN" and "2.0s+ on ranks 1-2" in check.detail
    assert _lookup_check([{"rank": 0, "reverse_lookup_s": None}]).status == "INFO"


def test_child_environment_replaces_launcher_variables() -> None:
    env = child_environment({**SLURM_ENV, "RANK": "9", "PATH": "/bin", "OMP_NUM_THREADS": "4"}, 1, 3, 4242)
    assert not [k for k in env if k.startswith("SLURM_")]
    ranks = (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"])
    assert ranks == ("1", "3", "1", "3")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "4242")
    assert env["OMP_NUM_THREADS"] == "4"  # the user's choice is kept
    assert env["NCCL_DEBUG"] == "INFO"  # tuning variables pass through


def test_tuning_variables_pick_nccl_gloo_torch() -> None:
    env = {"NCCL_IB_DISABLE": "1", "GLOO_SOCKET_IFNAME": "lo", "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
           "TORCHELASTIC_RUN_ID": "x", "HOME": "/root"}
    assert list(tuning_variables(env)) == ["GLOO_SOCKET_IFNAME", "NCCL_IB_DISABLE", "TORCH_DISTRIBUTED_DEBUG"]


# --------------------------------------------------------------------------- env report, in process
def test_env_report_torchrun_names_each_source() -> None:
    report = build_env_report(TORCHRUN_ENV)
    assert report["ok"] is True and report["error"] is None
    launch = report["launch"]
    assert launch["launcher"] == "torchrun" and "TORCHELASTIC_RUN_ID" in launch["reason"]
    fields = launch["fields"]
    assert fields["rank"] == {"value": 3, "source": "RANK"}
    assert fields["node_rank"] == {"value": 1, "source": "GROUP_RANK"}
    assert fields["master_port"] == {"value": 29400, "source": "MASTER_PORT"}
    assert launch["agent_store"] is True
    assert report["backend"]["backend"] == "gloo" and report["backend"]["device"] == "cpu"
    assert report["variables"]["launch"]["TORCHELASTIC_RUN_ID"] == "job42"
    assert "HOME" not in report["variables"]["launch"]


def test_env_report_slurm_derives_address_and_local_world() -> None:
    report = build_env_report(SLURM_ENV)
    fields = report["launch"]["fields"]
    assert report["launch"]["launcher"] == "slurm"
    assert fields["rank"] == {"value": 5, "source": "SLURM_PROCID"}
    assert fields["master_addr"] == {"value": "gpu07", "source": "SLURM_STEP_NODELIST (first host)"}
    assert fields["local_world_size"]["value"] == 4
    assert report["variables"]["tuning"] == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_DEBUG": "INFO"}


def test_env_report_partial_environment_carries_the_error() -> None:
    report = build_env_report(PARTIAL_ENV)
    assert report["ok"] is False and report["launch"] is None
    assert report["error"]["type"] == "LaunchEnvError"
    assert report["error"]["variable"] == "WORLD_SIZE"
    text = render_env_report(report)
    assert "ERROR LaunchEnvError: RANK='1' is set but WORLD_SIZE is not" in text
    assert "exit status 1" in text


def test_env_report_backend_error_fails_the_report() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    report = build_env_report(env, backend="nccl")  # no CUDA here, two ranks: no fallback
    assert report["ok"] is False
    assert report["error"]["type"] == "BackendUnavailableError"


def test_main_without_a_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "{env,doctor,where,explain}" in capsys.readouterr().err


# --------------------------------------------------------------------------- env, subprocess
@pytest.mark.processes
def test_env_cli_torchrun_table() -> None:
    result = run_cli(["env"], TORCHRUN_ENV)
    assert result.returncode == 0, result.output
    out = result.stdout
    assert re.search(r"launcher\s+torchrun\s+TORCHELASTIC_RUN_ID is set", out), out
    assert re.search(r"rank\s+3\s+RANK", out) and re.search(r"node rank\s+1\s+GROUP_RANK", out), out
    assert re.search(r"master addr\s+node1\s+MASTER_ADDR", out), out
    assert re.search(r"backend\s+gloo", out) and "torch" in out and "distruntime env: OK" in out


@pytest.mark.processes
def test_env_cli_slurm_json_parses() -> None:
    result = run_cli(["env", "--json"], SLURM_ENV)
    assert result.returncode == 0, result.output
    report = json.loads(result.stdout)
    assert report["launch"]["launcher"] == "slurm"
    assert report["launch"]["fields"]["world_size"] == {"value": 8, "source": "SLURM_NTASKS"}
    assert report["launch"]["fields"]["master_port"]["source"] == "derived from SLURM_JOB_ID+SLURM_STEP_ID"
    assert report["versions"]["torch"] and report["host"]["hostname"]
    assert report["variables"]["tuning"]["NCCL_DEBUG"] == "INFO"


@pytest.mark.processes
def test_env_cli_partial_environment_exits_non_zero() -> None:
    result = run_cli(["env"], PARTIAL_ENV)
    assert result.returncode == 1, result.output
    assert "RANK='1' is set but WORLD_SIZE is not" in result.stdout


@pytest.mark.processes
def test_env_cli_conflict_json_names_both_variables() -> None:
    result = run_cli(["env", "--json"], CONFLICT_ENV)
    assert result.returncode == 1, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["error"]["type"] == "LaunchEnvError"
    assert "RANK=2 contradicts SLURM_PROCID=5" in report["error"]["message"]
    assert report["variables"]["launch"]["SLURM_PROCID"] == "5"


# --------------------------------------------------------------------------- doctor
@pytest.mark.processes
def test_doctor_nproc_2_end_to_end() -> None:
    result = run_cli(["doctor", "--nproc", "2", "--max-bytes", "4M", "--timeout", "90"], {}, timeout_s=100)
    assert result.returncode == 0, result.output
    out = result.stdout
    assert "2 rank(s), backend gloo" in out, out
    assert re.search(r"ranks joined\s+OK\s+2/2 ranks", out), out
    assert re.search(r"all_reduce correct\s+OK", out), out
    assert re.search(r"^4 MiB\s+1048576\s+float32", out, re.MULTILINE), out
    assert out.rstrip().endswith("doctor: all checks passed"), out
    assert "all_reduce 1/" in result.stderr  # progress goes to stderr


@pytest.mark.processes
def test_doctor_bad_environment_fails_clearly() -> None:
    result = run_cli(["doctor"], PARTIAL_ENV, timeout_s=60)
    assert result.returncode == 1, result.output
    expected = r"launch environment\s+FAIL\s+LaunchEnvError: RANK='1' is set but WORLD_SIZE"
    assert re.search(expected, result.stdout), result.output
    assert "doctor: FAILED (launch environment)" in result.stdout


@pytest.mark.processes
def test_doctor_names_the_missing_rank() -> None:
    from procs import free_port

    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # --timeout counts from process start: importing a CUDA build of torch (the
    # minimum-version CI job) takes seconds on a loaded machine, so leave it room.
    result = run_cli(["doctor", "--timeout", "24"], env, timeout_s=60)
    assert result.returncode == 1, result.output
    assert re.search(r"start-up\s+FAIL\s+RendezvousError: .*missing ranks: 1", result.stdout), result.output
    assert result.seconds < 40, result.seconds


@pytest.mark.processes
def test_doctor_nproc_refuses_to_run_inside_a_multi_rank_launch() -> None:
    result = run_cli(["doctor", "--nproc", "2"], TORCHRUN_ENV, timeout_s=60)
    assert result.returncode == 1, result.output
    assert "already rank 3 of 4 under torchrun" in result.stderr


@pytest.mark.processes
def test_doctor_nproc_timeout_kills_every_rank() -> None:
    # 10**7 iterations of a 4-byte all_reduce cannot finish in 20 s: the bound must act. (Not
    # 8 s: on a loaded 2-core machine a CUDA build of torch took 3 s to import, and the start-up
    # half of what was left, 1 s, did not cover rank 0's own store -- CI on torch 2.4.)
    args = ["doctor", "--nproc", "2", "--timeout", "20", "--iters", "10000000", "--max-bytes", "4"]
    result = run_cli(args, {}, timeout_s=90)
    assert result.returncode == 124, result.output
    assert result.seconds < 40, result.seconds
    assert "did not finish within its --timeout" in result.stderr or "timed out" in result.stderr
    started = re.search(r"pids ([\d ]+)", result.stderr)
    assert started is not None, result.output
    pids = [int(p) for p in started.group(1).split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "a rank outlived the doctor's --timeout"


@pytest.mark.processes
def test_console_script_reports_its_version() -> None:
    from pathlib import Path

    from distruntime import __version__

    script = Path(sys.executable).parent / "distruntime"
    proc = start([str(script), "--version"], clean_env())
    result = finish(proc, 60)
    assert result.returncode == 0, result.output
    assert result.stdout.strip() == f"distruntime {__version__}"
