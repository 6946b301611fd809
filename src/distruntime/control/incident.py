"""One hang incident over the shared store, in O(N) requests.

1. A rank that has waited in a collective past the threshold claims event ``k``
   (``compare_set ev/<k>``). It is the *assembler*.
2. Each host's waiter (:mod:`distruntime.control.waiter`) is blocked in ``wait ev/<k>``:
   it wakes, tells its local ranks through the node-local channel, gathers their answers
   (and, for a local rank that cannot answer, what ``/proc`` and its faulthandler file
   show), and publishes **one** record for the host: :func:`publish_host_answer`.
3. The assembler polls one counter until every rank is covered (or the answer window
   closes), reads the host records with ``multi_get`` in batches, names ranks whose whole
   host stayed silent from their check-in, and publishes the verdict:
   :func:`assemble`.
4. Each host's waiter is blocked in ``wait vd/<k>`` and hands the verdict to its ranks.

Per host: the claim (rarely more than one per incident), ``compare_set``, ``append``,
``add``, ``wait`` and one read of the verdict; the assembler adds about 20 counter polls
and two requests per 1,024 hosts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch._C._distributed_c10d import Store

from distruntime.control.channel import HostChannel
from distruntime.control.protocol import (
    append,
    as_float,
    as_int,
    as_str,
    claim,
    event_key,
    parse_record,
    read,
    read_many,
    state_key,
    verdict_key,
)
from distruntime.control.verdict import (
    HangReport,
    build_report,
    parse_faulthandler,
    process_state,
    sanitize_record,
    sanitize_view,
)

__all__ = ["assemble", "host_key", "latest_event", "local_view", "open_event", "publish_host_answer"]

logger = logging.getLogger("distruntime")

_POLL_S = 0.1
_MAX_HOST_RECORD = 1 << 20


def host_key(host: str) -> str:
    """A short store-safe key for a host name.

    Example:
        >>> len(host_key("node-0042.cluster.example"))
        12
    """
    return hashlib.sha1(host.encode()).hexdigest()[:12]


def stale_after(tick_s: float) -> float:
    """How old a slot may be before its rank counts as silent (its watchdog could not run)."""
    return max(3 * tick_s, 1.5)


def open_event(store: Store, k: int, event: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """Claim event ``k`` (two requests for the winner, one for the others): (won, the event
    that holds the slot)."""
    mine = json.dumps(event)
    held = claim(store, event_key(k), mine)
    if held == mine:
        return True, event
    return False, parse_record(held.encode(), event_key(k)) or {"kind": "?"}


def latest_event(store: Store, limit: int = 4096) -> int:
    """The number of the last event claimed in this job (``check`` requests only: read-only)."""
    k = 0
    while k < limit and store.check([event_key(k + 1)]):
        k += 1
    return k


def local_view(pid: int, main_ident: int, stack_file: str) -> dict[str, Any]:
    """What this host can see of a local rank that does not answer."""
    view: dict[str, Any] = {"proc": process_state(pid)}
    try:
        with open(stack_file, encoding="utf-8", errors="replace") as handle:
            text = handle.read(256 * 1024)
    except OSError:
        text = ""
    if text:
        view["stack"] = parse_faulthandler(text, main_ident)
    return view


def _beat(slot: Mapping[str, Any]) -> dict[str, Any]:
    """A slot's last heartbeat, for a rank that did not answer."""
    keep = ("rank", "host", "pid", "main", "t", "where", "groups", "tick", "pending")
    return {name: slot[name] for name in keep if name in slot}


def gather_local(channel: HostChannel, k: int, tick_s: float, window_s: float) -> dict[str, dict[str, Any]]:
    """Every local rank's answer to incident ``k`` (or what the host sees of it), bounded by ``window_s``."""
    deadline = time.monotonic() + window_s
    while True:
        slots = channel.read_slots()
        now = time.time()
        waiting_for = [r for r, s in slots.items()
                       if as_int(s.get("answered")) != k and not s.get("left")
                       and now - as_float(s.get("t")) < stale_after(tick_s)]
        if not waiting_for or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    ranks: dict[str, dict[str, Any]] = {}
    for rank, slot in slots.items():
        if slot.get("left"):
            ranks[str(rank)] = {"left": True, "beat": _beat(slot)}
        elif as_int(slot.get("answered")) == k and isinstance(slot.get("record"), dict):
            ranks[str(rank)] = {"answer": slot["record"]}
        else:
            pid = as_int(slot.get("pid"), 0, low=0)
            stack_file = as_str(slot.get("stack_file"))
            view = local_view(pid, as_int(slot.get("main")), stack_file) if pid > 1 else {}
            ranks[str(rank)] = {"view": view, "beat": _beat(slot)}
    return ranks


