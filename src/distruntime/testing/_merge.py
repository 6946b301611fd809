"""Per-rank results -> the pytest reports of one distributed test.

The rules:

* every rank passed -> passed; every rank skipped -> skipped with the real reason;
  every rank xfailed (xpassed) -> xfailed (xpassed);
* anything else is one failure whose text starts with the rank that failed first (its
  full pytest traceback), then each other rank: peers that failed only because of it
  ("collateral": a ``PeerFailureError``, or a later communication error) in one line,
  independent failures in full, ranks that skipped alone (a non-collective skip), ranks
  that died (signal or exit code, with the tail of their log) and ranks still running
  when the test was stopped (with their Python stacks);
* captured output comes back per rank: ``Captured stdout call (rank 1)``; for a
  failure it is part of the failure text, so JUnit XML (``<failure>``) carries it too;
* each rank's time is in the teardown report's ``user_properties``
  (``distruntime:rank1:duration_s``): JUnit ``<properties>``, ``--durations`` summary.

Only pytest's public API is used here: a failure text is any object with
``toterminal`` and ``reprcrash`` (what pytest, its JUnit writer and pytest-xdist read).
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import pytest

__all__ = [
    "DURATION_PROPERTY", "Crash", "DistFailureRepr", "MergeInfo", "RankResult",
    "keywords", "merge", "trim_stacks",
]

_When = Literal["setup", "call", "teardown"]
_PHASES: tuple[_When, ...] = ("setup", "call", "teardown")

# Text of errors a rank gets when a peer has gone: failures that follow another rank's
# failure and match one of these are reported as its consequence.
_FALLOUT_PATTERNS = (
    "peerfailureerror",
    "failed because",
    "connection closed by peer",
    "connection reset",
    "connection refused",
    "broken pipe",
    "socket",
    "timed out",
    "timeout",
    "distbackenderror",
    "distnetworkerror",
    "diststoreerror",
    "gloo",
    "nccl",
)


@dataclass
class RankResult:
    """Everything the controller learnt about one rank during one test.

    Attributes:
        rank: the rank.
        reports: the rank's pytest reports in order (setup, call, teardown).
        report_times: wall-clock time each report arrived (same order).
        done: the rank finished the test protocol.
        exit_code: the process's exit status when it died (negative: a signal).
        died_at: wall-clock time the death was seen.
        stuck: still running when the test was stopped.
        stack: its Python stacks (SIGUSR1 dump) when it was stopped.
        log_tail: the last lines of its process log (stderr, crash dumps).
        peer_failures: ranks the runtime said failed before this one.
        notes: what the test left behind in the process (hygiene).
        error: an error of the harness itself on this rank.

    Example:
        >>> RankResult(0).status()
        'stuck'
    """

    rank: int
    reports: list[pytest.TestReport] = field(default_factory=list)
    report_times: list[float] = field(default_factory=list)
    done: bool = False
    exit_code: int | None = None
    died_at: float | None = None
    stuck: bool = False
    stack: str = ""
    log_tail: str = ""
    peer_failures: dict[int, str] | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def report(self, when: str) -> pytest.TestReport | None:
        return next((r for r in self.reports if r.when == when), None)

    def first_failed(self) -> pytest.TestReport | None:
        return next((r for r in self.reports if r.failed), None)

    def skip_report(self) -> pytest.TestReport | None:
        return next((r for r in self.reports if r.skipped), None)

    def status(self) -> str:
        """passed, failed, skipped, xfailed, xpassed, died, stuck or error."""
        skipped = self.skip_report()
        call = self.report("call")
        checks = (
            (self.error is not None, "error"),
            (self.first_failed() is not None, "failed"),
            (self.exit_code is not None, "died"),
            (not self.done, "stuck"),
            (skipped is not None and hasattr(skipped, "wasxfail"), "xfailed"),
            (skipped is not None, "skipped"),
            (call is not None and hasattr(call, "wasxfail"), "xpassed"),
        )
        return next((name for hit, name in checks if hit), "passed")

    def event_time(self) -> float:
        """When this rank's problem (failure, skip, death) happened."""
        for rep, t in zip(self.reports, self.report_times, strict=False):
            if rep.failed or rep.skipped:
                return t
        if self.died_at is not None:
            return self.died_at
        return float("inf")

    def current_phase(self) -> _When:
        """The phase the rank was in when it stopped reporting."""
        done = {r.when for r in self.reports}
        return next((w for w in _PHASES if w not in done), "teardown")


