"""The control plane's wake-ups hold on both of torch's store backends.

torch's classic backend (``TCPStore(use_libuv=False)``) wakes no ``wait`` on a
``compare_set``; libuv's does. Every key a rank blocks on (``join/go``, ``ev/<k>``,
``failed/root``, ``stop/all_left``) is published with :func:`protocol.claim`, which follows a
won ``compare_set`` with a ``set``.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from torch._C._distributed_c10d import TCPStore

from distruntime.control import incident
from distruntime.control.protocol import claim


def _server(libuv: bool) -> TCPStore:
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=libuv,
                    timeout=timedelta(seconds=10))


def _woken_after(server: TCPStore, key: str, publish: object) -> float | None:
    """Seconds a client's ``wait`` on ``key`` took to return after ``publish()``; None: not woken."""
    client = TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False,
                      timeout=timedelta(seconds=10))
    woke: list[float] = []

    def wait() -> None:
        try:
            client.wait([key], timedelta(seconds=2))
            woke.append(time.monotonic())
        except Exception:
            pass

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)  # the wait is registered on the server
    published = time.monotonic()
    publish()  # type: ignore[operator]
    waiter.join(5)
    return woke[0] - published if woke else None


@pytest.mark.parametrize("libuv", [True, False], ids=["libuv", "classic"])
def test_claim_wakes_a_blocked_wait(libuv: bool) -> None:
    server = _server(libuv)
    took = _woken_after(server, "go", lambda: claim(server, "go", "ok"))
    assert took is not None and took < 1.0, took
    assert claim(server, "go", "abort") == "ok"  # the first value stays


def test_the_classic_backend_needs_it() -> None:
    """Why claim() exists: on the classic backend a bare compare_set leaves the waiter asleep."""
    server = _server(False)
    assert _woken_after(server, "go", lambda: server.compare_set("go", "", "ok")) is None


@pytest.mark.parametrize("libuv", [True, False], ids=["libuv", "classic"])
def test_an_opened_incident_wakes_the_host_waiter_key(libuv: bool) -> None:
    server = _server(libuv)
    took = _woken_after(server, "ev/1", lambda: incident.open_event(server, 1, {"kind": "hang", "rank": 0}))
    assert took is not None and took < 1.0, took
