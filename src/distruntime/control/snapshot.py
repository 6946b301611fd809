"""A running job's table, from outside it: ``distruntime where`` and the pytest plugin.

``ask=False`` (``distruntime where``) only reads -- ``check`` and reads that set nothing --
so the job cannot notice it: the check-ins, the last verdict, and, on one of the job's
hosts, the node-local slots of its ranks (their progress and where their main thread is).
``ask=True`` (the pytest plugin at a test's deadline) opens an incident as a rank would,
so every host answers with its ranks' stacks and collectives; the verdict it publishes has
reason ``"deadline"``, on which no rank acts.

Everything read is untrusted: the world size is what was really checked in (counted with
``check``, never a number from the store), and a record that does not parse is named.
"""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from typing import Any

from torch._C._distributed_c10d import PrefixStore, Store

from distruntime.control import incident
from distruntime.control.channel import HostChannel
from distruntime.control.protocol import (
    POINTER_KEY,
    as_float,
    as_str,
    parse_record,
    printable,
    read,
    read_many,
    verdict_key,
)
from distruntime.control.verdict import HangReport, build_report, parse_report, sanitize_record

__all__ = ["MalformedRecord", "checked_in", "job_report"]

# The largest job ``where`` will walk (2**22 ranks).
_MAX_WORLD = 1 << 22


class MalformedRecord(ValueError):
    """A store record that is not what distruntime writes; names the key."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"store key {key!r} {why}: not a record distruntime wrote (the store is "
                         "shared and unauthenticated; another program may have written it)")
        self.key = key


def checked_in(job: Store) -> int:
    """How many ranks checked in (``who/0`` .. ``who/<n-1>``): found with O(log n) ``check`` s."""
    if not job.check(["who/0"]):
        return 0
    high = 1
    while high < _MAX_WORLD and job.check([f"who/{high}"]):
        high *= 2
    low = high // 2  # who/<low> exists; who/<high> does not (or the cap)
    while high - low > 1:
        middle = (low + high) // 2
        if job.check([f"who/{middle}"]):
            low = middle
        else:
            high = middle
    return low + 1


def _pointer(root: Store) -> dict[str, Any] | None:
    raw = read(root, POINTER_KEY)
    if raw is None:
        return None
    data = parse_record(raw, POINTER_KEY)
    if data is None or not isinstance(data.get("namespace"), str) or not data["namespace"]:
        raise MalformedRecord(POINTER_KEY, "does not name a namespace")
    return data


def job_report(root: Store, *, reason: str, ask: bool, namespace: str | None = None,
               window_s: float = 3.0) -> HangReport | None:
    """The table of the distruntime job whose store is ``root``; None when there is none.

    Raises:
        MalformedRecord: a record the table needs does not parse.
    """
    threshold = 0.0
    if namespace is None:
        pointer = _pointer(root)
        if pointer is None:
            return None
        namespace = str(pointer["namespace"])
        threshold = as_float(pointer.get("threshold_s"))
    job = PrefixStore(namespace, root)
    world_size = checked_in(job)
    whos = _whos(job, world_size)
    if ask:
        k = incident.latest_event(job) + 1
        won, _event = incident.open_event(job, k, {"kind": "hang", "rank": -1, "by": reason})
        if won:
            report = incident.assemble(job, k, world_size, threshold, window_s=window_s, reason=reason)
            incident.publish_verdict(job, k, report)  # reason "deadline": the ranks do not act on it
            return report
    heartbeats: dict[int, dict[str, Any]] = {}
    for rank, who in whos.items():
        heartbeats[rank] = {"rank": rank, "host": as_str(who.get("host"), limit=255)}
    heartbeats.update(_local_slots(namespace, world_size))
    report = build_report({}, heartbeats, {}, world_size=world_size, now=time.time(), threshold_s=threshold,
                          reason=reason)
    last = incident.latest_event(job)
    if last and job.check([verdict_key(last)]):
        verdict = parse_report(read(job, verdict_key(last)))
        if verdict is None:
            raise MalformedRecord(verdict_key(last), "is not a hang verdict")
        line = f"last verdict (event {last}): {printable(verdict.summary)}"
        report = replace(report, progress=(*report.progress, line))
    return report


def _whos(job: Store, world_size: int) -> dict[int, dict[str, Any]]:
    found: dict[int, dict[str, Any]] = {}
    for key, raw in read_many(job, [f"who/{r}" for r in range(world_size)], expected_size=200).items():
        data = parse_record(raw, key)
        if data is None:
            raise MalformedRecord(key, "is not a check-in record")
        found[int(key.rsplit("/", 1)[1])] = data
    return found


def _local_slots(namespace: str, world_size: int) -> dict[int, dict[str, Any]]:
    """The slots of the job's ranks on this host, as heartbeats (fresh ones count as answers)."""
    channel = HostChannel.open(namespace, socket.gethostname(), create=False)
    if channel is None:
        return {}
    beats: dict[int, dict[str, Any]] = {}
    for rank, slot in channel.read_slots().items():
        beat = sanitize_record(slot)
        if beat is not None and 0 <= rank < world_size:
            beats[rank] = beat
    return beats
