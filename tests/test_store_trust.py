"""Nothing read from the store may harm the host (docs/security.md), tested against live jobs.

A plain TCPStore client -- no code on the ranks -- writes random and adversarial values to
every key the library reads (check-ins, incidents, host answers, verdicts, failure records,
stop keys, the ``where`` pointer), at random moments, while a real 3-rank job runs, fails or
hangs. Afterwards:

* a sentinel process outside the job got no signal (it records every catchable one, and
  SIGKILL/SIGSTOP would show as its death or its stopped state); forged records name its pid,
  its process group (``-pgid``), ``-1``, ``0`` and ``1``;
* no file outside the job was written or created (forged records name such paths);
* no exception other than the library's named ones escaped (no ``JSONDecodeError`` and kin);
* the job ended as it would have: within its bound, with the exit status of its scenario.

Also here: the pid-reuse scenario (a rank's pid taken by another process is never signalled)
and the kill-duty race (a rank's own interrupt during the kill duty does not lose the kill).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from torch._C._distributed_c10d import TCPStore

from distruntime.control.channel import HostChannel, process_start_time
from distruntime.control.hostactions import kill_local_peer
from distruntime.control.protocol import POINTER_KEY
from procs import PYTHON, WORKERS, alive, clean_env, finish, free_port, kill_tree, rank_envs, start

pytestmark = pytest.mark.processes

_LIBRARY_ERRORS = {"PeerFailureError", "HangError", "ValueError", "SignalExit", "DistRuntimeError",
                   "UnevenStopCallsError"}
_FOREIGN_ERRORS = ("JSONDecodeError", "UnicodeDecodeError", "KeyError", "TypeError", "AttributeError",
                   "IndexError", "OverflowError", "RecursionError")

_SENTINEL = r"""
import os, signal, sys, time
mark = sys.argv[1]
def got(signum, frame):
    with open(mark, "a") as handle:
        handle.write(f"{signum}\n")
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT,
          signal.SIGABRT, signal.SIGALRM, signal.SIGCONT):
    signal.signal(s, got)
