"""Connection limits of a node (webcache/limits.py, acceptor.py, fastpath.py, tracking.py) against
real nodes over loopback: slow heads cut at the header deadline on the fast path and after the
hand-over to aiohttp, slow bodies, idle keep-alive connections, clients that do not read, the
per-node cap, descriptor exhaustion (EMFILE) with a bounded log, 1,000 slow connections beside
legitimate clients, and 505 for request lines of another HTTP version."""

from __future__ import annotations

import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_for
from test_fastpath import read_responses
from test_webcache import Cache, make_site

BOTH = pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp"])
HEAD_START = b"GET /index.html HTTP/1.1\r\nHost: x\r\n"
PATIENCE = 20.0  # far beyond every deadline the tests set: a connection still open then is held


@pytest.fixture
def node(tmp_path, domain):
    """``node(fast_path, *options)``: a one-node cache; stopped after the test."""
    root = tmp_path / "site"
    root.mkdir()
    make_site(root)
    started: list[Cache] = []

    def start(fast_path: bool = True, *options: str) -> Cache:
        extra = options if fast_path else ("--no-fast-path", *options)
        cache = Cache(root, domain, nodes=1, extra=extra)
        started.append(cache)
        return cache

    yield start
    for cache in started:
        assert cache.stop() == 0


def connect(cache: Cache) -> socket.socket:
    return socket.create_connection(("127.0.0.1", cache.port), timeout=10)


def trickle(sock: socket.socket, line: bytes, every: float, patience: float = PATIENCE
            ) -> tuple[bytes, bool]:
    """Send ``line`` every ``every`` seconds until the server closes the connection or
    ``patience`` runs out; returns what the server sent and whether it closed."""
    got = b""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            sock.sendall(line)
        except OSError:  # reset or broken pipe: closed
            return got + drain(sock), True
        ready, _, _ = select.select([sock], [], [], every)
        if ready:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
    return got, False


def drain(sock: socket.socket) -> bytes:
    got = b""
    sock.settimeout(2)
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except OSError:
        pass
    return got


def closed_within(sock: socket.socket, patience: float = PATIENCE) -> tuple[bytes, bool]:
    """Read without sending until the server closes (True) or ``patience`` runs out."""
    return trickle(sock, b"", 0.2, patience)


def timed_out(cache: Cache) -> dict[str, int]:
    return cache.status()["connections"]["timed_out"]


# -- deadlines ----------------------------------------------------------------------------------


