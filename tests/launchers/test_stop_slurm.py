"""Coordinated stop on the project's real SLURM cluster (slurmctld + two slurmd).

``sbatch --requeue`` runs examples/preemptible_train.py on 4 ranks (2 nodes x 2 tasks
with srun). SIGUSR1 goes to one task only (rank 2, as SLURM's ``--signal=USR1@N``
preemption warning may reach one task first); every rank stops at one step, rank 0
writes the checkpoint and runs ``scontrol requeue``; SLURM runs the job again with
``SLURM_RESTART_COUNT=1``, and the example resumes from the checkpoint and completes.

SLURM holds a requeued job for its credential lifetime (``cred_expire``, 120 s by
default) before it may start again; the test lifts that hold with
``scontrol update JobId=... StartTime=now`` (an administrator's command) rather than
waiting. Every wait is bounded; the job is cancelled if the test fails.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PYTHON, REPO, SlurmCluster, check_ok, probe_out_dir, run_bounded

pytestmark = pytest.mark.launchers

EXAMPLE = REPO / "examples" / "preemptible_train.py"
JOB_TIMEOUT_S = 150.0
STEPS = 80


def _job_state(cluster: SlurmCluster, job_id: str) -> str:
    show = run_bounded(["scontrol", "show", "job", job_id], 10, env=cluster.job_env())
    return show.stdout


def _field(state: str, name: str) -> str:
    for word in state.split():
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
    return ""


def _task_pid(job_id: str, procid: int) -> int | None:
    """The pid of the example's task with SLURM_PROCID=procid in job ``job_id`` (same host)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"preemptible_train.py" in cmdline and b"srun" not in cmdline
                and f"SLURM_JOB_ID={job_id}".encode() in environ
                and f"SLURM_PROCID={procid}".encode() in environ):
            return int(entry.name)
    return None


def test_sbatch_requeue_resumes_from_the_checkpoint(slurm_cluster: SlurmCluster) -> None:
    with probe_out_dir() as ckpt:
        _run_requeue_job(slurm_cluster, ckpt)


def _run_requeue_job(cluster: SlurmCluster, ckpt: Path) -> None:
    name = cluster.new_job_name("requeue")
    output = ckpt / "job.out"
    script = ckpt / "job.sh"
    run = shlex.join([PYTHON, str(EXAMPLE), "--ckpt-dir", str(ckpt), "--steps", str(STEPS), "--requeue"])
    script.write_text(
        f"#!/bin/bash\nset -e\necho RUN restart_count=${{SLURM_RESTART_COUNT:-0}}\nsrun {run}\n"
    )
    env = cluster.job_env()
    submitted = check_ok(run_bounded(
        ["sbatch", "--parsable", "--requeue", "--open-mode=append", f"--job-name={name}",
         f"--output={output}", "--nodes=2", "--ntasks-per-node=2", str(script)],
        30, env=env, cwd=REPO,
    ), "sbatch")
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    ok = False

    def log() -> str:
        return output.read_text(errors="replace") if output.exists() else "(no output yet)"

    def job_state() -> str:
        return _field(_job_state(cluster, job_id), "JobState")

    def wait_until(what: str, done: object) -> None:
        while time.monotonic() < deadline:
            if callable(done) and done():
                return
            time.sleep(0.2)
        pytest.fail(f"job {job_id}: {what} did not happen in time\n{_job_state(cluster, job_id)}\n{log()}")

    try:
        # Run 0: all four ranks train; then SIGUSR1 to rank 2 only.
        wait_until("4 ranks training", lambda: log().count("training from step 0 (restart_count 0)") == 4)
        pid = _task_pid(job_id, 2)
        assert pid is not None, f"rank 2's process not found\n{log()}"
        os.kill(pid, signal.SIGUSR1)
        wait_until("the requeue", lambda: _field(_job_state(cluster, job_id), "Restarts") == "1")
        first = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in range(4)]
        steps = {r["step"] for r in first}
        assert len(steps) == 1 and all(r["reason"] == "SIGUSR1 on rank 2" for r in first), first
        (stop_step,) = steps
        assert "requeued SLURM job" in log(), log()
        # Lift SLURM's hold on the requeued job (BeginTime = now + cred_expire) once it is
        # pending again; an update made while the first run is still ending is overwritten.
        wait_until("the job pending again", lambda: job_state() == "PENDING")
        # slurmd refuses a launch whose credential is not newer than the job's revocation at
        # requeue (one-second resolution): a start forced within that second fails the job
        # outright (FAILED, ExitCode 1:0, RunTime 0); the revocation reaches slurmd a little
        # after the controller shows the job pending. Leave a margin of seconds.
        time.sleep(5.0)

        def started() -> bool:
            if job_state() != "PENDING":
                return True
            run_bounded(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], 10, env=env)
            time.sleep(1.0)
            return False

        wait_until("the second run's start", started)
        ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
        wait_until("the second run's end", lambda: job_state() in ended)
        state = _job_state(cluster, job_id)
        assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, f"{state}\n{log()}"
        text = log()
        assert "RUN restart_count=1" in text, text
        assert text.count(f"training from step {stop_step} (restart_count 1)") == 4, text
        second = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in range(4)]
        finished = [r["step"] == STEPS and r["restart_count"] == 1 and not r["stopped"] for r in second]
        assert all(finished), second
        ok = True
    finally:
        if not ok:
            cluster.cancel(name)
