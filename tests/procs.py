"""Bounded subprocesses for tests: every process tree started here is killed at its deadline.

Each command runs in a new session (its own process group); on timeout the whole
group gets SIGTERM, then SIGKILL after a grace period, so launchers and their
children never outlive a test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
WORKERS = REPO / "tests" / "workers"
KILL_GRACE_S = 5.0
# Variables of an enclosing launcher that must not leak into a test's processes.
_LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "JSM_", "TORCHELASTIC_")
_LAUNCH_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "GROUP_WORLD_SIZE", "NODE_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_NAMES and not k.startswith(_LAUNCH_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    @property
    def output(self) -> str:
        return f"--- stdout\n{self.stdout[-6000:]}\n--- stderr\n{self.stderr[-6000:]}"


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the process group, SIGKILL it after the grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        list(cmd), env=dict(env) if env is not None else clean_env(), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout_s: float, started: float | None = None) -> Result:
    """Wait for ``proc`` at most ``timeout_s``; kill its tree past that."""
    started = time.monotonic() if started is None else started
    try:
        out, err = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        timed_out = True
    return Result(proc.returncode, out, err, time.monotonic() - started, timed_out)


def run(cmd: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None) -> Result:
    """Run ``cmd`` to completion, bounded by ``timeout_s`` (the tree is killed past it)."""
    started = time.monotonic()
    return finish(start(cmd, env), timeout_s, started)


def free_port() -> int:
    """A port free right now (tests only: the launcher-under-test binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_envs(world_size: int, port: int, **extra: str) -> list[dict[str, str]]:
    """Hand-set torch variables for ``world_size`` local ranks (a shell-loop launcher)."""
    return [clean_env(RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_RANK=str(r),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **extra) for r in range(world_size)]
