"""The ``distruntime`` command (also ``python -m distruntime``).

``distruntime env``
    What this process would get, without initialising anything: the launcher and the
    variables that decided it, rank / world size / local rank / node rank with the
    variable each came from, the rendezvous address, the backend and device ``auto``
    would choose, versions, and the tuning variables that are set. ``--json`` for bug
    reports and scripts. Exit status 1 when the environment would fail to start.

``distruntime doctor``
    Start the runtime on every rank and check the job: ranks joined and unique, hosts,
    devices, an ``all_reduce`` result, ``all_reduce`` latency and bus bandwidth from
    4 B to 64 MiB, start-up time. Runs under any launcher (``torchrun ... -m distruntime
    doctor``, ``srun distruntime doctor``) or starts ``--nproc N`` local ranks itself
    (gloo on CPU by default). Rank 0 prints the report; exit status 1 when a check
    fails, 124 when ``--timeout`` expires.

``distruntime where [HOST:PORT]``
    Where every rank of a *running* job stands, read-only: per rank, waiting in which
    collective (op, shapes, group, for how long) or running Python at which file:line,
    or not answering (``/proc`` state and a GIL-free stack dump on the same host).
    Defaults to ``MASTER_ADDR:MASTER_PORT``. Writes nothing to the job's store.

``distruntime explain [NAME]``
    What the error ``NAME`` means (``HangError``, ``RendezvousError``...), its usual causes
    and the fix, offline: the text of the documentation's troubleshooting page. Every
    error distruntime raises ends with ``See: distruntime explain NAME``. Without a name,
    every error with its one-line meaning.

Progress and errors go to stderr through :mod:`logging`; the report goes to stdout.

Example (a shell)::

    $ distruntime env --json
    $ torchrun --nproc-per-node 2 -m distruntime doctor
    $ distruntime explain HangError
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

_DEFAULT_TIMEOUT_S = 120.0


def _parser() -> argparse.ArgumentParser:
    from distruntime import __version__

    parser = argparse.ArgumentParser(
        prog="distruntime",
        description="Inspect and check PyTorch distributed launches.",
    )
    parser.add_argument("--version", action="version", version=f"distruntime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{env,doctor,where,explain}")

    env = sub.add_parser("env", help="show what this process would get (launcher, ranks, backend, versions)")
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.add_argument("--backend", default="auto", help="backend to resolve (default: auto)")

    doc = sub.add_parser("doctor", help="start the job and check ranks, all_reduce and bandwidth")
    doc.add_argument("--nproc", type=int, default=None, metavar="N",
                     help="start N local ranks (default: run as one rank of the current launcher)")
    doc.add_argument("--backend", default=None,
                     help="backend (default: gloo with --nproc, else auto)")
    doc.add_argument("--timeout", type=float, default=_DEFAULT_TIMEOUT_S, metavar="SECONDS",
                     help=f"bound on the whole run (default: {_DEFAULT_TIMEOUT_S:.0f}); start-up gets half")
    doc.add_argument("--min-bytes", default="4", help="smallest all_reduce message (default: 4)")
    doc.add_argument("--max-bytes", default="64M", help="largest all_reduce message (default: 64M)")
    doc.add_argument("--factor", type=int, default=4, help="size step between messages (default: 4)")
    doc.add_argument("--iters", type=int, default=20, help="timed iterations per size (default: 20)")
    doc.add_argument("--warmup", type=int, default=3, help="untimed iterations per size (default: 3)")
    doc.add_argument("--json", action="store_true", help="rank 0 prints JSON instead of tables")
    doc.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")

    where = sub.add_parser("where", help="where every rank of a running job stands (read-only)")
    where.add_argument("address", nargs="?", default=None, metavar="HOST:PORT",
                       help="the job's store (default: $MASTER_ADDR:$MASTER_PORT)")
    where.add_argument("--namespace", default=None, help="the job's key prefix (default: the announced one)")
    where.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                       help="bound on reaching the store (default: 5)")
    where.add_argument("--json", action="store_true", help="print JSON instead of the table")

    explain = sub.add_parser("explain", help="what an error means, its usual causes and the fix (offline)")
    explain.add_argument("name", nargs="?", default=None, metavar="NAME",
                         help="an exception class, e.g. HangError (default: list them all)")
    return parser


def _configure_logging(level: int, label: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [distruntime {label}] %(levelname)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    library = logging.getLogger("distruntime")
    library.handlers[:] = [handler]
    library.setLevel(level)
    library.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distruntime`` command; returns the exit status.

    Example::

        status = main(["env", "--json"])   # prints the report; 0, or 1 for a bad environment
    """
    from distruntime.cli.doctor import process_started

    started = process_started()
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "env":
        return _env(args)
    if args.command == "doctor":
        return _doctor(parser, args, started)
    if args.command == "where":
        from distruntime.cli.where import run_where

        _configure_logging(logging.WARNING, "where")
        return run_where(args.address, args.namespace, args.timeout, args.json)
    if args.command == "explain":
        from distruntime.cli.explain import run_explain

        return run_explain(args.name)
    parser.print_help(sys.stderr)
    return 2


