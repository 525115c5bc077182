"""``mcs-webcache``: run a multi-node cooperative cache on one port.

    mcs-webcache serve --root DIR [--nodes N] [--host 127.0.0.1] [--port 8080]
                       [--cache-size 64M] [--max-entry 1M] [--domain NAME]
                       [--header-timeout S] [--body-timeout S] [--keepalive-timeout S]
                       [--send-timeout S] [--max-connections N]
    mcs-webcache demo  [--dir DIR] [same options]   # generates a demo site, then serves it

The supervisor starts N node processes that share the port (SO_REUSEPORT) and one cache in
shared memory, restarts a node that dies (it rejoins as a new incarnation), and on Ctrl-C or
SIGTERM stops every node and leaves no shared memory behind.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from mcs.component_record import component_domain
from webcache.limits import ConnectionLimits, InvalidLimit, add_arguments

__all__ = ["main", "parse_size"]

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
READY_TIMEOUT = 30.0
RESTART_WINDOW, RESTART_BURST = 10.0, 5
CACHE_COMPONENT = "webcache"  # the cache's domain is "<--domain>.webcache"


class UsageError(Exception):
    """A bad command line or environment: printed without a traceback, exit status 2."""


def parse_size(text: str) -> int:
    """``64M``, ``64MiB``, ``512k``, ``1G``, ``4096`` -> bytes (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"bad size {text!r}: use a number with an optional K/M/G/T suffix")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def check_port(host: str, port: int) -> int:
    """Fail clearly if ``host:port`` is taken; returns the port (a free one for port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))  # without SO_REUSEPORT: any other listener makes this fail
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is already in use") from None
            raise UsageError(f"cannot bind {host}:{port}: {exc.strerror}") from None
        return probe.getsockname()[1]


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.nodes: dict[int, subprocess.Popen] = {}  # index -> process
        self.restarts: dict[int, list[float]] = {}
        self.pending: dict[int, float] = {}  # index -> when to (re)start it
        self.stopping = False

    def command(self, index: int) -> list[str]:
        # -P: never put the current directory first on sys.path (run from a source checkout,
        # it would shadow the installed package and its compiled core).
        a = self.args
        return [sys.executable, "-P", "-m", "webcache.node", "--domain", a.domain, "--root", a.root,
                "--host", a.host, "--port", str(a.port), "--cache-size", str(a.cache_size),
                "--max-entry", str(a.max_entry), "--node", f"node{index}", "--timing", a.timing] + (
                    ["--no-fast-path"] if a.no_fast_path else []) + a.limits.argv()

    def start_node(self, index: int) -> subprocess.Popen:
        proc = subprocess.Popen(self.command(index), stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("{"):
            proc.kill()
            proc.wait()
            proc.stdout.close()
            raise RuntimeError(f"node{index} did not start (exit status {proc.returncode})")
        info = json.loads(line)
        self.log(f"node{index} pid {info['pid']} serving (slot {info['slot']}, "
                 f"generation {info['generation']})")
        proc.stdout.close()
        self.nodes[index] = proc
        return proc

    def log(self, message: str) -> None:
        print(f"mcs-webcache: {message}", flush=True)

    def run(self) -> int:
        a = self.args
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        try:
            for i in range(a.nodes):
                self.start_node(i)
            host = f"[{a.host}]" if ":" in a.host else a.host
            cache_domain = component_domain(a.domain, CACHE_COMPONENT)
            self.log(f"{a.nodes} node(s) serving {a.root} at http://{host}:{a.port}/ "
                     f"(domain {a.domain}, cache domain {cache_domain}: mcs status --domain "
                     f"{a.domain}; live status page at /_mcs/, JSON at /_mcs/status, "
                     "metrics at /metrics)")
            print(json.dumps({"url": f"http://{host}:{a.port}/", "domain": a.domain,
                              "cache_domain": cache_domain,
                              "pids": [p.pid for p in self.nodes.values()]}), flush=True)
            while not self.stopping:
                self._reap_and_restart()
                time.sleep(0.05)
        except RuntimeError as exc:
            self.log(f"error: {exc}")
            return 1
        finally:
            self.shutdown()
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for index, proc in list(self.nodes.items()):
            if proc.poll() is None:
                continue
            self.log(f"node{index} pid {proc.pid} exited ({_describe(proc.returncode)}); restarting")
            del self.nodes[index]
            self.pending[index] = now
        for index, when in sorted(self.pending.items()):
            if self.stopping or when > now:
                continue
            recent = [t for t in self.restarts.get(index, []) if now - t < RESTART_WINDOW]
            self.restarts[index] = recent + [now]
            try:
                self.start_node(index)
                del self.pending[index]
            except RuntimeError as exc:
                delay = 1.0 if len(recent) < RESTART_BURST else RESTART_WINDOW
                self.log(f"{exc}; retrying in {delay:.0f}s")
                self.pending[index] = time.monotonic() + delay

    def shutdown(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in self.nodes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.nodes.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.nodes.clear()
        self._remove_roots()
        self.log("stopped")

    def _remove_roots(self) -> None:
        """Nodes that were killed leave their domain's root behind: remove it (never a live one)."""
        from mcs.gc import collect_domain

        collect_domain(component_domain(self.args.domain, CACHE_COMPONENT))


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"status {status}"


