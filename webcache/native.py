"""The native hit path of a node: a thread that serves plain cache hits without Python.

Most requests to a cache are plain ``GET``/``HEAD`` of a cached file. The asyncio fast path
(webcache/fastpath.py) answers them without aiohttp, but every request still costs Python. The
native hit loop (webcache/native_loop.h, wrapped by webcache/_native_loop.pyx) answers them
without the GIL, in a thread of its own with its own epoll set: it reads, parses the head
strictly, finds the file with one confined ``openat2`` (``RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS``) and its ``fstat``, takes the entry from the shared table as
``McsWebCache.lookup`` does (bucket lock, pin journal mark, pin, revalidation on size, mtime,
ctime, inode and device, the copy checksummed as it is made, unpin) and writes the same headers
as the fast path with one ``sendmsg``. Keep-alive, pipelining, the header, keep-alive and send
deadlines are its own (webcache/limits.py's values).

The seam is one interface, :meth:`FastPath.adopt`: everything else — a miss (the fill), a
conditional or range request, an unusual header or target, a partial head, ``/_mcs/*``,
``/metrics``, a request during a recovery, a stale or corrupt entry — goes to the asyncio side
with the bytes the loop read, with the reason counted (:class:`HandOff`), and is answered there
(its fast path, then aiohttp) exactly as on a connection that began there. A connection handed
over for what its client asked (:data:`TRANSIENT` says which are not: a method, header or target
the loop leaves to aiohttp, a partial head) stays there; one handed over for the state of the
cache (a miss, a recovery, a busy lock) comes back to the loop when its next request begins, if
nothing on the asyncio side holds any state of it (``Connection._give_back``): one miss, or one
recovery, does not leave a keep-alive connection on the slower side for good. Accepting stays in
Python (webcache/acceptor.py: the cap, descriptor exhaustion), which gives each accepted socket
to the loop.

The recovery gate: the loop keeps a gate word that the component closes and opens with its
own (``McsWebCache.on_gate``), and the quiesce phase waits until the loop is out of shared
memory (``workers_quiet``): during a recovery the loop hands every request to the asyncio
side, which serves it from disk. It is given the sections to read (master area, arenas, the
domain's root) only then, while it cannot be reading.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import threading
from typing import Any

from mcs import layout as mcs_layout
from mcs.errors import ClosedError, LayoutMismatchError
from webcache import _native_loop
from webcache import layout as L
from webcache.cache import McsWebCache
from webcache.fastpath import NODE_PID, NOT_PLAIN_HEADERS, SERVER, FastPath
from webcache.limits import ConnectionLimits, Expiry, descriptor_share
from webcache.sealdir import open_sealed_dir
from webcache.semantics import content_type, content_types

__all__ = ["NativeHits", "HandOff", "TRANSIENT", "LOCK_WAIT", "SEALED_MIN", "loop_layout",
           "make_loop", "sealed_count"]

log = logging.getLogger("mcs.webcache.native")

# How long the loop waits for a bucket lock before it hands the request over: a holder keeps it
# for microseconds (a walk, a pin, a link), so this is only met when the holder is descheduled.
LOCK_WAIT = 0.002
QUIET_WAIT = 1.0  # how long stopping waits for the loop to leave shared memory
# The smallest body given a sealed copy: below it, copying and summing per response costs less
# than the sendfile call that replaces them (bench/test_webcache.py measures both sides).
SEALED_MIN = 16 << 10


def sealed_count(nofile: int | None = None) -> int:
    """How many sealed copies (each a descriptor) a loop may hold: an eighth of what
    RLIMIT_NOFILE leaves after the reserve (connections take three quarters:
    limits.default_max_connections), at most the loop's table."""
    return max(0, descriptor_share(1 / 8, _native_loop.MAX_SEALED, nofile))


class HandOff(enum.IntEnum):
    """Why the native loop gave a connection to the asyncio side (values: native_loop.h)."""

    NOT_PLAIN = 0  # a complete head it does not serve: method, target, version, header
    PARTIAL = 1  # a head not complete when the socket had no more (or longer than 8 KiB)
    NO_FILE = 2  # no regular readable file of cacheable size there (the resolver says why)
    MISS = 3  # not cached: aiohttp fills (once in the domain)
    STALE = 4  # cached for another version of the file: dropped and read again there
    CORRUPT = 5  # checksum mismatch or a corrupt chain: dropped (or cut) and read again there
    RECOVERY = 6  # a recovery runs (or a memory failure was counted): served from disk there
    BUSY = 7  # the bucket lock was not free within LOCK_WAIT
    UNAVAILABLE = 8  # an arena not mapped in the loop, a mutex with a bad magic
    ERROR = 9  # an unexpected system error (no memory, no descriptor)


