"""What every rank was doing when a job stopped making progress: one cross-rank verdict.

Pure functions over plain JSON-able records, so that the watchdog (inside the job), the
``distruntime where`` command (outside it) and the pytest plugin (at a test's deadline)
build the very same table, and so that every rule is testable without processes.

A rank describes itself with a *state record* (:func:`flight_progress` and
:func:`parse_entries` read torch's Flight Recorder for it, :func:`main_stack` its main
thread). A rank that cannot answer (holding the GIL, stopped, gone) is described by what
its peers see: its last heartbeat, ``/proc`` on the same host, and the stack that
``faulthandler`` wrote for it without needing the GIL. :func:`build_report` turns all of
it into a :class:`HangReport`: a per-rank table with the culprit first, each group's
progress, and the first collective at which ranks disagree (a desync).

Example:
    >>> rec = {"rank": 0, "host": "n1", "pid": 7, "t": 100.0, "where": "train.py:12 in step",
    ...        "groups": {"0": {"desc": "default", "enqueued": 4, "completed": 3}},
    ...        "entries": [{"group": "0", "seq": 4, "op": "all_reduce", "sizes": [[4]],
    ...                     "dtypes": ["Float"], "completed": False, "created": 90.0}]}
    >>> rep = build_report({0: rec}, {1: {"rank": 1, "host": "n1", "pid": 8, "t": 91.0,
    ...     "where": "train.py:30 in step", "groups": {"0": {"desc": "default", "enqueued": 3,
    ...     "completed": 3}}}}, {1: {"proc": "R"}}, world_size=2, now=100.0, threshold_s=5.0)
    >>> rep.ranks[0].rank, rep.ranks[0].kind
    (1, 'unresponsive')
    >>> rep.is_hang
    True
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

from distruntime.control.protocol import as_str, printable

__all__ = [
    "HangReport",
    "RankState",
    "build_report",
    "flight_progress",
    "main_stack",
    "parse_entries",
    "process_state",
]

# Order of the table: who most likely stopped the others comes first.
_KIND_ORDER = {"exited": 0, "stopped": 1, "unresponsive": 2, "running": 3, "desync": 4,
               "waiting": 5, "left": 6}
# Frames of these packages are not "user code" when naming where a rank stands.
_LIBRARY_DIRS = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # distruntime
    os.path.dirname(os.path.abspath(traceback.__file__)) + os.sep,  # the standard library
)
_STACK_LIMIT = 40
# Flight Recorder's dtype names -> torch's.
_DTYPES = {"Float": "float32", "Double": "float64", "Half": "float16", "BFloat16": "bfloat16",
           "Long": "int64", "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8", "Bool": "bool"}
_FAULTHANDLER_FRAME = re.compile(r'File "(.*)", line (\d+) in (.*)$')
_ENTRIES_PER_GROUP = 8
_PROC_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O", "T": "stopped",
                "t": "stopped by a debugger", "Z": "zombie (exited)", "X": "dead"}


# ---------------------------------------------------------------------- reading a rank
def flight_progress(raw: bytes | str) -> dict[str, dict[str, Any]]:
    """Per process group: ``{"enqueued": N, "completed": M}`` from a Flight Recorder dump.

    ``raw`` is ``torch._C._distributed_c10d._dump_fr_trace_json(False)`` (no entries, a
    fraction of a millisecond). Groups are keyed by torch's process-group id.

    Example:
        >>> flight_progress(b'{"pg_status": {"0": {"last_enqueued_collective": "5",'
        ...                 b' "last_completed_collective": "4"}}}')
        {'0': {'enqueued': 5, 'completed': 4}}
    """
    data = json.loads(raw)
    progress = {}
    for pg_id, status in (data.get("pg_status") or {}).items():
        progress[str(pg_id)] = {
            "enqueued": int(status.get("last_enqueued_collective", -1)),
            "completed": int(status.get("last_completed_collective", -1)),
        }
    return progress


def parse_entries(raw: bytes | str, per_group: int = _ENTRIES_PER_GROUP) -> tuple[
        list[dict[str, Any]], dict[str, str]]:
    """The last ``per_group`` collectives of every group, and each group's description.

    Each entry: ``group`` (pg id), ``seq``, ``op`` (``all_reduce``), ``sizes``,
    ``dtypes``, ``completed`` and ``created`` (wall-clock seconds).

    Example:
        >>> entries, names = parse_entries(b'{"entries": [{"pg_id": 0, "collective_seq_id": 3,'
        ...     b' "profiling_name": "gloo:all_gather", "input_sizes": [[4]], "input_dtypes":'
        ...     b' ["Float"], "retired": false, "state": "scheduled", "time_created_ns": 2000000000,'
        ...     b' "process_group": ["0", "default_pg"]}]}')
        >>> entries[0]["op"], entries[0]["seq"], entries[0]["created"], names
        ('all_gather', 3, 2.0, {'0': 'default'})
    """
    data = json.loads(raw)
    by_group: dict[str, list[dict[str, Any]]] = {}
    names: dict[str, str] = {}
    for entry in data.get("entries") or []:
        if entry.get("is_p2p"):
            continue  # point-to-point ops have no collective sequence number
        group = str(entry.get("pg_id", entry.get("process_group", ["?"])[0]))
        pg_name, pg_desc = [*list(entry.get("process_group") or []), "", ""][:2]
        names[group] = _group_label(str(pg_name), str(pg_desc))
        by_group.setdefault(group, []).append({
            "group": group,
            "seq": int(entry.get("collective_seq_id", -1)),
            "op": str(entry.get("profiling_name", "?")).split(":", 1)[-1],
            "sizes": entry.get("input_sizes") or [],
            "dtypes": entry.get("input_dtypes") or [],
            "completed": bool(entry.get("retired")) or entry.get("state") == "completed",
            "created": int(entry.get("time_created_ns", 0)) / 1e9,
        })
    kept = [e for entries in by_group.values() for e in entries[-per_group:]]
    return kept, names


def _group_label(name: str, desc: str) -> str:
    if name == "0" or desc == "default_pg":
        return "default"
    if desc and desc != "undefined":
        return desc.removeprefix("mesh_")
    return f"group {name}"


def main_stack(frame: FrameType | None) -> list[str]:
    """The frames of a stack, outermost first, as ``file:line in func`` strings."""
    frames: list[str] = []
    while frame is not None and len(frames) < _STACK_LIMIT:  # no source lines read: cheap
        frames.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return frames[::-1]


def innermost_user_frame(stack: list[str]) -> str:
    """The innermost frame outside torch, distruntime and the standard library.

    Example:
        >>> innermost_user_frame(["/w/train.py:10 in main", "/x/site-packages/torch/distributed/"
        ...     "distributed_c10d.py:2800 in all_reduce"])
        '/w/train.py:10 in main'
    """
    for frame in reversed(stack):
        path = frame.rsplit(":", 1)[0]
        if not _is_library(path):
            return frame
    return stack[-1] if stack else ""


def _is_library(path: str) -> bool:
    parts = path.replace("\\", "/")
    if "/site-packages/torch/" in parts or "/dist-packages/torch/" in parts or "/torch/distributed/" in parts:
        return True
    if "/site-packages/" in parts or "/dist-packages/" in parts:
        return False  # another library is the user's code as far as we can tell
    return path.startswith(_LIBRARY_DIRS) or path.startswith("<")


def process_state(pid: int) -> str:
    """One letter from ``/proc/PID/stat`` (``R``, ``S``, ``D``, ``T``, ``Z``...), ``""`` when gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def parse_faulthandler(text: str, thread_ident: int | None = None) -> list[str]:
    """The main thread's frames from a ``faulthandler`` dump, outermost first.

    ``faulthandler`` writes ``Thread 0x... (most recent call first):`` blocks; the block of
    ``thread_ident`` is taken (the last block when not given or not found).

    Example:
        >>> parse_faulthandler('Thread 0x01 (most recent call first):\\n'
        ...     '  File "/w/t.py", line 5 in spin\\n  File "/w/t.py", line 9 in <module>\\n', 1)
        ['/w/t.py:9 in <module>', '/w/t.py:5 in spin']
    """
    blocks: list[tuple[int | None, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("Thread 0x", "Current thread 0x")):
            ident = int(stripped.split("0x", 1)[1].split()[0], 16)
            blocks.append((ident, []))
        elif blocks and (match := _FAULTHANDLER_FRAME.match(stripped)):
            path, lineno, func = match.groups()
            blocks[-1][1].append(f"{path}:{lineno} in {func}")
    chosen = [frames for ident, frames in blocks if ident == thread_ident]
    frames = chosen[-1] if chosen else (blocks[-1][1] if blocks else [])
    return list(reversed(frames))


# ---------------------------------------------------------------------- the verdict
@dataclass(frozen=True)
class RankState:
    """One row of the table.

    Attributes:
        rank: global rank.
        kind: ``waiting`` (in a collective), ``running`` (Python, not in a collective),
            ``desync`` (in a collective that differs from its peers'), ``unresponsive``
            (alive, but its watchdog thread could not run: native code holding the GIL),
            ``stopped`` (SIGSTOP), ``exited``, ``left`` (closed its runtime already).
        detail: the human sentence for the state.
        where: innermost user frame, ``file.py:LINE in func`` (``""`` when unknown).
        stack: main-thread frames, outermost first (may be the last one known).
        host: its host name; pid: its process id.
    """

    rank: int
    kind: str
    detail: str
    where: str = ""
    stack: tuple[str, ...] = ()
    host: str = ""
    pid: int = 0


@dataclass(frozen=True)
class HangReport:
    """The cross-rank verdict: the table (culprit first), group progress and desyncs.

    Attributes:
        is_hang: some rank waited longer than the threshold for peers that had not
            arrived (or arrived at a different collective). False when every rank is in
            the same collective (slow, not stuck).
        ranks: one :class:`RankState` per rank, the most likely culprit first.
        progress: one line per group: the last collective each rank reached.
        desyncs: the first collective of each group at which ranks disagree.
        threshold_s: the hang threshold in force.
        reason: ``"hang"`` (detected by the watchdog), ``"deadline"`` (a test's deadline)
            or ``"snapshot"`` (``distruntime where``).
        summary: the one-line verdict.
        hosts: every host of the job that the verdict heard of (a rank that must unblock
            its collectives shuts down its connections to these).
    """

    is_hang: bool
    ranks: tuple[RankState, ...]
    progress: tuple[str, ...] = ()
    desyncs: tuple[str, ...] = ()
    threshold_s: float = 0.0
    reason: str = "hang"
    summary: str = ""
    hosts: tuple[str, ...] = ()

    @property
    def culprits(self) -> tuple[int, ...]:
        """The ranks listed before the first rank that merely waits."""
        first = self.ranks[0].kind if self.ranks else ""
        if first in ("waiting", "left"):
            return ()
        return tuple(r.rank for r in self.ranks if r.kind not in ("waiting", "left"))

    def format(self, stacks: bool = True) -> str:
        """The verdict as text: summary, per-rank table, progress, desyncs, stacks."""
        lines = [self.summary] if self.summary else []
        lines.append("rank  state")
        for row in self.ranks:
            where = f" at {row.where}" if row.where and row.where not in row.detail else ""
            lines.append(f"{row.rank:>4}  {row.detail}{where}  [{row.host} pid {row.pid}]")
        if self.desyncs:
            lines.append("desync:")
            lines.extend(f"  {d}" for d in self.desyncs)
        if self.progress:
            lines.append("progress (last collective each rank reached):")
            lines.extend(f"  {p}" for p in self.progress)
        if stacks:
            shown = [row for row in self.ranks if row.kind not in ("waiting", "left")] or list(self.ranks[:1])
            for row in shown:
                if row.stack:
                    lines.append(f"rank {row.rank} main thread (innermost last):")
                    lines.extend(f"    {frame}" for frame in row.stack[-12:])
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> HangReport:
        """The report written by :meth:`to_json`; ``ValueError`` when ``text`` is not one."""
        report = parse_report(text)
        if report is None:
            raise ValueError("not a distruntime hang report")
        return report


def parse_report(text: str | bytes | None, limit: int = 8 << 20) -> HangReport | None:
    """A :class:`HangReport` from untrusted JSON (the store), or None when it is not one.

    Every field is type-checked and cut to size, so a record anyone could have written can
    neither crash the reader nor smuggle in a non-string where text is expected.

    Example:
        >>> text = '{"is_hang": true, "ranks": [{"rank": 1, "kind": "stopped", "detail": "x"}]}'
        >>> parse_report(text).ranks[0].kind
        'stopped'
        >>> parse_report('{"is_hang": "yes", "ranks": 3}') is None, parse_report(b"\\xff") is None
        (True, True)
    """
    if text is None or len(text) > limit:
        return None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("is_hang"), bool) \
            or not isinstance(data.get("ranks"), list):
        return None
    rows = []
    for item in data["ranks"]:
        if not isinstance(item, dict) or type(item.get("rank")) is not int:
            return None
        stack = item.get("stack") or []
        pid = item.get("pid", 0)
        rows.append(RankState(
            rank=item["rank"], kind=_text(item.get("kind"), 32), detail=_text(item.get("detail"), 2000),
            where=_text(item.get("where"), 500),
            stack=tuple(_text(f, 500) for f in stack[:_STACK_LIMIT]) if isinstance(stack, list) else (),
            host=_text(item.get("host"), 255), pid=pid if type(pid) is int else 0))

    def lines(name: str) -> tuple[str, ...]:
        value = data.get(name) or []
        return tuple(_text(v, 2000) for v in value[:1000]) if isinstance(value, list) else ()

    threshold = data.get("threshold_s", 0.0)
    return HangReport(
        is_hang=data["is_hang"], ranks=tuple(rows), progress=lines("progress"), desyncs=lines("desyncs"),
        threshold_s=float(threshold) if type(threshold) in (int, float) else 0.0,
        reason=_text(data.get("reason"), 32) or "hang", summary=_summary_text(data.get("summary")),
        hosts=lines("hosts"))


