"""Baseline servers for the shared-cache comparison (bench/test_scaling.py): the same HTTP work as
an mcs-webcache node, with a *different* cache behind it.

    python -P bench/shared_nothing.py --root DIR --nodes 3 --port 0 --cache-size 4M \\
        [--max-entry 1M] [--backend lru|redis] [--redis-port P]

* ``lru`` (shared-nothing): every node keeps a **private** in-process LRU (an ``OrderedDict`` of
  ``bytes``) bounded by ``--cache-size`` bytes of file data, like one mcs arena. N nodes hold N
  private caches: a hot file is duplicated in each of them.
* ``redis``: every node asks one Redis server (``GET``), and on a miss reads the file and fills
  Redis (``SET``); Redis runs with ``maxmemory`` = the total budget and ``allkeys-lru``
  (:class:`RedisServer` starts one). One shared cache, but every hit crosses a socket and is copied.

The nodes share one port with SO_REUSEPORT, exactly like the mcs launcher, and do the same per
request work as ``webcache.app``: the same path resolution (``webcache.paths.DocumentRoot``:
``openat2(O_PATH)``/``readlink``/``fstat``/``access``, reads from that descriptor), the same
validators (size, mtime, inode), the same headers, conditional requests and single ranges; only
the cache differs. (An mcs hit also verifies the checksum of the entry, which a private cache
does not need: that cost is mcs's alone.)

Each node counts its own ``hits``, ``misses``, ``disk_reads`` and ``disk_bytes`` (bytes of files
read from disk) and reports them with its cache usage at ``GET /_stats`` (JSON;
``/_stats?paths=1`` also lists the cached paths, to measure duplication across nodes). The
supervisor prints one JSON line ``{"url": ..., "pids": [...], "backend": ...}`` when every node
serves and stops them all on SIGTERM/SIGINT (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LruCache", "RespClient", "RedisServer", "free_port", "main"]

READY_TIMEOUT = 30.0
STREAM_CHUNK = 256 * 1024


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = text[-1:] if text[-1:] in units else ""
    return int(text[: len(text) - len(suffix)]) * units[suffix]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- the private LRU -------------------------------------------------------------------------


class LruCache:
    """Path -> (validator, bytes), at most ``budget`` bytes of file data, least recently used
    first out. Only the data is charged (no per-entry overhead): generous to the baseline."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.evictions = 0
        self._d: collections.OrderedDict[str, tuple[tuple[int, int, int], bytes]] = \
            collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def paths(self) -> list[str]:
        """The cached paths, least recently used first."""
        return list(self._d)

    def get(self, path: str, validator: tuple[int, int, int]) -> bytes | None:
        item = self._d.get(path)
        if item is None:
            return None
        if item[0] != validator:  # the file changed: never serve a stale copy
            self._remove(path)
            return None
        self._d.move_to_end(path)
        return item[1]

    def put(self, path: str, validator: tuple[int, int, int], data: bytes) -> None:
        if len(data) > self.budget:
            return
        if path in self._d:
            self._remove(path)
        while self.used + len(data) > self.budget:
            _, (_, old) = self._d.popitem(last=False)
            self.used -= len(old)
            self.evictions += 1
        self._d[path] = (validator, data)
        self.used += len(data)

    def _remove(self, path: str) -> None:
        _, data = self._d.pop(path)
        self.used -= len(data)


# -- a minimal Redis client (RESP2 over asyncio streams, a small connection pool) --------------


class RespClient:
    """Just enough Redis for a cache: ``get``/``set`` over a pool of ``size`` connections."""

    def __init__(self, host: str, port: int, size: int = 8) -> None:
        self.host, self.port, self.size = host, port, size
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._sem = asyncio.Semaphore(size)

    async def close(self) -> None:
        while self._idle:
            _, w = self._idle.pop()
            w.close()
            try:
                await w.wait_closed()
            except OSError:
                pass

    async def _call(self, *args: bytes) -> bytes | None:
        async with self._sem:
            conn = self._idle.pop() if self._idle else await asyncio.open_connection(
                self.host, self.port)
            r, w = conn
            try:
                out = [b"*%d\r\n" % len(args)]
                for a in args:
                    out += [b"$%d\r\n" % len(a), a, b"\r\n"]
                w.writelines(out)
                reply = await self._read(r)
            except BaseException:
                w.close()
                raise
            self._idle.append(conn)
            return reply

    @staticmethod
    async def _read(r: asyncio.StreamReader) -> bytes | None:
        line = await r.readuntil(b"\r\n")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = await r.readexactly(n + 2)
            return data[:-2]
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode(errors='replace')}")
        raise RuntimeError(f"redis: unexpected reply {line[:40]!r}")

    async def get(self, key: bytes) -> bytes | None:
        return await self._call(b"GET", key)

    async def set(self, key: bytes, value: bytes) -> None:
        await self._call(b"SET", key, value)