@dataclass(frozen=True)
class MergeInfo:
    """Facts about the run of one test, for the report text."""

    world_size: int
    backend: str
    timeout_s: float
    timeout_origin: str
    elapsed_s: float
    timed_out: bool = False
    grace_s: float = 0.0
    full_report: bool = False
    # pytest's --show-capture: which captured sections a failure shows.
    show_capture: str = "all"


class _Writer(Protocol):
    """What ``toterminal`` needs of pytest's terminal writer."""

    def line(self, s: str = "", **markup: bool) -> None: ...

    def sep(self, sepchar: str, title: str | None = None, **markup: Any) -> None: ...


@dataclass(frozen=True)
class Crash:
    """Where and how a test failed: the ``reprcrash`` pytest shows in its summary line.

    Example:
        >>> Crash("test_m.py", 7, "[rank 1] assert 10 < 5").message
        '[rank 1] assert 10 < 5'
    """

    path: str
    lineno: int
    message: str


class _TextWriter:
    """A plain-text ``_Writer`` for ``str()`` (JUnit XML, pytest-xdist's serialised reports)."""

    def __init__(self, width: int | None = None) -> None:
        self.lines: list[str] = []
        columns = shutil.get_terminal_size().columns
        self.width = width or (columns if columns >= 40 else 80)  # as pytest's own writer

    def __repr__(self) -> str:
        return f"_TextWriter(lines={len(self.lines)})"

    def line(self, s: str = "", **markup: bool) -> None:
        self.lines.append(s)

    def sep(self, sepchar: str, title: str | None = None, **markup: Any) -> None:
        if not title:
            self.lines.append(sepchar * self.width)
            return
        fill = sepchar * max((self.width - len(title) - 2) // (2 * len(sepchar)), 1)
        line = f"{fill} {title} {fill}"
        if len(line) + len(sepchar.rstrip()) <= self.width:
            line += sepchar.rstrip()
        self.lines.append(line)


@dataclass(eq=False)
class DistFailureRepr:
    """The failure text of a distributed test: a header, then one block per rank.

    ``toterminal`` and ``reprcrash`` are what pytest's public report API reads; nested
    blocks are the ranks' own pytest failure texts (anything with ``toterminal``).
    """

    header: str
    blocks: list[tuple[str, Any]]
    reprcrash: Crash

    def toterminal(self, tw: _Writer) -> None:
        self._write(tw, nested_as_text=False)

    def __str__(self) -> str:
        writer = _TextWriter()
        self._write(writer, nested_as_text=True)
        return "\n".join(writer.lines).strip()

    def _write(self, tw: _Writer, *, nested_as_text: bool) -> None:
        # The crash line first: where reports are flattened to text (pytest-xdist), the
        # first line is what summaries show.
        tw.line(self.reprcrash.message, red=True, bold=True)
        tw.line(self.header, red=True)
        for title, content in self.blocks:
            tw.sep("-", title)
            if isinstance(content, str) or nested_as_text:
                for line in str(content).rstrip("\n").splitlines():
                    tw.line(line)
            else:
                content.toterminal(tw)


def keywords(item: pytest.Item) -> dict[str, Literal[1]]:
    """The item's keywords as a report carries them."""
    return dict.fromkeys(item.keywords, 1)


def _listed(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _crash_message(rep: pytest.TestReport) -> str:
    crash = getattr(rep.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    if isinstance(rep.longrepr, tuple):
        return str(rep.longrepr[2])
    return rep.longreprtext.strip().splitlines()[-1] if rep.longreprtext.strip() else "failed"


def _skip_reason(rep: pytest.TestReport) -> str:
    if hasattr(rep, "wasxfail"):
        return f"xfail: {rep.wasxfail}" if rep.wasxfail else "xfail"
    if isinstance(rep.longrepr, tuple):
        return str(rep.longrepr[2])
    return rep.longreprtext


def _death(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _is_fallout(rank: RankResult) -> bool:
    failed = rank.first_failed()
    if failed is None:
        return False
    text = _crash_message(failed).lower()
    return any(p in text for p in _FALLOUT_PATTERNS)


def _rank_sections(ranks: Sequence[RankResult], when: str | None) -> list[tuple[str, str]]:
    """Each rank's captured output, headings tagged with the rank."""
    sections: list[tuple[str, str]] = []
    for rank in ranks:
        rep = rank.report(when) if when is not None else (rank.reports[-1] if rank.reports else None)
        if rep is None:
            continue
        sections.extend((f"{title} (rank {rank.rank})", text) for title, text in rep.sections)
    return sections


def _shown(sections: list[tuple[str, str]], show_capture: str) -> list[tuple[str, str]]:
    """The captured sections pytest's ``--show-capture`` lets a failure show."""
    if show_capture == "no":
        return []
    return [(title, text) for title, text in sections if show_capture == "all" or show_capture in title]


# The user property that carries a rank's time in the test (setup + call + teardown).
DURATION_PROPERTY = "distruntime:rank{rank}:duration_s"


def _properties(ranks: Sequence[RankResult]) -> list[tuple[str, object]]:
    props: list[tuple[str, object]] = []
    for rank in ranks:
        rep = rank.reports[-1] if rank.reports else None
        if rep is not None:
            props.extend((f"rank{rank.rank}:{name}", value) for name, value in rep.user_properties)
    for rank in ranks:
        if rank.reports:
            seconds = round(sum(rep.duration for rep in rank.reports), 6)
            props.append((DURATION_PROPERTY.format(rank=rank.rank), seconds))
    return props


def _phase_report(
    item: pytest.Item, ranks: Sequence[RankResult], when: _When, **extra: object
) -> pytest.TestReport:
    """A passed (or, via ``extra``, skipped) report made from every rank's report of ``when``."""
    own = [r.report(when) for r in ranks]
    present = [rep for rep in own if rep is not None]
    outcome = extra.pop("outcome", "passed")
    longrepr = extra.pop("longrepr", None)
    return pytest.TestReport(
        item.nodeid,
        item.location,
        keywords(item),
        outcome,  # type: ignore[arg-type]
        longrepr,  # type: ignore[arg-type]
        when,
        sections=_rank_sections(ranks, when),
        duration=max((rep.duration for rep in present), default=0.0),
        start=min((rep.start for rep in present), default=0.0),
        stop=max((rep.stop for rep in present), default=0.0),
        user_properties=_properties(ranks) if when == "teardown" else (),
        **extra,
    )


def merge(item: pytest.Item, ranks: Sequence[RankResult], info: MergeInfo) -> list[pytest.TestReport]:
    """The setup/call/teardown reports of a distributed test from its ranks' results."""
    statuses = {r.status() for r in ranks}
    if statuses == {"passed"}:
        return [_phase_report(item, ranks, w) for w in _PHASES]
    if statuses in ({"skipped"}, {"xfailed"}):
        return _all_skipped(item, ranks)
    if statuses == {"xpassed"}:
        call = ranks[0].report("call")
        wasxfail = getattr(call, "wasxfail", "")
        return [
            _phase_report(item, ranks, "setup"),
            _phase_report(item, ranks, "call", wasxfail=wasxfail),
            _phase_report(item, ranks, "teardown"),
        ]
    return _failure(item, ranks, info)


def _all_skipped(item: pytest.Item, ranks: Sequence[RankResult]) -> list[pytest.TestReport]:
    first = [r.skip_report() for r in ranks]
    reps = [rep for rep in first if rep is not None]
    when: _When = "setup" if any(rep.when == "setup" for rep in reps) else "call"
    template = next(rep for rep in reps if rep.when == when)
    extra: dict[str, object] = {"outcome": "skipped"}
    if hasattr(template, "wasxfail"):
        extra["wasxfail"] = template.wasxfail
        extra["longrepr"] = template.longrepr
    else:
        longrepr = template.longrepr
        reasons = {_skip_reason(rep) for rep in reps}
        if isinstance(longrepr, tuple) and len(reasons) > 1:
            pairs = [(r.rank, rep) for r, rep in zip(ranks, first, strict=True) if rep is not None]
            others = "; ".join(f"rank {rank}: {_skip_reason(rep)}" for rank, rep in pairs)
            longrepr = (longrepr[0], longrepr[1], f"{longrepr[2]} (reasons differ: {others})")
        extra["longrepr"] = longrepr
    skipped = _phase_report(item, ranks, when, **extra)
    out = [skipped] if when == "setup" else [_phase_report(item, ranks, "setup"), skipped]
    return [*out, _phase_report(item, ranks, "teardown")]


def _failure(item: pytest.Item, ranks: Sequence[RankResult], info: MergeInfo) -> list[pytest.TestReport]:
    by_status: dict[str, list[RankResult]] = {}
    for r in ranks:
        by_status.setdefault(r.status(), []).append(r)
    skippers = [r for r in ranks if r.status() in ("skipped", "xfailed")]
    # Candidates for the root cause: real failures, deaths, harness errors, lone skips.
    candidates = [r for r in ranks if r.status() in ("failed", "died", "error") or r in skippers]
    # The runtime tells a rank that another failed before it (peer_failures), but a rank
    # that failed with its own, non-communication error is not that rank's collateral.
    primary = [r for r in candidates if not (_peer_failure_text(r) or (r.peer_failures and _is_fallout(r)))]
    pool = primary or candidates
    root = min(pool, key=lambda r: (r.event_time(), r.rank)) if pool else None

    collateral: list[RankResult] = []
    independent: list[RankResult] = []
    for r in candidates:
        if r is root:
            continue
        if r.status() == "failed" and (
            _peer_failure_text(r)
            or (root is not None and r.event_time() >= root.event_time() and _is_fallout(r))
        ):
            collateral.append(r)
        else:
            independent.append(r)
    stuck = [r for r in ranks if r.status() == "stuck"]
    passed = [r for r in ranks if r.status() in ("passed", "xpassed")]

    header = _header(ranks, root=root, collateral=collateral, independent=independent, stuck=stuck,
                     skippers=skippers, info=info)
    blocks: list[tuple[str, Any]] = []
    if root is not None:
        blocks.append(_block(root, "first failure", info))
    seen: dict[str, int] = {}
    if root is not None and root.first_failed() is not None:
        seen[_crash_message(root.first_failed())] = root.rank  # type: ignore[arg-type]
    for r in independent:
        failed = r.first_failed()
        key = _crash_message(failed) if failed is not None else ""
        if failed is not None and key in seen and not info.full_report:
            blocks.append((f"rank {r.rank}: {failed.when} failed the same way as rank {seen[key]}", key))
            continue
        if failed is not None:
            seen[key] = r.rank
        blocks.append(_block(r, "also failed", info))
    for r in collateral:
        failed = r.first_failed()
        assert failed is not None
        cause = f"rank {root.rank}" if root is not None else "another rank"
        title = f"rank {r.rank}: {failed.when} failed because {cause} failed first"
        blocks.append((title, _body(failed) if info.full_report else _crash_message(failed)))
    for r in stuck:
        blocks.append(_stuck_block(r, root, info))
    if passed:
        blocks.append(("ranks that passed", f"rank(s) {_listed([r.rank for r in passed])}"))
    for r in ranks:
        if r.log_tail and r.status() in ("died", "error"):
            blocks.append((f"rank {r.rank}: end of its process log", _log_excerpt(r.log_tail)))
    # Each rank's captured output is part of the failure text (not report sections), so
    # whatever shows only the failure (JUnit <failure>, CI test views) shows it too.
    blocks.extend(_shown(_rank_sections(ranks, None), info.show_capture))

    fail_when = _failing_phase(root, stuck)
    crash = _reprcrash(item, root, stuck, info)
    failure = pytest.TestReport(
        item.nodeid, item.location, keywords(item), "failed",
        cast(Any, DistFailureRepr(header, blocks, crash)), fail_when,
        duration=info.elapsed_s,
        user_properties=_properties(ranks),
    )
    out: list[pytest.TestReport] = []
    for when in _PHASES:
        if when == fail_when:
            out.append(failure)
        elif _PHASES.index(when) < _PHASES.index(fail_when):
            out.append(_phase_report(item, ranks, when))
    if fail_when != "teardown":
        out.append(_phase_report(item, ranks, "teardown"))
    return out


def _body(rep: pytest.TestReport) -> Any:
    """A report's full failure text, kept structured (colours) where it is."""
    longrepr = rep.longrepr
    return longrepr if hasattr(longrepr, "toterminal") else rep.longreprtext


def _peer_failure_text(rank: RankResult) -> bool:
    failed = rank.first_failed()
    return failed is not None and "PeerFailureError" in _crash_message(failed)


def _failing_phase(root: RankResult | None, stuck: Sequence[RankResult]) -> _When:
    if root is not None:
        rep = root.first_failed() or root.skip_report()
        if rep is not None:
            return rep.when
        if root.error is not None and not root.reports:
            return "setup"
        return root.current_phase()
    if stuck:
        return min((r.current_phase() for r in stuck), key=_PHASES.index)
    return "call"


def _header(
    ranks: Sequence[RankResult],
    *,
    root: RankResult | None,
    collateral: Sequence[RankResult],
    independent: Sequence[RankResult],
    stuck: Sequence[RankResult],
    skippers: Sequence[RankResult],
    info: MergeInfo,
) -> str:
    where = f"world size {info.world_size}, backend {info.backend}"
    parts = []
    if info.timed_out and stuck:
        parts.append(
            f"timed out after {info.timeout_s:g}s ({info.timeout_origin}): rank(s) "
            f"{_listed([r.rank for r in stuck])} still running"
        )
    if skippers and len(skippers) < len(ranks):
        parts.append(
            f"non-collective skip: rank(s) {_listed([r.rank for r in skippers])} skipped while rank(s) "
            f"{_listed([r.rank for r in ranks if r not in skippers])} did not. A skip must happen on every "
            "rank (a rank that skips alone leaves its peers waiting in collectives); decide it the same way "
            "on all ranks"
        )
    same = _same_failure(root, independent)
    if root is not None and same and not collateral:
        ranks_ = sorted([root.rank, *(r.rank for r in independent)])
        parts.append(f"rank(s) {_listed(ranks_)} failed {_what(root)}, each with the same error (shown once)")
    else:
        if root is not None and root not in skippers:
            parts.append(f"rank {root.rank} failed first ({_what(root)})")
        if collateral:
            parts.append(f"rank(s) {_listed([r.rank for r in collateral])} failed because of it")
        if independent:
            parts.append(f"rank(s) {_listed([r.rank for r in independent])} also failed")
    if stuck and not info.timed_out:
        parts.append(
            f"rank(s) {_listed([r.rank for r in stuck])} still running {info.grace_s:g}s later were stopped"
        )
    return f"distributed test failed ({where}): " + "; ".join(parts)


def _same_failure(root: RankResult | None, others: Sequence[RankResult]) -> bool:
    """Every failing rank raised the same error (e.g. a collective assert)."""
    if root is None or not others:
        return False
    first = root.first_failed()
    if first is None:
        return False
    key = _crash_message(first)
    return all((f := r.first_failed()) is not None and _crash_message(f) == key for r in others)


def _what(rank: RankResult) -> str:
    failed = rank.first_failed()
    if failed is not None:
        return f"in {failed.when}"
    if rank.exit_code is not None:
        return f"its process {_death(rank.exit_code)} during {rank.current_phase()}"
    if rank.error is not None:
        return "harness error"
    return "skipped"


def _block(rank: RankResult, role: str, info: MergeInfo) -> tuple[str, Any]:
    failed = rank.first_failed()
    if failed is not None:
        return f"rank {rank.rank}: {failed.when} ({role})", _body(failed)
    if rank.error is not None:
        return f"rank {rank.rank}: harness error ({role})", rank.error
    if rank.exit_code is not None:
        return (f"rank {rank.rank}: process {_death(rank.exit_code)} during {rank.current_phase()} ({role})",
                "The rank's process ended without finishing the test; the end of its log follows.")
    skipped = rank.skip_report()
    reason = _skip_reason(skipped) if skipped is not None else ""
    return f"rank {rank.rank}: skipped alone ({role})", reason


def _stuck_block(rank: RankResult, root: RankResult | None, info: MergeInfo) -> tuple[str, str]:
    phase = rank.current_phase()
    if info.timed_out:
        title = f"rank {rank.rank}: still running in {phase} at the deadline; its Python stacks"
    else:
        cause = f"rank {root.rank}" if root is not None else "another rank"
        title = (f"rank {rank.rank}: still running in {phase} {info.grace_s:g}s after {cause} failed; "
                 "its Python stacks")
    return title, trim_stacks(rank.stack) or "(no stack dump received)"


# Frames of the harness itself, left out of stack dumps.
_HARNESS_FRAMES = (
    "/_pytest/", "/pluggy/", "/distruntime/testing/_worker.py", "/distruntime/testing/_zygote.py",
    'File "<string>"',
)


def trim_stacks(text: str) -> str:
    r"""A faulthandler dump without the harness's own frames and watchdog thread.

    Example:
        >>> dump = ('Current thread 0x1 (most recent call first):\n'
        ...         '  File "/t/test_x.py", line 3 in test_x\n'
        ...         '  File "/v/_pytest/python.py", line 187 in pytest_pyfunc_call\n')
        >>> print(trim_stacks(dump))
        Current thread 0x1 (most recent call first):
          File "/t/test_x.py", line 3 in test_x
          ... 1 frame(s) of pytest and the rank worker
    """
    blocks = [b for b in text.strip().split("\n\n") if b.strip()]
    out = []
    for block in blocks:
        lines = block.splitlines()
        if any("_worker.py" in ln and " in watch" in ln for ln in lines):
            continue
        kept, hidden = [lines[0]], 0
        for line in lines[1:]:
            if any(marker in line for marker in _HARNESS_FRAMES):
                hidden += 1
            else:
                kept.append(line)
        if hidden:
            kept.append(f"  ... {hidden} frame(s) of pytest and the rank worker")
        out.append("\n".join(kept))
    return "\n\n".join(out)


def _log_excerpt(log: str) -> str:
    """From the crash dump on when there is one; else the last lines."""
    start = log.rfind("Fatal Python error")
    if start >= 0:
        return trim_stacks(log[start:])
    return "\n".join(log.splitlines()[-40:])


def _reprcrash(
    item: pytest.Item, root: RankResult | None, stuck: Sequence[RankResult], info: MergeInfo
) -> Crash:
    path, lineno, _ = item.location
    where_line = (lineno or 0) + 1
    if info.timed_out and stuck:
        return Crash(path, where_line, f"timed out after {info.timeout_s:g}s; rank(s) "
                                f"{_listed([r.rank for r in stuck])} still running")
    if root is not None:
        failed = root.first_failed()
        crash = getattr(failed.longrepr, "reprcrash", None) if failed is not None else None
        if crash is not None:
            return Crash(crash.path, crash.lineno, f"[rank {root.rank}] {crash.message}")
        if failed is not None:
            return Crash(path, where_line, f"[rank {root.rank}] {_crash_message(failed)}")
        skipped = root.skip_report()
        if skipped is not None and root.status() in ("skipped", "xfailed"):
            message = f"[rank {root.rank}] non-collective skip: {_skip_reason(skipped)}"
            return Crash(path, where_line, message)
        return Crash(path, where_line, f"[rank {root.rank}] {_what(root)}")
    return Crash(path, where_line, "distributed test failed")