def _summary_text(value: Any) -> str:
    return printable(value[:4000], keep_newlines=True) if isinstance(value, str) else ""


def _text(value: Any, limit: int) -> str:
    return as_str(value, "", limit)


@dataclass
class _Row:
    rank: int
    kind: str = "running"
    detail: str = ""
    where: str = ""
    stack: list[str] = field(default_factory=list)
    host: str = ""
    pid: int = 0
    waited: float = 0.0
    seq: int = -1


def _shape(entry: Mapping[str, Any]) -> str:
    if entry.get("op", "?") == "?":  # a heartbeat reads op and shapes only once a wait is long
        return "(op not read yet)"
    sizes = entry.get("sizes") or []
    dtypes = [_DTYPES.get(str(d), str(d).lower()) for d in entry.get("dtypes") or []]
    if not sizes and not dtypes:  # a barrier, or no Flight Recorder to say (op from the frame)
        return str(entry["op"])
    shape = ", ".join("[" + ", ".join(str(n) for n in s) + "]" for s in sizes[:2])
    if len(sizes) > 2:
        shape += f", ... ({len(sizes)} tensors)"
    dtype = dtypes[0] if dtypes else ""
    return f"{entry['op']}({shape}{' ' + dtype if dtype else ''})"


def _seq(seq: int) -> str:
    """``#4``; ``#?`` where no Flight Recorder numbers the collectives."""
    return f"#{seq}" if seq >= 0 else "#?"


