"""The front of a node: a small asyncio protocol that owns every connection, with the hit fast
path in it and the aiohttp application behind it.

Most requests to a cache are plain ``GET``/``HEAD`` of a cached file. For those the protocol
does what nginx does: it reads the request head itself, finds the file with one confined
``openat2`` (webcache/_fs.pyx), copies the entry out of the shared cache into a reused buffer
(pinned while copying, revalidated, checksum verified on the copy) and writes a prebuilt header
block and the data with one ``writev`` — no request object, no router, no new Python object
for the body.

Everything else is handed to aiohttp *with the bytes received so far*, and aiohttp answers
every later request of that connection: a miss (the fill and its coalescing), directories,
conditional and range requests, encoded or unusual paths, symlinks, large files,
``/_mcs/status`` and ``/metrics``, partial or malformed request heads, request bodies, and
every request while a recovery runs. The fast path only ever answers 200 with the file's exact
bytes and headers.

The protocol stays the transport's protocol after the hand-over (it passes the events on to
aiohttp's), because aiohttp has no deadline for a request head: every connection lives under
the deadlines of webcache/limits.py, checked by one sweep per node (see :class:`Phase`). The
front itself writes only two answers: 408 when a head is not complete in time, and 505 to a
request line of an HTTP version other than 1.x.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import re
import socket
import stat
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Callable

from webcache._fs import stat_beneath
from webcache.cache import McsWebCache
from webcache.limits import ConnectionLimits, ConnectionStats, Expiry
from webcache.paths import DocumentRoot, ResolvedFile
from webcache.semantics import file_headers, http_date

__all__ = ["FastPath", "FastPathStats", "Connection", "Phase", "HttpVersion", "http_version",
           "SERVER", "NODE_PID", "identity_fields", "NOT_PLAIN_HEADERS", "plain_request",
           "plain_target", "response_block", "connection_tail"]

log = logging.getLogger("mcs.webcache.fastpath")

SERVER = "mcs-webcache"
NODE_PID = str(os.getpid())  # which node answered (X-Mcs-Node; a node is one process)


def identity_fields(host_name: str | None) -> dict[str, str]:
    """The header fields every response of a node carries, on both paths: the node
    (``X-Mcs-Node``: its pid), its host (``X-Mcs-Host``: ``serve --host-name``, when given) and
    ``Server``."""
    fields = {"X-Mcs-Node": NODE_PID}
    if host_name:
        fields["X-Mcs-Host"] = host_name
    fields["Server"] = SERVER
    return fields
MAX_HEAD = 8192  # a longer head is aiohttp's to refuse (431)
MAX_TARGET = 1024
MAX_LINE = 8192  # a longer request line is aiohttp's to refuse
_HEADER_CACHE_MAX = 4096
_TARGETS_MAX = 16384

# A target the fast path may serve: plain characters only (no %, ?, #, ;, no dot segment or
# dotfile, no empty segment, no trailing slash). Anything else goes to the full resolver.
_PLAIN_TARGET = re.compile(rb"/[A-Za-z0-9_~\-][A-Za-z0-9._~\-/]*")
# Bytes that never appear in a well-formed head line (controls except HTAB, DEL).
_BAD_HEAD_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Request headers that need more than "send the whole file": aiohttp and semantics.py handle them.
NOT_PLAIN_HEADERS = frozenset({
    b"transfer-encoding", b"range", b"if-match", b"if-none-match", b"if-modified-since",
    b"if-unmodified-since", b"if-range", b"expect", b"upgrade", b"content-type",
})
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_SPOKEN = (b" HTTP/1.1\r", b" HTTP/1.0\r", b" HTTP/1.1", b" HTTP/1.0")
_ERROR_BODIES = {
    HTTPStatus.REQUEST_TIMEOUT: b"408 request timeout: the request head was not complete in time\n",
    HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
        b"505 HTTP version not supported: this server speaks HTTP/1.0 and HTTP/1.1 only\n",
}


class HttpVersion(enum.Enum):
    """What a request line's version says to an HTTP/1.1 server (RFC 9110 2.5, 15.6.6)."""

    SUPPORTED = "1.0 or 1.1"
    NEWER_MINOR = "1.2 to 1.9: processed as HTTP/1.1, answered in HTTP/1.1"
    UNSUPPORTED = "another major version (0.9, 2.0, 3.0, ...): 505"
    MALFORMED = "not HTTP/DIGIT.DIGIT: the parser's 400"