print("ready", flush=True)
time.sleep(300)
"""


def _sentinel(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    mark = tmp / "sentinel-signals.txt"
    proc = subprocess.Popen([PYTHON, "-c", _SENTINEL, str(mark)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, mark


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _values(rng: random.Random, pid: int, outside: Path) -> list[bytes]:
    """Adversarial values: garbage, wrong types, and well-formed records naming the sentinel."""
    victims = [pid, -pid, -1, 0, 1, 2**70, str(pid)]
    hostile = {
        "rank": 0, "host": socket.gethostname(), "pid": rng.choice(victims), "start": 1,
        "error_file": str(outside / rng.choice(["victim.json", "new.json"])), "world_size": 3,
        "where": "\x1b]52;c;aGk=\x07\x1b[2J job healthy\n rank 0 ok", "root": True,
        "what": "\x1b[31mforged\x1b[0m", "kind": "hang", "namespace": "distruntime/forged",
    }
    verdict = {
        "is_hang": True, "reason": "hang", "threshold_s": 1, "summary": "\x1b[2Jforged\nfake line",
        "ranks": [{"rank": r, "kind": rng.choice(["unresponsive", "stopped", "gil", "exited"]),
                   "detail": "forged", "pid": rng.choice(victims), "host": socket.gethostname(),
                   "stack": ["\x1b[2J"]} for r in range(3)],
        "hosts": [socket.gethostname()], "progress": [], "desyncs": [],
    }
    return [
        b"", b"not json", b"[]", b"null", b"1e999", b'{"rank": "x"}', b"\xff\xfe\x00garbage",
        b"A" * (2 << 20),  # 2 MiB
        b"{" * 100_000,  # deep nesting
        json.dumps(hostile).encode(), json.dumps(verdict).encode(),
        json.dumps({**hostile, "pid": -1, "rank": -7}).encode(),
        json.dumps({"rank": 1, "root": True, "what": 5}).encode(),
        b"0:99999999999999999999\n-1:5\nx:y\n" * 10,
    ]


def _keys(namespace: str, rng: random.Random, family: str) -> list[str]:
    k = rng.randint(1, 4)
    if family == "counters":
        # The counters the ranks ADD to. torch's store server drops the connection of any
        # client whose ADD meets a non-number (raw torch's own counters too): the job is
        # disrupted as raw torch's would be, and every rank must still end within its bound.
        keys = [f"st/{k}/ranks", "failed/n", "done/count", "stop/left_count", "stop/checked"]
    else:
        host = rng.choice(["0" * 16, "ffffffffffffffff", "../../etc"])
        keys = [f"who/{rng.randint(0, 3)}", f"ev/{k}", f"vd/{k}", f"st/{k}/{host}", f"st/{k}/hosts",
                "failed/root", "failed/log", f"failed/exited/{rng.randint(0, 2)}",
                "stop/left", "stop/waiting", f"stop/reason/{rng.randint(0, 2)}", "stop/all_left"]
    return [f"{namespace}/{key}" for key in keys] + [POINTER_KEY]


def _fuzz(port: int, stop: threading.Event, pid: int, outside: Path, seed: int, log: list[str],
          family: str) -> None:
    rng = random.Random(seed)
    store = TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                     timeout=timedelta(seconds=10))
    namespace = ""
    while not stop.is_set() and not namespace:  # the real namespace, from the job's own pointer
        try:
            if store.check([POINTER_KEY]):
                namespace = json.loads(store.get(POINTER_KEY))["namespace"]
        except Exception as error:
            log.append(f"pointer: {error}")
        stop.wait(0.1)
    while not stop.is_set():
        key = rng.choice(_keys(namespace, rng, family))
        value = rng.choice(_values(rng, pid, outside))
        try:
            if rng.random() < 0.3:
                store.append(key, value)
            else:
                store.set(key, value)
            log.append(key)
        except Exception as error:
            log.append(f"store gone: {error}")
            return
        stop.wait(rng.uniform(0.0, 0.15))


@pytest.mark.parametrize("family", ["records", "counters"])
@pytest.mark.parametrize("mode", ["ok", "raise", "hang"])
def test_forged_records_kill_nothing_write_nothing_and_the_job_ends_as_it_would(
        mode: str, family: str, tmp_path: Path) -> None:
    """``records``: every key the library reads; the job ends as it would have. ``counters``:
    the keys ranks ADD to; the store drops their connections, and every rank still ends
    within the bound, with one of the library's errors if it fails."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.json"
    victim.write_text("original")
    sentinel, mark = _sentinel(tmp_path)
    port = free_port()
    seed = random.randrange(1 << 30)
    hang = 4.0
    envs = rank_envs(3, port, DURATION_S="6", HANG_TIMEOUT_S=str(hang),
                     TORCHELASTIC_ERROR_FILE="")  # the ranks' own error files: none
    for env in envs:
        env.pop("TORCHELASTIC_ERROR_FILE")
    started = time.monotonic()
    ranks = [start([PYTHON, str(WORKERS / "trust_job.py"), mode], env) for env in envs]
    stop, log = threading.Event(), []
    fuzzer = threading.Thread(target=_fuzz, args=(port, stop, sentinel.pid, outside, seed, log, family),
                              daemon=True)
    fuzzer.start()
    bound = 6 + hang + 10 + 25  # the job's own length, the hang bound, start-up and teardown slack
    results = [finish(proc, max(bound - (time.monotonic() - started), 1.0), started) for proc in ranks]
    stop.set()
    fuzzer.join(15)
    try:
        why = f"seed {seed}, {len(log)} forged writes; last: {log[-3:]}\n" + "\n".join(
            f"--- rank {r}: exit {res.returncode}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
            for r, res in enumerate(results))
        assert not mark.exists(), f"the sentinel got signals {mark.read_text()!r} ({why})"
        assert _state(sentinel.pid) not in ("gone", "Z", "T", "t"), f"sentinel {_state(sentinel.pid)} ({why})"
        assert victim.read_text() == "original", why
        assert sorted(p.name for p in outside.iterdir()) == ["victim.json"], why
        assert len([entry for entry in log if "/" in entry]) > 10, why  # the fuzzer really wrote
        for rank, result in enumerate(results):
            output = result.output
            assert not result.timed_out, f"rank {rank} did not end within {bound:g} s ({why})\n{output}"
            for name in _FOREIGN_ERRORS:
                assert name not in output, f"rank {rank}: {name} escaped ({why})\n{output}"
            failed = [line.split()[1].rstrip(":") for line in result.stdout.splitlines()
                      if line.startswith("FAILED ")]
            assert set(failed) <= _LIBRARY_ERRORS, f"rank {rank}: {failed} ({why})\n{output}"
            if family == "counters":
                continue  # a disrupted job: any end within the bound, with a library error
            if mode == "ok":
                assert result.returncode == 0, f"rank {rank} ({why})\n{output}"
            else:
                assert result.returncode != 0 and failed, f"rank {rank} ({why})\n{output}"
    finally:
        kill_tree(sentinel.pid, grace_s=1)


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    """A rank's slot names a pid whose process is now another one (another start time)."""
    sentinel, mark = _sentinel(tmp_path)
    try:
        start_time = process_start_time(sentinel.pid)
        assert start_time is not None
        for forged in ({"rank": 1, "pid": sentinel.pid, "start": start_time - 1},  # the pid was reused
                       {"rank": 1, "pid": sentinel.pid, "start": 0},
                       {"rank": 1, "pid": -sentinel.pid, "start": start_time},  # a process group
                       {"rank": 1, "pid": 1, "start": process_start_time(1) or 1},
                       {"rank": 1, "pid": -1, "start": start_time}):
            assert kill_local_peer(forged, RuntimeError("x"), "test") is False, forged
        time.sleep(0.2)
        assert not mark.exists() and alive(sentinel.pid)
    finally:
        kill_tree(sentinel.pid, grace_s=1)