@pytest.mark.slow
@BOTH
def test_a_slow_head_is_cut_at_the_header_deadline(node, fast_path):
    # One header line every 0.3 s: an inactivity timer would be refreshed forever; the header
    # deadline runs from the first byte and is never extended.
    cache = node(fast_path, "--header-timeout", "1")
    with connect(cache) as s:
        s.sendall(HEAD_START)
        got, closed = trickle(s, b"X-Slow: a\r\n", every=0.3)
    assert closed, "a head sent one line at a time was held past every deadline"
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert timed_out(cache)["header"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("path", ["--native-hits", "--no-native-hits", "--no-fast-path"])
def test_the_first_heads_deadline_runs_from_accept(node, path):
    # A client that waits 1.5 s and then begins its first head is cut 2 s after it connected,
    # not 2 s after its first byte (3.5 s): the deadline is not restarted by the first byte,
    # nor by the native loop's hand-over of the partial head (it was, on every path).
    cache = node(path != "--no-fast-path", path, "--header-timeout", "2")
    with connect(cache) as s:
        accepted = time.monotonic()
        time.sleep(1.5)
        s.sendall(HEAD_START)
        got, closed = closed_within(s)
        took = time.monotonic() - accepted
    assert closed and got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert took < 3.0, f"cut {took:.2f} s after accept (the deadline: 2 s, swept every 0.5 s)"


@pytest.mark.slow
@BOTH
def test_a_slow_head_after_the_hand_over_is_cut_too(node, fast_path):
    # /_mcs/status is always aiohttp's: the connection is handed over, and the next head,
    # trickled, must still meet the front's deadline (aiohttp has none for a head).
    cache = node(fast_path, "--header-timeout", "1")
    with connect(cache) as s:
        s.sendall(b"GET /_mcs/status HTTP/1.1\r\nHost: x\r\n\r\n")
        (status, _, _), = read_responses(s, 1)
        assert status == 200
        s.sendall(HEAD_START)
        got, closed = trickle(s, b"X-Slow: a\r\n", every=0.3)
    assert closed, "a slow second head was held past every deadline"
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert cache.status()["fast_path"]["handed_over"] >= (1 if fast_path else 0)


@pytest.mark.slow
@BOTH
def test_idle_keepalive_connections_are_closed(node, fast_path):
    cache = node(fast_path, "--keepalive-timeout", "1", "--header-timeout", "2")
    assert cache.get("/f4096.bin")[0] == 200  # cached: the next GET is a fast-path hit
    for first in (b"GET /f4096.bin HTTP/1.1\r\nHost: x\r\n\r\n",
                  b"GET /_mcs/status HTTP/1.1\r\nHost: x\r\n\r\n"):  # aiohttp's
        with connect(cache) as s:
            s.sendall(first)
            (status, _, _), = read_responses(s, 1)
            assert status == 200
            got, closed = closed_within(s)
        assert closed and got == b"", (first, got[:200])
    with connect(cache) as s:  # a connection that never sends anything
        got, closed = closed_within(s)
    assert closed and got == b""
    counts = timed_out(cache)
    assert counts["idle"] >= 2 and counts["header"] >= 1, counts


@pytest.mark.slow
@BOTH
def test_a_slow_body_is_cut_at_the_body_deadline(node, fast_path):
    # aiohttp answers 405 at once and would then read (and drop) the body for 10 s.
    cache = node(fast_path, "--body-timeout", "1")
    with connect(cache) as s:
        s.sendall(b"POST /index.html HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        got, closed = trickle(s, b"x" * 10, every=0.3, patience=8.0)
    assert closed, "a body sent 10 bytes at a time was read past the body deadline"
    assert got.startswith(b"HTTP/1.1 405 "), got[:200]


@pytest.mark.slow
@BOTH
def test_a_client_that_reads_nothing_is_dropped_at_the_send_timeout(node, fast_path):
    cache = node(fast_path, "--send-timeout", "1")
    assert cache.get("/f65536.bin")[0] == 200
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", cache.port))
        s.sendall(b"GET /f65536.bin HTTP/1.1\r\nHost: x\r\n\r\n" * 200)  # 13 MB, not read
        mine = s.getsockname()[1]
        assert wait_for(lambda: established(cache, mine) == 0, PATIENCE, 0.2), \
            "a client that reads nothing was held past the send timeout"
    assert timed_out(cache)["send"] >= 1


# -- the cap ------------------------------------------------------------------------------------


def test_connections_beyond_the_cap_are_closed_at_once(node):
    cache = node(True, "--max-connections", "8", "--header-timeout", "60")
    held = [connect(cache) for _ in range(8)]
    try:
        for s in held:
            s.sendall(HEAD_START)  # held in their head for 60 s
        assert wait_for(lambda: established(cache) >= 8, 10)
        for _ in range(4):
            with connect(cache) as extra:
                got, closed = closed_within(extra, 10)
            assert closed and got == b"", "a connection beyond the cap was kept"
        for s in held[:2]:
            s.close()
        assert wait_for(lambda: _get_ok(cache), 10), "a client was refused below the cap"
        doc = cache.status()["connections"]
        assert doc["refused_at_cap"] >= 4 and doc["limits"]["max_connections"] == 8
        assert doc["open"] <= 8
    finally:
        for s in held:
            s.close()


def established(cache: Cache, client_port: int | None = None) -> int:
    """The node's established connections (from ``client_port`` only, if given), as the
    kernel sees them."""
    match = f"sport = :{cache.port}" + (f" and dport = :{client_port}" if client_port else "")
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( {match} )"],
                         capture_output=True, text=True).stdout
    return len(out.splitlines())


def _get_ok(cache: Cache) -> bool:
    try:
        return cache.get("/index.html")[0] == 200
    except OSError:
        return False


@pytest.fixture
def many_descriptors():
    """Raise this process's descriptor limit for a thousand client sockets (the nodes inherit
    it); skip where the hard limit does not allow it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_legitimate_clients_are_served_beside_a_thousand_slow_connections(node,
                                                                          many_descriptors):
    cache = node(True, "--header-timeout", "3")
    slow: list[socket.socket] = []
    try:
        for _ in range(1000):
            s = connect(cache)
            s.sendall(HEAD_START)
            slow.append(s)
        open_slow = set(slow)
        answers: list[bytes] = []
        deadline = time.monotonic() + 60
        while open_slow and time.monotonic() < deadline:
            status, _, body = cache.get("/index.html")  # a legitimate client, between lines
            assert status == 200 and body == b"<html>home</html>\n"
            for s in list(open_slow):  # one header line each, every second
                try:
                    s.sendall(b"X-Slow: a\r\n")
                except OSError:
                    open_slow.discard(s)
            ready, _, _ = select.select(list(open_slow), [], [], 1.0)
            for s in ready:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                answers.append(data)
                open_slow.discard(s)
        assert not open_slow, f"{len(open_slow)} of 1000 slow connections still open after 60 s"
        assert sum(a.startswith(b"HTTP/1.1 408 ") for a in answers) >= 900
        assert timed_out(cache)["header"] >= 900
    finally:
        for s in slow:
            s.close()


# -- descriptor exhaustion -------------------------------------------------------------------------


@pytest.mark.slow
def test_emfile_sheds_backs_off_logs_little_and_recovers(node):
    cache = node(True, "--header-timeout", "60", "--max-connections", "10000")
    assert cache.get("/index.html")[0] == 200
    pid = cache.pids[0]
    fds = [int(fd) for fd in os.listdir(f"/proc/{pid}/fd")]
    limit = max(len(fds), max(fds) + 1) + 12
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    clients = []
    try:
        for _ in range(60):  # past the node's descriptors: the rest wait in the backlog
            s = connect(cache)
            s.sendall(HEAD_START)
            clients.append(s)
        time.sleep(4.0)  # what happens at EMFILE for a while: shedding, back-off, logging
        shed = 0
        for s in clients:  # the connections closed unserved by the reserve descriptor
            ready, _, _ = select.select([s], [], [], 0)
            shed += bool(ready)
    finally:
        for s in clients:
            s.close()
    assert wait_for(lambda: _get_ok(cache), 15, 0.2), "the node did not recover from EMFILE"
    lines = [ln for ln in cache.stderr_tail
             if "accept" in ln or "open files" in ln or "system resource" in ln]
    assert 1 <= len(lines) <= 3, "".join(lines[:20])
    assert shed >= 1, "every connection past the limit was left waiting in the backlog"
    doc = cache.status()["connections"]
    assert doc["accept_errors"] >= 1 and doc["shed"] >= 1, doc


# -- HTTP versions -------------------------------------------------------------------------------


@BOTH
def test_request_lines_of_other_http_versions_get_505(node, fast_path):
    cache = node(fast_path)
    assert cache.get("/index.html")[0] == 200  # cached: a fast-path hit from now on
    for raw in (b"GET /index.html HTTP/2.0\r\nHost: x\r\n\r\n",
                b"GET /_mcs/status HTTP/2.0\r\nHost: x\r\n\r\n",
                b"GET /index.html HTTP/3.0\r\nHost: x\r\n\r\n",
                b"GET /index.html HTTP/0.9\r\nHost: x\r\n\r\n",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 connection preface
                b"GET /index.html HTTP/2.0\r\n"):  # the request line alone is enough
        with connect(cache) as s:
            s.sendall(raw)
            got, closed = closed_within(s, 10)
        assert closed and got.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"), \
            (raw, got[:200])
        assert b"HTTP/1.0 and HTTP/1.1" in got
    # Pipelined behind a request the front cannot see past (aiohttp parses it): 505 as well.
    with connect(cache) as s:
        s.sendall(b"GET /_mcs/status HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /index.html HTTP/2.0\r\nHost: x\r\n\r\n")
        first, second = read_responses(s, 2)
    assert first[0] == 200 and second[0] == 505
    # The rest of a head the front saw begin behind another request: a header line, not a
    # request line, even when it ends like one.
    with connect(cache) as s:
        s.sendall(b"GET /_mcs/status HTTP/1.1\r\nHost: x\r\n\r\nGET /index.html HTTP/1.1\r\n")
        (status, _, _), = read_responses(s, 1)
        time.sleep(0.3)  # answered: the connection is between requests for the front
        s.sendall(b"X-Note: not HTTP/2.0\r\nHost: x\r\n\r\n")
        (status, _, body), = read_responses(s, 1)
    assert status == 200 and body == b"<html>home</html>\n"
    # HTTP/1.2 is HTTP/1.x: processed as HTTP/1.1 (RFC 9110 2.5), answered in HTTP/1.1.
    for target in (b"/index.html", b"/_mcs/status"):
        with connect(cache) as s:
            s.sendall(b"GET " + target + b" HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n")
            got = drain(s)
        assert got.startswith(b"HTTP/1.1 200 OK\r\n"), got[:200]
    assert cache.status()["connections"]["version_refused"] >= 7


# -- options, status, metrics --------------------------------------------------------------------


@pytest.mark.slow
def test_limits_are_options_validated_and_reported(node, tmp_path, domain):
    exe = str(Path(sys.executable).with_name("mcs-webcache"))
    for option, value in [("--header-timeout", "0"), ("--body-timeout", "-1"),
                          ("--keepalive-timeout", "nan"), ("--send-timeout", "1e9"),
                          ("--max-connections", "0"), ("--header-timeout", "soon"),
                          ("--max-connections", "many"), ("--drain-timeout", "-1"),
                          ("--drain-timeout", "inf")]:
        launcher = subprocess.Popen([exe, "serve", "--root", str(tmp_path), "--port", "0",
                                     "--domain", domain, option, value], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
        try:
            _, err = launcher.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # it serves: stop it and its nodes
            os.killpg(launcher.pid, signal.SIGTERM)
            _, err = launcher.communicate()
        assert launcher.returncode == 2, (option, value, err)
        assert option in err and "Traceback" not in err, err
    cache = node(True, "--header-timeout", "7", "--body-timeout", "8", "--keepalive-timeout",
                 "30", "--send-timeout", "9", "--max-connections", "123", "--drain-timeout",
                 "2.5")
    doc = cache.status()["connections"]
    assert doc["limits"] == {"header_timeout": 7.0, "body_timeout": 8.0,
                             "keepalive_timeout": 30.0, "send_timeout": 9.0,
                             "max_connections": 123, "drain_timeout": 2.5}
    assert doc["open"] >= 1 and doc["accepted"] >= 1
    metrics = cache.get("/metrics")[2].decode()
    for name in ("mcs_webcache_connections_open{", "mcs_webcache_connections_max{",
                 "mcs_webcache_connections_refused_at_cap_total{",
                 "mcs_webcache_connections_accept_errors_total{",
                 'mcs_webcache_connections_timed_out_total{node="node0",slot="0",incarnation="'):
        assert name in metrics, name
    assert re.search(r'mcs_webcache_connections_timed_out_total\{node="node0",slot="0",'
                     r'incarnation="\d+",kind="header"\} 0', metrics)
    assert "mcs_webcache_hits_total{" in metrics  # the app's own metrics are still there
