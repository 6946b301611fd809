"""Bounded subprocesses for tests: every process tree started here is killed at its deadline.

Commands run in a new session; on timeout the whole *tree* gets SIGTERM, then SIGKILL
after a grace period. The tree is found by walking parent links in /proc as well as by
session, because torchrun starts its workers in sessions of their own (``killpg`` on
the launcher alone would orphan them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
WORKERS = REPO / "tests" / "workers"
KILL_GRACE_S = 5.0
OUTPUT_TAIL_CHARS = 6000

# Variables a launcher sets for its workers: removed from the environment tests hand
# to a launcher, so a test run from inside a job (or a shell with MASTER_PORT set)
# does not leak into the case.
_LAUNCHER_VAR_PREFIXES = (
    "SLURM_", "SLURMD_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL",
    "HYDRA_", "HYDI_", "MV2_", "JSM_", "TORCHELASTIC_",
)
_LAUNCHER_VARS = {
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
}


def clean_env(extra: Mapping[str, str] | None = None, **more: str) -> dict[str, str]:
    """os.environ without launcher variables, plus ``extra`` and ``more``.

    Sets OMP_NUM_THREADS=1 (several ranks on 2 cores), unbuffered Python output, and
    puts the repo's ``src`` first on PYTHONPATH so workers import this checkout.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_VAR_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")
    src = str(REPO / "src")
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = src if not old else f"{src}{os.pathsep}{old}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    env.update(more)
    return env


