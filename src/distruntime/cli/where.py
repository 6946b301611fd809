"""``distruntime where [HOST:PORT]``: where every rank of a running job stands, read-only.

Joins the job's rendezvous store as a plain client and reads what the ranks' watchdogs
already publish there: their heartbeats (collective progress per group, pending
collective with op and shapes once it is slow, innermost user frame), the address each
rank checked in from, and the last hang verdict if there was one. It writes nothing
(no ``set``, no ``add``: only ``check`` and ``get``), so the job cannot notice it. On
the job's own host it also reads ``/proc`` and the stacks faulthandler wrote for ranks
that stopped answering, as the ranks' own verdict does.

Example (a shell)::

    $ distruntime where                    # MASTER_ADDR:MASTER_PORT of this shell
    $ distruntime where node1:29500 --json
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Any

from torch._C._distributed_c10d import TCPStore

from distruntime.control.protocol import POINTER_KEY, printable
from distruntime.control.snapshot import MalformedRecord, job_report
from distruntime.rendezvous import _wait_for_listener

__all__ = ["run_where"]

logger = logging.getLogger("distruntime.where")


class WhereError(Exception):
    """A clear reason why the job could not be looked at."""


def run_where(address: str | None, namespace: str | None, timeout_s: float, as_json: bool) -> int:
    """Print the table of a running job; 0 on success, 1 when no job can be read."""
    try:
        report, where = _bounded_snapshot(address, namespace, timeout_s)
    except WhereError as error:
        logger.error("%s", printable(str(error), keep_newlines=True))
        return 1
    if as_json:  # json.dumps escapes every control character: exact JSON, safe to print
        sys.stdout.write(json.dumps({"address": where, **json.loads(report.to_json())}, indent=2) + "\n")
    else:  # everything shown came from an unauthenticated store: no escape sequence gets through
        sys.stdout.write(printable(f"job at {where}\n{report.format()}", keep_newlines=True) + "\n")
    sys.stdout.flush()
    return 0


def _bounded_snapshot(address: str | None, namespace: str | None, timeout_s: float) -> tuple[Any, str]:
    """:func:`snapshot`, ended at ``timeout_s`` whatever the store does (slow answers, huge jobs)."""
    result: list[tuple[Any, str] | BaseException] = []

    def look() -> None:
        try:
            # Each step inside is bounded by this budget: its own, clearer error comes first.
            result.append(snapshot(address, namespace, max(timeout_s - 0.5, 0.75 * timeout_s)))
        except BaseException as error:  # handed to the caller's thread
            result.append(error)

    worker = threading.Thread(target=look, name="distruntime-where-snapshot", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not result:
        raise WhereError(f"no complete answer from the store within --timeout {timeout_s:g} s. Fix: pass a "
                         "longer --timeout for a large job, or check that the address is the job's store.")
    outcome = result[0]
    if isinstance(outcome, MalformedRecord):
        raise WhereError(str(outcome)) from outcome
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def snapshot(address: str | None, namespace: str | None, timeout_s: float) -> tuple[Any, str]:
    """Read a running job's state: returns the report and ``host:port``."""
    host, port = _address(address)
    store = _connect(host, port, timeout_s)
    report = job_report(store, reason="snapshot", ask=False, namespace=namespace)
    if report is None:
        raise WhereError(
            f"the store at {host}:{port} holds no distruntime job (no '{POINTER_KEY}' key): it may "
            "belong to a job that does not use distruntime, or to one still starting (rank 0 announces "
            "it one watchdog tick after start-up). Fix: use the job's MASTER_ADDR:MASTER_PORT (rank 0 "
            "logs it as 'rendezvous HOST:PORT'; under torchrun that is the workers' MASTER_PORT, not "
            "--rdzv-endpoint), or pass --namespace.")
    return report, f"{host}:{port}"


def _address(address: str | None) -> tuple[str, int]:
    text = address or ""
    if not text:
        host, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
        if not host or not port:
            raise WhereError("no job address: pass HOST:PORT (the job's MASTER_ADDR:MASTER_PORT: rank 0 "
                             "logs it at start-up as 'rendezvous HOST:PORT'), or set MASTER_ADDR and "
                             "MASTER_PORT.")
        text = f"{host}:{port}"
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise WhereError(f"{text!r} is not HOST:PORT. Fix: e.g. `distruntime where node1:29500`.")
    return host.strip("[]"), int(port_text)


def _connect(host: str, port: int, timeout_s: float) -> Any:
    """A store client, bounded: nothing listening, or a listener that is not a store, fail fast."""
    deadline = time.monotonic() + timeout_s
    if not _wait_for_listener(host, port, deadline):
        raise WhereError(f"nothing listens at {host}:{port} (waited {timeout_s:g} s): the job has ended, or "
                         "the address is wrong. Fix: use the job's MASTER_ADDR:MASTER_PORT.")
    made: list[Any] = []

    def connect() -> None:
        try:
            store = TCPStore(host, port, is_master=False, wait_for_workers=False,
                             timeout=timedelta(seconds=max(deadline - time.monotonic(), 0.5)))
            # torch < 2.5's client does not ping while connecting: the first request would
            # block on a listener that is not a store. Make it here, inside the bound.
            store.check(["distruntime/current"])
            made.append(store)
        except Exception as error:  # reported below as "not a store"
            made.append(error)

    # TCPStore's client handshake blocks forever on a port held by another program.
    worker = threading.Thread(target=connect, name="distruntime-where", daemon=True)
    worker.start()
    worker.join(max(deadline - time.monotonic(), 0.5))
    if not made or isinstance(made[0], Exception):
        why = f": {made[0]}" if made else ""
        raise WhereError(f"{host}:{port} does not answer as a rendezvous store{why}. Fix: check the "
                         "address (another program may hold that port).")
    return made[0]
