"""The hang verdict's rules, on hand-made records (no processes): who is named first,
how each state reads, desync detection, the threshold, and the parsers it relies on.

The real-process scenarios (sleep, busy loop, GIL held, SIGSTOP, desyncs, subgroups,
under every launcher) are in tests/fault_matrix.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from distruntime.control.agent import hang_threshold
from distruntime.control.verdict import (
    HangReport,
    build_report,
    flight_progress,
    innermost_user_frame,
    parse_entries,
    parse_faulthandler,
    process_state,
)
from distruntime.errors import HangError, LaunchEnvError

NOW = 1000.0


def _entry(seq: int, op: str = "all_reduce", sizes: list[list[int]] | None = None, done: bool = False,
           created: float = NOW - 7, group: str = "0") -> dict[str, object]:
    return {"group": group, "seq": seq, "op": op, "sizes": sizes if sizes is not None else [[4]],
            "dtypes": ["Float"], "completed": done, "created": created}


def _record(rank: int, enqueued: int, completed: int, entries: list[dict[str, object]],
            where: str = "/w/train.py:20 in step", desc: str = "default") -> dict[str, object]:
    return {"rank": rank, "host": "n1", "pid": 100 + rank, "t": NOW, "where": where,
            "stack": ["/w/train.py:40 in main", where],
            "groups": {"0": {"desc": desc, "enqueued": enqueued, "completed": completed}},
            "entries": entries}


def _report(records: dict[int, dict[str, object]], world: int, **kw: object) -> HangReport:
    heartbeats = kw.pop("heartbeats", {})
    views = kw.pop("views", {})
    return build_report(records, heartbeats, views, world_size=world, now=NOW,  # type: ignore[arg-type]
                        threshold_s=5.0, **kw)  # type: ignore[arg-type]


def _waiting(rank: int) -> dict[str, object]:
    return _record(rank, 2, 1, [_entry(1, done=True), _entry(2)])


def test_rank_running_python_is_named_first_with_its_line() -> None:
    behind = _record(2, 1, 1, [_entry(1, done=True)], where="/w/train.py:33 in load_batch")
    report = _report({0: _waiting(0), 1: _waiting(1), 2: behind}, 3)
    assert report.is_hang
    assert report.ranks[0].rank == 2 and report.ranks[0].kind == "running"
    assert report.ranks[0].detail == "running Python at /w/train.py:33 in load_batch"
    assert report.culprits == (2,)
    waiting = "waiting in collective #2 all_reduce([4] float32) (group default) for 7.0 s"
    assert waiting in report.ranks[1].detail
    assert "group default: ranks 0, 1 at #2 (in progress); rank 2 at #1 (done)" in report.progress
    assert report.summary.endswith("rank 2 running Python at /w/train.py:33 in load_batch")


def test_desync_names_the_minority_op_and_every_variant() -> None:
    odd = _record(1, 2, 1, [_entry(1, done=True), _entry(2, op="all_gather")])
    report = _report({0: _waiting(0), 1: odd, 2: _waiting(2), 3: _waiting(3)}, 4)
    assert report.is_hang
    assert report.desyncs == ("collective #2 of group default: ranks 0, 2, 3 in all_reduce([4] float32); "
                              "rank 1 in all_gather([4] float32)",)
    assert report.ranks[0].rank == 1 and report.ranks[0].kind == "desync"
    assert report.summary.endswith("desync: " + report.desyncs[0])


def test_shape_mismatch_is_a_desync() -> None:
    odd = _record(3, 2, 1, [_entry(1, done=True), _entry(2, sizes=[[8]])])
    report = _report({0: _waiting(0), 1: _waiting(1), 2: _waiting(2), 3: odd}, 4)
    assert "rank 3 in all_reduce([8] float32)" in report.desyncs[0]
    assert report.ranks[0].rank == 3


def test_same_collective_everywhere_is_slow_not_a_hang() -> None:
    report = _report({r: _waiting(r) for r in range(3)}, 3)
    assert not report.is_hang
    assert report.summary.startswith("no hang: every rank is in the same collective")


def test_under_the_threshold_is_not_a_hang() -> None:
    fresh = {r: _record(r, 2, 1, [_entry(2, created=NOW - 1)]) for r in (0, 1)}
    report = _report({**fresh, 2: _record(2, 1, 1, [])}, 3)
    assert not report.is_hang


@pytest.mark.parametrize(("proc", "kind", "text"), [
    ("T", "stopped", "stopped (SIGSTOP: /proc state T)"),
    ("R", "unresponsive", "blocked in native code holding the GIL"),
    ("", "exited", "exited (pid 102 on n1 is gone)"),
])
def test_silent_rank_reads_from_what_its_host_sees(proc: str, kind: str, text: str) -> None:
    beat = {"rank": 2, "host": "n1", "pid": 102, "t": NOW - 6, "where": "/w/train.py:9 in step",
            "groups": {"0": {"desc": "default", "enqueued": 1, "completed": 1}}}
    views = {2: {"proc": proc, "stack": ["/w/train.py:50 in main", "/w/native.py:7 in spin"]}}
    report = _report({0: _waiting(0), 1: _waiting(1)}, 3, heartbeats={2: beat}, views=views)
    assert report.is_hang
    first = report.ranks[0]
    assert (first.rank, first.kind) == (2, kind)
    assert text in first.detail
    if kind != "exited":
        assert first.where == "/w/native.py:7 in spin"
        assert "rank 2 main thread" in report.format()


def test_silent_rank_on_another_host_is_still_named() -> None:
    beat = {"rank": 1, "host": "n2", "pid": 5, "t": NOW - 8, "where": "/w/train.py:9 in step", "groups": {}}
    report = _report({0: _waiting(0)}, 2, heartbeats={1: beat})
    assert report.ranks[0].rank == 1
    assert "did not answer: holding the GIL, stopped, or its host is unreachable" in report.ranks[0].detail
    assert "last heartbeat 8.0 s ago at /w/train.py:9 in step" in report.ranks[0].detail


def test_subgroup_hang_names_the_group() -> None:
    sub = _record(0, 1, 0, [_entry(1, group="1")], desc="default")
    sub["groups"] = {"0": {"desc": "default", "enqueued": 1, "completed": 1},  # type: ignore[index]
                     "1": {"desc": "tp", "enqueued": 1, "completed": 0}}
    behind = _record(1, 1, 1, [_entry(1, done=True)], where="/w/train.py:70 in tp_step")
    report = _report({0: sub, 1: behind}, 2)
    assert report.is_hang
    assert "(group tp)" in report.ranks[1].detail
    assert any(line.startswith("group tp: rank 0 at #1 (in progress)") for line in report.progress)


def test_snapshot_reads_fresh_heartbeats_as_answers() -> None:
    beat = {"rank": 0, "host": "n1", "pid": 1, "t": NOW - 0.2, "tick": 0.5, "where": "/w/t.py:3 in f",
            "groups": {"0": {"desc": "default", "enqueued": 3, "completed": 2}},
            "pending": {"0": {"seq": 3, "since": NOW - 2, "op": "all_reduce", "sizes": [[4]],
                              "dtypes": ["Float"]}}}
    idle = {**beat, "rank": 1, "pid": 2, "groups": {"0": {"desc": "default", "enqueued": 2, "completed": 2}},
            "pending": {}, "where": "/w/t.py:9 in g"}
    report = build_report({}, {0: beat, 1: idle}, {}, world_size=2, now=NOW, threshold_s=5, reason="snapshot")
    kinds = {row.rank: row for row in report.ranks}
    waiting = "waiting in collective #3 all_reduce([4] float32) (group default) for 2.0 s"
    assert kinds[0].detail.startswith(waiting)
    assert kinds[1].detail == "running Python at /w/t.py:9 in g"


def test_report_round_trips_through_json_and_hang_error_pickles() -> None:
    import pickle

    report = _report({0: _waiting(0), 1: _record(1, 1, 1, [])}, 2)
    again = HangReport.from_json(report.to_json())
    assert again == report
    error = pickle.loads(pickle.dumps(HangError(report)))
    assert str(error) == report.format() and error.report == report


def test_flight_recorder_parsers() -> None:
    raw = json.dumps({
        "pg_status": {"0": {"last_enqueued_collective": "5", "last_completed_collective": "4"}},
        "entries": [
            {"pg_id": 0, "collective_seq_id": s, "profiling_name": "gloo:all_reduce", "input_sizes": [[4]],
             "input_dtypes": ["Float"], "retired": s < 5, "time_created_ns": s * 10**9,
             "process_group": ["0", "default_pg"]} for s in range(1, 15)
        ] + [{"pg_id": 1, "collective_seq_id": 1, "profiling_name": "gloo:broadcast", "input_sizes": [[2]],
              "input_dtypes": ["Float"], "retired": False, "time_created_ns": 0,
              "process_group": ["1", "mesh_tp"]},
             {"pg_id": 0, "is_p2p": True, "collective_seq_id": 0}],
    })
    assert flight_progress(raw) == {"0": {"enqueued": 5, "completed": 4}}
    entries, names = parse_entries(raw, per_group=3)
    assert [e["seq"] for e in entries if e["group"] == "0"] == [12, 13, 14]
    assert names == {"0": "default", "1": "tp"}


def test_faulthandler_parser_takes_the_main_thread() -> None:
    text = ("Thread 0x00000002 (most recent call first):\n  File \"/x/worker.py\", line 3 in loop\n\n"
            "Current thread 0x0000000a (most recent call first):\n  File \"/w/t.py\", line 5 in spin\n"
            "  File \"/w/t.py\", line 9 in <module>\n")
    assert parse_faulthandler(text, 0xA) == ["/w/t.py:9 in <module>", "/w/t.py:5 in spin"]
    assert parse_faulthandler(text, 2) == ["/x/worker.py:3 in loop"]


def test_innermost_user_frame_skips_torch_and_distruntime() -> None:
    import distruntime

    lib = os.path.dirname(distruntime.__file__)
    stack = ["/w/train.py:10 in main", f"{lib}/runtime.py:5 in __exit__",
             "/v/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py:1 in all_reduce"]
    assert innermost_user_frame(stack) == "/w/train.py:10 in main"


def test_process_state_of_a_stopped_and_a_gone_process() -> None:
    stop_self = "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)"
    child = subprocess.Popen([sys.executable, "-c", stop_self])
    try:
        deadline = time.monotonic() + 20
        while process_state(child.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process_state(child.pid) == "T"
    finally:
        child.kill()
        child.wait(10)
    assert process_state(child.pid) == ""


def test_hang_threshold_sources() -> None:
    assert hang_threshold(7.5, 1800.0, {}) == 7.5
    assert hang_threshold(None, 1800.0, {"DISTRUNTIME_HANG_TIMEOUT_S": "42"}) == 42.0
    assert hang_threshold(None, 600.0, {}) == 590.0
    assert hang_threshold(None, 12.0, {}) == pytest.approx(9.0)  # 10 s or a quarter before the timeout
    assert math.isinf(hang_threshold(math.inf, 600.0, {}))
    with pytest.raises(LaunchEnvError, match=r"DISTRUNTIME_HANG_TIMEOUT_S='soon' is not a number"):
        hang_threshold(None, 600.0, {"DISTRUNTIME_HANG_TIMEOUT_S": "soon"})
    with pytest.raises(ValueError, match="hang_timeout_s must be positive"):
        hang_threshold(0.0, 600.0, {})


_ABORT_SCRIPT = """
import socket
from distruntime.control.unblock import _shutdown_connections