def _ranks_text(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, sorted(ranks)))


def build_report(
    records: Mapping[int, Mapping[str, Any]],
    heartbeats: Mapping[int, Mapping[str, Any]],
    local_views: Mapping[int, Mapping[str, Any]],
    *,
    world_size: int,
    now: float,
    threshold_s: float,
    reason: str = "hang",
    left: frozenset[int] = frozenset(),
) -> HangReport:
    """Assemble the verdict.

    Args:
        records: state records of the ranks that answered (``rank -> record``).
        heartbeats: the last heartbeat of ranks that did not answer.
        local_views: what a peer on the same host saw of a rank that did not answer:
            ``{"proc": "T"}`` (``/proc`` state letter, ``""`` when the pid is gone) and
            optionally ``"stack"`` (frames from its ``faulthandler`` dump).
        world_size: number of ranks.
        now: wall-clock time of the verdict (``time.time()``).
        threshold_s: the hang threshold.
        reason: ``"hang"``, ``"deadline"`` or ``"snapshot"``.
        left: ranks that closed their runtime already.
    """
    if reason == "snapshot":  # nobody was asked: a fresh heartbeat stands for an answer
        fresh = {r: _beat_as_record(b) for r, b in heartbeats.items() if _fresh(b, now) and r not in records}
        records = {**fresh, **records}
        heartbeats = {r: b for r, b in heartbeats.items() if r not in records}
    rows = {r: _describe(r, records, heartbeats, local_views, now=now, left=r in left)
            for r in range(world_size)}
    names: dict[str, str] = {}
    for rec in list(records.values()) + list(heartbeats.values()):
        for gid, g in (rec.get("groups") or {}).items():
            names.setdefault(str(gid), str(g.get("desc") or _group_label(str(gid), "")))
    desyncs, desync_ranks = _find_desyncs(records, names)
    for rank, text in desync_ranks.items():
        row = rows[rank]
        if row.kind == "waiting":
            row.kind, row.detail = "desync", text
    progress = _progress(records, heartbeats, names, world_size)
    waiting = [row for row in rows.values() if row.kind in ("waiting", "desync")]
    stuck = [row for row in rows.values() if row.kind in ("exited", "stopped", "unresponsive", "running")]
    longest = max((row.waited for row in waiting), default=0.0)
    if reason == "hang":
        someone_missing = bool(stuck or desyncs or _behind(records, heartbeats))
        is_hang = bool(waiting) and longest >= threshold_s and someone_missing
    else:
        is_hang = bool(waiting or stuck)
    order = sorted(rows.values(), key=lambda row: (_KIND_ORDER.get(row.kind, 9), -row.waited, row.rank))
    kept, folded = _fold_waiting(order)
    ranks = tuple(RankState(row.rank, row.kind, row.detail, row.where, tuple(row.stack), row.host, row.pid)
                  for row in kept)
    progress.extend(folded)
    hosts = tuple(sorted({row.host for row in rows.values() if row.host}))
    summary = _summary(ranks, desyncs, longest=longest, threshold_s=threshold_s, reason=reason,
                       is_hang=is_hang)
    return HangReport(is_hang, ranks, tuple(progress), tuple(desyncs), threshold_s, reason, summary, hosts)


