"""The accept loop of a node: the connection cap, and graceful behaviour without descriptors.

asyncio's own server, at EMFILE, logs "socket.accept() out of system resource" for every
failure and leaves the connections waiting in the backlog; a red team saw 1.9 M such lines in
100 s. This loop, on the listening sockets (SO_REUSEPORT, one set per node):

- accepts at most ``ACCEPT_BATCH`` connections per readiness event, so a flood of connections
  cannot starve the requests of the open ones;
- closes a connection at once, unserved, when ``max_connections`` are open (counted);
- at EMFILE/ENFILE closes its reserve descriptor, accepts the oldest waiting connection and
  closes it (the client learns at once instead of timing out; libev's trick), reopens the
  reserve, and stops accepting for a delay that doubles from 50 ms to 1 s, or until one of its
  connections closes, whichever comes first;
- logs through the node's rate-limited handlers (webcache/ratelog.py): one line per 10 s.

Accepted sockets become transports with ``loop.connect_accepted_socket``: the same transport,
TCP_NODELAY included, that ``create_server`` makes (asyncio and uvloop alike); or, with the
native hit loop, go to it (``adopt``), which hands back what it does not serve.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import Callable

from webcache.limits import ConnectionLimits, ConnectionStats

__all__ = ["Acceptor", "BACKLOG", "ACCEPT_BATCH"]

log = logging.getLogger("mcs.webcache.accept")

BACKLOG = 511  # nginx's default
ACCEPT_BATCH = 64
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0
_NO_DESCRIPTOR = frozenset({errno.EMFILE, errno.ENFILE})
_NO_MEMORY = frozenset({errno.ENOBUFS, errno.ENOMEM})
# The connection died in the backlog or a firewall refused it: skip it, accept the next one.
_SKIP = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host:port`` (every address it resolves to),
    with SO_REUSEADDR and SO_REUSEPORT, as ``create_server(reuse_port=True)`` makes them."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _open_reserve() -> int:
    try:
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class Acceptor:
    """Accepts connections on ``sockets`` for ``protocol_factory`` within ``limits``;
    ``open_count`` says how many connections are open now. With ``adopt``, each accepted
    socket (non-blocking) is offered to it first (the native hit loop: webcache/native.py;
    False: not taken, it gets a transport as usual)."""

    def __init__(self, sockets: list[socket.socket],
                 protocol_factory: Callable[[], asyncio.Protocol], limits: ConnectionLimits,
                 stats: ConnectionStats, open_count: Callable[[], int],
                 adopt: Callable[[socket.socket], bool] | None = None) -> None:
        self.sockets = sockets
        self.protocol_factory = protocol_factory
        self.adopt = adopt
        self.cap = limits.cap
        self.stats = stats
        self.open_count = open_count
        self.starting = 0  # accepted, transport not made yet
        self._loop = asyncio.get_running_loop()
        self._reserve = _open_reserve()
        self._delay = BACKOFF_MIN
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        for sock in sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def backing_off(self) -> bool:
        return self._resume is not None

    def close(self) -> None:
        """Stop accepting and close the listening sockets and the reserve descriptor."""
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        else:
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())
        for sock in self.sockets:
            sock.close()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1

    def released(self) -> None:
        """A connection closed: a descriptor is free, so end a back-off for EMFILE now."""
        if self._resume is not None and not self._closed:
            self._resume.cancel()
            self._resume = None
            self._listen()

    # -- the loop -----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _SKIP:
                    continue
                self.stats.accept_errors += 1
                if exc.errno in _NO_DESCRIPTOR:
                    self._shed(listener)
                log.warning("accept failed on %s: %s; backing off %.2f s", _name(listener),
                            exc.strerror, self._delay)
                self._back_off()
                return
            self._delay = BACKOFF_MIN
            if self.open_count() + self.starting >= self.cap:
                self.stats.refused_at_cap += 1
                sock.close()
                continue
            self.stats.accepted += 1
            if self.adopt is not None:
                try:
                    sock.setblocking(False)
                    if self.adopt(sock):
                        continue
                except OSError as exc:
                    log.warning("the native hit loop refused a connection: %s", exc)
                    sock.close()
                    continue
            self.starting += 1
            task = self._loop.create_task(self._start(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self.protocol_factory, sock)
        except OSError:  # reset before its transport was made
            sock.close()
        finally:
            self.starting -= 1

    def _shed(self, listener: socket.socket) -> None:
        """Close the oldest waiting connection with the reserve descriptor's slot."""
        if self._reserve < 0:
            self._reserve = _open_reserve()
            return
        os.close(self._reserve)
        self._reserve = -1
        try:
            sock, _addr = listener.accept()
        except OSError:
            pass
        else:
            sock.close()
            self.stats.shed += 1
        self._reserve = _open_reserve()

    def _back_off(self) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
        self._resume = self._loop.call_later(self._delay, self._resume_now)
        self._delay = min(BACKOFF_MAX, self._delay * 2)

    def _resume_now(self) -> None:
        self._resume = None
        self._listen()

    def _listen(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "listener"
    return f"{host}:{port}"