def http_version(token: bytes) -> HttpVersion:
    """Classify the version token of a request line."""
    match = _VERSION.fullmatch(token)
    if match is None:
        return HttpVersion.MALFORMED
    if match.group(1) != b"1":
        return HttpVersion.UNSUPPORTED
    return HttpVersion.SUPPORTED if match.group(2) in (b"0", b"1") else HttpVersion.NEWER_MINOR


class Phase(enum.Enum):
    """Where a connection is; each phase but BUSY has its deadline (webcache/limits.py)."""

    IDLE = "no request and no byte of the next: keepalive_timeout (header_timeout at first)"
    HEAD = "bytes of a head received: header_timeout from its first byte, never extended"
    BODY = "a request whose body is not complete: body_timeout from the end of its head"
    BUSY = "a request being answered: only send_timeout, if the client stops reading"
    LINGER = "the last response sent, our side shut: the client's input dropped, LINGER at most"
    CLOSED = "closed or closing"


_IDLE, _HEAD, _BODY, _BUSY, _CLOSED = Phase.IDLE, Phase.HEAD, Phase.BODY, Phase.BUSY, Phase.CLOSED
_LINGER = Phase.LINGER
LINGER = 5.0  # s a lingering close waits for the client to close (the native loop's too)


@dataclass
class FastPathStats:
    """Counters of one node's front (in /_mcs/status and /metrics, through webcache/board.py)."""

    served: int = 0  # responses written by the fast path
    requests: int = 0  # requests answered by aiohttp (webcache/tracking.py counts them)
    handed_over: int = 0  # connections given to aiohttp
    connections: int = 0  # connections accepted
    native_served: int = 0  # of ``served``: written by the native hit loop (webcache/native.py)
    native_handed_off: int = 0  # connections the native loop gave to this front
    native_sealed_hits: int = 0  # of ``native_served``: sent from a sealed copy (sendfile)
    sealed_bytes: int = 0  # bytes of sealed copies the native loop holds now
    # The front's connection report (FastPath.connection_status), set by the front that keeps
    # these stats: /_mcs/status and /metrics describe the node's connections through it.
    connection_status: Callable[[], dict[str, Any]] | None = None
    # Set with the native hit loop: folds its counters into these (and the cache's and the
    # connections') before they are read; and its own report for /_mcs/status.
    sync: Callable[[], None] | None = None
    native: Callable[[], dict[str, Any]] | None = None


