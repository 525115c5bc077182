"""``mcs-webcache front``: the tier in front of several cache hosts, as a configuration for a
proven load balancer from the distribution's packages (HAProxy or nginx), not a new one.

    mcs-webcache front --hosts [NAME=]HOST:PORT,... [--listen ADDR:PORT] [--engine haproxy|nginx]
                       [--balance consistent|roundrobin] [--check-interval MS] [--fall N]
                       [--rise N] [--retries N] [--connect-timeout MS] [--stats-socket PATH]
                       [--out FILE] [--check | --run]

A domain is one host's shared memory; several hosts each run their own (``mcs-webcache serve``)
and the front sends every URI to one host by **consistent hashing** on its path, so N hosts
hold N times the working set and losing a host moves only that host's share of the URIs.
Round-robin (``--balance roundrobin``) is there to compare: every host then caches the same
hot set. The front checks each host's readiness (``GET /_mcs/ready``: 200 only while the domain
is stable), takes a failing host out (HAProxy: active checks every ``--check-interval``, ``--fall``
failures in a row, plus the live traffic's errors, ``observe layer7``; nginx: ``max_fails`` within
``fail_timeout``, passive) and retries a failed request on another host.

Without ``--run`` or ``--check`` the configuration goes to ``--out`` (default: stdout).
``--check`` asks the engine whether it accepts it (``haproxy -c``, ``nginx -t``); ``--run`` writes
it and replaces this process with the engine in the foreground. Install the engines with
``apt-get install haproxy`` or ``apt-get install nginx`` (Debian/Ubuntu). docs/hosts.md has the
deployment: systemd units per host, node crash against host crash, capacity planning.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Address", "Backend", "FrontConfig", "FrontError", "ENGINES", "BALANCES",
           "READY_PATH", "parse_address", "parse_hosts", "render", "render_haproxy",
           "render_nginx", "engine_binary", "engine_argv", "host_name", "add_parser", "main"]

ENGINES = ("haproxy", "nginx")
BALANCES = ("consistent", "roundrobin")
READY_PATH = "/_mcs/ready"  # webcache.app.ready: 200 only while the host's domain is stable
# HAProxy places a server on its hash ring by the server's id: ids derived from the address
# keep every host's share when the list is reordered or a host is removed (nginx's ketama
# points come from the address already).
_MAX_ID = 2_000_000_000
# Points per server on HAProxy's ring: 16 x weight. Every server has the same weight, so only
# the evenness of the split changes: over eight sets of 3 addresses, 600 URIs split 25-40 %
# with 16 points each, 30-37 % with 1,600 (HAProxy 2.6).
HAPROXY_WEIGHT = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_RANGES = {"check-interval": (100, 600_000), "fall": (1, 100), "rise": (1, 100),
          "retries": (0, 10), "connect-timeout": (50, 600_000)}


class FrontError(Exception):
    """A bad command line or a missing engine: one line on stderr, exit status 2."""


@dataclass(frozen=True)
class Address:
    """A host (an IPv4 or IPv6 address or a DNS name) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Backend:
    """One cache host: the name the front shows it under, and where it serves."""

    name: str
    address: Address

    @property
    def haproxy_id(self) -> int:
        """A stable id from the address (see _MAX_ID); :func:`parse_hosts` makes them unique."""
        return zlib.crc32(str(self.address).encode()) % _MAX_ID + 1


@dataclass(frozen=True)
class FrontConfig:
    """Everything a front's configuration says; rendered by :func:`render_haproxy` and
    :func:`render_nginx` (pure functions of it)."""

    hosts: tuple[Backend, ...]
    listen: Address = Address("127.0.0.1", 8080)
    balance: str = "consistent"
    check_interval_ms: int = 1000
    fall: int = 2
    rise: int = 2
    retries: int = 2
    connect_timeout_ms: int = 1000
    stats_socket: str | None = None  # HAProxy's admin socket (show stat, disable server, ...)
    ids: tuple[int, ...] = ()  # HAProxy server ids, one per host (parse_hosts' order)

    def __post_init__(self) -> None:
        if not self.hosts:
            raise FrontError("--hosts: at least one HOST:PORT is needed")
        if self.balance not in BALANCES:
            raise FrontError(f"--balance must be one of {', '.join(BALANCES)}")
        if not self.ids:
            object.__setattr__(self, "ids", unique_ids(self.hosts))

    @property
    def fail_timeout_s(self) -> int:
        """nginx: how long a host that failed ``fall`` times is left out before it is tried
        again (the time HAProxy's ``rise`` good checks take), whole seconds."""
        return max(1, math.ceil(self.check_interval_ms * self.rise / 1000))