# Hand-offs for the state of the cache, not for what the client asked: the connection goes
# back to the loop at its next request (webcache.fastpath.Connection._give_back). A file the
# loop does not serve (a 404, a directory, a file larger than max_entry streamed by aiohttp)
# says nothing about the client's next request either: without NO_FILE here, one large file or
# one 404 kept a keep-alive connection off the loop for good (in the chaos soak, whose site
# has files over max_entry, the loop served under 1% of the hits).
TRANSIENT = frozenset({HandOff.MISS, HandOff.NO_FILE, HandOff.STALE, HandOff.CORRUPT,
                       HandOff.RECOVERY, HandOff.BUSY, HandOff.UNAVAILABLE, HandOff.ERROR})

if {h.name: h.value for h in HandOff} != _native_loop.REASONS:
    raise LayoutMismatchError("webcache.native.HandOff disagrees with webcache/native_loop.h: "
                              "rebuild the package after editing them together")


def loop_layout() -> dict[str, int]:
    """The offsets the loop reads the shared table with (webcache/layout.py owns them)."""
    return {
        "slots": mcs_layout.MAX_MEMBERS, "buckets": L.BUCKETS, "buckets_at": L.bucket_offset(0),
        "bucket_size": L.BUCKET_SIZE, "b_mutex": L.B_MUTEX, "b_head": L.B_HEAD,
        "e_next": L.E_NEXT, "e_hash": L.E_HASH, "e_size": L.E_SIZE, "e_mtime": L.E_MTIME,
        "e_inode": L.E_INODE, "e_dev": L.E_DEV, "e_sum": L.E_SUM, "e_access": L.E_ACCESS,
        "e_path_len": L.E_PATH_LEN, "e_ctime": L.E_CTIME, "e_pins": L.E_PINS,
        "entry_header": L.ENTRY_HEADER, "arena_header": L.ARENA_HEADER, "a_id": L.A_ID,
        "m_ref": L.M_REF, "m_arena": L.M_ARENA, "slot_shift": L.SLOT_SHIFT,
        "max_chain": L.MAX_CHAIN, "mf_offset": mcs_layout.MEMORY_FAILURES,
    }


def make_loop(root_fd: int, prefix: str, max_entry: int, limits: ConnectionLimits, *,
              check_readable: bool = False, host_name: str | None = None,
              sealed_copies: int = 0, max_sealed: int | None = None,
              sealed_dir_fd: int = -1) -> _native_loop.HitLoop:
    """A loop (not running) for files under ``prefix`` (the canonical root and ``/``) found
    from ``root_fd`` (the loop's own descriptor: it does not close it).

    ``check_readable`` adds ``access(R_OK)`` to every GET; without it a GET is served only
    from an entry whose ctime equals the file's, and a change of mode, owner or ACL moves
    ctime, so the entry was read from this very file state (HEAD always checks).

    ``sealed_copies``: bytes of sealed copies at most (0: none), in at most ``max_sealed``
    copies (default: :func:`sealed_count`); sealed memfds, or unnamed read-only files in the
    directory ``sealed_dir_fd`` (webcache.sealdir; the loop's own: it does not close it)."""
    return _native_loop.HitLoop(
        root_fd=root_fd, prefix=os.fsencode(prefix), max_entry=max_entry,
        check_readable=check_readable, header_timeout=limits.header_timeout,
        keepalive_timeout=limits.keepalive_timeout, send_timeout=limits.send_timeout,
        sweep_interval=limits.sweep_interval, lock_wait=LOCK_WAIT, layout=loop_layout(),
        not_plain=sorted(NOT_PLAIN_HEADERS),
        types={ext.encode(): ctype.encode() for ext, ctype in content_types().items()},
        default_type=content_type("file").encode(), node=NODE_PID.encode(),
        server=SERVER.encode(), host=(host_name or "").encode(),
        sealed_budget=sealed_copies, sealed_min=SEALED_MIN,
        sealed_count=sealed_count() if max_sealed is None else max_sealed,
        sealed_dir_fd=sealed_dir_fd)