class RedisServer:
    """A private ``redis-server`` on a loopback port: no persistence, ``maxmemory`` bytes,
    ``allkeys-lru``. A context manager; ``close()`` stops it and removes its directory."""

    def __init__(self, maxmemory: int, exe: str | None = None) -> None:
        exe = exe or shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.maxmemory = maxmemory
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="mcs-bench-redis-")
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--maxmemory", str(maxmemory),
             "--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "10",
             "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command("PING") == "PONG":
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def command(self, *args: str) -> str:
        """One command over a fresh blocking connection (setup and INFO only, not the hot path)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            payload = b"*%d\r\n" % len(args) + b"".join(
                b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
            s.sendall(payload)
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                buf += chunk
            head, _, rest = buf.partition(b"\r\n")
            if head[:1] == b"$":
                n = int(head[1:])
                while len(rest) < n + 2:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("redis closed the connection")
                    rest += chunk
                return rest[:n].decode()
            if head[:1] == b"-":
                raise RuntimeError(head[1:].decode())
            return head[1:].decode()

    def info(self) -> dict[str, str]:
        out = {}
        for line in self.command("INFO").splitlines():
            if ":" in line and not line.startswith("#"):
                k, _, v = line.partition(":")
                out[k] = v.strip()
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- one node ----------------------------------------------------------------------------------


@dataclass
class Stats:
    hits: int = 0
    misses: int = 0
    disk_reads: int = 0
    disk_bytes: int = 0


def make_app(args: argparse.Namespace):
    from aiohttp import web

    from webcache.app import plan_file_response
    from webcache.paths import DocumentRoot, FileChanged

    root = DocumentRoot(args.root)
    stats = Stats()
    lru = LruCache(args.cache_size) if args.backend == "lru" else None
    redis_box: list[RespClient] = []
    node_pid = str(os.getpid())

    def read_file(opened) -> bytes:
        data = opened.read_all()  # from the descriptor the lookup confined, as the node does
        stats.disk_reads += 1
        stats.disk_bytes += len(data)
        return data

    async def lookup(f) -> bytes | None:
        validator = (f.size, f.mtime_ns, f.inode)
        if lru is not None:
            return lru.get(f.path, validator)
        key = b"%s\0%d:%d:%d" % (os.fsencode(f.path), *validator)
        data = await redis_box[0].get(key)
        if data is not None and len(data) != f.size:
            return None
        return data

    async def store(f, data: bytes) -> None:
        validator = (f.size, f.mtime_ns, f.inode)
        if lru is not None:
            lru.put(f.path, validator, data)
        else:
            await redis_box[0].set(b"%s\0%d:%d:%d" % (os.fsencode(f.path), *validator), data)

    async def serve_file(request: web.Request) -> web.StreamResponse:
        planned = plan_file_response(request, root, node_pid)
        if isinstance(planned, web.Response):
            return planned
        opened, status, headers, span = planned
        with opened:
            f = opened.file
            try:
                if f.size > args.max_entry:
                    data = read_file(opened)  # never cached (the bench files are all below it)
                else:
                    data = await lookup(f)
                    if data is not None:
                        stats.hits += 1
                    else:
                        stats.misses += 1
                        data = read_file(opened)
                        await store(f, data)
            except FileChanged:
                raise web.HTTPServiceUnavailable(text="file changed while being read; retry\n",
                                                 headers={"Retry-After": "0"}) from None
        body = data if span is None else memoryview(data)[span[0]:span[1]]
        return web.Response(body=body, status=status, headers=headers)

    async def stats_handler(request: web.Request) -> web.Response:
        doc = {"pid": os.getpid(), "backend": args.backend, "hits": stats.hits,
               "misses": stats.misses, "disk_reads": stats.disk_reads,
               "disk_bytes": stats.disk_bytes, "budget": args.cache_size}
        if lru is not None:
            doc.update(entries=len(lru), bytes=lru.used, evictions=lru.evictions)
            if request.query.get("paths"):
                doc["paths"] = lru.paths()
        return web.json_response(doc)

    async def on_startup(app: web.Application) -> None:
        if args.backend == "redis":
            redis_box.append(RespClient("127.0.0.1", args.redis_port))

    async def on_cleanup(app: web.Application) -> None:
        for client in redis_box:
            await client.close()

    app = web.Application(client_max_size=0)
    app.router.add_get("/_stats", stats_handler)
    app.router.add_route("*", "/{tail:.*}", serve_file)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


async def serve_node(args: argparse.Namespace) -> None:
    from aiohttp import web

    runner = web.AppRunner(make_app(args), access_log=None, handle_signals=False)
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


def node_main(args: argparse.Namespace) -> int:
    try:  # the same event loop choice as webcache.node
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        uvloop.run(serve_node(args))
    else:
        asyncio.run(serve_node(args))
    return 0


# -- the supervisor ----------------------------------------------------------------------------


def supervise(args: argparse.Namespace) -> int:
    port = args.port or free_port(args.host)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    nodes: list[subprocess.Popen] = []
    code = 0
    try:
        for i in range(args.nodes):
            cmd = [sys.executable, "-P", os.path.abspath(__file__), "--node", "--root", args.root,
                   "--host", args.host, "--port", str(port), "--cache-size", str(args.cache_size),
                   "--max-entry", str(args.max_entry), "--backend", args.backend,
                   "--redis-port", str(args.redis_port)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            nodes.append(proc)
            ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
            line = proc.stdout.readline() if ready else ""
            proc.stdout.close()
            if not line.startswith("{"):
                print(f"shared_nothing: node{i} did not start", file=sys.stderr, flush=True)
                return 1
        print(json.dumps({"url": f"http://{args.host}:{port}/", "backend": args.backend,
                          "pids": [p.pid for p in nodes]}), flush=True)
        while not stopping:
            if any(p.poll() is not None for p in nodes):
                print("shared_nothing: a node exited", file=sys.stderr, flush=True)
                code = 1
                break
            time.sleep(0.05)
    finally:
        for p in nodes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in nodes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/shared_nothing.py", description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cache-size", type=parse_size, default=parse_size("64M"),
                   help="private LRU bytes per node (lru backend)")
    p.add_argument("--max-entry", type=parse_size, default=parse_size("1M"))
    p.add_argument("--backend", choices=["lru", "redis"], default="lru")
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--node", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 1 <= args.nodes <= 64:
        p.error("--nodes must be 1..64")
    args.root = str(Path(args.root).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return node_main(args) if args.node else supervise(args)


if __name__ == "__main__":
    sys.exit(main())
