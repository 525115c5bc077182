"""Several cache hosts on this one machine, for tests/test_hosts.py and bench/test_hosts.py.

Each host is a **network namespace made here** (``mcs-<pid>-h<K>``) with a veth pair to the root
namespace and a private /30 from 10.231.0.0/16 (its two addresses exist only on that pair: the
peer in the namespace, the other end here), ``lo`` up inside; it runs its own ``mcs-webcache
serve`` (its own domain: shared memory is per machine here, so every host's domain has its own
name) bound to its address. The front tier (``mcs-webcache front --run``: HAProxy or nginx) runs
here on loopback and reaches the hosts through the veths. A host crash is every process in its
namespace killed at once (``ip netns pids``).

:func:`namespaces` removes what it made (every process left in a namespace killed, the veth
pair, the namespace) even when the body fails, and fails itself if anything is left;
:class:`LabUnavailable` says why namespaces cannot be made here (not root, no ``ip``): the
caller skips with that reason. Imported by bench/ by path (not a test module).
"""

from __future__ import annotations

import contextlib
import csv
import http.client
import ipaddress
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# The conftest of tests/ or of bench/, whichever runs: both have this helper.
from conftest import wait_for

BIN = Path(sys.executable).parent
MCS_WEBCACHE = str(BIN / "mcs-webcache")
MCS = str(BIN / "mcs")
IP = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.access(p, os.X_OK)),
                                None)
SUBNET = ipaddress.ip_network("10.231.0.0/16")
HOSTS_MAX = 8  # per lab: /30s 8 apart for each pid (below), more are found if those are taken


