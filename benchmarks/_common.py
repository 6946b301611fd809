"""Shared helpers for the benchmark scripts: bounded processes, statistics, tables, results.

Every process a benchmark starts runs in its own session and is killed with its whole
tree (found through /proc parent links, so torchrun's workers in their own sessions are
included) when it overruns its bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
# The process-tree kill the test suite uses (tests/procs.py): one implementation.
sys.path.insert(0, str(REPO / "tests"))
from procs import kill_tree as kill_process_tree  # noqa: E402

WORKERS = BENCH / "workers"
RESULTS = BENCH / "results"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")

# Variables of an enclosing launcher: never passed to the processes a benchmark starts.
_LAUNCH_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MV2_", "JSM_", "TORCHELASTIC_")
_LAUNCH_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "GROUP_WORLD_SIZE", "NODE_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")


SHIM_SOURCE = BENCH / "shim" / "numeric_hosts.c"
_PRELOAD: str | None = None


def add_resolver_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--system-resolver", action="store_true",
        help="let torch's reverse DNS lookups reach the system resolver (default: the "
             "shim/numeric_hosts.c LD_PRELOAD shim answers them numerically; see docs/benchmarks.md)",
    )


def setup_resolver(args: argparse.Namespace) -> str:
    """Install the numeric-hosts shim for every process the benchmark starts, unless
    ``--system-resolver``; returns ``"numeric-hosts shim"`` or ``"system"``."""
    global _PRELOAD  # noqa: PLW0603 - one setting for the whole benchmark run
    if args.system_resolver:
        return "system"
    build = Path(tempfile.gettempdir()) / f"distruntime-bench-{os.getuid()}"
    build.mkdir(exist_ok=True)
    target = build / "numeric_hosts.so"
    if not target.exists() or target.stat().st_mtime < SHIM_SOURCE.stat().st_mtime:
        cmd = ["cc", "-shared", "-fPIC", "-O2", "-o", str(target), str(SHIM_SOURCE), "-ldl"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"warning: could not build {SHIM_SOURCE.name} ({result.stderr.strip()[:200]}); "
                  "using the system resolver", file=sys.stderr)
            return "system"
    _PRELOAD = str(target)
    return "numeric-hosts shim"


def result_name(name: str, resolver: str) -> str:
    return name if resolver != "system" else f"{name}_system_resolver"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables, plus ``extra`` (and the shim, if on)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_NAMES and not k.startswith(_LAUNCH_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    if _PRELOAD is not None:
        env["LD_PRELOAD"] = " ".join(x for x in (env.get("LD_PRELOAD", ""), _PRELOAD) if x)
    env.update(extra)
    return env


def kill_tree(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` and every process below it (other sessions included), then reap it."""
    kill_process_tree(proc.pid, grace_s=0.5)
    proc.wait()


@dataclass
class Run:
    returncode: int | None  # None: killed at the bound
    stdout: str
    stderr: str
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    def tail(self, n: int = 3000) -> str:
        return f"--- stdout\n{self.stdout[-n:]}\n--- stderr\n{self.stderr[-n:]}"


def run(cmd: Sequence[str], timeout_s: float, env: Mapping[str, str] | None = None,
        cwd: Path | None = None) -> Run:
    """Run ``cmd`` bounded by ``timeout_s``; past it the whole tree is killed."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), env=dict(env) if env is not None else clean_env(), cwd=cwd or REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        code = None
    return Run(code, out, err, time.perf_counter() - started)


def torchrun_records(worker: str, n: int, args: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
    """One ``torchrun --standalone`` launch of ``workers/<worker>`` on N ranks, each of which
    writes ``<out>/rank<R>.json`` (``--out`` is appended); returns those records."""
    with tempfile.TemporaryDirectory(prefix="drt-bench-") as out:
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(n), "--monitor-interval", "0.1",
               str(WORKERS / worker), *args, "--out", out]
        result = run(cmd, timeout_s)
        if result.returncode != 0:
            raise SystemExit(f"torchrun with {n} workers failed ({result.returncode}):\n{result.tail()}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def iqr(values: Sequence[float]) -> tuple[float, float]:
    """Lower and upper quartiles (the inclusive method; the value itself for one sample)."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on, including the load at the time."""
    import torch

    load = os.getloadavg()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return {
        "commit": head + (" + uncommitted changes in src/" if dirty else ""),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def save(name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (read by ``plot.py`` and the docs)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def parse_sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)