def _spawn_with_pid(pid: int, tmp: Path) -> tuple[subprocess.Popen[str], Path] | None:
    """The sentinel, started with process id ``pid`` (``ns_last_pid``: root, a few tries)."""
    for _ in range(50):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError:
            return None
        proc, mark = _sentinel(tmp)
        if proc.pid == pid:
            return proc, mark
        kill_tree(proc.pid, grace_s=1)
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a pid to a process needs root (ns_last_pid)")
def test_pid_reuse_after_a_silent_exit_only_signals_the_job(tmp_path: Path) -> None:
    """A rank exits without a word while a forked child keeps its sockets; its pid goes to an
    unrelated process. The peers' verdict and kill duty must not touch that process."""
    port = free_port()
    envs = rank_envs(2, port, DURATION_S="30", HANG_TIMEOUT_S="4")
    procs = [start([PYTHON, str(WORKERS / "trust_job.py"), "reuse"], env) for env in envs]
    reused, child = None, 0
    try:
        assert procs[1].stdout is not None
        line = procs[1].stdout.readline()  # "READY 1 <pid>", then "EXITING <pid>"
        while line and not line.startswith("EXITING"):
            line = procs[1].stdout.readline()
        assert line.startswith("EXITING"), line
        pid, child = int(line.split()[1]), int(line.split()[2])
        procs[1].wait(10)
        reused = _spawn_with_pid(pid, tmp_path)
        assert reused is not None, f"could not hand pid {pid} to another process"
        sentinel, mark = reused
        result = finish(procs[0], 60)
        assert not result.timed_out, result.output
        assert result.returncode != 0 and "FAILED " in result.stdout, result.output
        time.sleep(0.5)
        assert not mark.exists() and _state(sentinel.pid) not in ("gone", "Z", "T", "t"), result.output
    finally:
        if reused is not None:
            kill_tree(reused[0].pid, grace_s=1)
        if child > 1:
            kill_tree(child, grace_s=1)
        for proc in procs:
            kill_tree(proc.pid, grace_s=1)


def test_kill_duty_survives_the_ranks_own_interrupt(tmp_path: Path) -> None:
    """The duty to end a stuck local peer runs to the end while the acting rank is interrupted."""
    channel_ns = f"trust-{os.getpid()}-{time.time()}"
    channel = HostChannel.open(channel_ns, socket.gethostname())
    assert channel is not None
    stuck = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        slot = {"rank": 1, "pid": stuck.pid, "start": process_start_time(stuck.pid) or 0}
        script = (
            "import os, signal, sys, threading, time\n"
            "from distruntime.control.hostactions import kill_local_peer\n"
            "from distruntime.teardown import run_bounded\n"
            "import json\n"
            "slot = json.loads(sys.argv[1])\n"
            "signal.signal(signal.SIGUSR1, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))\n"
            "threading.Timer(0.1, lambda: os.kill(os.getpid(), signal.SIGUSR1)).start()\n"
            "try:\n"
            "    run_bounded(lambda: (time.sleep(0.3), kill_local_peer(slot, RuntimeError('hang'), 'test')),"
            " 10.0, 'kill duty')\n"
            "except KeyboardInterrupt:\n"
            "    print('INTERRUPTED', flush=True)\n"
            "time.sleep(1.0)\n"
        )
        result = finish(start([PYTHON, "-c", script, json.dumps(slot)], clean_env()), 30)
        assert not result.timed_out, result.output
        stuck.wait(5)
        assert stuck.returncode == -signal.SIGKILL, result.output
    finally:
        kill_tree(stuck.pid, grace_s=1)
        channel.close(0)