class LabUnavailable(Exception):
    """Namespaces cannot be made here; the message says why (the caller skips with it)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    assert IP is not None
    r = subprocess.run([IP, *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


@dataclass
class Netns:
    """One namespace of the lab: ``inner`` is the host's address (inside), ``outer`` the root
    namespace's end of the pair."""

    name: str
    veth: str
    outer: str
    inner: str

    def argv(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the namespace (``ip netns exec`` execs it: same pid)."""
        assert IP is not None
        return [IP, "netns", "exec", self.name, *cmd]

    def pids(self) -> set[int]:
        r = _ip("netns", "pids", self.name, check=False)
        return {int(p) for p in r.stdout.split()} if r.returncode == 0 else set()

    def kill_all(self, timeout: float = 15.0) -> set[int]:
        """SIGKILL every process in the namespace (a host crash); returns those it killed once
        none is left. Zombies of our own children stay until their parent reaps them."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            alive = {p for p in self.pids() if not _zombie(p)}
            if not alive:
                return killed
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed |= alive
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: processes {sorted(alive)} survive SIGKILL")
            time.sleep(0.02)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True  # gone


def _taken() -> list[ipaddress.IPv4Network]:
    out = _ip("-o", "-4", "addr", "show").stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


def _free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """``count`` /30s of SUBNET that no interface here uses, starting at a place of this pid's
    (two concurrent runs start apart)."""
    taken = _taken()
    slots = SUBNET.num_addresses // 4
    start = (os.getpid() % (slots // HOSTS_MAX)) * HOSTS_MAX
    found: list[ipaddress.IPv4Network] = []
    for i in range(slots):
        net = ipaddress.ip_network(f"{SUBNET.network_address + 4 * ((start + i) % slots)}/30")
        if not any(net.overlaps(t) for t in taken):
            found.append(net)
            if len(found) == count:
                return found
    raise LabUnavailable(f"no free /30 left in {SUBNET}")


@contextlib.contextmanager
def namespaces(count: int) -> Iterator[list[Netns]]:
    """``count`` namespaces with their veth pairs, removed afterwards (see the module doc)."""
    if IP is None:
        raise LabUnavailable("the 'ip' command (iproute2) is not installed")
    if not 1 <= count <= HOSTS_MAX:
        raise ValueError(f"1..{HOSTS_MAX} hosts")
    pid = os.getpid()
    made: list[Netns] = []
    try:
        for k, net in enumerate(_free_subnets(count), 1):
            ns = Netns(f"mcs-{pid}-h{k}", f"mcs{pid}h{k}", str(net[1]), str(net[2]))
            r = _ip("netns", "add", ns.name, check=False)
            if r.returncode != 0:
                if not made:  # the first one: namespaces cannot be made here at all
                    raise LabUnavailable(f"cannot create a network namespace (ip netns add: "
                                         f"{r.stderr.strip()}); run as root")
                raise RuntimeError(f"ip netns add {ns.name}: {r.stderr.strip()}")
            made.append(ns)
            peer = f"mcs{pid}p{k}"
            _ip("link", "add", ns.veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns.name)
            _ip("addr", "add", f"{ns.outer}/30", "dev", ns.veth)
            _ip("link", "set", ns.veth, "up")
            _ip("-n", ns.name, "addr", "add", f"{ns.inner}/30", "dev", peer)
            _ip("-n", ns.name, "link", "set", peer, "up")
            _ip("-n", ns.name, "link", "set", "lo", "up")
        yield made
    finally:
        remove(made)


def remove(made: list[Netns]) -> None:
    """Kill what runs in each namespace, delete its veth pair and the namespace; fails if any
    of them is still there afterwards."""
    problems = []
    for ns in reversed(made):
        try:
            ns.kill_all()
        except AssertionError as exc:
            problems.append(str(exc))
        _ip("link", "del", ns.veth, check=False)  # deletes its peer too
        _ip("netns", "del", ns.name, check=False)
    names = set(_ip("netns", "list").stdout.split())
    for ns in made:
        if ns.name in names:
            problems.append(f"namespace {ns.name} is left")
        if _ip("link", "show", ns.veth, check=False).returncode == 0:
            problems.append(f"veth {ns.veth} is left")
    if problems:
        raise AssertionError("; ".join(problems))


# -- HTTP ----------------------------------------------------------------------------------------


def http_get(host: str, port: int, path: str,
             timeout: float = 10.0) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One GET on a fresh connection: status, headers (case-insensitive: HAProxy sends names
    in lower case), body."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Logged:
    """A child process whose stdout lines are queued and whose stderr goes to a file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "a")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=None if env is None else {**os.environ, **env})
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def json_line(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no ready line in {timeout} s: {self.log_tail()}") from None
            if line is None:
                raise AssertionError(f"exited {self.proc.wait()}: {self.log_tail()}")
            if line.startswith("{"):
                return json.loads(line)

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-3000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._drain.join(10)
        self.proc.stdout.close()
        self._log.close()
        return code


# -- hosts -----------------------------------------------------------------------------------------


class Host:
    """``mcs-webcache serve`` inside ``ns`` at ``ns.inner:port`` (or, with ``ns`` None, on
    127.0.0.1; port 0: a free one), domain ``domain``, saying ``X-Mcs-Host: name``.
    :meth:`crash` kills every process of the host at once; :meth:`start` again is the host
    coming back (after ``mcs gc``, as a unit's ExecStartPre would)."""

    def __init__(self, ns: Netns | None, root: Path, workdir: Path, *, name: str, domain: str,
                 port: int = 8080, nodes: int = 1, cache_size: str = "8M",
                 max_entry: str = "1M", extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.ns, self.root, self.workdir, self.env = ns, root, workdir, env
        self.name, self.domain, self.port = name, domain, port
        self.ip = ns.inner if ns is not None else "127.0.0.1"
        self.options = ["--root", str(root), "--host", self.ip, "--nodes", str(nodes),
                        "--domain", domain, "--host-name", name, "--cache-size", cache_size,
                        "--max-entry", max_entry, *extra]
        self.launcher: _Logged | None = None
        self.pids: list[int] = []
        self.start()

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self) -> None:
        assert self.launcher is None
        argv = [MCS_WEBCACHE, "serve", "--port", str(self.port), *self.options]
        self.launcher = _Logged(argv if self.ns is None else self.ns.argv(argv),
                                self.workdir / f"{self.name}.log", self.env)
        try:
            info = self.launcher.json_line(90)
        except BaseException:
            self.crash()
            raise
        self.pids = list(info["pids"])
        self.port = int(info["url"].rstrip("/").rsplit(":", 1)[1])

    def get(self, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        return http_get(self.ip, self.port, path)

    def status(self) -> dict:
        status, _, body = self.get("/_mcs/status")
        assert status == 200, status
        return json.loads(body)

    def totals(self) -> dict[str, int]:
        """The domain's counters over its life (every node of this host)."""
        return self.status()["domain"]["totals"]

    def crash(self) -> None:
        """kill -9 of every process of the host at once (the launcher first: it restarts no
        node), then the launcher reaped."""
        if self.ns is not None:
            self.ns.kill_all()
        elif self.launcher is not None:
            victims = [self.launcher.proc.pid, *self.pids]
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not wait_for(lambda: all(_zombie(p) for p in victims), 15):
                raise AssertionError(f"{self.name}: {victims} survive SIGKILL")
        if self.launcher is not None:
            self.launcher.stop(signal.SIGKILL)
            self.launcher = None

    def stop(self) -> int:
        """SIGTERM to the launcher (it stops its nodes and removes its domain's root)."""
        code = 0
        if self.launcher is not None:
            code = self.launcher.stop()
            self.launcher = None
        if self.ns is not None:
            self.ns.kill_all()
        return code

    def gc(self) -> subprocess.CompletedProcess:
        return subprocess.run([MCS, "gc", "--domain", self.domain], capture_output=True,
                              text=True, timeout=30)

    def shm_left(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm")
                if n == f"mcs.{self.domain}" or n.startswith(f"mcs.{self.domain}.")]


# -- the front -----------------------------------------------------------------------------------


class Front:
    """``mcs-webcache front --run`` on 127.0.0.1 in front of ``hosts`` (HAProxy with an admin
    socket, or nginx)."""

    def __init__(self, hosts: list[Host], workdir: Path, *, engine: str = "haproxy",
                 balance: str = "consistent", check_interval_ms: int = 1000, fall: int = 2,
                 rise: int = 2) -> None:
        self.engine, self.port = engine, free_port()
        self.socket = workdir / "haproxy.sock" if engine == "haproxy" else None
        self.inter_ms, self.fall, self.rise = check_interval_ms, fall, rise
        argv = [MCS_WEBCACHE, "front", "--hosts",
                ",".join(f"{h.name}={h.address}" for h in hosts),
                "--listen", f"127.0.0.1:{self.port}", "--engine", engine, "--balance", balance,
                "--check-interval", str(check_interval_ms), "--fall", str(fall),
                "--rise", str(rise), "--out", str(workdir / f"{engine}.conf"), "--run"]
        if self.socket is not None:
            argv += ["--stats-socket", str(self.socket)]
        self.proc = _Logged(argv, workdir / f"front-{engine}.log")
        if not wait_for(self._answers, 30):
            code = self.proc.stop()
            raise AssertionError(f"{engine} did not start ({code}): {self.proc.log_tail()}")

    def _answers(self) -> bool:
        if self.proc.proc.poll() is not None:
            raise AssertionError(f"{self.engine} exited: {self.proc.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            if self.socket is not None:
                self.stats()
            return True
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
        return http_get("127.0.0.1", self.port, path)

    def owners(self, files: dict[str, bytes]) -> dict[str, str]:
        """One GET of every file through the front, each body checked: URI -> the host that
        answered it (X-Mcs-Host)."""
        seen = {}
        for uri, data in files.items():
            status, headers, body = self.get(uri)
            assert status == 200 and body == data, (uri, status)
            seen[uri] = headers["X-Mcs-Host"]
        return seen

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's ``show stat`` of the hosts' backend: server name -> its row (``status``:
        UP, DOWN, ``UP 1/2``...; ``stot``: sessions sent to it; ``wretr``, ``wredis``)."""
        assert self.socket is not None, "stats: HAProxy only"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        text = data.decode().lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(text.splitlines())
                if row.get("pxname") == "mcs_hosts" and row["svname"] != "BACKEND"}

    def wait_status(self, name: str, status: str, timeout: float) -> float:
        """Polls until host ``name`` has ``status`` (UP or DOWN); returns when (monotonic)."""
        if not wait_for(lambda: self.stats()[name]["status"] == status, timeout, 0.01):
            raise AssertionError(f"{name} not {status} within {timeout} s: {self.stats()[name]}")
        return time.monotonic()

    def stop(self) -> int:
        return self.proc.stop()
