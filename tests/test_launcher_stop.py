"""The launcher's stop after a peer's failure (issue 21), in one process.

A SIGTERM that finds a peer's root failure on record is that peer's ``PeerFailureError``;
teardown holds the first SIGTERM and a second one ends the rank after its report; the
failure path's connection shutdown keeps the store's port. The multi-rank behaviour is in
the fault matrix (phase "wrapper" and the own-group scenario) and tests/test_wrappers.py.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from torch._C._distributed_c10d import HashStore, PrefixStore, TCPStore

from distruntime.control.failures import failure_log, report_failure, report_now, root_failure_on_record
from distruntime.control.unblock import release_peers, store_ports
from distruntime.errorfile import write_error_file
from distruntime.errors import PeerFailureError, SignalExit
from distruntime.launchers import discover
from distruntime.rendezvous import Rendezvous
from distruntime.teardown import SignalScope

_ROOT = json.dumps({"rank": 1, "root": True, "what": "ValueError: injected fault on rank 1"})


def _rendezvous(rank: int = 2, store: Any = None) -> Rendezvous:
    launch = discover({"RANK": str(rank), "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"})
    return Rendezvous(store if store is not None else HashStore(), False, "127.0.0.1:29500", launch, 0.0)


def test_sigterm_after_a_peers_root_failure_names_that_peer() -> None:
    rdzv = _rendezvous()
    rdzv.store.set("failed/root", _ROOT)
    error = report_failure(rdzv, 2, SignalExit(signal.SIGTERM))
    assert isinstance(error, PeerFailureError) and error.root_reported
    assert error.failed_ranks == {1: "ValueError: injected fault on rank 1"}
    assert str(error).startswith("rank 1 failed first (ValueError: injected fault on rank 1); rank 2 stopped")
    assert "This rank saw: terminated by signal 15" in str(error)
    # recorded as a peer record, not a second root
    assert failure_log(rdzv.store) == [{"rank": 2, "root": False, "what": "terminated by signal 15"}]
    assert rdzv.store.add("failed/n", 0) == 1


def test_sigterm_with_nothing_on_record_is_this_ranks_root_failure() -> None:
    rdzv = _rendezvous()
    assert report_failure(rdzv, 2, SignalExit(signal.SIGTERM)) is None
    assert failure_log(rdzv.store) == [{"rank": 2, "root": True, "what": "terminated by signal 15"}]


@pytest.mark.parametrize("raw", [
    b"not json", b'{"rank": "one", "root": true}', b"[1]", b'{"rank": -3, "root": true}',
    b'{"rank": 1, "root": "yes"}', json.dumps({"rank": 2, "root": True, "what": "its own"}).encode(),
    b"x" * 10_000,
])
def test_a_malformed_or_own_root_record_counts_as_none(raw: bytes) -> None:
    store = HashStore()
    store.set("failed/root", raw)
    assert root_failure_on_record(store, 2, "terminated by signal 15") is None


def test_a_second_sigterm_in_teardown_reports_then_ends() -> None:
    seen: list[int] = []
    words: list[str] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    scope = SignalScope()
    try:
        scope.install()
        scope.hold(lambda: words.append("report"))
        os.kill(os.getpid(), signal.SIGTERM)
        assert (scope.held, seen, words) == (signal.SIGTERM, [], [])  # held, the rank goes on
        os.kill(os.getpid(), signal.SIGTERM)
        assert (seen, words) == ([signal.SIGTERM], ["report"])  # report first, then the old handler
        scope.restore()
        assert scope.held is None and seen == [signal.SIGTERM]  # a failed teardown drops it
    finally:
        scope.restore()
        signal.signal(signal.SIGTERM, previous)


def test_a_held_sigterm_is_redelivered_after_a_clean_teardown() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    scope = SignalScope()
    try:
        scope.install()
        scope.hold()
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == []
        scope.restore(redeliver_held=True)
        assert seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not scope._handle
    finally:
        signal.signal(signal.SIGTERM, previous)


def _signalled_in_exit() -> str:
    # Stands in for the runtime's __exit__: Python runs a signal's handler at the next bytecode
    # or function entry, which, after a collective that failed under SIGTERM, is __exit__.
    os.kill(os.getpid(), signal.SIGTERM)
    return "the teardown went on"


def test_a_sigterm_landing_in_the_runtimes_exit_is_held_not_raised() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    scope = SignalScope(held_in=(_signalled_in_exit.__code__,))
    try:
        scope.install()
        assert _signalled_in_exit() == "the teardown went on"
        assert (scope.held, scope.active) == (signal.SIGTERM, False)
        with pytest.raises(SignalExit):  # anywhere else it still unwinds the block
            scope.resume()  # a nested runtime's exit does not tear down: it raises
        scope.restore()
        scope.install()
        with pytest.raises(SignalExit):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        scope.restore()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_a_signal_between_hold_and_teardown_is_held() -> None:
    """hold() switches to holding before it leaves the raising mode: no window raises."""
    scope = SignalScope()
    try:
        scope.install()
        scope._holding = True  # the first half of hold(): ``active`` is still on
        os.kill(os.getpid(), signal.SIGTERM)
        assert scope.held == signal.SIGTERM
    finally:
        scope.restore()


def test_the_error_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "error.json"
    path.write_text("{}")
    write_error_file(ValueError("bad batch"), str(path))
    assert json.loads(path.read_text())["message"]["message"] == "ValueError: bad batch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.json"]  # no partial file left
    write_error_file(ValueError("lost"), str(tmp_path / "gone" / "error.json"))  # warns, never raises
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.json"]


def test_last_words_name_the_peer_in_the_error_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    rdzv = _rendezvous()
    rdzv.store.set("failed/root", _ROOT)
    report_now(rdzv, 2, RuntimeError("Connection closed by peer [127.0.0.1]:1234"))
    message = json.loads(path.read_text())["message"]["message"]
    assert message.startswith("PeerFailureError: rank 1 failed first (ValueError: injected fault on rank 1)")
    # a rank's own root failure is its last word, without a store request
    report_now(None, 2, KeyError("mine"))
    assert json.loads(path.read_text())["message"]["message"] == "KeyError: 'mine'"


def test_release_peers_keeps_the_store_port() -> None:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = TCPStore("127.0.0.1", server.port, is_master=False)
    rdzv = _rendezvous(store=PrefixStore("ns", client))
    assert store_ports(rdzv) == frozenset({29500, server.port})
    release_peers(rdzv, "gloo")
    client.set("still", "here")  # the store connection was kept
    assert server.get("still") == b"here"
    assert release_peers(rdzv, "nccl") == 0  # NCCL: the abort covers every group
