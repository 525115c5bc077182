"""The hit fast path of a node: a small asyncio protocol in front of the aiohttp application.

Most requests to a cache are plain ``GET``/``HEAD`` of a cached file. For those the protocol
does what nginx does: it reads the request head itself, finds the file with one confined
``openat2`` (webcache/_fs.pyx), copies the entry out of the shared cache into a reused buffer
(pinned while copying, revalidated, checksum verified on the copy) and writes a prebuilt header
block and the data with one ``writev`` — no request object, no router, no new Python object
for the body.

Everything else is handed to aiohttp *with the bytes received so far*, and the connection
stays with aiohttp from then on: a miss (the fill and its coalescing), directories, conditional
and range requests, encoded or unusual paths, symlinks, large files, ``/_mcs/status`` and
``/metrics``, partial or malformed request heads, request bodies, and every request while a
recovery runs. The fast path never answers with an error itself, so every error, limit and
timeout is aiohttp's; it only ever answers 200 with the file's exact bytes and headers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable

from webcache._fs import stat_beneath
from webcache.cache import McsWebCache
from webcache.paths import DocumentRoot, ResolvedFile
from webcache.semantics import file_headers, http_date

__all__ = ["FastPath", "FastPathStats", "SERVER", "NODE_PID"]

log = logging.getLogger("mcs.webcache.fastpath")

SERVER = "mcs-webcache"
NODE_PID = str(os.getpid())  # which node answered (X-Mcs-Node; a node is one process)
MAX_HEAD = 8192  # a longer head is aiohttp's to refuse (431)
MAX_TARGET = 1024
IDLE_TIMEOUT = 75.0  # aiohttp's keep-alive default
_HEADER_CACHE_MAX = 4096
_TARGETS_MAX = 16384

# A target the fast path may serve: plain characters only (no %, ?, #, ;, no dot segment or
# dotfile, no empty segment, no trailing slash). Anything else goes to the full resolver.
_PLAIN_TARGET = re.compile(rb"/[A-Za-z0-9_~\-][A-Za-z0-9._~\-/]*")
# Bytes that never appear in a well-formed head line (controls except HTAB, DEL).
_BAD_HEAD_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Request headers that need more than "send the whole file": aiohttp and semantics.py handle them.
_NOT_PLAIN = frozenset({
    b"transfer-encoding", b"range", b"if-match", b"if-none-match", b"if-modified-since",
    b"if-unmodified-since", b"if-range", b"expect", b"upgrade", b"content-type",
})


@dataclass
class FastPathStats:
    """Counters of one node's fast path (in /_mcs/status)."""

    served: int = 0  # responses written by the fast path
    handed_over: int = 0  # connections given to aiohttp
    connections: int = 0  # connections accepted


class FastPath:
    """The per-node front: ``loop.create_server(front.protocol, ...)``. ``aiohttp_factory`` makes
    aiohttp's protocol for a connection handed over (``AppRunner.server``)."""

    def __init__(self, cache: McsWebCache, root: DocumentRoot,
                 aiohttp_factory: Callable[[], asyncio.Protocol], *, enabled: bool = True,
                 stats: FastPathStats | None = None) -> None:
        self.cache = cache
        self.root = root
        self.aiohttp_factory = aiohttp_factory
        self.stats = stats if stats is not None else FastPathStats()
        self.connections: set[_Connection] = set()
        self._root_fd = os.open(root.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._prefix = root.root.rstrip("/") + "/"
        self._headers: dict[tuple[str, int, int, int, int], bytes] = {}
        self._targets: dict[bytes, tuple[bytes, str]] = {}  # checked target -> (rel, path)
        # Hits are copied here out of shared memory and verified (webcache.cache.lookup), then
        # written; one buffer per node: the loop serves one request at a time.
        self.scratch = bytearray(64 * 1024)
        self._date_second = -1
        self._date = b""
        self.enabled = enabled and self._openat2_works()
        self._sweeper: asyncio.TimerHandle | None = None

    def _openat2_works(self) -> bool:
        try:
            stat_beneath(self._root_fd, b".")
            return True
        except OSError as exc:
            log.warning("fast path off: openat2 unavailable (%s); aiohttp serves everything", exc)
            return False

    def protocol(self) -> asyncio.Protocol:
        """Protocol factory for ``create_server``."""
        if not self.enabled:
            return self.aiohttp_factory()
        self.stats.connections += 1
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_TIMEOUT / 5, self._sweep)
        return _Connection(self)

    def close(self) -> None:
        """Close every connection still on the fast path (aiohttp closes its own)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            conn.close()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            if now - conn.last_active > IDLE_TIMEOUT:
                conn.close()
        self._sweeper = asyncio.get_running_loop().call_later(IDLE_TIMEOUT / 5, self._sweep)

    # -- the parts of a response ------------------------------------------------------------

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = http_date(now * 1_000_000_000).encode()
        return self._date

    def header_block(self, f: ResolvedFile) -> bytes:
        """Status line and the file's headers, up to (not including) Date and Connection."""
        key = (f.path, f.size, f.mtime_ns, f.inode, f.ctime_ns)
        block = self._headers.get(key)
        if block is not None:
            return block
        now = time.time_ns()
        fields = file_headers(f.path, f.size, f.mtime_ns, f.inode, f.ctime_ns, now_ns=now)
        block = ("HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
                 + f"Content-Length: {f.size}\r\nX-Mcs-Node: {NODE_PID}\r\nServer: {SERVER}\r\n"
                 "Date: ").encode()
        if f.mtime_ns <= now:  # a future mtime gives a Last-Modified that changes: not kept
            if len(self._headers) >= _HEADER_CACHE_MAX:
                self._headers.clear()
            self._headers[key] = block
        return block

    def plain_file(self, target: bytes) -> ResolvedFile | None:
        """The regular, readable file a plain target names with no symlink on the way, or None
        (then the full resolver decides, and says 403/404 itself)."""
        known = self._targets.get(target)
        if known is None:
            if (len(target) > MAX_TARGET or _PLAIN_TARGET.fullmatch(target) is None
                    or b"//" in target or b"/." in target or target.endswith(b"/")
                    or target == b"/metrics" or target.startswith(b"/_mcs/")):
                return None
            if len(self._targets) >= _TARGETS_MAX:
                self._targets.clear()
            known = self._targets[target] = (target[1:], self._prefix + target[1:].decode())
        try:
            mode, _uid, size, mtime_ns, ctime_ns, inode, dev, nlink, readable = \
                stat_beneath(self._root_fd, known[0])
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(mode) or nlink == 0 or not readable or size > self.cache.max_entry:
            return None
        return ResolvedFile(known[1], size, mtime_ns, inode, dev, ctime_ns)