# Rows listed one by one; beyond this, ranks that merely wait are counted per collective,
# so that a verdict over 100k ranks stays a few hundred kB (it goes to every host).
_MAX_WAITING_ROWS = 256


def _fold_waiting(order: list[_Row]) -> tuple[list[_Row], list[str]]:
    waiting = [row for row in order if row.kind == "waiting"]
    if len(waiting) <= _MAX_WAITING_ROWS:
        return order, []
    folded_rows = waiting[_MAX_WAITING_ROWS:]
    dropped = {row.rank for row in folded_rows}
    by_collective: dict[str, list[int]] = {}
    for row in folded_rows:
        by_collective.setdefault(row.detail.split(" for ", 1)[0], []).append(row.rank)
    lines = [f"{len(ranks)} more ranks {what} (first: {', '.join(map(str, sorted(ranks)[:8]))})"
             for what, ranks in sorted(by_collective.items(), key=lambda kv: -len(kv[1]))]
    return [row for row in order if row.rank not in dropped], lines


_Records = Mapping[int, Mapping[str, Any]]


def _fresh(beat: Mapping[str, Any], now: float) -> bool:
    return "t" in beat and now - float(beat["t"]) < 3 * float(beat.get("tick", 1.0)) + 1.0


def _beat_as_record(beat: Mapping[str, Any]) -> dict[str, Any]:
    """A heartbeat read as a state record: pending collectives become unfinished entries."""
    entries = [
        {"group": gid, "seq": p.get("seq", -1), "op": p.get("op", "?"), "sizes": p.get("sizes", []),
         "dtypes": p.get("dtypes", []), "completed": False, "created": p.get("since", beat.get("t", 0.0))}
        for gid, p in (beat.get("pending") or {}).items()
    ]
    return {**beat, "entries": entries, "stack": []}


