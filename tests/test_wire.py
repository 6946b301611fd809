"""The wire proxy (benchmarks/wire.py) decodes every TCPStore request exactly.

Each Python store call goes through the proxy, alone in its phase, and the decoded query
types must be exactly what torch sends for it. This is what makes the request counts of
``benchmarks/bench_store_load.py`` and the simulator trustworthy.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from torch.distributed import TCPStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from wire import ProxyProcess, parse_requests


def _timeout(client: Any) -> None:
    with pytest.raises(dist.DistError):
        client.wait(["never"], timedelta(seconds=0.2))


def _client(port: int) -> TCPStore:
    return TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                    timeout=timedelta(seconds=10))


# call -> the requests torch 2.13 puts on the wire for it
CALLS: list[tuple[str, Callable[[Any], object], dict[str, int]]] = [
    ("set", lambda c: c.set("a", "1"), {"SET": 1}),
    ("get", lambda c: c.get("a"), {"WAIT": 1, "GET": 1}),
    ("add", lambda c: c.add("n", 2), {"ADD": 1}),
    ("compare_set", lambda c: c.compare_set("a", "1", "2"), {"COMPARE_SET": 1}),
    ("check", lambda c: c.check(["a", "b"]), {"CHECK": 1}),
    ("wait", lambda c: c.wait(["a"]), {"WAIT": 1}),
    ("wait_timeout", _timeout, {"WAIT": 1, "CANCEL_WAIT": 1}),
    ("num_keys", lambda c: c.num_keys(), {"GETNUMKEYS": 1}),
    ("multi_get", lambda c: c.multi_get(["a", "n"]), {"WAIT": 1, "MULTI_GET": 1}),
    ("delete_key", lambda c: c.delete_key("n"), {"DELETE_KEY": 1}),
    ("append", lambda c: c.append("a", "x"), {"APPEND": 1}),
    ("multi_set", lambda c: c.multi_set(["x", "y"], ["1", "2"]), {"MULTI_SET": 1}),
    ("queue_push", lambda c: c.queue_push("q", "v"), {"QUEUE_PUSH": 1}),
    ("queue_len", lambda c: c.queue_len("q"), {"QUEUE_LEN": 1}),
    ("queue_pop", lambda c: c.queue_pop("q"), {"WAIT": 1, "QUEUE_POP": 1}),
    ("list_keys", lambda c: c.list_keys(), {"LIST_KEYS": 1}),
    ("connect", lambda c: _client(c.port), {"VALIDATE": 1, "PING": 1}),
]


def test_every_store_call_is_decoded_exactly() -> None:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with ProxyProcess("127.0.0.1", server.port) as proxy:
        proxy.mark("connect-first")
        client = _client(proxy.port)
        # The calls this torch has (queue_* and list_keys came after 2.4)
        calls = [entry for entry in CALLS if entry[0] in ("wait_timeout", "connect")
                 or hasattr(client, entry[0])]
        for name, call, _expected in calls:
            proxy.mark(name)
            call(client)
        proxy.mark("end")
        summary = proxy.summary()
    assert "_errors" not in summary, summary["_errors"]
    connect = summary["connect-first"]["by_type"]
    assert connect in ({"VALIDATE": 1, "PING": 1}, {"VALIDATE": 1}), connect  # torch 2.4 sends no PING
    seen = {name: summary.get(name, {}).get("by_type", {}) for name, _, _ in calls}
    assert seen == {name: connect if name == "connect" else want for name, _call, want in calls}
    assert len(calls) >= 12, [name for name, _, _ in calls]


def test_parser_waits_for_whole_requests() -> None:
    key, value = b"who/3", b"x" * 300
    one = struct.Struct("<Q").pack
    message = (bytes([1]) + one(len(key)) + key + one(len(value)) + value
               + bytes([5]) + one(2) + one(1) + b"a" + one(1) + b"b")
    for cut in range(len(message)):
        requests, used = parse_requests(message[:cut])
        assert used <= cut
        assert [r.kind for r in requests] == (["SET"] if cut >= 1 + 8 + len(key) + 8 + len(value) else [])
    requests, used = parse_requests(message)
    assert used == len(message)
    assert [(r.kind, r.keys) for r in requests] == [("SET", ("who/3",)), ("CHECK", ("a", "b"))]