def make_demo_site(directory: Path) -> Path:
    """A small static site with pages, a stylesheet and files from 0 B to 2 MiB."""
    import random

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    sizes = [0, 1, 100, 4096, 65536, 300_000, 2 << 20]
    files = []
    (directory / "files").mkdir(exist_ok=True)
    for size in sizes:
        name = f"files/blob-{size}.bin"
        (directory / name).write_bytes(rng.randbytes(size))
        files.append((name, size))
    (directory / "style.css").write_text("body { font-family: sans-serif; margin: 2em; }\n")
    rows = "\n".join(f'<li><a href="/{n}">{n}</a> ({s} bytes)</li>' for n, s in files)
    (directory / "index.html").write_text(
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>mcs demo</title>"
        "<link rel='stylesheet' href='/style.css'></head><body>\n"
        "<h1>mcs cooperative web cache</h1>\n"
        "<p>Every node of this domain serves the same files from ONE cache in shared memory. "
        "Kill a node (<code>kill -9</code>): the others keep serving, the launcher restarts it."
        "</p>\n<p><a href='/_mcs/'>status page</a> · <a href='/_mcs/status'>/_mcs/status</a>"
        " · <a href='/metrics'>/metrics</a></p>\n"
        f"<ul>\n{rows}\n</ul>\n</body></html>\n")
    for i in range(50):
        (directory / f"page{i}.html").write_text(
            f"<!doctype html><title>page {i}</title><p>{'lorem ipsum ' * rng.randint(10, 400)}</p>\n")
    return directory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcs-webcache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("serve", "demo"):
        p = sub.add_parser(name, help="serve a directory" if name == "serve"
                           else "generate a demo site and serve it")
        if name == "serve":
            p.add_argument("--root", required=True, help="document root")
        else:
            p.add_argument("--dir", default=".demo-site", help="where to generate the site")
        p.add_argument("--nodes", type=int, default=3, help="node processes (default 3)")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
        p.add_argument("--cache-size", default="64M", help="arena per node (default 64M)")
        p.add_argument("--max-entry", default="1M", help="largest cached file (default 1M)")
        p.add_argument("--domain", default=None, help="domain name (default webcache-PORT)")
        p.add_argument("--timing", default="{}", help=argparse.SUPPRESS)
        p.add_argument("--no-fast-path", action="store_true",
                       help="serve every request through aiohttp (to compare; slower)")
        add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            args.root = str(make_demo_site(Path(args.dir)).resolve())
        root = Path(args.root)
        if not root.is_dir():
            raise UsageError(f"document root {args.root!r} does not exist or is not a directory")
        args.root = str(root.resolve())
        if not 1 <= args.nodes <= 32:
            raise UsageError("--nodes must be within 1..32")
        if not 0 <= args.port <= 65535:
            raise UsageError("--port must be within 0..65535")
        args.cache_size = parse_size(args.cache_size)
        args.max_entry = parse_size(args.max_entry)
        if args.cache_size < 1 << 20:
            raise UsageError("--cache-size must be at least 1M")
        if args.max_entry > args.cache_size // 2:
            raise UsageError("--max-entry must be at most half of --cache-size")
        try:
            args.limits = ConnectionLimits.from_args(args)
        except InvalidLimit as exc:
            raise UsageError(str(exc)) from None
        args.port = check_port(args.host, args.port)
        args.domain = args.domain or f"webcache-{args.port}"
        try:
            component_domain(args.domain, CACHE_COMPONENT)  # the cache's own domain name
        except ValueError as exc:
            raise UsageError(f"--domain: {exc}") from None
        _refuse_live_domain(args.domain)
    except UsageError as exc:
        print(f"mcs-webcache: error: {exc}", file=sys.stderr)
        return 2
    return Supervisor(args).run()


def _refuse_live_domain(domain: str) -> None:
    from mcs.bootstrap import Bootstrap
    from mcs.errors import BootstrapError

    try:
        boot = Bootstrap.open(component_domain(domain, CACHE_COMPONENT), create=False, wait=0.2)
    except BootstrapError as exc:
        if "does not exist" in str(exc):
            return
        raise UsageError(str(exc)) from None
    with boot:
        if boot.live_slots():
            raise UsageError(f"domain {domain!r} is live (another mcs-webcache runs it); "
                             "use --domain to pick another name")


if __name__ == "__main__":
    sys.exit(main())