def _describe(rank: int, records: _Records, heartbeats: _Records, local_views: _Records, *, now: float,
              left: bool) -> _Row:
    rec = records.get(rank)
    if rec is not None:
        row = _Row(rank, host=str(rec.get("host", "")), pid=int(rec.get("pid", 0)),
                   stack=list(rec.get("stack") or []), where=str(rec.get("where", "")))
        pending = [e for e in rec.get("entries") or [] if not e.get("completed")]
        if pending:
            oldest = min(pending, key=lambda e: float(e.get("created", now)))
            row.kind = "waiting"
            row.waited = max(now - float(oldest.get("created", now)), 0.0)
            row.seq = int(oldest.get("seq", -1))
            group = str(rec.get("groups", {}).get(str(oldest.get("group")), {}).get("desc", "")) or \
                _group_label(str(oldest.get("group")), "")
            row.detail = (f"waiting in collective {_seq(row.seq)} {_shape(oldest)} (group {group}) "
                          f"for {row.waited:.1f} s")
            if row.where:
                row.detail += f", called at {row.where}"
        elif left:
            row.kind, row.detail = "left", "left the runtime (finished its work)"
        else:
            row.detail = f"running Python at {row.where or '?'}"
        return row
    beat = heartbeats.get(rank) or {}
    view = local_views.get(rank)
    row = _Row(rank, host=str(beat.get("host", "")), pid=int(beat.get("pid", 0)),
               where=str(beat.get("where", "")))
    age = now - float(beat["t"]) if "t" in beat else None
    last = f"; last heartbeat {age:.1f} s ago at {row.where}" if age is not None and row.where else ""
    if left:
        row.kind, row.detail = "left", "left the runtime (finished its work)"
    elif view is not None:
        state = str(view.get("proc", ""))
        row.stack = list(view.get("stack") or [])
        if row.stack:
            row.where = innermost_user_frame(row.stack)
        if state in ("", "Z", "X"):
            code = view.get("exit")
            row.kind = "exited"
            row.detail = f"exited ({code})" if code else f"exited (pid {row.pid} on {row.host} is gone)"
        elif state in ("T", "t"):
            row.kind, row.detail = "stopped", f"stopped (SIGSTOP: /proc state {state}){last}"
        else:
            row.kind = "unresponsive"
            where = f" at {row.where}" if row.where else ""
            row.detail = (f"blocked in native code holding the GIL{where} (its watchdog could not run"
                          f"{f' for {age:.1f} s' if age is not None else ''}; /proc state {state}: "
                          f"{_PROC_STATES.get(state, state)})")
    elif beat.get("host_silent"):
        row.kind = "unresponsive"
        row.detail = (f"did not answer: no rank on its host {row.host or '?'} answered (every rank there "
                      "is stuck, or the host is unreachable); last heard from it at check-in")
    else:
        row.kind = "unresponsive"
        row.detail = ("did not answer: holding the GIL, stopped, or its host is unreachable "
                      f"(no peer on its host could look){last}")
    return row