def unique_ids(hosts: Sequence[Backend]) -> tuple[int, ...]:
    ids: list[int] = []
    for b in hosts:
        i = b.haproxy_id
        while i in ids:  # two addresses with the same crc32: the next free id
            i = i % _MAX_ID + 1
        ids.append(i)
    return tuple(ids)


# -- parsing -------------------------------------------------------------------------------------


def parse_address(text: str, what: str) -> Address:
    """``HOST:PORT``, ``[IPv6]:PORT``; HOST an IP address or a DNS name, PORT in 1..65535."""
    text = text.strip()
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text) or re.fullmatch(r"([^:\[\]]+):(\d+)", text)
    if not m:
        raise FrontError(f"{what}: {text!r} is not HOST:PORT (IPv6: [ADDR]:PORT)")
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise FrontError(f"{what}: port {port} of {text!r} is not within 1..65535")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if text.startswith("[") or len(host) > 253 or not all(
                _LABEL.fullmatch(label) for label in host.rstrip(".").split(".")):
            raise FrontError(f"{what}: {host!r} is neither an IP address nor a host name") \
                from None
    return Address(host, port)


def parse_hosts(text: str) -> tuple[Backend, ...]:
    """``[NAME=]HOST:PORT,...`` -> the backends, in order. A name defaults to the address
    (``10.0.0.2_8080``); names and addresses must be unique."""
    backends: list[Backend] = []
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise FrontError("--hosts: at least one HOST:PORT is needed")
    for item in items:
        if not item:
            raise FrontError(f"--hosts: empty item in {text!r}")
        name, sep, addr = item.partition("=")
        if not sep:
            name, addr = "", item
        address = parse_address(addr, "--hosts")
        if not name:
            name = re.sub(r"[^A-Za-z0-9.-]", "_", str(address)).strip("_")
        if not _NAME.fullmatch(name):
            raise FrontError(f"--hosts: name {name!r}: use letters, digits, '.', '_', '-' "
                             "(at most 63)")
        for other in backends:
            if other.address == address:
                raise FrontError(f"--hosts: {address} is given twice")
            if other.name == name:
                raise FrontError(f"--hosts: the name {name!r} is given twice")
        backends.append(Backend(name, address))
    return tuple(backends)


def host_name(text: str | None) -> str:
    """The name a cache host gives itself (``serve --host-name``; default: this machine's
    hostname): a header value, so letters, digits, '.', '_', '-' only."""
    if text is None:
        import socket

        return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:63].lstrip("-_.") or "host"
    if not _NAME.fullmatch(text):
        raise ValueError(f"{text!r}: use letters, digits, '.', '_', '-' (at most 63, "
                         "starting with a letter or digit)")
    return text


# -- rendering -----------------------------------------------------------------------------------


def _header(cfg: FrontConfig, engine: str) -> list[str]:
    how = ("consistent hashing on the URI path: each URI has one host; losing a host moves only "
           "its share" if cfg.balance == "consistent" else
           "round-robin: every host sees every URI (and caches the same hot set)")
    return [f"# mcs-webcache front ({engine}), generated by: mcs-webcache front --engine "
            f"{engine} --balance {cfg.balance} --hosts "
            + ",".join(f"{b.name}={b.address}" for b in cfg.hosts),
            f"# {len(cfg.hosts)} cache host(s), {how}.",
            f"# A host is ready while GET {READY_PATH} answers 200 (its domain is stable)."]


