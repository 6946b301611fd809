"""``distruntime where``: a read-only look at a running job, and clear errors within seconds."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from distruntime.control.progress import flight_recorder_available
from procs import PYTHON, WORKERS, clean_env, free_port, kill_tree, rank_envs

pytestmark = pytest.mark.processes


def _where(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "distruntime", "where", *args], env=clean_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_where_shows_a_slow_job_without_disturbing_it() -> None:
    """Rank 1 works 15 s before a collective (under the 20 s threshold): ``where`` names it
    running Python at its line and rank 0 waiting in all_reduce; the job then passes."""
    port = free_port()
    envs = rank_envs(2, port, FAULT_RANK="1", HANG_TIMEOUT_S="20", SLOW_S="15")
    procs = [subprocess.Popen([PYTHON, str(WORKERS / "fault.py"), "slow"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for env in envs]
    seen = ""
    try:
        deadline = time.monotonic() + 120
        wanted = "all_reduce([4] float32)" if flight_recorder_available() else "#? all_reduce"
        while time.monotonic() < deadline and wanted not in seen:
            result = _where(f"127.0.0.1:{port}")
            seen = result.stdout + result.stderr
            time.sleep(1.0)
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p.pid)
    assert "snapshot of a running job" in seen, seen
    if flight_recorder_available():  # the op, once it has waited a quarter of the threshold
        assert "waiting in collective #2 all_reduce([4] float32) (group default)" in seen, seen
    else:  # no Flight Recorder: the op from the main thread's frame, no number, no shapes
        assert "waiting in collective #? all_reduce (group default)" in seen, seen
    assert "running Python at" in seen and "fault.py:" in seen, seen
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    assert all("DONE" in out and "HangError" not in out for out in outputs), "\n".join(outputs)


def test_where_with_nothing_listening_fails_fast() -> None:
    port = free_port()
    started = time.monotonic()
    result = _where(f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1
    assert f"nothing listens at 127.0.0.1:{port}" in result.stderr
    assert time.monotonic() - started < 15  # 2 s bound plus the interpreter's start


def test_where_on_a_port_that_is_not_a_store_fails_fast() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = _where(f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 1
    assert "does not answer as a rendezvous store" in result.stderr
    assert time.monotonic() - started < 15


def test_where_needs_an_address() -> None:
    result = _where()
    assert result.returncode == 1
    assert "no job address: pass HOST:PORT" in result.stderr