def _fingerprints(records: Mapping[int, Mapping[str, Any]]) -> dict[tuple[str, int], dict[int, str]]:
    seen: dict[tuple[str, int], dict[int, str]] = {}
    for rank, rec in records.items():
        for entry in rec.get("entries") or []:
            seen.setdefault((str(entry.get("group")), int(entry.get("seq", -1))), {})[rank] = _shape(entry)
    return seen


def _find_desyncs(records: Mapping[int, Mapping[str, Any]],
                  names: Mapping[str, str]) -> tuple[list[str], dict[int, str]]:
    """The first collective of each group at which the ranks' ops, shapes or dtypes differ."""
    first: dict[str, tuple[int, dict[int, str]]] = {}
    for (group, seq), by_rank in _fingerprints(records).items():
        if len(set(by_rank.values())) > 1 and (group not in first or seq < first[group][0]):
            first[group] = (seq, by_rank)
    lines, minority = [], {}
    for group, (seq, by_rank) in sorted(first.items()):
        variants: dict[str, list[int]] = {}
        for rank, shape in by_rank.items():
            variants.setdefault(shape, []).append(rank)
        ordered = sorted(variants.items(), key=lambda kv: (-len(kv[1]), min(kv[1])))
        parts = "; ".join(f"{_ranks_text(ranks)} in {shape}" for shape, ranks in ordered)
        name = names.get(group) or _group_label(group, "")
        lines.append(f"collective {_seq(seq)} of group {name}: {parts}")
        majority = ordered[0][1] if len(ordered[0][1]) > len(ordered[-1][1]) else []
        for shape, ranks in ordered:
            if ranks is majority:
                continue
            for rank in ranks:
                minority[rank] = (f"in collective {_seq(seq)} {shape} (group {name}) "
                                  f"while {_ranks_text(majority or [r for r in by_rank if r not in ranks])} "
                                  f"called {ordered[0][0] if majority else 'another op'}: desync")
    return lines, minority


