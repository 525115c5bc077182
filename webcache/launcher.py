"""``mcs-webcache``: run a multi-node cooperative cache on one port.

    mcs-webcache serve --root DIR [--nodes N] [--host 127.0.0.1] [--port 8080]
                       [--cache-size 64M] [--max-entry 1M] [--domain NAME]
                       [--header-timeout S] [--body-timeout S] [--keepalive-timeout S]
                       [--send-timeout S] [--max-connections N] [--host-name NAME]
    mcs-webcache demo  [--dir DIR] [same options]   # generates a demo site, then serves it
    mcs-webcache front --hosts HOST:PORT,... [...]  # HAProxy/nginx in front of several hosts

The launcher runs N node processes under :class:`mcs.supervise.Supervisor` (``mcs supervise``'s
engine): they share the port (SO_REUSEPORT) and one cache in shared memory; a node that dies is
restarted with back-off (it rejoins as a new incarnation) and given up after more than 10 crashes
within 10 s; on Ctrl-C or SIGTERM every node stops and no shared memory is left behind. If the
launcher itself is killed, the nodes get SIGTERM and stop cleanly (``mcs gc`` then removes the
domain's root).
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from mcs.component_record import component_domain
from mcs.supervise import Backoff, RestartIntensity, RestartPolicy, SlotStatus, Supervisor
from webcache import front, limits
from webcache.limits import ConnectionLimits, InvalidLimit, add_arguments, add_native_argument

__all__ = ["main", "parse_size"]

READY_TIMEOUT = 30.0
# A node stopping drains for --drain-timeout, then leaves its domain: killed if it takes this
# much longer (as `mcs supervise --stop-timeout`).
STOP_MARGIN = 5.0
# A node that crashes more than 10 times within 10 s is given up (a crash loop, not faults: a
# chaos soak kills a node at most every few seconds); the first restart is at once (50 ms),
# later ones in a row wait longer (docs/supervise.md has the rules).
RESTART_INTENSITY = RestartIntensity(10, 10.0)
BACKOFF = Backoff(0.05, 5.0)
CACHE_COMPONENT = "webcache"  # the cache's domain is "<--domain>.webcache"


class UsageError(Exception):
    """A bad command line or environment: printed without a traceback, exit status 2."""


def parse_size(text: str) -> int:
    """``64M``, ``64MiB``, ``512k``, ``1G``, ``4096`` -> bytes (binary units)."""
    try:
        return limits.parse_size(text)
    except InvalidLimit as exc:
        raise UsageError(str(exc)) from None


def check_port(host: str, port: int) -> int:
    """Fail clearly if ``host:port`` is taken; returns the port (a free one for port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR (as the nodes bind): connections of a crashed predecessor in TIME_WAIT
        # do not count, a listener still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))  # without SO_REUSEPORT: any other listener makes this fail
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is already in use") from None
            raise UsageError(f"cannot bind {host}:{port}: {exc.strerror}") from None
        return probe.getsockname()[1]


class Launcher:
    """The cache's nodes as members of an :class:`mcs.supervise.Supervisor`: node ``i`` is
    slot ``i`` (restarted as ``node<i>``, a new incarnation), ready when it serves (it says
    READY=1); once every node is ready, the URL and the pids are printed. After the nodes stop,
    the domain's root is removed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def command(self, index: int) -> list[str]:
        # -P: never put the current directory first on sys.path (run from a source checkout,
        # it would shadow the installed package and its compiled core).
        a = self.args
        return [sys.executable, "-P", "-m", "webcache.node", "--domain", a.domain, "--root", a.root,
                "--host", a.host, "--port", str(a.port), "--cache-size", str(a.cache_size),
                "--max-entry", str(a.max_entry), "--node", f"node{index}", "--timing", a.timing,
                "--host-name", a.host_name,
                "--native-hits" if a.native_hits else "--no-native-hits",
                "--sealed-copies", str(a.sealed_copies)] + (
                    ["--sealed-dir", a.sealed_dir] if a.sealed_dir else []) + (
                    ["--no-fast-path"] if a.no_fast_path else []) + a.limits.argv()

    def log(self, message: str) -> None:
        print(f"mcs-webcache: {message}", flush=True)

    def run(self) -> int:
        # A node's own stdout line is for whoever starts one by hand: the launcher's stdout
        # carries only its log and its JSON line.
        supervisor = Supervisor(self.command, self.args.nodes, intensity=RESTART_INTENSITY,
                                backoff=BACKOFF, ready_timeout=READY_TIMEOUT,
                                restart=RestartPolicy.ALWAYS, stdout=subprocess.DEVNULL,
                                log=self.log, on_ready=self.serving,
                                stop_timeout=self.args.limits.drain_timeout + STOP_MARGIN)
        try:
            return supervisor.run()
        finally:
            self._remove_roots()

    def serving(self, slots: list[SlotStatus]) -> None:
        a = self.args
        host = f"[{a.host}]" if ":" in a.host else a.host
        cache_domain = component_domain(a.domain, CACHE_COMPONENT)
        pids = [s.pid for s in slots if s.pid is not None]  # a node that gave up has none
        self.log(f"{len(pids)} node(s) serving {a.root} at http://{host}:{a.port}/ "
                 f"(domain {a.domain}, cache domain {cache_domain}: mcs status --domain "
                 f"{a.domain}; live status page at /_mcs/, JSON at /_mcs/status, "
                 "metrics at /metrics)")
        print(json.dumps({"url": f"http://{host}:{a.port}/", "domain": a.domain,
                          "cache_domain": cache_domain, "pids": pids}),
              flush=True)

    def _remove_roots(self) -> None:
        """Nodes that were killed leave their domain's root behind: remove it (never a live one)."""
        from mcs.gc import collect_domain

        collect_domain(component_domain(self.args.domain, CACHE_COMPONENT))


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
        p.add_argument("--host-name", default=None, help="this host's name in every response "
                       "(X-Mcs-Host) and in /_mcs/status (default: the hostname)")
        add_native_argument(p)
        add_arguments(p)
    front.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "front":
        return front.main(args)
    try:
        try:
            args.host_name = front.host_name(args.host_name)
        except ValueError as exc:
            raise UsageError(f"--host-name: {exc}") from None
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
    return Launcher(args).run()


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