def render_haproxy(cfg: FrontConfig) -> str:
    """HAProxy (>= 2.4): ``balance uri`` + ``hash-type consistent`` (or ``roundrobin``), active
    checks of ``/_mcs/ready``, ``observe layer7``, retries and redispatch to another host."""
    lines = _header(cfg, "haproxy") + [
        "global",
        "    log stderr format short local0 notice",
    ]
    if cfg.stats_socket:
        lines.append(f"    stats socket {cfg.stats_socket} mode 600 level admin")
    check_timeout = min(cfg.check_interval_ms, cfg.connect_timeout_ms)
    lines += [
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option dontlognull",
        f"    timeout connect {cfg.connect_timeout_ms}ms",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 60s",
        f"    timeout check {check_timeout}ms",
        "    # A request that fails on one host (refused, reset, no answer, 502/503/504) is",
        "    # tried again, each time on another host (redispatch): GET and HEAD only have",
        "    # no body, so every one of them can be retried.",
        f"    retries {cfg.retries}",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response junk-response response-timeout 502 503 504",
        "",
        "frontend mcs_front",
        f"    bind {cfg.listen}",
        "    default_backend mcs_hosts",
        "",
        "backend mcs_hosts",
    ]
    if cfg.balance == "consistent":
        lines += ["    balance uri", "    hash-type consistent"]
    else:
        lines += ["    balance roundrobin"]
    lines += [
        f"    option httpchk GET {READY_PATH}",
        "    http-check expect status 200",
        "    # observe layer7: errors of the live traffic count too (10 in a row: marked down",
        "    # at once, without waiting for the next check).",
        f"    default-server check inter {cfg.check_interval_ms}ms fall {cfg.fall} "
        f"rise {cfg.rise} weight {HAPROXY_WEIGHT} observe layer7 error-limit 10 "
        "on-error mark-down",
    ]
    for b, i in zip(cfg.hosts, cfg.ids):
        lines.append(f"    server {b.name} {b.address} id {i}")
    return "\n".join(lines) + "\n"


