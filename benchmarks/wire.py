"""A counting proxy for torch's TCPStore: every request a client sends, decoded on the wire.

Put :class:`WireProxy` in front of a real ``torch.distributed.TCPStore`` and point the
clients at the proxy's port. Each client connection gets its own upstream connection;
bytes are forwarded unchanged in both directions, and the client-to-server stream is
parsed into requests, counted per query type, per client connection and per *phase*
(a label the benchmark sets with :meth:`WireProxy.mark`).

The wire format (torch/csrc/distributed/c10d/TCPStoreBackend.hpp and the libuv server,
``TCPStoreLibUvBackend.cpp``; checked against torch 2.13's header):
one byte of query type, then its arguments, all in native (little-endian) byte order; a
*string* or *bytes* argument is a ``uint64`` length and the bytes.

==========  ==============  =============================================================
code        query type      arguments
==========  ==============  =============================================================
0           VALIDATE        uint32 magic (0x3C85F7CE); first request of every connection
1           SET             key, value
2           COMPARE_SET     key, expected, desired
3           GET             key
4           ADD             key, int64
5           CHECK           uint64 n, n keys
6           WAIT            uint64 n, n keys
7           GETNUMKEYS      --
8           DELETE_KEY      key
9           APPEND          key, value
10          MULTI_GET       uint64 n, n keys
11          MULTI_SET       uint64 n, n (key, value)
12          CANCEL_WAIT     --
13          PING            uint32 nonce (torch >= 2.5: sent by every client at connect)
14          QUEUE_PUSH      key, value
15          QUEUE_POP       key
16          QUEUE_LEN       key
17          LIST_KEYS       --
18          BARRIER         key, int64 world size
==========  ==============  =============================================================

torch 2.4's enum is the prefix up to PING (the queue types came later, LIST_KEYS and
BARRIER in the 2.1x releases); codes never moved, so one table decodes both.

What a Python call costs on the wire (torch 2.13): ``get`` is WAIT + GET, ``wait`` is WAIT
(+ CANCEL_WAIT on timeout), ``multi_get`` is WAIT + MULTI_GET, ``queue_pop`` is WAIT +
QUEUE_POP; ``set``/``add``/``check``/``compare_set``/``append``/``delete_key``/``multi_set``/
``num_keys`` one request each; a client connection costs VALIDATE + PING.

Example::

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with WireProxy("127.0.0.1", store.port) as proxy:
        client = TCPStore("127.0.0.1", proxy.port, is_master=False)
        proxy.mark("work")
        client.set("a", "1")
        proxy.counts("work")        # {"SET": 1}
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["QUERY_TYPES", "ProxyProcess", "Request", "WireProxy", "parse_requests"]

QUERY_TYPES = (
    "VALIDATE", "SET", "COMPARE_SET", "GET", "ADD", "CHECK", "WAIT", "GETNUMKEYS", "DELETE_KEY",
    "APPEND", "MULTI_GET", "MULTI_SET", "CANCEL_WAIT", "PING", "QUEUE_PUSH", "QUEUE_POP", "QUEUE_LEN",
    "LIST_KEYS", "BARRIER",
)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
# Argument shapes by query type: s = string/bytes, v = 8-byte value, w = 4-byte value,
# n = uint64 count then that many keys, m = uint64 count then (key, value) pairs.
_SHAPES = {
    "VALIDATE": "w", "SET": "ss", "COMPARE_SET": "sss", "GET": "s", "ADD": "sv", "CHECK": "n",
    "WAIT": "n", "GETNUMKEYS": "", "DELETE_KEY": "s", "APPEND": "ss", "MULTI_GET": "n",
    "MULTI_SET": "m", "CANCEL_WAIT": "", "PING": "w", "QUEUE_PUSH": "ss", "QUEUE_POP": "s",
    "QUEUE_LEN": "s", "LIST_KEYS": "", "BARRIER": "sv",
}


class ProtocolError(ValueError):
    """Bytes that are no TCPStore request (an unknown query type)."""


@dataclass(frozen=True)
class Request:
    kind: str
    keys: tuple[str, ...]
    size: int  # bytes on the wire


class _Incomplete(Exception):
    pass


def _take(buf: bytes | bytearray, pos: int, n: int) -> int:
    if pos + n > len(buf):
        raise _Incomplete
    return pos + n


def _string(buf: bytes | bytearray, pos: int) -> tuple[bytes, int]:
    end = _take(buf, pos, 8)
    (length,) = _U64.unpack_from(buf, pos)
    stop = _take(buf, end, length)
    return bytes(buf[end:stop]), stop


def _one(buf: bytes | bytearray, pos: int) -> tuple[Request, int]:
    start = pos
    pos = _take(buf, pos, 1)
    code = buf[start]
    if code >= len(QUERY_TYPES):
        raise ProtocolError(f"unknown TCPStore query type {code} at byte {start}")
    kind = QUERY_TYPES[code]
    keys: list[str] = []
    for arg_index, shape in enumerate(_SHAPES[kind]):
        if shape == "w":
            pos = _take(buf, pos, 4)
        elif shape == "v":
            pos = _take(buf, pos, 8)
        elif shape == "s":
            value, pos = _string(buf, pos)
            if arg_index == 0:
                keys.append(value.decode(errors="replace"))
        elif shape in "nm":
            end = _take(buf, pos, 8)
            (count,) = _U64.unpack_from(buf, pos)
            pos = end
            for _ in range(count):
                key, pos = _string(buf, pos)
                keys.append(key.decode(errors="replace"))
                if shape == "m":
                    _value, pos = _string(buf, pos)
    return Request(kind, tuple(keys), pos - start), pos


def parse_requests(buf: bytes | bytearray) -> tuple[list[Request], int]:
    """The complete requests at the start of ``buf`` and how many bytes they take."""
    requests: list[Request] = []
    pos = 0
    while pos < len(buf):
        try:
            request, pos = _one(buf, pos)
        except _Incomplete:
            break
        requests.append(request)
    return requests, pos


@dataclass
class _Tally:
    by_type: Counter[str] = field(default_factory=Counter)
    by_conn: Counter[int] = field(default_factory=Counter)
    by_prefix: Counter[str] = field(default_factory=Counter)
    bytes: int = 0


def _prefix(key: str) -> str:
    """``ns/who/3`` -> ``who/*``: the key family, with the job's namespace and numbers cut."""
    parts = key.split("/")
    while parts and (parts[0].startswith("distruntime-") or parts[0].startswith("/")
                     or parts[0] in ("default_pg", "")):
        parts = parts[1:]
    shape = ["*" if p.isdigit() or (len(p) == 12 and p.isalnum() and not p.isalpha()) else p for p in parts]
    return "/".join(shape[:3]) or key


class WireProxy:
    """Forward TCP connections to a TCPStore and count the requests (see the module docstring)."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1", port: int = 0,
                 keep_keys: bool = True) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.keep_keys = keep_keys
        self._lock = threading.Lock()
        self._phase = "start"
        self._phases: dict[str, _Tally] = {}
        self._conn_ids = 0
        self._conn_labels: dict[int, str] = {}
        self._errors: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> WireProxy:
        self._thread = threading.Thread(target=self._serve, name="wire-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("wire proxy did not start")
        if self._errors:
            raise RuntimeError(self._errors[0])
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> WireProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ counting
    def mark(self, phase: str) -> None:
        """Count what follows under ``phase`` (requests already in flight land where they are parsed)."""
        with self._lock:
            self._phase = phase

    @property
    def phase(self) -> str:
        return self._phase

    def _tallies(self, phase: str | None) -> list[Any]:
        """The tallies of ``phase`` (none if unknown), or of every phase; under the lock."""
        with self._lock:
            if phase is not None:
                return [self._phases[phase]] if phase in self._phases else []
            return list(self._phases.values())

    def counts(self, phase: str | None = None) -> dict[str, int]:
        """Requests by query type, in ``phase`` or in all phases."""
        total: Counter[str] = Counter()
        for tally in self._tallies(phase):
            total.update(tally.by_type)
        return dict(total)

    def total(self, phase: str | None = None, exclude: Iterable[str] = ()) -> int:
        skip = set(exclude)
        return sum(n for kind, n in self.counts(phase).items() if kind not in skip)

    def per_connection(self, phase: str | None = None) -> dict[int, int]:
        total: Counter[int] = Counter()
        for tally in self._tallies(phase):
            total.update(tally.by_conn)
        return dict(total)

    def key_families(self, phase: str | None = None) -> dict[str, int]:
        """Requests by key family (``who/*``, ``st/*/hosts``, ...): where the requests go."""
        total: Counter[str] = Counter()
        for tally in self._tallies(phase):
            total.update(tally.by_prefix)
        return dict(total.most_common())

    def phases(self) -> list[str]:
        with self._lock:
            return list(self._phases)

    def connections(self) -> int:
        return self._conn_ids

    def summary(self) -> dict[str, Any]:
        return {phase: {"requests": self.total(phase), "by_type": self.counts(phase),
                        "connections": len(self.per_connection(phase)), "keys": self.key_families(phase)}
                for phase in self.phases()}

    @property
    def errors(self) -> list[str]:
        return list(self._errors)

    def _count(self, conn: int, requests: list[Request]) -> None:
        with self._lock:
            tally = self._phases.setdefault(self._phase, _Tally())
            for request in requests:
                tally.by_type[request.kind] += 1
                tally.by_conn[conn] += 1
                tally.bytes += request.size
                if self.keep_keys:
                    first = request.keys[0] if request.keys else ""
                    family = _prefix(first) if first else "-"
                    tally.by_prefix[f"{request.kind} {family}"] += 1

    # ------------------------------------------------------------------ the loop
    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._client, self.host, self.port, backlog=4096, limit=1 << 22))
            self.port = self._server.sockets[0].getsockname()[1]
        except OSError as error:
            self._errors.append(f"wire proxy cannot listen: {error}")
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self._conn_ids += 1
            conn = self._conn_ids
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target, limit=1 << 22)
        except OSError as error:
            self._errors.append(f"upstream connect failed: {error}")
            writer.close()
            return
        back = asyncio.ensure_future(self._copy(up_reader, writer))
        pending = bytearray()
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                up_writer.write(data)
                pending += data
                requests, used = parse_requests(pending)
                if used:
                    del pending[:used]
                if requests:
                    self._count(conn, requests)
                await up_writer.drain()
        except ProtocolError as error:
            self._errors.append(str(error))
            # keep forwarding, uncounted: the store decides what to make of it
            with contextlib.suppress(OSError, ConnectionError):
                while data := await reader.read(1 << 20):
                    up_writer.write(data)
                    await up_writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                up_writer.close()
            await asyncio.gather(back, return_exceptions=True)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 20):
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


# ---------------------------------------------------------------------- out of process
# Some TCPStore bindings keep the GIL while they block on the socket (``queue_len`` and
# ``queue_pop`` in torch 2.13): a proxy thread in the caller's process then never runs. And
# a benchmark's own threads should not compete with the proxy for one GIL. So the benches
# run the proxy as a process of its own and steer it over a pipe.

class ProxyProcess:
    """:class:`WireProxy` in a child process: the same counting interface, over stdin/stdout."""

    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1", port: int = 0) -> None:
        import subprocess
        import sys

        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--target", f"{target_host}:{target_port}", "--host", host,
             "--port", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().split()
        if line[:1] != ["port"]:
            self._proc.kill()
            raise RuntimeError(f"wire proxy did not start: {line}")
        self.host = host
        self.port = int(line[1])
        self._cache: dict[str, Any] | None = None

    def _ask(self, command: str) -> str:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._proc.stdout.readline().strip()

    def mark(self, phase: str) -> None:
        self._ask(f"mark {phase}")

    def summary(self) -> dict[str, Any]:
        import json

        data: dict[str, Any] = json.loads(self._ask("summary"))
        return data

    def counts(self, phase: str | None = None) -> dict[str, int]:
        data = self.summary()
        if phase is not None:
            return dict(data.get(phase, {}).get("by_type", {}))
        total: Counter[str] = Counter()
        for entry in data.values():
            total.update(entry["by_type"])
        return dict(total)

    def total(self, phase: str | None = None, exclude: Iterable[str] = ()) -> int:
        skip = set(exclude)
        return sum(n for kind, n in self.counts(phase).items() if kind not in skip)

    def stop(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self._ask("quit")
            try:
                self._proc.wait(5)
            except Exception:  # a stuck child is killed, whatever the error
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main() -> None:
    import argparse
    import json
    import resource
    import sys
    import time

    parser = argparse.ArgumentParser(description="TCPStore counting proxy, steered over stdin")
    parser.add_argument("--target", required=True, help="HOST:PORT of the real TCPStore")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, _, port = args.target.rpartition(":")
    proxy = WireProxy(host, int(port), args.host, args.port).start()
    print(f"port {proxy.port}", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "mark":
            time.sleep(0.02)  # let bytes already on the way be parsed under the old phase
            proxy.mark(arg)
            print("ok", flush=True)
        elif command == "summary":
            time.sleep(0.02)
            print(json.dumps(proxy.summary() | ({"_errors": {"by_type": {}, "errors": proxy.errors}}
                                                 if proxy.errors else {})), flush=True)
        elif command == "quit":
            print("ok", flush=True)
            break
    proxy.stop()


if __name__ == "__main__":
    _main()