class NativeHits:
    """The native hit loop of one node, in front of ``front`` (the asyncio fast path, which
    gets what the loop hands over) on ``cache``. :meth:`start` in the event loop; then the
    acceptor gives it connections (:meth:`adopt`); :meth:`close` before the cache stops."""

    def __init__(self, cache: McsWebCache, front: FastPath, limits: ConnectionLimits, *,
                 check_readable: bool = False, sealed_copies: int = 0,
                 sealed_dir: str | os.PathLike[str] | None = None) -> None:
        self.cache = cache
        self.front = front
        self._sealed_dir_fd = -1
        self.sealed_in = "memfd" if sealed_copies else None  # /_mcs/status: where copies are
        self._root_fd = os.dup(front.root_fd)
        try:
            if sealed_dir is not None and sealed_copies:
                self._sealed_dir_fd = open_sealed_dir(sealed_dir)
                self.sealed_in = os.path.abspath(sealed_dir)
            self.loop = make_loop(self._root_fd, front.prefix, cache.max_entry, limits,
                                  host_name=front.host_name,
                                  check_readable=check_readable,
                                  sealed_copies=sealed_copies,
                                  sealed_dir_fd=self._sealed_dir_fd)
        except BaseException:
            self._close_fds()
            raise
        self._thread = threading.Thread(target=self._run, name="mcs-webcache-native", daemon=True)
        self._aio: asyncio.AbstractEventLoop | None = None
        self._seen = dict.fromkeys(_native_loop.COUNTERS, 0)  # counters folded in so far
        self._reasons: dict[int, int] = {}
        self.failed = False
        self.closed = False
        self.given_back = 0  # connections the asyncio side gave back (at their next request)

    # -- lifetime -------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop (its thread), take its hand-offs in this event loop, open its gate."""
        self._aio = asyncio.get_running_loop()
        self._thread.start()
        self._aio.add_reader(self.loop.wake_fd, self._take)
        self.front.native = self
        stats = self.front.stats
        stats.sync = self.sync
        stats.native = self.status
        self.cache.attach_native(self)

    def _run(self) -> None:
        try:
            self.loop.run()
        except Exception:
            self.failed = True
            log.exception("the native hit loop failed; the asyncio side serves everything")
            if self._aio is not None:  # its connections are closed, new ones go to the front
                self._aio.call_soon_threadsafe(self.close)

    def drain(self) -> None:
        """The node stops: each connection is closed once it has no request in progress (its
        last response says ``Connection: close``); :meth:`open` counts what is left."""
        if not (self.closed or self.failed):
            self.loop.drain()

    def close(self) -> None:
        """Stop the loop (its connections are closed) and give the cache back (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.cache.detach_native()
        self.loop.stop()
        self._thread.join()
        if self._aio is not None:
            self._aio.remove_reader(self.loop.wake_fd)
        self.sync()
        self.front.native = None
        self.loop.close()
        self._close_fds()

    def _close_fds(self) -> None:
        try:
            os.close(self._root_fd)
        finally:
            if self._sealed_dir_fd >= 0:
                os.close(self._sealed_dir_fd)

    # -- the gate (McsWebCache.on_gate, workers_quiet) ------------------------------------------

    def close_gate(self) -> None:
        self.loop.close_gate()

    def open_gate(self, memory: tuple) -> None:
        self.loop.open_gate(*memory)

    def wait_quiet(self, timeout: float) -> bool:
        return self.loop.wait_quiet(timeout)

    # -- connections ----------------------------------------------------------------------------

    def adopt(self, sock: Any) -> bool:
        """Serve an accepted (non-blocking) socket: True, the loop owns its descriptor from now
        on; False if the loop is stopped or failed (the socket is left to the caller)."""
        if self.failed or self.closed:
            return False
        fd = sock.detach()
        try:
            self.loop.adopt(fd)
        except OSError:
            os.close(fd)
            raise
        self.front.stats.connections += 1
        return True

    @property
    def open(self) -> int:
        """Connections the loop holds (or has handed over and the front has not taken)."""
        return 0 if self.closed else self.loop.open

    def taking(self) -> bool:
        """Whether a connection given back would be served here (else it would come back)."""
        return not (self.failed or self.closed or self.loop.gate_closed or self.loop.draining)

    def give_back(self, fd: int, data: bytes) -> bool:
        """A connection the asyncio side gives back with ``data``, the start of its next
        request (``fd`` is the loop's from now on, or closed when False)."""
        try:
            self.loop.adopt(fd, data)
        except OSError:
            os.close(fd)
            return False
        self.given_back += 1
        return True

    def _take(self) -> None:
        for fd, reason, data, deadline in self.loop.take():
            self.front.adopt(fd, data, returnable=reason in TRANSIENT, deadline=deadline)

    # -- counters --------------------------------------------------------------------------------

    def sync(self) -> None:
        """Fold what the loop counted since the last call into the node's statistics: its
        responses into the fast path's, its hits into the cache's, its deadlines into the
        connections'."""
        try:
            values, self._reasons = self.loop.counters()
        except ClosedError:  # closed: everything was folded in by close()
            return
        now = dict(zip(_native_loop.COUNTERS, values))
        d = {k: now[k] - self._seen[k] for k in now}
        self._seen = now
        stats = self.front.stats
        stats.served += d["served"]
        stats.native_served += d["served"]
        stats.native_sealed_hits += d["sealed_hits"]
        stats.sealed_bytes = now["sealed_bytes"]
        self.cache.cache_stats.hits += d["hits"]
        timed_out = self.front.conn_stats.timed_out
        timed_out[Expiry.HEADER.value] += d["timed_out_header"]
        timed_out[Expiry.IDLE.value] += d["timed_out_idle"]
        timed_out[Expiry.SEND.value] += d["timed_out_send"]

    def status(self) -> dict[str, Any]:
        """``fast_path.native`` of /_mcs/status."""
        self.sync()
        out: dict[str, Any] = {"running": not self.closed and not self.failed,
                               "open": self.open, **self._seen, "given_back": self.given_back,
                               "sealed_in": self.sealed_in}
        out["handed_off_by_reason"] = {HandOff(r).name.lower(): n
                                       for r, n in sorted(self._reasons.items())}
        return out
