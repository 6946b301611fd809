"""Time-to-exit of every fault scenario; writes the table in docs/reliability.md.

    python benchmarks/bench_reliability.py --repeats 3            # all scenarios
    python benchmarks/bench_reliability.py --repeats 1 --only SIGKILL

Runs each scenario of tests/fault_matrix.py (real processes, gloo/CPU) ``--repeats``
times and reports the median seconds from the fault (or, for start-up faults, from
the ranks entering the runtime) until every process had exited, next to the bound the
test suite enforces. Scenarios whose runs broke their promise are marked.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fault_matrix import SCENARIOS, Outcome, Scenario, run_scenario  # noqa: E402

_BEGIN = "<!-- bench_reliability: begin -->"
_END = "<!-- bench_reliability: end -->"


def _kept(outcome: Outcome) -> bool:
    """The scenario kept its promises: bounded, no orphans, port free, causes named."""
    s = outcome.scenario
    codes_ok = all((code == 0) == (rank in s.expect_success) for rank, code in enumerate(outcome.returncodes))
    return (not outcome.timed_out and not outcome.orphans and outcome.port_free and codes_ok
            and all(text in outcome.output for text in s.expect)
            and not any(text in outcome.output for text in s.absent)
            and outcome.seconds_to_exit <= s.bound_s)


def _row(s: Scenario, outcomes: list[Outcome]) -> str:
    times = [o.seconds_to_exit for o in outcomes]
    kept = sum(_kept(o) for o in outcomes)
    cause = s.expect[0].replace("|", "\\|")
    return (f"| {s.phase} | {s.name} | {s.launcher} | {s.world_size} | {statistics.median(times):.2f} | "
            f"{max(times):.2f} | {s.bound_s:g} | {kept}/{len(outcomes)} | `{cause[:70]}` |")


def _merge_rows(old_table: str, rows: list[str]) -> str:
    """Replace the rows of the re-run scenarios in an existing table (``--only``)."""
    key = lambda row: row.split("|")[1:4]  # noqa: E731 - phase, scenario, launcher
    fresh = {tuple(key(row)): row for row in rows}
    lines = [fresh.pop(tuple(key(line)), line) if line.startswith("| ") else line
             for line in old_table.splitlines()]
    lines[0] += f" Rows re-measured {time.strftime('%Y-%m-%d %H:%M')}: {len(rows)}."
    return "\n".join(lines + list(fresh.values()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="run scenarios whose name contains this text")
    parser.add_argument("--write", type=Path, default=REPO / "docs" / "reliability.md",
                        help="markdown file whose marked table is replaced ('-' to skip)")
    args = parser.parse_args()
    chosen = [s for s in SCENARIOS if args.only in s.name]
    rows = []
    started = time.monotonic()
    for s in chosen:
        outcomes = [run_scenario(s) for _ in range(args.repeats)]
        rows.append(_row(s, outcomes))
        print(rows[-1], flush=True)
    table = "\n".join([
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} cores, "
        f"{platform.python_version()}, no GPU), {args.repeats} runs per scenario, "
        f"{time.monotonic() - started:.0f} s in all.",
        "",
        "| phase | scenario | launcher | ranks | median s to exit | max s | bound s | kept | cause named |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    if str(args.write) != "-":
        text = args.write.read_text()
        head, _, rest = text.partition(_BEGIN)
        old, _, tail = rest.partition(_END)
        if args.only and "| phase |" in old:
            table = _merge_rows(old.strip("\n"), rows)
        args.write.write_text(f"{head}{_BEGIN}\n{table}\n{_END}{tail}")
        print(f"wrote {args.write}")
    return 0 if all(f" {args.repeats}/{args.repeats} |" in row for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
