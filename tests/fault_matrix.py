"""The fault-injection matrix: scenarios as data, and one runner for tests and benchmarks.

Each scenario starts real ranks (hand-set env processes, torchrun, mp.spawn or Open MPI),
injects one fault, and records every process's exit code, output and exit time. The
runner bounds everything: past ``Scenario.bound_s`` (plus start-up) the whole process
tree is killed and the outcome says so.

``benchmarks/bench_reliability.py`` runs the same table several times and writes the
measured time-to-exit into ``docs/reliability.md``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from distruntime.control.progress import flight_recorder_available
from procs import PYTHON, TORCHRUN, WORKERS, clean_env, free_port, kill_tree, rank_envs

FAULT = str(WORKERS / "fault.py")
FAULT_SPAWN = str(WORKERS / "fault_spawn.py")
WRAPPER_JOB = str(WORKERS / "wrapper_job.py")
START_UP_S = 90.0  # allowance for imports on a loaded 2-core machine, before any fault


@dataclass(frozen=True)
class Scenario:
    """One fault: where it happens, what every surviving rank must say, and the bound.

    ``bound_s`` is the promise: from the fault (or, for start-up faults, from the ranks
    entering the runtime) to every process having exited. Start-up faults with a 6 s
    ``timeout_minutes`` get 8 s: the error within the timeout, then the process's exit.
    """

    name: str
    phase: str  # "start-up", "mid-job", "teardown", "bad env"
    launcher: str  # "procs" (hand-set env), "torchrun", "spawn", "openmpi"
    mode: str  # fault.py mode
    world_size: int
    expect: tuple[str, ...]  # substrings the combined output must contain
    bound_s: float
    fault_rank: int = -1
    signal_rank: int | None = None  # the harness signals this rank once it is READY...
    signal_number: int = 0  # ...with this signal
    missing: tuple[int, ...] = ()  # procs: ranks never started
    env: Mapping[int, Mapping[str, str]] = field(default_factory=dict)  # procs: per-rank extras
    occupy_port: bool = False  # a foreign listener holds MASTER_PORT
    timeout_minutes: float = 1.0
    collective_timeout_minutes: float | None = None
    expect_success: tuple[int, ...] = ()  # ranks that must exit 0 (all others non-zero)
    kill_leftovers: bool = False  # a hung rank the harness must kill (it never exits itself)
    hang_timeout_s: float | None = None  # DistributedRuntime(hang_timeout_s=...)
    absent: tuple[str, ...] = ()  # substrings the output must not contain
    worker: str = FAULT  # the rank script, given ``mode`` (wrapper_job.py: "WRAPPER:MESH:MODE")
    needs: tuple[str, ...] = ()  # modules the worker imports (the ``wrappers`` extra): else skipped
    expect_each: str = ""  # every rank but the faulty one leaves the runtime on this (rank_reports)


@dataclass
class Outcome:
    scenario: Scenario
    returncodes: list[int | None]
    output: str
    seconds_to_exit: float  # from the fault (or runtime entry) to the last exit
    timed_out: bool
    orphans: list[int]
    port_free: bool

    def describe(self) -> str:
        return (f"{self.scenario.name}: rcs={self.returncodes} exit={self.seconds_to_exit:.2f}s "
                f"timed_out={self.timed_out} orphans={self.orphans}\n{self.output[-8000:]}")


_HANG_S = 5.0
# Collective numbers, shapes and dtypes in the verdict come from torch's Flight Recorder.
_FR = flight_recorder_available()
_CULPRIT_PY = ("in a collective; rank 2 running Python at", "HangError", "fault.py:")
_CULPRIT_GIL = ("in a collective; rank 2 blocked in native code holding the GIL", "HangError")
_IN_ERROR_FILE = "traceback : distruntime.errors.HangError: hang: a rank waited"
_WRAPPERS = {"fabric": ("lightning",), "accelerate": ("accelerate",)}
_TERM = signal.SIGTERM
_KILL = signal.SIGKILL
_INT = signal.SIGINT

SCENARIOS: tuple[Scenario, ...] = (
    # --- bad environment: one process, immediate
    Scenario("bad env: RANK not an integer", "bad env", "procs", "ok", 1,
             ("RANK='abc' is not a non-negative integer",), 5, env={0: {"RANK": "abc"}}),
    Scenario("bad env: RANK without WORLD_SIZE", "bad env", "procs", "ok", 1,
             ("WORLD_SIZE is not", "partial launch environment"), 5, env={0: {"WORLD_SIZE": ""}}),
    Scenario("bad env: RANK >= WORLD_SIZE", "bad env", "procs", "ok", 1,
             ("RANK=2 is not below WORLD_SIZE=1",), 5, env={0: {"RANK": "2"}}),
    Scenario("bad env: LOCAL_RANK >= LOCAL_WORLD_SIZE", "bad env", "procs", "ok", 1,
             ("LOCAL_RANK=3 is not below LOCAL_WORLD_SIZE=1",), 5, env={0: {"LOCAL_RANK": "3"}}),
    # --- start-up
    Scenario("missing rank", "start-up", "procs", "ok", 3,
             ("missing ranks: 2", "joined (rank@host): 0@", "1@"), 8, missing=(2,), timeout_minutes=0.1),
    Scenario("missing rank 0 (the store host)", "start-up", "procs", "ok", 2,
             ("never came up (missing rank: 0)",), 8, missing=(0,), timeout_minutes=0.1),
    Scenario("MASTER_PORT taken by another program", "start-up", "procs", "ok", 2,
             ("is already in use",), 8, occupy_port=True, timeout_minutes=0.1),
    Scenario("MASTER_ADDR does not resolve", "start-up", "procs", "ok", 2,
             ("MASTER_ADDR='-no-such-host-' (from MASTER_ADDR) does not resolve",), 5,
             env={0: {"MASTER_ADDR": "-no-such-host-"}, 1: {"MASTER_ADDR": "-no-such-host-"}}),
    Scenario("two processes claim one rank", "start-up", "procs", "ok", 3,
             ("rank 1 is claimed by two processes",), 8, timeout_minutes=0.1,
             env={2: {"RANK": "1"}}),
    Scenario("ranks disagree on WORLD_SIZE", "start-up", "procs", "ok", 2,
             ("ranks disagree on the world size",), 8, timeout_minutes=0.1,
             env={1: {"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"}}),
    # --- mid-job: a rank raises
    Scenario("exception on rank 2", "mid-job", "procs", "raise", 4,
             ("rank 2 failed first (ValueError: injected fault on rank 2)",), 10, fault_rank=2),
    Scenario("exception on rank 0 (the store host)", "mid-job", "procs", "raise", 3,
             ("rank 0 failed first (ValueError: injected fault on rank 0)",), 10, fault_rank=0),
    Scenario("exception on rank 1", "mid-job", "torchrun", "raise", 4,
             ("rank 1 failed first (ValueError: injected fault on rank 1)",), 10, fault_rank=1),
    Scenario("exception on rank 1", "mid-job", "spawn", "raise", 3,
             ("rank 1 failed first (ValueError: injected fault on rank 1)",), 10, fault_rank=1),
    Scenario("exception on rank 1", "mid-job", "openmpi", "raise", 3,
             ("rank 1 failed first (ValueError: injected fault on rank 1)",), 10, fault_rank=1),
    # --- mid-job: a rank vanishes without a word
    Scenario("os._exit on rank 2", "mid-job", "procs", "exit", 4,
             ("rank 2 exited without reporting an error",), 10, fault_rank=2),
    Scenario("os._exit on rank 1", "mid-job", "torchrun", "exit", 3,
             ("exitcode  : 3",), 10, fault_rank=1),
    Scenario("SIGKILL of rank 1", "mid-job", "procs", "wait", 3,
             ("rank 1 exited without reporting an error",), 10, fault_rank=1,
             signal_rank=1, signal_number=_KILL),
    Scenario("SIGKILL of rank 0 (the store host)", "mid-job", "procs", "wait", 3,
             ("rank 0, which hosts the rendezvous store", "is gone"), 10, fault_rank=0,
             signal_rank=0, signal_number=_KILL),
    Scenario("SIGKILL of rank 1", "mid-job", "torchrun", "wait", 3,
             ("Signal 9 (SIGKILL) received",), 10, fault_rank=1, signal_rank=1, signal_number=_KILL),
    # --- mid-job: signals the runtime handles
    Scenario("SIGTERM to rank 1", "mid-job", "procs", "wait", 3,
             ("received SIGTERM", "rank 1 failed first (terminated by signal 15)"), 10, fault_rank=1,
             signal_rank=1, signal_number=_TERM),
    Scenario("SIGINT (Ctrl-C) to rank 1", "mid-job", "procs", "wait", 3,
             ("rank 1 failed first (KeyboardInterrupt)",), 10, fault_rank=1,
             signal_rank=1, signal_number=_INT),
    # --- mid-job: a rank hangs; with no hang_timeout_s the watchdog decides just before the
    # collective timeout (6 s here), and every rank, the hung one included, leaves
    Scenario("rank 2 hangs before a collective (default threshold)", "mid-job", "procs", "wait", 3,
             ("in a collective; rank 2 running Python at", "HangError", "fault.py:"), 12 + 10, fault_rank=2,
             collective_timeout_minutes=0.2),
    # --- mid-job hangs and desyncs, 5 s threshold: out within threshold + 10 s
    *(Scenario(name, "hang", launcher, mode, size, expect, _HANG_S + 10, fault_rank=rank,
               hang_timeout_s=_HANG_S)
      for name, launcher, mode, size, rank, expect in (
        ("sleep before a collective", "procs", "sleep", 4, 2, _CULPRIT_PY),
        ("busy Python loop", "procs", "busy", 4, 2, _CULPRIT_PY),
        ("blocked in C holding the GIL", "procs", "gil", 4, 2, _CULPRIT_GIL),
        ("SIGSTOP", "procs", "sigstop", 4, 2, ("in a collective; rank 2 stopped (SIGSTOP",)),
        ("all_gather where the others all_reduce", "procs", "op", 4, 2,
         ("desync: collective #2 of group default: ranks 0, 1, 3 in all_reduce([4] float32); "
          "rank 2 in all_gather([4] float32)",) if _FR else
         ("desync: collective #? of group default: ranks 0, 1, 3 in all_reduce; rank 2 in all_gather",)),
        ("one extra collective", "procs", "extra", 4, 2,
         (f"desync: collective {'#3' if _FR else '#?'} of group default: ranks 0, 1, 3 in barrier; "
          "rank 2 in all_reduce",)),
        ("hang in a subgroup", "procs", "subgroup", 4, 1,
         ("in a collective; rank 1 running Python at", "(group pair)" if _FR else "(group default)")),
        # under torchrun the verdict is also in each rank's error file: torchrun's summary shows it
        ("sleep before a collective", "torchrun", "sleep", 4, 2, (*_CULPRIT_PY, _IN_ERROR_FILE)),
        ("blocked in C holding the GIL", "torchrun", "gil", 4, 2, (*_CULPRIT_GIL, _IN_ERROR_FILE)),
        ("all_gather where the others all_reduce", "torchrun", "op", 4, 2,
         ("rank 2 in all_gather", _IN_ERROR_FILE)),
        ("SIGSTOP", "spawn", "sigstop", 3, 1, ("in a collective; rank 1 stopped (SIGSTOP",)),
        # Without Flight Recorder (torch 2.4, docs/compat.md) shapes are not recorded: see the
        # scenario after this table.
        *((("different shapes", "procs", "shape", 4, 2,
            ("desync: collective #2 of group default: ranks 0, 1, 3 in all_reduce([4] float32); "
             "rank 2 in all_reduce([8] float32)",)),) if _FR else ()),
        ("busy Python loop", "spawn", "busy", 3, 1, ("in a collective; rank 1 running Python at",)),
        ("blocked in C holding the GIL", "openmpi", "gil", 3, 1,
         ("in a collective; rank 1 blocked in native code holding the GIL",)),
    )),
    *(() if _FR else (
        # torch 2.4's gloo completes the mismatched all_reduce on the ranks that sent 4
        # elements; they move on to the barrier, and that desync is what the table names.
        Scenario("different shapes, no Flight Recorder", "hang", "procs", "shape", 4,
                 ("desync: collective #? of group default", "rank 2 in all_reduce"), _HANG_S + 10,
                 fault_rank=2, hang_timeout_s=_HANG_S),)),
    Scenario("a slow rank under the threshold", "hang", "procs", "slow", 4, ("DONE 0", "DONE 3"), 10,
             fault_rank=2, hang_timeout_s=_HANG_S, expect_success=(0, 1, 2, 3),
             absent=("HangError", "distributed job hangs", "asking every rank")),
    # --- a wrapper's own group: the failed rank lives on (30 s) and keeps it alive; its peers,
    # blocked in it, are freed by the failure path's connection shutdown, not by its exit
    Scenario("exception on rank 1, a group the runtime does not own kept alive", "mid-job", "procs",
             "own-group", 3, ("rank 1 failed first (ValueError: injected fault on rank 1)",), 10,
             fault_rank=1, kill_leftovers=True,
             expect_each="PeerFailureError: rank 1 failed first (ValueError: injected fault on rank 1)"),
    # --- the wrapper axis: Lightning Fabric (ModelParallelStrategy, TP x FSDP2) and Accelerate
    # (DDP, and a mesh of its own) on 4 ranks under torchrun, each with its own mesh and with the
    # runtime's (tests/workers/wrapper_job.py); rank 1 raises, hangs or is SIGKILLed mid-step
    *(Scenario(f"{wrapper}, {mesh} mesh: {what}", "wrapper", "torchrun", f"{wrapper}:{mesh}:{mode}", 4,
               expect, bound, fault_rank=1, worker=WRAPPER_JOB, needs=_WRAPPERS[wrapper],
               hang_timeout_s=_HANG_S if mode == "hang" else None, expect_each=each)
      for wrapper in ("fabric", "accelerate") for mesh in ("own", "runtime")
      for what, mode, expect, each, bound in (
          ("exception on rank 1", "raise", ("rank 1 failed first (ValueError: injected fault on rank 1)",),
           "PeerFailureError: rank 1 failed first (ValueError: injected fault on rank 1)", 10),
          ("rank 1 hangs", "hang", ("HangError", "rank 1 running Python at", "wrapper_job.py:"),
           "HangError", _HANG_S + 10),
          # torchrun's SIGTERM reaches the others as their collectives break: held in teardown
          ("SIGKILL of rank 1", "kill", ("Signal 9 (SIGKILL) received",),
           "PeerFailureError: rank 1 exited without reporting an error", 10),
      )),
    # --- teardown
    Scenario("rank 1 dies while the others tear down", "teardown", "procs", "exit-after", 3,
             ("FAULT",), 10, fault_rank=1, expect_success=(0, 2)),
)


_REPORT = re.compile(r"rank (\d+) leaves the runtime on (.*)$", re.MULTILINE)


def rank_reports(output: str) -> list[tuple[int, str]]:
    """Each ``rank R leaves the runtime on <error>`` line distruntime logged: (R, <error>)."""
    return [(int(rank), said) for rank, said in _REPORT.findall(output)]


def _mark_dir(token: str) -> Path:
    return Path("/tmp") / f"drt-fault-{token}"


def _scenario_env(s: Scenario, token: str) -> dict[str, str]:
    extra = {"FAULT_RANK": str(s.fault_rank), "TIMEOUT_MINUTES": str(s.timeout_minutes),
             "DRT_SCENARIO": token, "OMP_NUM_THREADS": "1", "DRT_MARK_DIR": str(_mark_dir(token))}
    if s.collective_timeout_minutes is not None:
        extra["COLLECTIVE_TIMEOUT_MINUTES"] = str(s.collective_timeout_minutes)
    if s.hang_timeout_s is not None:
        extra["HANG_TIMEOUT_S"] = str(s.hang_timeout_s)
    return extra


def _commands(s: Scenario, port: int, token: str) -> list[tuple[list[str], dict[str, str]]]:
    extra = _scenario_env(s, token)
    if s.launcher == "procs":
        envs = rank_envs(s.world_size, port, **extra)
        cmds = []
        for rank, env in enumerate(envs):
            if rank in s.missing:
                continue
            env.update(s.env.get(rank, {}))
            cmds.append(([PYTHON, s.worker, s.mode], {k: v for k, v in env.items() if v != ""}))
        return cmds
    env = clean_env(**extra)
    if s.launcher == "torchrun":
        return [([TORCHRUN, "--nproc-per-node", str(s.world_size), "--monitor-interval", "0.1",
                  s.worker, s.mode], env)]
    if s.launcher == "spawn":
        return [([PYTHON, FAULT_SPAWN, s.mode, str(s.world_size), str(port)], env)]
    if s.launcher == "openmpi":
        mpirun = ["mpirun.openmpi", "--allow-run-as-root", "--oversubscribe", "--mca", "oob_tcp_if_include",
                  "lo", "--mca", "btl_tcp_if_include", "lo", "-np", str(s.world_size)]
        passed = [arg for name in (*extra, "MASTER_PORT") for arg in ("-x", name)]
        return [([*mpirun, *passed, PYTHON, FAULT, s.mode], {**env, "MASTER_PORT": str(port)})]
    raise ValueError(f"unknown launcher {s.launcher!r}")


def _processes_with_token(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"DRT_SCENARIO={token}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def _times(output: str, tag: str) -> list[float]:
    return [float(line.split()[1]) for line in output.splitlines() if line.startswith(tag + " ")]


def run_scenario(s: Scenario) -> Outcome:
    """Run one scenario to the end, bounded by start-up allowance + ``s.bound_s``."""
    token = uuid.uuid4().hex
    _mark_dir(token).mkdir()
    port = free_port()
    blocker = None
    if s.occupy_port:
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
    procs = []
    for cmd, env in _commands(s, port, token):
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    outputs = [""] * len(procs)
    ended: list[float | None] = [None] * len(procs)
    hard_deadline = time.monotonic() + START_UP_S + s.bound_s
    signalled_at: float | None = None
    try:
        if s.signal_rank is not None:
            signalled_at = _signal_when_ready(s, token, hard_deadline)
        for index, proc in enumerate(procs):
            remaining = max(hard_deadline - time.monotonic(), 0.1)
            if s.kill_leftovers and s.fault_rank == index and s.launcher == "procs":
                continue  # the hung rank: reaped below, after its peers have exited
            try:
                outputs[index], _ = proc.communicate(timeout=remaining)
                ended[index] = time.time()
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                outputs[index], _ = proc.communicate()
        if s.kill_leftovers:
            for index, proc in enumerate(procs):
                if proc.returncode is None:
                    kill_tree(proc.pid)
                    outputs[index], _ = proc.communicate()
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
        if blocker is not None:
            blocker.close()
        shutil.rmtree(_mark_dir(token), ignore_errors=True)
    output = "\n".join(outputs)
    start = _fault_time(s, output, signalled_at)
    watched = [t for i, t in enumerate(ended) if not (s.kill_leftovers and i == s.fault_rank)]
    counted = [t for t in watched if t is not None]
    timed_out = len(counted) < len(watched)
    time.sleep(0.2)  # let the kernel reap what was killed before looking for orphans
    return Outcome(
        scenario=s,
        returncodes=[p.returncode for p in procs],
        output=output,
        seconds_to_exit=(max(counted) - start) if counted and start else float("nan"),
        timed_out=timed_out,
        orphans=_processes_with_token(token),
        port_free=_port_free(port),
    )


def _fault_time(s: Scenario, output: str, signalled_at: float | None) -> float | None:
    if signalled_at is not None:
        return signalled_at
    faults = _times(output, "FAULT")
    if faults:
        return min(faults)
    enters = _times(output, "ENTER")
    return max(enters) if enters else None


def _signal_when_ready(s: Scenario, token: str, deadline: float) -> float:
    """Signal the target rank once it is inside the runtime (it writes its pid then)."""
    mark = _mark_dir(token) / f"fault-{s.signal_rank}"
    while time.monotonic() < deadline:
        if mark.exists() and mark.read_text():
            os.kill(int(mark.read_text()), s.signal_number)
            return time.time()
        time.sleep(0.02)
    raise TimeoutError(f"{s.name}: rank {s.signal_rank} never reached the fault point")