class _Handover(Exception):
    """This request (and the rest of the connection) is aiohttp's."""


class _Connection(asyncio.Protocol):
    """One client connection while it is on the fast path."""

    __slots__ = ("front", "transport", "fd", "buffer", "paused", "last_active")

    def __init__(self, front: FastPath) -> None:
        self.front = front
        self.transport: Any = None
        self.fd = -1
        self.buffer = b""
        self.paused = False
        self.last_active = time.monotonic()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self.buffer = self.buffer + data if self.buffer else data
        self._process()

    def eof_received(self) -> bool | None:
        return None  # close; a partial head at EOF gets no answer (as aiohttp does)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
            self._process()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- requests -----------------------------------------------------------------------------

    def _process(self) -> None:
        while self.buffer and self.transport is not None:
            if self.paused:  # the client does not read: stop reading its requests too
                self.transport.pause_reading()
                return
            end = self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
            if end < 0:
                self._handover()  # a partial (or too long) head: aiohttp waits, limits, times out
                return
            try:
                self._serve(self.buffer[:end])
            except _Handover:
                pass
            except Exception:
                log.exception("fast path failed; aiohttp takes the connection")
            else:
                self.buffer = self.buffer[end + 4:]
                continue
            self._handover()  # outside the except: aiohttp's own errors carry no context of ours
            return

    def _serve(self, head: bytes) -> None:
        """Answer one complete request head, or raise _Handover before writing anything."""
        if _BAD_HEAD_BYTE.search(head.replace(b"\r\n", b"")) is not None or b"\r\n " in head \
                or b"\r\n\t" in head:
            raise _Handover
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise _Handover
        method, target, version = parts
        if method != b"GET" and method != b"HEAD":
            raise _Handover
        if version == b"HTTP/1.1":
            keep_alive = True
        elif version == b"HTTP/1.0":
            keep_alive = False
        else:
            raise _Handover
        hosts = 0
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or b" " in name or b"\t" in name:
                raise _Handover
            name = name.lower()
            if name == b"host":
                hosts += 1
            elif name == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip(b" \t")
                    if token == b"close":
                        keep_alive = False
                    elif token == b"keep-alive":
                        keep_alive = keep_alive or version == b"HTTP/1.0"
                    else:
                        raise _Handover
            elif name == b"content-length":
                if value.strip(b" \t") != b"0":
                    raise _Handover
            elif name in _NOT_PLAIN:
                raise _Handover
        if hosts != 1 and version == b"HTTP/1.1" or hosts > 1:
            raise _Handover
        front = self.front
        cache = front.cache
        if cache.recovering or self.transport.is_closing():
            raise _Handover
        f = front.plain_file(target)
        if f is None:
            raise _Handover
        head_out = front.header_block(f) + front.date() + (
            b"\r\nConnection: keep-alive\r\n\r\n" if keep_alive and version == b"HTTP/1.0"
            else b"\r\n\r\n" if keep_alive else b"\r\nConnection: close\r\n\r\n")
        if method == b"HEAD":
            self.transport.write(head_out)
        else:
            if len(front.scratch) < f.size:
                front.scratch = bytearray(f.size)
            hit = cache.lookup(f, into=front.scratch)
            if hit is None:
                raise _Handover  # a miss: aiohttp fills (once in the domain)
            try:
                self._write(head_out, hit.data)
            finally:
                hit.release()
        front.stats.served += 1
        if not keep_alive and self.transport is not None:
            self.buffer = b""
            self.transport.close()

    def _write(self, head: bytes, data: memoryview) -> None:
        """Header block and body (a view of the scratch buffer) in one ``writev`` when the
        transport has nothing queued; what the socket does not take is copied into the
        transport's buffer (the scratch buffer is reused by the next request)."""
        transport = self.transport
        n = 0
        if self.fd >= 0 and not transport.get_write_buffer_size():
            try:
                n = os.writev(self.fd, (head, data))
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:  # reset or broken pipe: the client is gone
                transport.abort()
                return
        if n < len(head):
            transport.write(head[n:] + bytes(data))
        elif n < len(head) + len(data):
            transport.write(bytes(data[n - len(head):]))

    def _handover(self) -> None:
        transport, data = self.transport, self.buffer
        self.transport, self.buffer = None, b""
        self.front.connections.discard(self)
        if transport is None or transport.is_closing():
            return
        self.front.stats.handed_over += 1
        handler = self.front.aiohttp_factory()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)