def render_nginx(cfg: FrontConfig) -> str:
    """nginx: ``hash $uri consistent`` (or round-robin), ``max_fails``/``fail_timeout`` (open
    source nginx has passive checks only), ``proxy_next_upstream`` to another host. Relative
    paths (pid, temp files) are under the prefix: run it with ``nginx -p DIR -c FILE``."""
    temp = [f"    {kind}_temp_path {kind}_temp;"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
    lines = _header(cfg, "nginx") + [
        "# Run: nginx -p DIR -c FILE -e stderr (DIR holds the pid file and the temp files).",
        "# Open source nginx checks hosts passively: a host that fails max_fails requests within",
        "# fail_timeout is left out for fail_timeout, then tried again with live requests.",
        "worker_processes auto;",
        "daemon off;",
        "pid nginx.pid;",
        "error_log stderr notice;",
        "events { worker_connections 4096; }",
        "http {",
        "    access_log off;",
        *temp,
        "    upstream mcs_hosts {",
    ]
    if cfg.balance == "consistent":
        lines += ["        # $uri: the path without the query string, as HAProxy's balance uri",
                  "        # (the cache ignores the query: /a.css?v=2 is the file /a.css)",
                  "        hash $uri consistent;"]
    for b in cfg.hosts:
        lines.append(f"        server {b.address} max_fails={cfg.fall} "
                     f"fail_timeout={cfg.fail_timeout_s}s;  # {b.name}")
    lines += [
        "        keepalive 64;",
        "    }",
        "    server {",
        f"        listen {cfg.listen};",
        "        location / {",
        "            proxy_pass http://mcs_hosts;",
        "            proxy_http_version 1.1;",
        '            proxy_set_header Connection "";',
        "            proxy_set_header Host $host;",
        f"            proxy_connect_timeout {cfg.connect_timeout_ms}ms;",
        "            proxy_read_timeout 60s;",
        "            proxy_next_upstream error timeout invalid_header http_502 http_503 "
        "http_504;",
        f"            proxy_next_upstream_tries {cfg.retries + 1};",
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render(cfg: FrontConfig, engine: str) -> str:
    if engine == "haproxy":
        return render_haproxy(cfg)
    if engine == "nginx":
        return render_nginx(cfg)
    raise FrontError(f"--engine must be one of {', '.join(ENGINES)}")


# -- running -------------------------------------------------------------------------------------


def engine_binary(engine: str) -> str:
    """The engine's executable (PATH, then the sbin folders a non-root PATH leaves out)."""
    found = shutil.which(engine) or next(
        (p for p in (f"/usr/sbin/{engine}", f"/usr/local/sbin/{engine}")
         if os.access(p, os.X_OK)), None)
    if found is None:
        raise FrontError(f"{engine} is not installed: apt-get install {engine} (Debian, Ubuntu; "
                         f"dnf install {engine} on Fedora, RHEL)")
    return found


def engine_argv(engine: str, binary: str, config: Path, *, check: bool) -> list[str]:
    """The engine's command line: check the configuration, or run in the foreground."""
    if engine == "haproxy":
        return [binary, "-c", "-f", str(config)] if check else [binary, "-db", "-f", str(config)]
    prefix = str(config.parent) + "/"
    return [binary, *(["-t"] if check else []), "-p", prefix, "-c", str(config), "-e", "stderr"]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``front`` subcommand of ``mcs-webcache`` (webcache/launcher.py)."""
    p = sub.add_parser("front", help="write (or run) the configuration of a load balancer in "
                       "front of several cache hosts")
    p.add_argument("--hosts", required=True, metavar="[NAME=]HOST:PORT,...",
                   help="the cache hosts (each an mcs-webcache serve)")
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="ADDR:PORT",
                   help="where the front listens (default 127.0.0.1:8080)")
    p.add_argument("--engine", default="haproxy", help="haproxy (default) or nginx")
    p.add_argument("--balance", default="consistent",
                   help="consistent (hash of the URI, default) or roundrobin")
    p.add_argument("--check-interval", default="1000", metavar="MS",
                   help="HAProxy: health check every MS ms (default 1000)")
    p.add_argument("--fall", default="2", help="failed checks (nginx: failed requests) that "
                   "take a host out (default 2)")
    p.add_argument("--rise", default="2", help="good checks that bring it back (default 2)")
    p.add_argument("--retries", default="2", help="tries of a failed request on other hosts "
                   "(default 2)")
    p.add_argument("--connect-timeout", default="1000", metavar="MS",
                   help="connecting to a host (default 1000 ms)")
    p.add_argument("--stats-socket", default=None, metavar="PATH",
                   help="HAProxy: its admin socket (show stat, disable server)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the configuration (default: stdout; with --check or "
                        "--run, a new temporary directory)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="have the engine check it")
    mode.add_argument("--run", action="store_true",
                      help="write it and run the engine in the foreground (exec)")
    return p


def _int(args: argparse.Namespace, option: str) -> int:
    text = getattr(args, option.replace("-", "_"))
    lo, hi = _RANGES[option]
    try:
        value = int(text)
    except ValueError:
        raise FrontError(f"--{option}: {text!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise FrontError(f"--{option} must be within {lo}..{hi}")
    return value


def config_from_args(args: argparse.Namespace) -> FrontConfig:
    if args.engine not in ENGINES:
        raise FrontError(f"--engine must be one of {', '.join(ENGINES)}")
    if args.balance not in BALANCES:
        raise FrontError(f"--balance must be one of {', '.join(BALANCES)}")
    if args.stats_socket is not None and args.engine != "haproxy":
        raise FrontError("--stats-socket is for --engine haproxy (nginx has none)")
    return FrontConfig(
        hosts=parse_hosts(args.hosts), listen=parse_address(args.listen, "--listen"),
        balance=args.balance, check_interval_ms=_int(args, "check-interval"),
        fall=_int(args, "fall"), rise=_int(args, "rise"), retries=_int(args, "retries"),
        connect_timeout_ms=_int(args, "connect-timeout"),
        stats_socket=None if args.stats_socket is None else str(Path(args.stats_socket).resolve()))


def main(args: argparse.Namespace) -> int:
    """``mcs-webcache front``: exit 0 (written / valid), the engine's status for --check, 2 for
    a bad command line or a missing engine; --run does not return (exec)."""
    try:
        cfg = config_from_args(args)
        text = render(cfg, args.engine)
        binary = engine_binary(args.engine) if args.check or args.run else ""
        if args.out is None and not (args.check or args.run):
            sys.stdout.write(text)
            return 0
        if args.out is None:
            out = Path(tempfile.mkdtemp(prefix=f"mcs-front-{args.engine}-")) / f"{args.engine}.conf"
        else:
            out = Path(args.out).resolve()
            if not out.parent.is_dir():
                raise FrontError(f"--out: the directory {str(out.parent)!r} does not exist")
        try:
            out.write_text(text)
        except OSError as exc:
            raise FrontError(f"--out: cannot write {str(out)!r}: {exc.strerror}") from None
    except FrontError as exc:
        print(f"mcs-webcache front: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        result = subprocess.run(engine_argv(args.engine, binary, out, check=True))
        if args.out is None:
            shutil.rmtree(out.parent, ignore_errors=True)
        return result.returncode
    if args.run:
        print(f"mcs-webcache front: {args.engine} with {out}: {len(cfg.hosts)} host(s), "
              f"{cfg.balance}, listening on {cfg.listen}", file=sys.stderr, flush=True)
        argv = engine_argv(args.engine, binary, out, check=False)
        os.execv(argv[0], argv)
    print(f"mcs-webcache front: wrote {out}", file=sys.stderr)
    return 0