def publish_host_answer(store: Store, k: int, host: str, ranks: dict[str, dict[str, Any]]) -> bool:
    """Publish this host's answers to incident ``k``: three requests, once per host."""
    payload = json.dumps({"host": host, "ranks": ranks})
    if len(payload) > _MAX_HOST_RECORD:  # stacks of ranks that merely wait go first
        for entry in ranks.values():
            answer = entry.get("answer")
            if isinstance(answer, dict) and answer.get("entries"):
                answer["stack"] = answer.get("stack", [])[-4:]
        payload = json.dumps({"host": host, "ranks": ranks})[:_MAX_HOST_RECORD]
    key = state_key(k, host_key(host))
    if bytes(store.compare_set(key, "", payload)).decode(errors="replace") != payload:
        return False  # a backup waiter of this host published first
    append(store, f"st/{k}/hosts", host_key(host) + "\n")
    store.add(f"st/{k}/ranks", len(ranks))
    return True


def collect_answers(store: Store, k: int, world_size: int, window_s: float) -> dict[str, Any]:
    """Wait (bounded) until the hosts' answers cover every rank, then read them all."""
    deadline = time.monotonic() + window_s
    while int(store.add(f"st/{k}/ranks", 0)) < world_size and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    listed = (read(store, f"st/{k}/hosts") or b"").decode(errors="replace").split()
    keys = [state_key(k, h) for h in dict.fromkeys(listed) if len(h) == 12 and h.isalnum()][:world_size]
    records: dict[int, dict[str, Any]] = {}
    views: dict[int, dict[str, Any]] = {}
    beats: dict[int, dict[str, Any]] = {}
    left: set[int] = set()
    for key, raw in read_many(store, keys, expected_size=8192).items():
        host_record = parse_record(raw, key)
        if host_record is None or not isinstance(host_record.get("ranks"), dict):
            continue
        for rank_text, entry in host_record["ranks"].items():
            rank = as_int(rank_text, -1, low=0, high=world_size - 1)
            if rank < 0 or not isinstance(entry, dict):
                continue
            if entry.get("left") is True:
                left.add(rank)
            answer = sanitize_record(entry.get("answer"))
            if answer is not None:
                records[rank] = answer
                continue
            view, beat = sanitize_view(entry.get("view")), sanitize_record(entry.get("beat"))
            if view is not None:
                views[rank] = view
            if beat is not None:
                beats[rank] = beat
    return {"records": records, "views": views, "beats": beats, "left": left}


def assemble(store: Store, k: int, world_size: int, threshold_s: float, *, window_s: float,
             reason: str = "hang") -> HangReport:
    """The verdict of incident ``k`` from every host's answer (see the module docstring)."""
    found = collect_answers(store, k, world_size, window_s)
    records, views, beats, left = found["records"], found["views"], found["beats"], found["left"]
    covered = set(records) | set(views) | set(beats) | left
    silent = [r for r in range(world_size) if r not in covered]
    if silent:  # a host that published nothing: named from its check-in
        # Every rank checked in at start-up, so each who/<r> exists: multi_get does not wait.
        whos = read_many(store, [f"who/{r}" for r in silent])
        for key, raw in whos.items():
            who = parse_record(raw, key) or {}
            rank = as_int(key.rsplit("/", 1)[1], -1)
            beats[rank] = {"rank": rank, "host": as_str(who.get("host"), limit=255), "pid": 0,
                           "host_silent": True}
    try:
        return build_report(records, beats, views, world_size=world_size, now=time.time(),
                            threshold_s=threshold_s, reason=reason, left=frozenset(left))
    except Exception as error:  # a record the sanitizer let through must not cost the verdict
        logger.warning("hang verdict from partial records (%s: %s)", type(error).__name__, error)
        return build_report({}, {}, {}, world_size=world_size, now=time.time(), threshold_s=threshold_s,
                            reason=reason)


def publish_verdict(store: Store, k: int, report: HangReport) -> None:
    store.set(verdict_key(k), report.to_json())


def wait_verdict(store: Store, k: int, timeout_s: float) -> bytes | None:
    """Block (one request) until verdict ``k`` is published, then read it."""
    try:
        store.wait([verdict_key(k)], timedelta(seconds=timeout_s))
    except dist.DistError:
        return None
    return read(store, verdict_key(k))