def free_port() -> int:
    """A port free right now (tests only: the launcher-under-test binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def rank_envs(world_size: int, port: int, **extra: str) -> list[dict[str, str]]:
    """Hand-set torch variables for ``world_size`` local ranks (a shell-loop launcher)."""
    return [clean_env(RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_RANK=str(r),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **extra) for r in range(world_size)]


def tail(text: str, limit: int = OUTPUT_TAIL_CHARS) -> str:
    return text if len(text) <= limit else "...[cut]...\n" + text[-limit:]


def format_output(cmd: Sequence[str], stdout: str, stderr: str, returncode: int | None) -> str:
    """A readable block with the command, its exit status and its output tails."""
    return (
        f"command: {' '.join(cmd)}\n"
        f"exit status: {returncode}\n"
        f"--- stdout ---\n{tail(stdout)}\n"
        f"--- stderr ---\n{tail(stderr)}"
    )


class CommandTimeoutError(subprocess.TimeoutExpired):
    """A bounded command overran its limit; its process tree was killed.

    ``str()`` includes the output captured up to the kill.
    """

    def __init__(self, cmd: Sequence[str], timeout: float, stdout: str, stderr: str) -> None:
        super().__init__(list(cmd), timeout, output=stdout, stderr=stderr)

    def __str__(self) -> str:
        out = self.output if isinstance(self.output, str) else ""
        err = self.stderr if isinstance(self.stderr, str) else ""
        return f"timed out after {self.timeout:.0f} s; process tree killed\n" + format_output(
            self.cmd, out, err, None
        )


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, sid) for every process, from /proc."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ...": comm may contain spaces
        fields = stat[stat.rfind(")") + 2 :].split()
        try:
            table[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[3]))
        except (IndexError, ValueError):
            continue
    return table


def process_tree(root: int) -> set[int]:
    """``root``, its descendants, and every process in root's session or group.

    torchrun starts its workers in new sessions, and ``timeout`` moves itself
    to its own process group, so neither killpg nor the session alone is
    enough: walk the parent links as well.
    """
    table = _proc_table()
    found = {root} | {pid for pid, (_, pgid, sid) in table.items() if sid == root or pgid == root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is "alive" to kill(0) but is already dead
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
        return stat[stat.rfind(")") + 2 :].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(root: int, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM ``root``'s whole tree, wait up to ``grace_s``, then SIGKILL what is left."""
    targets = process_tree(root)
    me = os.getpid()
    targets.discard(me)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        # children forked meanwhile (e.g. by a signal handler) join the set
        table = _proc_table()
        targets |= {pid for pid, (ppid, _, _) in table.items() if ppid in targets}
        targets.discard(me)
        if not any(alive(pid) for pid in targets):
            return
        time.sleep(0.1)
    table = _proc_table()
    targets |= {pid for pid, (ppid, _, _) in table.items() if ppid in targets}
    targets.discard(me)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def kill_session_leftovers(sid: int, grace_s: float = 1.0) -> None:
    """Kill processes still in session ``sid`` after its leader ended.

    Matches on the session id only (never on the leader's pid, which may have
    been reused once the leader was reaped). Daemons that detached with
    setsid() (munged, slurmctld, slurmd) are in other sessions and stay.
    """
    me = os.getpid()
    targets = {pid for pid, (_, _, s) in _proc_table().items() if s == sid and pid not in (me, sid)}
    if not targets:
        return
    for pid in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(pid) for pid in targets):
        time.sleep(0.05)
    for pid in targets:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class BoundedProcess:
    """One command in its own session, output to temporary files, killable as a tree.

    Output goes to files, not pipes, so a grandchild that keeps the pipe open
    (a daemon, an orphaned worker) can never make the caller wait.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.cmd = [str(c) for c in cmd]
        # owned by this object and closed by close(), not a with-block
        self._out = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        self._err = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")  # noqa: SIM115
        self.popen = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            text=True,
        )
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return self.popen.poll()

    def kill(self) -> None:
        """Kill the whole tree (no-op if it already ended) and reap the root."""
        kill_tree(self.popen.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=KILL_GRACE_S)

    def output(self) -> tuple[str, str]:
        texts = []
        for f in (self._out, self._err):
            f.flush()
            f.seek(0)
            texts.append(f.read())
        return texts[0], texts[1]

    def close(self) -> None:
        self._out.close()
        self._err.close()

    def result(self) -> subprocess.CompletedProcess[str]:
        rc = self.popen.returncode
        assert rc is not None, "result() before the process ended"
        out, err = self.output()
        return subprocess.CompletedProcess(self.cmd, rc, out, err)


def run_bounded(
    cmd: Sequence[str],
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in a new session; never longer than ``timeout_s``.

    Returns the completed process (any exit status) with its output. On
    timeout the whole process tree is killed (SIGTERM, SIGKILL after 5 s) and
    :class:`CommandTimeoutError` is raised with the output captured so far.
    Stray processes the command leaves in its session are killed too.
    """
    proc = BoundedProcess(cmd, env=env, cwd=cwd)
    try:
        try:
            proc.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.output()
            raise CommandTimeoutError(proc.cmd, timeout_s, out, err) from None
        # the command ended; anything it left behind in its session goes too
        kill_session_leftovers(proc.popen.pid)
        return proc.result()
    finally:
        if proc.popen.returncode is None:
            proc.kill()
        proc.close()




# ---------------------------------------------------------------- pipes, for live output
@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool

    @property
    def output(self) -> str:
        return f"--- stdout\n{tail(self.stdout)}\n--- stderr\n{tail(self.stderr)}"


def start(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``cmd`` in its own session with pipes (for tests that read output live)."""
    return subprocess.Popen(
        list(cmd), env=dict(env) if env is not None else clean_env(), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout_s: float, started: float | None = None) -> Result:
    """Wait for ``proc`` at most ``timeout_s``; kill its whole tree past that."""
    started = time.monotonic() if started is None else started
    try:
        out, err = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        timed_out = True
    return Result(proc.returncode, out, err, time.monotonic() - started, timed_out)


def run(cmd: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None) -> Result:
    """Run ``cmd`` to completion, bounded by ``timeout_s`` (the tree is killed past it)."""
    started = time.monotonic()
    return finish(start(cmd, env), timeout_s, started)