def pair(listener):
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    return client, server

store_listener = socket.create_server(("127.0.0.1", 0))
peer_listener = socket.create_server(("127.0.0.1", 0))
store_port = store_listener.getsockname()[1]
store_client, store_server = pair(store_listener)
peer_client, peer_server = pair(peer_listener)
print("other host", _shutdown_connections(frozenset({store_port}), {"10.255.255.1"}))
print("closed", _shutdown_connections(frozenset({store_port}), {"127.0.0.1"}))
peer_server.settimeout(5)
print("peer read", peer_server.recv(1))
store_client.sendall(b"x")
store_server.settimeout(5)
print("store read", store_server.recv(1))
"""


def test_gloo_abort_shuts_down_job_connections_but_not_the_store() -> None:
    """gloo has no abort: the watchdog shuts down this process's TCP connections to the
    job's hosts, except the rendezvous store's, so a blocked collective read fails.
    (In a fresh process: it acts on every connection of the process that runs it.)"""
    result = subprocess.run([sys.executable, "-c", _ABORT_SCRIPT], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "other host 0",  # a connection to a host outside the job is left alone
        "closed 2",  # both ends of the peer connection live in this process
        "peer read b''",  # the "blocked read" ends at once
        "store read b'x'",  # the store's connection still works
    ], result.stdout


def test_nccl_abort_goes_through_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL groups are aborted with torch's own call (never destroyed: that drains a hung
    communicator); no socket is touched for a pure NCCL group."""
    import torch.distributed as dist

    from distruntime.control import unblock

    calls: list[str] = []
    # raising=False: torch 2.4 has no _abort_process_group (docs/compat.md)
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda: calls.append("abort"),
                        raising=False)

    def sockets(keep: frozenset[int], addresses: set[str]) -> int:
        calls.append("sockets")
        return 0

    monkeypatch.setattr(unblock, "_shutdown_connections", sockets)
    unblock.abort_blocked_collectives("nccl", frozenset(), set())
    assert calls == ["abort"]
    calls.clear()
    unblock.abort_blocked_collectives("cpu:gloo,cuda:nccl", frozenset(), set())
    assert calls == ["abort", "sockets"]


