"""Coordinated stop with real launchers: the preemptible example under torchrun, a signal
to one worker or to torchrun's agent, and a torchrun restart (``--max-restarts 1``).

Every job is bounded: the whole process tree is killed at its deadline (tests/procs.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from procs import REPO, TORCHRUN, WORKERS, BoundedProcess, clean_env, process_tree

pytestmark = pytest.mark.processes

EXAMPLE = str(REPO / "examples" / "preemptible_train.py")
JOB_TIMEOUT_S = 120.0
# torchrun's agent gives its workers this long after forwarding SIGTERM, then SIGKILLs them.
AGENT_GRACE_S = 30.0


def _wait_for(job: BoundedProcess, text: str, count: int, timeout_s: float) -> str:
    """Poll the job's stderr until ``text`` appears ``count`` times (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        err = job.output()[1]
        if err.count(text) >= count:
            return err
        if job.poll() is not None:
            break
        time.sleep(0.1)
    job.kill()
    out, err = job.output()
    pytest.fail(f"{count} x {text!r} not seen within {timeout_s:.0f}s\n--- stdout\n{out}\n--- stderr\n{err}")


def _worker_pid(root: int, rank: int) -> int:
    """The pid of the worker with RANK=rank among ``root``'s descendants."""
    for pid in process_tree(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        is_worker = b"preemptible_train.py" in cmdline and b"torchrun" not in cmdline
        if is_worker and f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under pid {root}")


def _finish(job: BoundedProcess, timeout_s: float) -> tuple[int, str]:
    try:
        code = job.popen.wait(timeout=timeout_s)
    except Exception:
        job.kill()
        raise
    out, err = job.output()
    job.close()
    return code, out + err


def _records(out: Path, world_size: int) -> list[dict[str, object]]:
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    return records


def _run_example(ckpt: Path, steps: int = 400) -> BoundedProcess:
    return BoundedProcess(
        [TORCHRUN, "--nproc-per-node", "4", EXAMPLE, "--ckpt-dir", str(ckpt), "--steps", str(steps)],
        env=clean_env(), cwd=REPO,
    )


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_example_signal_to_one_worker_stops_all_at_one_step_then_resumes(signum: int, tmp_path: Path) -> None:
    name = signal.Signals(signum).name
    job = _run_example(tmp_path)
    _wait_for(job, "training from step 0", 4, JOB_TIMEOUT_S)
    os.kill(_worker_pid(job.popen.pid, 2), signum)
    signalled = time.monotonic()
    code, output = _finish(job, JOB_TIMEOUT_S)
    assert code == 0, output
    assert time.monotonic() - signalled < 30, output
    records = _records(tmp_path, 4)
    steps = {r["step"] for r in records}
    assert len(steps) == 1, records  # every rank stopped at the same step
    (step,) = steps
    assert isinstance(step, int) and 0 < step < 400
    assert all(r["reason"] == f"{name} on rank 2" for r in records), records
    assert output.count(f"stopping at step {step}: {name} on rank 2") == 4, output
    assert "left the runtime after the agreed stop" in output
    assert (tmp_path / "model.pt").exists()

    # The next run resumes from the checkpoint and finishes.
    job = _run_example(tmp_path, steps=step + 5)
    code, output = _finish(job, JOB_TIMEOUT_S)
    assert code == 0, output
    assert output.count(f"training from step {step} (restart_count 0)") == 4, output
    records = _records(tmp_path, 4)
    assert all(r["step"] == step + 5 and not r["stopped"] for r in records), records


def test_sigterm_to_torchrun_agent_checkpoints_before_its_grace_period(tmp_path: Path) -> None:
    job = _run_example(tmp_path)
    _wait_for(job, "training from step 0", 4, JOB_TIMEOUT_S)
    os.kill(job.popen.pid, signal.SIGTERM)  # the agent forwards it to every worker
    signalled = time.monotonic()
    code, output = _finish(job, JOB_TIMEOUT_S)
    elapsed = time.monotonic() - signalled
    assert elapsed < AGENT_GRACE_S, f"took {elapsed:.1f}s\n{output}"
    assert code != 0  # torchrun itself reports that it was terminated
    records = _records(tmp_path, 4)
    steps = {r["step"] for r in records}
    assert len(steps) == 1 and all(r["stopped"] for r in records), records
    assert all(str(r["reason"]).startswith("SIGTERM on rank ") for r in records), records
    assert (tmp_path / "model.pt").exists()


def test_torchrun_restart_starts_clean_and_counts(tmp_path: Path) -> None:
    job = BoundedProcess(
        [TORCHRUN, "--nproc-per-node", "4", "--max-restarts", "1",
         str(WORKERS / "restart_job.py"), str(tmp_path)],
        env=clean_env(), cwd=REPO,
    )
    code, output = _finish(job, JOB_TIMEOUT_S)
    assert code == 0, output
    assert "rank 1 fails in round 0 on purpose" in output  # round 0 did fail
    records = _records(tmp_path, 4)
    assert all(r["restart_count"] == 1 and r["sum"] == 4.0 for r in records), records