class FastPath:
    """The per-node front: ``protocol`` is the factory of every connection's protocol.
    ``aiohttp_factory`` makes aiohttp's protocol for a connection handed over
    (``AppRunner.server``); with ``enabled`` false every connection is handed over at once and
    the front only keeps the deadlines."""

    def __init__(self, cache: McsWebCache, root: DocumentRoot,
                 aiohttp_factory: Callable[[], asyncio.Protocol], *, enabled: bool = True,
                 stats: FastPathStats | None = None, limits: ConnectionLimits | None = None,
                 conn_stats: ConnectionStats | None = None, host_name: str | None = None) -> None:
        self.cache = cache
        self.host_name = host_name
        self._identity = identity_lines(host_name)
        self.root = root
        self.aiohttp_factory = aiohttp_factory
        self.stats = stats if stats is not None else FastPathStats()
        self.stats.connection_status = self.connection_status
        self.limits = limits if limits is not None else ConnectionLimits()
        self.conn_stats = conn_stats if conn_stats is not None else ConnectionStats()
        self.header_timeout = self.limits.header_timeout
        self.keepalive_timeout = self.limits.keepalive_timeout
        self.on_release: Callable[[], None] | None = None  # a connection closed (the acceptor)
        self.connections: set[Connection] = set()
        self.native: Any = None  # the native hit loop in front of this one (webcache/native.py)
        self.adopting = 0  # connections handed over by the native loop, transport not made yet
        self._adoptions: set[asyncio.Task] = set()
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
        self.draining = False  # the node stops: every connection closes once idle

    def _openat2_works(self) -> bool:
        try:
            stat_beneath(self._root_fd, b".")
            return True
        except OSError as exc:
            log.warning("fast path off: openat2 unavailable (%s); aiohttp serves everything", exc)
            return False

    @property
    def root_fd(self) -> int:
        """The document root, opened ``O_PATH`` (-1 once closed)."""
        return self._root_fd

    @property
    def prefix(self) -> str:
        """The canonical root path and ``/``: a plain target's file is ``prefix + target[1:]``."""
        return self._prefix

    def protocol(self, initial: bytes = b"", counted: bool = True, returnable: bool = False,
                 deadline: float | None = None) -> asyncio.Protocol:
        """Protocol factory (``connect_accepted_socket``, ``create_server``). ``initial``: the
        bytes the native hit loop read from a connection it hands over (not counted again);
        ``returnable``: the connection goes back to the loop at its next request;
        ``deadline``: its first head's header deadline, from accept (time.monotonic())."""
        if self.enabled and counted:
            self.stats.connections += 1
        if self._sweeper is None and self._root_fd >= 0:  # not once closed
            self._sweeper = asyncio.get_running_loop().call_later(
                self.limits.sweep_interval, self._sweep)
        return Connection(self, initial, returnable, deadline)

    def open_connections(self) -> int:
        """Connections open on this node: this front's, the native loop's, those between."""
        native = self.native.open if self.native is not None else 0
        return len(self.connections) + native + self.adopting

    def adopt(self, fd: int, data: bytes, returnable: bool = False,
              deadline: float | None = None) -> None:
        """A connection the native hit loop hands over with ``data``, the bytes it read and did
        not answer: this front's (and aiohttp's, as it decides) from now on; or, if
        ``returnable`` (it was handed over for the state of the cache, not for what its client
        asked), until its next request begins, which goes back to the loop. ``deadline``: the
        header deadline of a first head handed over partial (it runs from accept)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        self.stats.native_handed_off += 1
        self.adopting += 1
        task = asyncio.get_running_loop().create_task(
            self._adopt(sock, data, returnable, deadline))
        self._adoptions.add(task)
        task.add_done_callback(self._adoptions.discard)

    async def _adopt(self, sock: socket.socket, data: bytes, returnable: bool,
                     deadline: float | None) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: self.protocol(data, counted=False, returnable=returnable,
                                      deadline=deadline), sock)
        except OSError:  # reset meanwhile
            sock.close()
        finally:
            self.adopting -= 1

    def drain(self) -> None:
        """The node stops: from now on a fast-path response says ``Connection: close`` and
        ends its connection, and :meth:`close_idle` closes the connections that wait for a
        request (those aiohttp serves too, once its response is written)."""
        self.draining = True
        self.close_idle()

    def close_idle(self) -> None:
        """Close every connection with no request in progress (what it has to send is sent
        first: the transport flushes its buffer before closing)."""
        for conn in list(self.connections):
            conn.close_if_idle()

    def close(self) -> None:
        """Stop the deadlines; close every connection still on the fast path (aiohttp shuts
        down its own, letting requests in progress finish)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            if conn.inner is None:
                conn.close()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check(now)
        self._sweeper = asyncio.get_running_loop().call_later(
            self.limits.sweep_interval, self._sweep)

    def connection_status(self) -> dict[str, Any]:
        """The ``connections`` part of /_mcs/status."""
        s = self.conn_stats
        return {"open": self.open_connections(), "accepted": s.accepted,
                "refused_at_cap": s.refused_at_cap, "accept_errors": s.accept_errors,
                "shed": s.shed, "version_refused": s.version_refused,
                "timed_out": dict(s.timed_out), "limits": self.limits.describe()}

    # -- the parts of a response ------------------------------------------------------------

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = http_date(now * 1_000_000_000).encode()
        return self._date

    def error_response(self, status: HTTPStatus) -> bytes:
        """A complete response with ``Connection: close`` (408 or 505), in HTTP/1.1."""
        body = _ERROR_BODIES[status]
        return (f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n{self._identity}Date: ").encode() + self.date() \
            + b"\r\n\r\n" + body

    def header_block(self, f: ResolvedFile) -> bytes:
        """Status line and the file's headers, up to (not including) Date and Connection."""
        key = (f.path, f.size, f.mtime_ns, f.inode, f.ctime_ns)
        block = self._headers.get(key)
        if block is not None:
            return block
        now = time.time_ns()
        block = response_block(f.path, f.size, f.mtime_ns, f.inode, f.ctime_ns, now, self._identity)
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
            if not plain_target(target):
                return None
            if len(self._targets) >= _TARGETS_MAX:
                self._targets.clear()
            known = self._targets[target] = (target[1:], self._prefix + target[1:].decode())
        try:
            mode, _uid, size, mtime_ns, ctime_ns, inode, dev, nlink, readable = \
                stat_beneath(self._root_fd, known[0])
        except (OSError, ValueError):
            return None
        if (not stat.S_ISREG(mode) or nlink == 0 or not readable or size > self.cache.max_entry
                or mtime_ns < 0 or ctime_ns < 0):  # dated before 1970: never cached
            return None
        return ResolvedFile(known[1], size, mtime_ns, inode, dev, ctime_ns)


def identity_lines(host_name: str | None) -> str:
    """:func:`identity_fields` as header lines."""
    return "".join(f"{k}: {v}\r\n" for k, v in identity_fields(host_name).items())


def response_block(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int,
                   now_ns: int, identity: str | None = None) -> bytes:
    """The status line and headers of a 200 for a file, up to (not including) the Date value:
    what the fast path (and the native hit loop, webcache/native_loop.h) writes before it.
    ``identity``: the node's identity lines (:func:`identity_lines`; default: no host name)."""
    fields = file_headers(path, size, mtime_ns, inode, ctime_ns, now_ns=now_ns)
    return ("HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
            + f"Content-Length: {size}\r\n"
            + (identity_lines(None) if identity is None else identity) + "Date: ").encode()


def connection_tail(keep_alive: bool, http10: bool) -> bytes:
    """What follows the Date value of a fast-path response: the Connection header when it is
    not HTTP/1.x's default, and the blank line."""
    if keep_alive:
        return b"\r\nConnection: keep-alive\r\n\r\n" if http10 else b"\r\n\r\n"
    return b"\r\nConnection: close\r\n\r\n"


def plain_target(target: bytes) -> bool:
    """Whether the fast path may look ``target`` up (a plain name: letters, digits, ``._~-/``,
    no dot segment, dotfile, empty segment or trailing slash, not /metrics or /_mcs/...)."""
    return not (len(target) > MAX_TARGET or _PLAIN_TARGET.fullmatch(target) is None
                or b"//" in target or b"/." in target or target.endswith(b"/")
                or target == b"/metrics" or target.startswith(b"/_mcs/"))


def plain_request(head: bytes) -> tuple[bytes, bytes, bool, bool] | None:
    """``(method, target, http10, keep_alive)`` of a complete request head (without its blank
    line) that the fast path may answer, else None (aiohttp's): a ``GET`` or ``HEAD`` in
    HTTP/1.1 or 1.0 with no control byte but HTAB outside its CRLFs, no folded line, well-formed
    header names, exactly one Host in 1.1 (at most one in 1.0), ``Connection`` tokens ``close``
    and ``keep-alive`` only, no body (``Content-Length: 0`` at most) and none of
    :data:`NOT_PLAIN_HEADERS`. The native hit loop parses the same way (webcache/native_loop.h:
    ``hl_parse``; tests/test_native_hits.py compares them)."""
    if _BAD_HEAD_BYTE.search(head.replace(b"\r\n", b"")) is not None or b"\r\n " in head \
            or b"\r\n\t" in head:
        return None
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if method != b"GET" and method != b"HEAD":
        return None
    if version == b"HTTP/1.1":
        keep_alive = True
    elif version == b"HTTP/1.0":
        keep_alive = False
    else:
        return None
    hosts = 0
    close = False  # "close" wins over "keep-alive", in any order (RFC 9112 9.3)
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or b" " in name or b"\t" in name:
            return None
        name = name.lower()
        if name == b"host":
            hosts += 1
        elif name == b"connection":
            for token in value.lower().split(b","):
                token = token.strip(b" \t")
                if token == b"close":
                    close = True
                elif token == b"keep-alive":
                    keep_alive = keep_alive or version == b"HTTP/1.0"
                else:
                    return None
        elif name == b"content-length":
            if value.strip(b" \t") != b"0":
                return None
        elif name in NOT_PLAIN_HEADERS:
            return None
    if hosts != 1 and version == b"HTTP/1.1" or hosts > 1:
        return None
    return method, target, version == b"HTTP/1.0", keep_alive and not close


def _aiohttp_idle(handler: Any) -> bool:
    """Whether aiohttp's protocol waits for the next request and holds nothing of one (its
    private state, read defensively: anything unexpected means not idle)."""
    waiter = getattr(handler, "_waiter", None)
    return (waiter is not None and not waiter.done() and not getattr(handler, "_messages", True)
            and getattr(handler, "_keepalive", False) is True
            and getattr(handler, "_close", True) is False
            and getattr(handler, "_force_close", True) is False)


class _Handover(Exception):
    """This request (and the rest of the connection) is aiohttp's."""


class Connection(asyncio.Protocol):
    """One client connection, from accept to close: the fast path while ``inner`` is None, then
    a pass-through to aiohttp's protocol (``inner``); the deadlines in both cases."""

    __slots__ = ("front", "transport", "fd", "buffer", "paused", "inner", "phase", "deadline",
                 "fresh", "pending", "in_request", "payload", "line_pending", "unsent",
                 "stalled_since", "initial", "returnable", "half_closed")

    def __init__(self, front: FastPath, initial: bytes = b"", returnable: bool = False,
                 deadline: float | None = None) -> None:
        self.front = front
        self.initial = initial  # bytes received before this protocol (the native hit loop's)
        self.returnable = returnable  # back to the native hit loop at its next request
        self.transport: Any = None
        self.fd = -1
        self.buffer = b""
        self.paused = False
        self.inner: Any = None  # aiohttp's RequestHandler once handed over
        self.phase = _IDLE
        # The first head's deadline runs from accept (the native loop's, if it accepted).
        self.deadline = deadline if deadline is not None \
            else time.monotonic() + front.header_timeout
        self.fresh = True  # no byte received yet
        self.pending = False  # bytes arrived while a request was being answered (pipelined)
        self.in_request = False  # aiohttp runs a request of this connection
        self.payload: Any = None  # that request's body stream, while it is not complete
        self.line_pending = True  # aiohttp gets no byte of a request before its request line
        self.unsent = 0  # the write buffer's size at the last sweep
        self.stalled_since = 0.0  # since when it has not changed
        self.half_closed = False  # the client shut its side: answer what it asked, then close

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1
        self.front.connections.add(self)
        if not self.front.enabled:
            self._attach_inner()
        if self.initial:  # the request the native loop handed over: answered here
            data, self.initial = self.initial, b""
            returnable, self.returnable = self.returnable, False
            self.data_received(data)
            self.returnable = returnable

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        self.transport = None
        self.phase = _CLOSED
        self.payload = None
        if self.inner is not None:
            self.inner.connection_lost(exc)
        if self.front.on_release is not None:
            self.front.on_release()

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is _LINGER:
            return  # input after the last response: dropped
        if phase is _IDLE:
            if self.returnable and self._give_back(data):
                return
            self.phase = _HEAD
            deadline = time.monotonic() + self.front.header_timeout
            # a head's deadline runs from its first byte; the first head's from accept
            self.deadline = min(self.deadline, deadline) if self.fresh else deadline
            self.fresh = False
            self.line_pending = True
        elif phase is _BUSY:
            self.pending = True
        if self.inner is not None:
            self._feed_inner(data)
            return
        self.buffer = self.buffer + data if self.buffer else data
        self._process()

    def eof_received(self) -> bool | None:
        """The client shut its side (``printf ... | nc -N``, a half-close). The requests it sent
        complete are answered first: aiohttp's own protocol would let the transport close at
        once, losing the answers it had not written. A partial head at EOF gets no answer."""
        inner = self.inner
        if inner is None:
            return None  # close: the fast path answered every complete head already
        inner.eof_received()
        if self.phase is not _CLOSED and (self.in_request or not _aiohttp_idle(inner)):
            self.half_closed = True
            return True  # keep the transport open for the answers (request_finished closes)
        return None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()
        else:
            self.paused = True

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()
            return
        self.paused = False
        if self.transport is not None:
            self.transport.resume_reading()
            self._process()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def close_if_idle(self) -> None:
        """Close this connection if it waits for a request and holds none (the node stops)."""
        transport = self.transport
        if (transport is None or self.phase is not _IDLE or self.in_request or self.buffer
                or self.payload is not None
                or (self.inner is not None and not _aiohttp_idle(self.inner))):
            return
        self.phase = _CLOSED
        transport.close()

    # -- deadlines ----------------------------------------------------------------------------

    def check(self, now: float) -> None:
        """The sweep: close this connection if its phase's deadline has passed, or if its
        client has read nothing of a response for ``send_timeout``."""
        transport = self.transport
        if transport is None or self.phase is _CLOSED:
            return
        unsent = transport.get_write_buffer_size()
        if unsent:  # a response is on its way: the client's reading is what counts now
            if unsent != self.unsent:
                self.unsent, self.stalled_since = unsent, now
            elif now - self.stalled_since >= self.front.limits.send_timeout:
                self._expired(Expiry.SEND)
                transport.abort()
            return
        self.unsent = 0
        if now < self.deadline:
            return
        phase = self.phase
        if phase is _BODY and (self.payload is None or self.payload.is_eof()):
            self.payload = None  # the body came in time
            if self.in_request:
                self._set(_BUSY, math.inf)
            else:
                self._between_requests(now)
        elif phase is _HEAD:
            self._expired(Expiry.HEADER)
            self._answer_and_close(HTTPStatus.REQUEST_TIMEOUT)
        elif phase is _IDLE:
            self._expired(Expiry.HEADER if self.fresh else Expiry.IDLE)
            self.close()
        elif phase is _BODY:
            self._expired(Expiry.BODY)
            self.close()
        elif phase is _LINGER:
            self.phase = _CLOSED
            self.close()

    def _expired(self, why: Expiry) -> None:
        self.front.conn_stats.timed_out[why.value] += 1
        self.phase = _CLOSED

    def _set(self, phase: Phase, deadline: float) -> None:
        self.phase, self.deadline = phase, deadline

    def _between_requests(self, now: float) -> None:
        if self.pending:  # the next head is (partly) there already, its line unseen by us
            self._set(_HEAD, now + self.front.header_timeout)
            self.line_pending = False
        else:
            self._set(_IDLE, now + self.front.keepalive_timeout)
        self.pending = False

    def request_started(self, payload: Any) -> None:
        """aiohttp dispatched a request of this connection (its head is complete); ``payload``
        is its body stream (webcache/tracking.py)."""
        if self.phase is _CLOSED:
            return
        self.in_request = True
        self.pending = False
        if payload.is_eof():
            self.payload = None
            self._set(_BUSY, math.inf)
        else:
            self.payload = payload
            self._set(_BODY, time.monotonic() + self.front.limits.body_timeout)

    def request_finished(self) -> None:
        """aiohttp's answer to that request is written (or failed)."""
        self.in_request = False
        if self.half_closed and not getattr(self.inner, "_messages", None):
            self.phase = _CLOSED  # the last request of a half-closed client is answered
            if self.transport is not None:
                self.transport.close()  # (after what is buffered is sent)
            return
        if self.phase is _CLOSED or (self.phase is _BODY and not self.payload.is_eof()):
            return  # an unread body keeps its deadline while aiohttp drains it
        self.payload = None
        self._between_requests(time.monotonic())

    def refuse_version(self) -> None:
        """505 and close: the request line names an HTTP version this server does not speak."""
        self.front.conn_stats.version_refused += 1
        self._answer_and_close(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)

    def _answer_and_close(self, status: HTTPStatus) -> None:
        self.phase = _CLOSED
        self.buffer = b""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.front.error_response(status))
            self.transport.close()

    # -- handing over ---------------------------------------------------------------------------

    def _attach_inner(self) -> None:
        self.inner = self.front.aiohttp_factory()
        self.inner.connection_made(self.transport)

    def _feed_inner(self, data: bytes) -> None:
        if self.line_pending:
            data = self._request_line(data)
            if not data:
                return
        self.inner.data_received(data)

    def _request_line(self, data: bytes) -> bytes:
        """Hold the bytes of a request until its request line is complete, then check its
        version: 505 for a major version other than 1, HTTP/1.x (x > 1) rewritten to HTTP/1.1
        (RFC 9110 2.5: processed as the highest minor version this server speaks). Returns the
        bytes to pass on (none while held or once refused)."""
        buf = self.buffer + data if self.buffer else data
        start = 0
        while buf.startswith(b"\r\n", start):  # empty lines before a request are ignored
            start += 2
        eol = buf.find(b"\n", start, start + MAX_LINE)
        if eol < 0 and len(buf) - start < MAX_LINE:
            self.buffer = buf
            return b""
        self.buffer = b""
        self.line_pending = False
        if eol < 0 or buf.endswith(_SPOKEN, start, eol):
            return buf  # too long (aiohttp's parser refuses it), or HTTP/1.1 or 1.0
        line = buf[start:eol].rstrip(b"\r")
        space = line.rfind(b" ")
        # Not a request line if its first word is not a method (a header line, when the front
        # could not see where the previous request ended): never judged here.
        first = line.find(b" ")
        verdict = http_version(line[space + 1:]) if 0 < first < space \
            and b":" not in line[:first] else HttpVersion.MALFORMED
        if verdict is HttpVersion.UNSUPPORTED:
            self.refuse_version()
            return b""
        if verdict is HttpVersion.NEWER_MINOR:
            at = start + space + 1
            buf = buf[:at] + b"HTTP/1.1" + buf[at + 8:]
        return buf

    def _give_back(self, data: bytes) -> bool:
        """The next request of a connection the native hit loop handed over for the state of
        the cache (a miss, a recovery, a busy lock): back to the loop with its first bytes,
        if nothing here holds any state of the connection (no bytes buffered or unsent, no
        request in progress, aiohttp waiting for the next one). True if given back."""
        native = self.front.native
        transport = self.transport
        if (native is None or not native.taking() or self.buffer or self.fd < 0
                or transport is None or transport.is_closing()
                or transport.get_write_buffer_size() or self.in_request
                or self.payload is not None or self.paused
                or (self.inner is not None and not _aiohttp_idle(self.inner))):
            return False
        try:
            fd = os.dup(self.fd)
        except OSError:
            return False
        if not native.give_back(fd, data):
            return False
        self.phase = _CLOSED  # this transport is closed, not the connection: the loop has it
        transport.close()
        return True

    def _handover(self) -> None:
        transport, data = self.transport, self.buffer
        self.buffer = b""
        if transport is None or transport.is_closing():
            return
        self.front.stats.handed_over += 1
        self.line_pending = True  # the buffer starts with a request
        self._attach_inner()
        if data:
            self._feed_inner(data)

    # -- requests on the fast path ------------------------------------------------------------

    def _process(self) -> None:
        while self.buffer and self.transport is not None:
            if self.paused:  # the client does not read: stop reading its requests too
                self.transport.pause_reading()
                return
            end = self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD)
            if end < 0:
                self._handover()  # a partial (or too long) head: aiohttp's, under our deadline
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
        if self.phase is _HEAD and self.transport is not None:
            self.phase = _IDLE
            self.deadline = time.monotonic() + self.front.keepalive_timeout

    def _serve(self, head: bytes) -> None:
        """Answer one complete request head, or raise _Handover before writing anything."""
        request = plain_request(head)
        if request is None:
            raise _Handover
        method, target, http10, keep_alive = request
        front = self.front
        keep_alive = keep_alive and not front.draining
        cache = front.cache
        if cache.recovering or self.transport.is_closing():
            raise _Handover
        f = front.plain_file(target)
        if f is None:
            raise _Handover
        head_out = front.header_block(f) + front.date() + connection_tail(keep_alive, http10)
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
            self._linger()

    def _linger(self) -> None:
        """After the last response: a lingering close (RFC 9112 9.6), as the native loop does.
        Closing the socket while the client still sends (a request pipelined behind this one)
        would have the kernel answer with a reset that drops what of the response is still on
        its way; instead our side is shut down once the response is flushed (it ends with a
        FIN), and the client's input is dropped until it closes too, ``LINGER`` s at most."""
        transport = self.transport
        self._set(_LINGER, time.monotonic() + LINGER)
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()

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