def _behind(records: Mapping[int, Mapping[str, Any]], heartbeats: Mapping[int, Mapping[str, Any]]) -> bool:
    """Whether some rank has not yet enqueued the collective another rank waits in."""
    reached: dict[str, list[int]] = {}
    for rec in list(records.values()) + list(heartbeats.values()):
        for gid, g in (rec.get("groups") or {}).items():
            reached.setdefault(str(gid), []).append(int(g.get("enqueued", -1)))
    return any(len(set(values)) > 1 for values in reached.values())


def _progress(records: Mapping[int, Mapping[str, Any]], heartbeats: Mapping[int, Mapping[str, Any]],
              names: Mapping[str, str], world_size: int) -> list[str]:
    lines = []
    groups: dict[str, dict[int, tuple[int, int]]] = {}
    for source in (heartbeats, records):  # answered records override heartbeats
        for rank, rec in source.items():
            for gid, g in (rec.get("groups") or {}).items():
                reached = (int(g.get("enqueued", -1)), int(g.get("completed", -1)))
                groups.setdefault(str(gid), {})[rank] = reached
    for gid in sorted(groups, key=lambda g: (len(g), g)):
        by_value: dict[tuple[int, int], list[int]] = {}
        for rank, value in groups[gid].items():
            by_value.setdefault(value, []).append(rank)
        parts = []
        for (enq, done), ranks in sorted(by_value.items(), key=lambda kv: min(kv[1])):
            state = "done" if done >= enq else "in progress"
            parts.append(f"{_ranks_text(ranks)} at #{enq} ({state})")
        missing = [r for r in range(world_size) if r not in groups[gid]] if gid == "0" else []
        if missing:
            parts.append(f"{_ranks_text(missing)} unknown")
        lines.append(f"group {names.get(gid, gid)}: " + "; ".join(parts))
    return lines


def _summary(ranks: tuple[RankState, ...], desyncs: list[str], *, longest: float, threshold_s: float,
             reason: str, is_hang: bool) -> str:
    if not ranks:
        return ""
    if reason == "hang" and not is_hang:
        return f"no hang: every rank is in the same collective (waiting {longest:.1f} s)"
    head = ranks[0]
    cause = f"rank {head.rank} {head.detail}" if head.kind not in ("waiting", "left") else ""
    if desyncs and head.kind in ("desync", "waiting"):
        cause = f"desync: {desyncs[0]}"
    opener = {
        "hang": f"hang: a rank waited {longest:.1f} s (threshold {threshold_s:g} s) in a collective",
        "deadline": "the test's deadline passed",
        "snapshot": "snapshot of a running job",
    }.get(reason, reason)
    return f"{opener}; {cause}" if cause else opener


