"""Baseline servers and a fallback load generator for ``bench/test_webcache.py``.

    python -P webcache_baselines.py serve --mode file|memory --root DIR --workers N
        N aiohttp worker processes on ONE loopback port (SO_REUSEPORT, like the mcs nodes).
        ``file``: a handler returning ``web.FileResponse(path)``; ``memory``: a handler
        returning ``web.Response(body=data)`` from a dict of ``bytes`` read at start-up.
        Prints one JSON line ``{"url": ..., "pids": [...]}`` when every worker serves and
        stops every worker on SIGTERM/SIGINT (like ``mcs-webcache serve``).

    python -P webcache_baselines.py load --port P --path /f --conns C --duration S [--procs K]
        Fallback load generator (used only when wrk is not installed): K processes, each with
        C/K keep-alive connections doing GETs back to back for S seconds (bounded). Prints one
        JSON line with requests, errors, non-2xx, bytes and requests/s.

Both event loops use uvloop when it is installed, as the mcs nodes do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT = 30.0


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


# -- one worker ------------------------------------------------------------------------------


def _load_files(root: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files["/" + path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def make_app(mode: str, root: Path):
    from aiohttp import web

    app = web.Application()
    if mode == "memory":
        files = _load_files(root)

        async def handler(request: web.Request) -> web.StreamResponse:
            data = files.get(request.path)
            if data is None:
                raise web.HTTPNotFound()
            return web.Response(body=data)
    elif mode == "file":
        base = root.resolve()

        async def handler(request: web.Request) -> web.StreamResponse:
            path = (base / request.match_info["tail"]).resolve()
            if not path.is_relative_to(base) or not path.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(path)
    else:
        raise ValueError(mode)
    app.router.add_get("/{tail:.*}", handler)
    return app


async def _serve_worker(args: argparse.Namespace) -> None:
    from aiohttp import web

    runner = web.AppRunner(make_app(args.mode, Path(args.root)), access_log=None,
                           handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, reuse_port=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    await stop.wait()
    await runner.cleanup()


# -- the supervisor --------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    stopping = False

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Reserve a port: a bound (never listening) SO_REUSEPORT socket keeps it ours until every
    # worker listens on it too; it gets no connections since it does not listen.
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    probe.bind((args.host, args.port))
    port = probe.getsockname()[1]
    workers: list[subprocess.Popen] = []
    try:
        for _ in range(args.workers):
            proc = subprocess.Popen(
                [sys.executable, "-P", os.path.abspath(__file__), "worker", "--mode", args.mode,
                 "--root", args.root, "--host", args.host, "--port", str(port)],
                stdout=subprocess.PIPE, text=True)
            workers.append(proc)
            ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
            line = proc.stdout.readline() if ready else ""
            proc.stdout.close()
            if not line.startswith("{"):
                print(f"baseline worker did not start (status {proc.poll()})", file=sys.stderr)
                return 1
        probe.close()
        print(json.dumps({"url": f"http://{args.host}:{port}/",
                          "pids": [p.pid for p in workers]}), flush=True)
        while not stopping:
            if any(p.poll() is not None for p in workers):
                print("a baseline worker died", file=sys.stderr)
                return 1
            time.sleep(0.05)
        return 0
    finally:
        probe.close()
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in workers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- fallback load generator -----------------------------------------------------------------


def _load_proc(port: int, path: str, conns: int, duration: float, queue) -> None:
    """Keep-alive GETs on ``conns`` non-blocking sockets for ``duration`` seconds."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode()
    sel = select.epoll()
    socks: dict[int, list] = {}  # fd -> [sock, buffer, expected total or None, header length]
    stats = {"requests": 0, "errors": 0, "non2xx": 0, "bytes": 0}

    def connect() -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        s.send(request)
        socks[s.fileno()] = [s, bytearray(), None, 0]
        sel.register(s.fileno(), select.EPOLLIN)

    for _ in range(conns):
        connect()
    deadline = time.monotonic() + duration
    while (now := time.monotonic()) < deadline:
        for fd, _ in sel.poll(min(0.1, deadline - now)):
            state = socks[fd]
            try:
                chunk = state[0].recv(1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                stats["errors"] += 1
                sel.unregister(fd)
                state[0].close()
                del socks[fd]
                connect()
                continue
            buf = state[1]
            buf += chunk
            while True:
                if state[2] is None:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head = bytes(buf[:end]).decode("latin-1").lower()
                    length = 0
                    for line in head.split("\r\n")[1:]:
                        if line.startswith("content-length:"):
                            length = int(line.split(":", 1)[1])
                    if not head.startswith("http/1.1 2"):
                        stats["non2xx"] += 1
                    state[2], state[3] = end + 4 + length, end + 4
                if len(buf) < state[2]:
                    break
                stats["requests"] += 1
                stats["bytes"] += state[2]
                del buf[:state[2]]
                state[2] = None
                state[0].send(request)
    for state in socks.values():
        state[0].close()
    sel.close()
    queue.put(stats)


def load(args: argparse.Namespace) -> int:
    procs = max(1, min(args.procs, args.conns))
    queue = multiprocessing.get_context("fork").Queue()
    workers = []
    started = time.monotonic()
    for i in range(procs):
        n = args.conns // procs + (1 if i < args.conns % procs else 0)
        p = multiprocessing.get_context("fork").Process(
            target=_load_proc, args=(args.port, args.path, n, args.duration, queue))
        p.start()
        workers.append(p)
    totals = {"requests": 0, "errors": 0, "non2xx": 0, "bytes": 0}
    for _ in workers:
        for key, value in queue.get(timeout=args.duration + 30).items():
            totals[key] += value
    for p in workers:
        p.join(10)
    elapsed = time.monotonic() - started
    totals["seconds"] = elapsed
    totals["rps"] = totals["requests"] / args.duration
    print(json.dumps(totals), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="webcache_baselines.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "worker"):
        p = sub.add_parser(name)
        p.add_argument("--mode", choices=("file", "memory"), required=True)
        p.add_argument("--root", required=True)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=0)
        p.add_argument("--workers", type=int, default=1)
    p = sub.add_parser("load")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--procs", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "worker":
        _run(_serve_worker(args))
        return 0
    return load(args)


if __name__ == "__main__":
    sys.exit(main())
