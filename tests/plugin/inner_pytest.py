"""Running inner pytest sessions (the plugin under test) in bounded subprocesses.

Rank processes live in sessions of their own (the plugin kills them by process group),
so killing the inner pytest's process group would not reach them. On timeout the whole
process *tree* is killed instead: every process descending from the inner pytest,
found through ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Variables of an enclosing run that must not reach the inner sessions.
_DROPPED = (
    "PYTEST_ADDOPTS",
    "PYTEST_XDIST_WORKER",
    "PYTEST_XDIST_WORKER_COUNT",
    "PYTEST_XDIST_TESTRUNUID",
    "PYTEST_CURRENT_TEST",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux ``/proc``), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_tree(root: int) -> None:
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Inner:
    """The outcome of one inner pytest session."""

    returncode: int
    output: str
    seconds: float

    def has(self, *fragments: str) -> bool:
        return all(f in self.output for f in fragments)

    def line_of(self, prefix: str) -> str:
        """The summary line (from -rA) that starts with ``prefix``."""
        for line in self.output.splitlines():
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r} in:\n{self.output}")


class InnerRunner:
    """Start ``python -m pytest`` in a project directory, bounded by a timeout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.procs: list[subprocess.Popen[str]] = []

    def write(self, **files: str) -> None:
        """Write ``name=source`` pairs as ``name.py`` into the project directory."""
        for name, source in files.items():
            (self.path / f"{name}.py").write_text(textwrap.dedent(source))

    def start(
        self, *args: str, env: dict[str, str] | None = None, runner: tuple[str, ...] = ("-m", "pytest"),
        cache: bool = False,
    ) -> subprocess.Popen[str]:
        """``runner``: what runs pytest (e.g. ``-m coverage run -m pytest``); ``cache``: keep --lf data."""
        environ = {k: v for k, v in os.environ.items() if k not in _DROPPED}
        environ["COLUMNS"] = "400"  # summary lines untruncated
        environ.update(env or {})
        proc = subprocess.Popen(
            [
                sys.executable,
                *runner,
                *(() if cache else ("-p", "no:cacheprovider")),
                "-rA",
                "--color=no",
                f"--basetemp={self.path / 'inner-tmp'}",
                *args,
            ],
            cwd=self.path,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def run(
        self, *args: str, timeout: float, env: dict[str, str] | None = None,
        runner: tuple[str, ...] = ("-m", "pytest"), cache: bool = False,
    ) -> Inner:
        started = time.monotonic()
        proc = self.start(*args, env=env, runner=runner, cache=cache)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            out, _ = proc.communicate()
            pytest.fail(f"the inner pytest ran past {timeout}s; its process tree was killed.\n{out[-8000:]}")
        return Inner(proc.returncode, out, time.monotonic() - started)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.communicate()
