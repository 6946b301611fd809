"""The control plane's store protocol: key names, reads that cost one request, and
defensive parsing of everything read back.

Every key lives under the job's rendezvous namespace. The store is shared by every rank and
is unauthenticated, so each request here is paid N times and each value read is untrusted
input: it is size-capped, parsed, type-checked, and dropped with a warning when it does not
fit -- it never raises into the caller and never changes which error the user sees.

Keys (``k`` is an event number, ``h`` a host key, ``r`` a rank):

============================  ==========================================================
``who/<r>``                    check-in record (rendezvous): host, pid, world size, mesh
``ev/<k>``                     event ``k``: claimed once (``compare_set``); a hang incident
                               or a stop request. Each host waits on the next one.
``st/<k>/<h>``, ``st/<k>/hosts``, ``st/<k>/ranks``
                               an incident's per-host answers, the list of hosts that
                               answered, and how many ranks they covered
``vd/<k>``                     the incident's verdict, waited on by each host
``failed/root``, ``failed/log``, ``failed/n``
                               failure records: the first root cause (waited on), every
                               record (one ``append`` each), and how many ranks reported
``distruntime/current``        (root store) pointer for ``distruntime where``
============================  ==========================================================
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch.distributed as dist
from torch._C._distributed_c10d import Store

__all__ = [
    "MAX_RECORD_BYTES", "POINTER_KEY", "claim", "event_key", "parse_record", "read", "read_many", "state_key",
    "verdict_key",
]

logger = logging.getLogger("distruntime")

# Root-store key (outside any namespace) where rank 0 announces the live rendezvous, so
# that ``distruntime where HOST:PORT`` can find the job's keys without writing anything.
POINTER_KEY = "distruntime/current"
# The largest value the control plane accepts from the store (a host's incident answer
# with every local rank's stack and last collectives is a few tens of kB).
MAX_RECORD_BYTES = 1 << 20
# TCPStore's server refuses a multi_get of more keys or a larger payload than this.
_BATCH_KEYS = 1024
_BATCH_BYTES = 6 << 20
# compare_set with an expected value no writer uses: on a missing key the store returns
# the expected value unchanged and sets nothing, on a present one its current value.
_ABSENT = "\x00distruntime:absent\x00"


def event_key(k: int) -> str:
    return f"ev/{k}"


def state_key(k: int, host: str) -> str:
    return f"st/{k}/{host}"


def verdict_key(k: int) -> str:
    return f"vd/{k}"


def read(store: Store, key: str) -> bytes | None:
    """The value of ``key``, or None when it is absent: one request, never waits.

    (``Store.get`` waits for the key first: two requests on the wire, and a block.)
    """
    value = store.compare_set(key, _ABSENT, _ABSENT)
    return None if value == _ABSENT.encode() else bytes(value)


def claim(store: Store, key: str, value: str) -> str:
    """Set ``key`` to ``value`` unless it is set already; return what it holds now.

    Two requests for the winner, one for the others: the winner's ``compare_set`` is followed
    by a ``set`` of the same value, because torch's classic store backend
    (``TCPStore(use_libuv=False)``) wakes no ``wait`` on a ``compare_set``, only on a ``set``.

    Example:
        >>> from torch.distributed import HashStore
        >>> store = HashStore()
        >>> claim(store, "ev/1", "rank 0"), claim(store, "ev/1", "rank 3")
        ('rank 0', 'rank 0')
    """
    held = bytes(store.compare_set(key, "", value)).decode(errors="replace")
    if held == value:
        store.set(key, value)
    return held


def append(store: Store, key: str, value: str) -> None:
    """Append ``value`` to ``key`` (one request; created when absent).

    ``Store.append`` is bound since torch 2.1 but missing from torch's type stubs.
    """
    cast(Any, store).append(key, value)


def _batches(keys: Sequence[str], sizes: Sequence[int] | None) -> Iterator[list[str]]:
    batch: list[str] = []
    used = 0
    for index, key in enumerate(keys):
        size = sizes[index] if sizes is not None else 0
        if batch and (len(batch) >= _BATCH_KEYS or used + size > _BATCH_BYTES):
            yield batch
            batch, used = [], 0
        batch.append(key)
        used += size
    if batch:
        yield batch


def read_many(store: Store, keys: Sequence[str], expected_size: int = 256) -> dict[str, bytes]:
    """Values of ``keys`` that all exist, with one ``multi_get`` per batch (two requests each)."""
    found: dict[str, bytes] = {}
    for batch in _batches(keys, [expected_size] * len(keys)):
        for key, value in zip(batch, store.multi_get(batch), strict=True):
            found[key] = bytes(value)
    return found


def parse_record(raw: bytes | str | None, key: str, *,
                 limit: int = MAX_RECORD_BYTES) -> dict[str, Any] | None:
    """A JSON object read from ``key``, or None (logged) when it is absent, too large or not an object.

    Example:
        >>> parse_record(b'{"rank": 1}', "who/1")
        {'rank': 1}
        >>> parse_record(b"[1, 2]", "who/1") is None, parse_record(b"{", "who/1") is None
        (True, True)
    """
    if raw is None:
        return None
    if len(raw) > limit:
        logger.warning("ignored store key %r: %d bytes (at most %d accepted)", key, len(raw), limit)
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        logger.warning("ignored store key %r: not JSON", key)
        return None
    if not isinstance(data, dict):
        logger.warning("ignored store key %r: a JSON %s, not an object", key, type(data).__name__)
        return None
    return data


def as_int(value: Any, default: int = 0, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within ``[low, high]``, else ``default`` (bools are not ints here).

    Example:
        >>> as_int("7"), as_int(-3, low=0), as_int(True), as_int(10**30, high=10**6)
        (7, 0, 0, 0)
    """
    if isinstance(value, bool):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    if (low is not None and number < low) or (high is not None and number > high):
        return default
    return number


def as_float(value: Any, default: float = 0.0) -> float:
    """``value`` as a finite float, else ``default``.

    Example:
        >>> as_float("1.5"), as_float("nan"), as_float(None)
        (1.5, 0.0, 0.0)
    """
    if isinstance(value, bool):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return number if math.isfinite(number) else default


def as_str(value: Any, default: str = "", limit: int = 4096) -> str:
    r"""``value`` if it is a string (cut to ``limit`` characters, control characters escaped),
    else ``default``.

    Example:
        >>> as_str("node1\x1b]52;c;evil\x07"), as_str(7, "?")
        ('node1\\x1b]52;c;evil\\x07', '?')
    """
    return printable(value[:limit]) if isinstance(value, str) else default


# C0 and C1 controls, DEL, and the bidirectional overrides and isolates (which reorder what a
# terminal shows): none may reach a terminal or a log line from a store record.
_UNSAFE = {*range(0x00, 0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A),
           0x200E, 0x200F, 0x061C}
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _UNSAFE}


def printable(text: str, *, keep_newlines: bool = False) -> str:
    r"""``text`` with every control character escaped (``\x1b``), so it shows as text.

    Example:
        >>> printable("ok\x1b[2J\nfake line"), printable("a\nb", keep_newlines=True)
        ('ok\\x1b[2J\\x0afake line', 'a\nb')
    """
    if keep_newlines:
        return "\n".join(line.translate(_ESCAPES) for line in text.split("\n"))
    return text.translate(_ESCAPES)


def store_alive(store: Store) -> bool:
    """Whether the store still answers (one request)."""
    try:
        store.check(["distruntime/alive"])
        return True
    except dist.DistError:
        return False
