"""The host waiter: one blocked ``wait`` per host instead of polling the store.

One process per host (the holder of the node-local leader lock, or a backup when the
holder stops ticking) runs this thread on a store connection of its own, so the main
client -- which torch uses for new communicators -- is never held. It sleeps in
``wait ev/<k+1>`` at no cost to the store; re-armed every ``REARM_S`` (two requests). On
an event it tells its host through the node-local channel and, for a hang incident,
gathers and publishes the host's answers and waits for the verdict
(:mod:`distruntime.control.incident`).

One degraded case: torch without ``Store.clone`` (before 2.5) and a store given to the
runtime under a prefix of its own (a ``PrefixStore`` whose prefix torch does not expose).
A new connection cannot find the job's keys there, so the waiter checks for the next event
once per tick on the rank's own connection instead (one request per host per tick).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store, TCPStore

from distruntime.control import incident
from distruntime.control.channel import HostChannel
from distruntime.control.protocol import as_int, as_str, event_key, parse_record, read
from distruntime.control.unblock import shutdown_socket_to, socket_inodes

__all__ = ["HostWaiter", "WaiterConfig"]

logger = logging.getLogger("distruntime")

# How long one wait lasts before it is re-armed: 2 requests per host per REARM_S.
REARM_S = 300.0
_CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WaiterConfig:
    """Where the store is and what an incident needs to know."""

    store_host: str
    store_port: int
    namespace: str
    host: str
    rank: int  # the rank whose process runs this waiter
    world_size: int
    tick_s: float
    answer_window_s: float


# How long one wait for a verdict blocks, past the answer window, before the waiter looks for
# a newer event: a real verdict comes within the window, so it costs nothing then.
_VERDICT_SLACK_S = 2.0


class HostWaiter:
    """The thread that waits on the store for this host (see the module docstring)."""

    def __init__(self, channel: HostChannel, config: WaiterConfig) -> None:
        self.channel = channel
        self.config = config
        self.requests = 0  # store requests this waiter made, for the simulator and tests
        self._closing = threading.Event()
        self._clone: Callable[[], Store] | None = None
        self._shared: Store | None = None
        self.polling = False  # the degraded case of the module docstring
        self._inodes: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="distruntime-host-waiter", daemon=True)

    def __repr__(self) -> str:
        alive = self._thread.is_alive()
        return f"HostWaiter(host={self.config.host!r}, rank={self.config.rank}, alive={alive})"

    def start(self, clone: Callable[[], Store] | None = None, shared: Store | None = None) -> None:
        """Start waiting on a connection of its own: ``clone()`` (the rank's store's
        ``Store.clone``), else one this thread opens; both in the thread, since connecting
        blocks while the store's host is gone. ``shared``: the rank's own store, polled when a
        new connection cannot see the job (the module docstring)."""
        self._clone = clone
        self._shared = shared
        self._thread.start()

    def close(self) -> None:
        """Stop the thread: its blocked wait is cut by shutting down its own connection."""
        self._closing.set()
        if self._inodes:
            shutdown_socket_to(self.config.store_port, self._inodes)
        if self._thread.ident is not None:  # a waiter made but never started has nothing to end
            self._thread.join(2.0)

    # ------------------------------------------------------------------ the thread
    def _connect(self) -> Store:
        self._inodes = socket_inodes()  # this connection is the one not among them, at close
        if self._clone is not None:
            return self._clone()
        client = TCPStore(self.config.store_host, self.config.store_port, is_master=False,
                          wait_for_workers=False, timeout=timedelta(seconds=_CONNECT_TIMEOUT_S))
        store = PrefixStore(self.config.namespace, client)
        self.requests += 1
        if self._shared is None or store.check([f"who/{self.config.rank}"]):
            return store
        # This rank's own check-in record is not where a new connection looks: the given
        # store adds a prefix of its own. Poll through the rank's connection instead.
        logger.debug("host waiter: the store given to the runtime has a prefix a new connection "
                     "cannot rebuild (torch without Store.clone); checking once per tick")
        self.polling = True
        return self._shared

    def _run(self) -> None:
        try:
            store = self._connect()
        except (dist.DistError, RuntimeError) as error:
            logger.debug("host waiter: cannot reach the store: %s", error)
            return
        host = self.channel.read_host()
        host["leader"] = self.config.rank
        self.channel.write_host(host)
        k = as_int(host.get("round"), 0, low=0)
        while not self._closing.is_set():
            try:
                self.requests += 1
                if self.polling:
                    if not store.check([event_key(k + 1)]):
                        self._closing.wait(self.config.tick_s)
                        continue
                else:
                    store.wait([event_key(k + 1)], timedelta(seconds=REARM_S))
            except dist.DistError as error:
                if self._closing.is_set() or "timeout" not in str(error).lower():
                    logger.debug("host waiter stops: %s", error)
                    return
                self.requests += 1  # the client's CANCEL_WAIT
                continue
            k += 1
            try:
                if self._handle(store, k):
                    return
            except dist.DistError as error:
                logger.debug("host waiter stops: %s", error)
                return

    def _handle(self, store: Store, k: int) -> bool:
        """Event ``k`` is claimed: tell the host and, for an incident, answer it. True: stop waiting."""
        self.requests += 1
        event = parse_record(read(store, event_key(k)), event_key(k)) or {}
        kind = as_str(event.get("kind"), "?", 16)
        host = self.channel.read_host()
        host.update(round=k, event={"kind": kind, "rank": as_int(event.get("rank"), -1)})
        if kind != "hang":  # not an incident (nor a record distruntime wrote): nothing to wait for
            host.update(verdict_round=k, verdict="")
            self.channel.write_host(host)
            return False
        self.channel.write_host(host)
        config = self.config
        ranks = incident.gather_local(self.channel, k, config.tick_s, 2 * config.tick_s + 0.5)
        self.requests += 3
        incident.publish_host_answer(store, k, config.host, ranks)
        raw = self._verdict(store, k)
        host = self.channel.read_host()
        text = raw.decode(errors="replace") if raw is not None else ""
        host.update(verdict_round=k, verdict=text)
        self.channel.write_host(host)
        # Waiting goes on after a verdict: anyone can write an event key, and a verdict read
        # from the store is no proof that this one was the job's last incident.
        return False

    def _verdict(self, store: Store, k: int) -> bytes | None:
        """Verdict ``k``, waited for in slices: a newer event (one with no verdict ever coming,
        e.g. written by a store client that is not a rank) does not hold this host back."""
        deadline = time.monotonic() + self.config.answer_window_s + 10.0
        while True:
            self.requests += 2
            left = max(deadline - time.monotonic(), 0.1)
            slice_s = min(self.config.answer_window_s + _VERDICT_SLACK_S, left)
            raw = incident.wait_verdict(store, k, slice_s)
            if raw is not None or time.monotonic() >= deadline:
                return raw
            self.requests += 2  # the timed-out wait's CANCEL_WAIT, and this check
            if store.check([event_key(k + 1)]):
                logger.debug("host waiter: event %d has no verdict and event %d is open: moving on",
                             k, k + 1)
                return None


def leader_of(host: dict[str, Any]) -> int:
    return as_int(host.get("leader"), -1)
