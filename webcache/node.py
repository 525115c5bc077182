"""One cache node: an McsWebCache member serving HTTP on a shared port (SO_REUSEPORT).

Started by the launcher (``python -m webcache.node ...``); when it serves it prints one JSON line
``{"ready": ..., "pid": ..., "slot": ...}`` and says ``READY=1`` to its supervisor (sd_notify,
when NOTIFY_SOCKET is set), and stops cleanly on SIGTERM/SIGINT: it takes no more connections,
lets the responses in progress finish (``--drain-timeout``, :func:`drain`) and leaves the
domain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from mcs.sdnotify import notify
from webcache import ratelog
from webcache.acceptor import Acceptor, listening_sockets
from webcache.app import FAST, make_app
from webcache.cache import McsWebCache
from webcache.fastpath import FastPath, FastPathStats
from webcache.limits import (ConnectionLimits, ConnectionStats, InvalidLimit, add_arguments,
                             add_native_argument, default_max_connections)
from webcache.native import NativeHits
from webcache.paths import DocumentRoot
from webcache.sealdir import SealedDirError
from webcache.tracking import track_requests

log = logging.getLogger("mcs.webcache.node")

DRAIN_POLL = 0.05  # while a stopping node drains, it looks for idle connections this often
AIOHTTP_SHUTDOWN = 1.0  # aiohttp's own wait for its handlers, after the drain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m webcache.node")
    p.add_argument("--domain", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cache-size", type=int, required=True)
    p.add_argument("--max-entry", type=int, required=True)
    p.add_argument("--node", default=None)
    p.add_argument("--host-name", default=None,
                   help="this host's name, sent in every response (X-Mcs-Host)")
    p.add_argument("--timing", default="{}", help="JSON: heartbeat, suspect_after, evict_after")
    p.add_argument("--no-fast-path", action="store_true",
                   help="serve every request through aiohttp (for comparison)")
    add_native_argument(p, check_dir=False)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        args.limits = ConnectionLimits.from_args(args)
    except InvalidLimit as exc:
        p.error(str(exc))
    return args


async def serve(args: argparse.Namespace, cache: McsWebCache, root: DocumentRoot) -> None:
    limits: ConnectionLimits = args.limits
    if limits.cap > default_max_connections():
        log.warning("--max-connections %d is more than RLIMIT_NOFILE leaves for connections "
                    "(%d): past the descriptor limit, new connections are shed", limits.cap,
                    default_max_connections())
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_loop_error)
    app = make_app(cache, root, args.host_name)
    stats = app[FAST] = FastPathStats()
    # aiohttp's own keep-alive timer and body lingering end after the front's deadlines (which
    # count what they close): backstops only.
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=limits.keepalive_timeout + limits.header_timeout + 1,
                           lingering_time=limits.body_timeout,
                           shutdown_timeout=AIOHTTP_SHUTDOWN)
    await runner.setup()
    assert runner.server is not None
    # The deadlines after the hand-over to aiohttp (webcache/tracking.py).
    runner.server.request_handler = track_requests(runner.server.request_handler)
    conn_stats = ConnectionStats()
    front = FastPath(cache, root, runner.server, enabled=not args.no_fast_path, stats=stats,
                     limits=limits, conn_stats=conn_stats, host_name=args.host_name)
    native = start_native(cache, front, limits, args.sealed_copies, args.sealed_dir) \
        if args.native_hits and front.enabled else None
    server = Acceptor(listening_sockets(args.host, args.port), front.protocol, limits, conn_stats,
                      front.open_connections, adopt=native.adopt if native is not None else None)
    front.on_release = server.released
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "pid": os.getpid(), "slot": cache.slot,
                      "generation": cache.view.generation, "fast_path": front.enabled,
                      "native_hits": native is not None}), flush=True)
    notify(f"READY=1\nSTATUS=serving as member slot {cache.slot}, generation "
           f"{cache.view.generation}")
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                if cache.member.fenced:
                    log.error("this node was fenced; exiting")
                    break
    finally:
        server.close()
        await drain(front, native, limits.drain_timeout)
        if native is not None:
            native.close()
        front.close()
        await runner.cleanup()


async def drain(front: FastPath, native: NativeHits | None, timeout: float) -> int:
    """A stopping node's last act of service (nginx's graceful quit): no connection is taken
    any more (the caller closed the listeners); each one still open is closed as soon as it has
    no request in progress, so that every response begun is sent whole; the connections left
    after ``timeout`` seconds are returned (counted) and the caller closes them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if native is not None:
        native.drain()
    front.drain()
    while True:
        left = front.open_connections()
        if left == 0 or loop.time() >= deadline:
            break
        await asyncio.sleep(DRAIN_POLL)
        front.close_idle()
    if left:
        log.warning("stopping with %d connection(s) still busy after the drain timeout (%g s); "
                    "closing them", left, timeout)
    return left


def start_native(cache: McsWebCache, front: FastPath, limits: ConnectionLimits,
                 sealed_copies: int, sealed_dir: str | None = None) -> NativeHits | None:
    """The native hit loop in front of ``front``, running; None (logged) if it cannot start:
    the asyncio fast path then serves everything."""
    try:
        try:
            native = NativeHits(cache, front, limits, sealed_copies=sealed_copies,
                                sealed_dir=sealed_dir)
        except SealedDirError as exc:  # checked by the launcher, gone or changed since
            log.warning("%s; sealed copies are memfds", exc)
            native = NativeHits(cache, front, limits, sealed_copies=sealed_copies)
    except OSError as exc:
        log.warning("native hit loop off: %s; the asyncio fast path serves every request", exc)
        return None
    native.start()
    return native


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """The event loop's errors, with a fixed message template so that the rate limit of the log
    (webcache/ratelog.py) groups repeats of one kind."""
    log.error("event loop: %s", context.get("message", "error"), exc_info=context.get("exception"))


class _ClientErrorFilter(logging.Filter):
    """Drop aiohttp's tracebacks for what clients do (a malformed request, a reset connection):
    one log record per bad request would let any client flood the logs. Errors of the server
    itself are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (HttpProcessingError, ConnectionError))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Stopped by SIGTERM/SIGINT (serve's handlers), even if whoever started it blocked them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    logging.basicConfig(level=logging.WARNING, format=f"node {os.getpid()}: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_ClientErrorFilter())
    ratelog.install()
    try:
        import uvloop  # optional: pip install mcs-multicomputer[fast]
    except ImportError:
        uvloop = None
    root = DocumentRoot(args.root)
    cache = McsWebCache(args.domain, cache_size=args.cache_size, max_entry=args.max_entry,
                        node=args.node, **json.loads(args.timing))
    cache.start()
    try:
        if uvloop is not None:
            uvloop.run(serve(args, cache, root))
        else:
            asyncio.run(serve(args, cache, root))
    finally:
        cache.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