_GIL_SCRIPT = """
import ctypes, threading, time
from torch._C._distributed_c10d import HashStore
from distruntime.control.agent import AgentConfig, RankAgent
from distruntime.control.channel import HostChannel

def hold_the_gil():
    print("GIL", time.time(), threading.main_thread().ident, flush=True)
    ctypes.PyDLL(None).sleep(30)  # PyDLL: the GIL stays held for the whole call

channel = HostChannel.open("gil-test-%d" % time.time_ns(), "here")
agent = RankAgent(HashStore(), AgentConfig(0, 2, 5.0, "gloo", frozenset()), channel)
agent.start()
print("FILE", agent._stack_path, flush=True)
hold_the_gil()
"""


def test_stack_of_a_rank_holding_the_gil_lands_on_disk() -> None:
    """The watchdog's dead man's switch: with the GIL held in C, no Python thread can run,
    yet faulthandler's C thread writes the main thread's stack within 2 ticks + 0.5 s."""
    from distruntime.control.incident import local_view

    proc = subprocess.Popen([sys.executable, "-c", _GIL_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        stack_file = line[1] if line and line[0] == "FILE" else ""
        line = proc.stdout.readline().split()
        assert line and line[0] == "GIL", line
        took, main = float(line[1]), int(line[2])
        deadline = time.monotonic() + 20
        view: dict[str, object] = {}
        while time.monotonic() < deadline and not view.get("stack"):
            view = local_view(proc.pid, main, stack_file)
            time.sleep(0.05)
        landed = time.time() - took
        assert view.get("stack"), view
        assert view["stack"][-1] == "<string>:9 in hold_the_gil", view  # type: ignore[index]
        assert view["proc"] in ("S", "R")  # alive, not stopped: "holding the GIL" in the verdict
        assert landed < 5.0, f"stack on disk {landed:.1f} s after the GIL was taken (armed for 1.5 s)"
    finally:
        proc.kill()
        proc.wait(10)