def _main_ident() -> int:
    import threading

    return threading.main_thread().ident or 0


def own_stack() -> list[str]:
    """This process's main-thread stack (safe from any thread that holds the GIL)."""
    return main_stack(sys._current_frames().get(_main_ident()))


# ---------------------------------------------------------------------- untrusted records
def _int(value: Any, default: int = -1) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 62
    return value if ok else default


def _num(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    number = float(value)
    return number if math.isfinite(number) and abs(number) < 1e15 else default


def _strings(value: Any, limit: int = _STACK_LIMIT) -> list[str]:
    return [_text(v, 500) for v in value[:limit] if isinstance(v, str)] if isinstance(value, list) else []


def _entry(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    sizes = value.get("sizes")
    return {
        "group": _text(value.get("group"), 64) or str(_int(value.get("group"), 0)),
        "seq": _int(value.get("seq")),
        "op": _text(value.get("op"), 64) or "?",
        "sizes": [[_int(n, 0) for n in s[:8] if isinstance(n, int)] for s in sizes[:8] if isinstance(s, list)]
        if isinstance(sizes, list) else [],
        "dtypes": _strings(value.get("dtypes"), 8),
        "completed": value.get("completed") is True,
        "created": _num(value.get("created")),
    }


def _groups(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        return {}
    groups = {}
    for gid, g in list(value.items())[:256]:
        if isinstance(g, dict):
            groups[_text(gid, 64)] = {"desc": _text(g.get("desc"), 200), "enqueued": _int(g.get("enqueued")),
                                      "completed": _int(g.get("completed"))}
    return groups


def _pending(value: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"seq": _int(value.get("seq")), "since": _num(value.get("since"))}
    for name in ("op", "sizes", "dtypes"):
        if name in value:
            entry[name] = (_entry(value) or {}).get(name)
    return entry


def sanitize_record(value: Any) -> dict[str, Any] | None:
    """A rank's state record or heartbeat from the store, with every field build_report reads
    coerced to its type (and cut to size); None when it is not a record at all.

    Example:
        >>> sanitize_record({"rank": 1, "pid": "7; rm -rf /", "where": 3, "entries": [{"seq": "x"}]})["pid"]
        0
        >>> sanitize_record([1]) is None
        True
    """
    if not isinstance(value, dict):
        return None
    entries = [e for e in (_entry(v) for v in (value.get("entries") or [])[:64]
                           if isinstance(value.get("entries"), list)) if e is not None]
    pending = value.get("pending")
    pending = pending if isinstance(pending, dict) else {}
    record: dict[str, Any] = {
        "rank": _int(value.get("rank")), "host": _text(value.get("host"), 255),
        "pid": _int(value.get("pid"), 0),
        "main": _int(value.get("main"), 0), "where": _text(value.get("where"), 500),
        "stack": _strings(value.get("stack")), "entries": entries, "groups": _groups(value.get("groups")),
        "tick": _num(value.get("tick"), 1.0),
        "pending": {_text(gid, 64): _pending(p)
                    for gid, p in list(pending.items())[:64] if isinstance(p, dict)},
    }
    if "t" in value:
        record["t"] = _num(value.get("t"))
    if value.get("left") is True:
        record["left"] = True
    if value.get("host_silent") is True:
        record["host_silent"] = True
    return record


def sanitize_view(value: Any) -> dict[str, Any] | None:
    """What a peer saw of a silent local rank (``/proc`` letter, faulthandler stack), type-checked."""
    if not isinstance(value, dict):
        return None
    view: dict[str, Any] = {"proc": _text(value.get("proc"), 2), "stack": _strings(value.get("stack"))}
    if isinstance(value.get("exit"), str):
        view["exit"] = _text(value.get("exit"), 200)
    return view
