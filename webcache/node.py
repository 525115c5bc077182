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

from webcache.app import make_app
from webcache.cache import McsWebCache
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
    return p.parse_args(argv)


async def serve(args: argparse.Namespace, cache: McsWebCache, root: DocumentRoot) -> None:
    runner = web.AppRunner(make_app(cache, root), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_port=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "pid": os.getpid(), "slot": cache.slot,
                      "generation": cache.view.generation}), flush=True)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            if cache.member.fenced:
                log.error("this node was fenced; exiting")
                break
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"node {os.getpid()}: %(message)s")
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