def _env(args: argparse.Namespace) -> int:
    from distruntime.cli.envreport import build_env_report, render_env_report

    _configure_logging(logging.WARNING, "env")
    report = build_env_report(os.environ, args.backend)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_env_report(report))
    sys.stdout.flush()
    return 0 if report["ok"] else 1


def _doctor(parser: argparse.ArgumentParser, args: argparse.Namespace, started: float) -> int:
    from distruntime.cli._format import parse_bytes
    from distruntime.cli.doctor import DoctorOptions, run_rank
    from distruntime.errors import LaunchEnvError
    from distruntime.launchers import discover

    try:
        min_bytes, max_bytes = parse_bytes(args.min_bytes), parse_bytes(args.max_bytes)
    except ValueError as exc:
        parser.error(str(exc))
    if args.timeout <= 0 or args.iters < 1 or args.warmup < 0 or args.factor < 2 or min_bytes > max_bytes:
        parser.error("need --timeout > 0, --iters >= 1, --warmup >= 0, --factor >= 2, "
                     "--min-bytes <= --max-bytes")
    if args.nproc is not None and args.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {args.nproc}")
    quiet = logging.WARNING if args.quiet else logging.INFO

    if args.nproc is not None:
        _configure_logging(quiet, "doctor --nproc")
        return _doctor_local(args, started)

    try:
        rank = discover(os.environ).rank
        label = f"doctor rank {rank}"
    except LaunchEnvError:
        rank, label = 0, "doctor"
    _configure_logging(quiet if rank == 0 else logging.WARNING, label)
    nproc = os.environ.get("DISTRUNTIME_DOCTOR_NPROC", "")
    options = DoctorOptions(
        backend=args.backend or "auto", timeout_s=args.timeout, min_bytes=min_bytes, max_bytes=max_bytes,
        factor=args.factor, iters=args.iters, warmup=args.warmup, as_json=args.json,
        launched_by=f"distruntime doctor --nproc {nproc}" if nproc else "",
    )
    return run_rank(options, started)


def _doctor_local(args: argparse.Namespace, started: float) -> int:
    from distruntime.cli.local import launch_local
    from distruntime.errors import LaunchEnvError
    from distruntime.launchers import discover

    logger = logging.getLogger("distruntime.doctor")
    try:
        launch = discover(os.environ)
    except LaunchEnvError as exc:
        logger.error("--nproc: this shell's launch variables are invalid, and the local ranks would "
                     "inherit a confused environment: %s", exc)
        return 1
    if launch.world_size > 1:
        logger.error(
            "--nproc %d: this process is already rank %d of %d under %s (%s); --nproc would start "
            "ranks inside a rank. Fix: drop --nproc and let the launcher start the ranks, or run "
            "outside the launcher.",
            args.nproc, launch.rank, launch.world_size, launch.launcher, launch.reason,
        )
        return 1
    child_args = ["--backend", args.backend or "gloo", "--min-bytes", args.min_bytes, "--max-bytes",
                  args.max_bytes, "--factor", str(args.factor), "--iters", str(args.iters),
                  "--warmup", str(args.warmup)]
    if args.json:
        child_args.append("--json")
    if args.quiet:
        child_args.append("--quiet")
    return launch_local(args.nproc, child_args, args.timeout, started=started)
