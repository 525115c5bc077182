"""One cache node: an McsWebCache member serving HTTP on a shared port (SO_REUSEPORT).

Started by the launcher (``python -m webcache.node ...``); prints one JSON line
``{"ready": ..., "pid": ..., "slot": ...}`` when it serves, and stops cleanly on SIGTERM/SIGINT.
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

from webcache.app import FAST, make_app
from webcache.cache import McsWebCache
from webcache.fastpath import FastPath, FastPathStats
from webcache.paths import DocumentRoot

log = logging.getLogger("mcs.webcache.node")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m webcache.node")
    p.add_argument("--domain", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cache-size", type=int, required=True)
    p.add_argument("--max-entry", type=int, required=True)
    p.add_argument("--node", default=None)
    p.add_argument("--timing", default="{}", help="JSON: heartbeat, suspect_after, evict_after")
    p.add_argument("--no-fast-path", action="store_true",
                   help="serve every request through aiohttp (for comparison)")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace, cache: McsWebCache, root: DocumentRoot) -> None:
    app = make_app(cache, root)
    stats = app[FAST] = FastPathStats()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    front = FastPath(cache, root, runner.server, enabled=not args.no_fast_path, stats=stats)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(front.protocol, args.host, args.port, reuse_port=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "pid": os.getpid(), "slot": cache.slot,
                      "generation": cache.view.generation, "fast_path": front.enabled}),
          flush=True)
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
        front.close()
        await runner.cleanup()


class _ClientErrorFilter(logging.Filter):
    """Drop aiohttp's tracebacks for what clients do (a malformed request, a reset connection):
    one log record per bad request would let any client flood the logs. Errors of the server
    itself are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (HttpProcessingError, ConnectionError))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"node {os.getpid()}: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_ClientErrorFilter())
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
