"""How connections end without losing a byte of a response. A node that is stopped (SIGTERM)
drains, as nginx's graceful quit: it takes no connection any more, closes the idle ones at
once, sends every response in progress whole (with ``Connection: close`` from the native loop
and the fast path) and then leaves; what is still busy after ``--drain-timeout`` is closed. A
connection closed after its last response lingers while the client still sends. Real launcher
and nodes, real slow clients, both hit paths (the native loop and the asyncio fast path), a
cached hit and a body streamed from disk."""

from __future__ import annotations

import os
import socket
import time

import pytest

from test_fastpath import read_responses
from test_webcache import Cache, make_site

HIT_PATHS = {"native": ("--native-hits",), "asyncio": ("--no-native-hits",)}
# Bodies larger than a loopback socket's send buffer grows to (tcp_wmem's 4 MiB): a client that
# does not read leaves part of the response with the node, not only in the kernel.
BIG_ENTRY = 8 << 20
BODIES = {"hit": "/big.bin",  # 6 MiB, cached: the native loop's or the fast path's
          "streamed": "/huge.bin"}  # 12 MiB, over --max-entry: aiohttp streams it from disk
SIZES = {"/big.bin": 6 << 20, "/huge.bin": 12 << 20}
SLOW_RCVBUF = 4096  # the slow client's receive buffer


@pytest.fixture(params=sorted(HIT_PATHS))
def hit_path(request) -> str:
    return request.param


def start(tmp_path, domain: str, hit_path: str, drain: float) -> tuple[Cache, dict[str, bytes]]:
    root = tmp_path / "site"
    root.mkdir()
    files = make_site(root)
    for name, size in SIZES.items():
        files[name] = os.urandom(size)
        (root / name.lstrip("/")).write_bytes(files[name])
    return Cache(root, domain, nodes=1,
                 extra=(*HIT_PATHS[hit_path], "--drain-timeout", repr(drain), "--max-entry",
                        str(BIG_ENTRY), "--cache-size", str(4 * BIG_ENTRY))), files


def request_slowly(cache: Cache, name: str) -> tuple[socket.socket, bytes]:
    """A client with a small receive buffer that asks for ``name`` and reads only the start."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
    s.settimeout(10)
    s.connect(("127.0.0.1", cache.port))
    s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
    return s, s.recv(1000)


def read_to_end(s: socket.socket, start: bytes, timeout: float = 20.0,
                reset_ok: bool = False) -> bytes:
    """``start`` and what the connection sends until it ends (with ``reset_ok``, a reset ends
    it too: a response the node cut)."""
    s.settimeout(timeout)
    data = bytearray(start)
    try:
        while chunk := s.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        if not reset_ok:
            raise
    return bytes(data)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def closed_by_peer(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def warm(cache: Cache, name: str, files: dict[str, bytes]) -> None:
    for _ in range(3):  # a miss, then hits (and, for a large body, a sealed copy)
        assert cache.get(name)[2] == files[name]


@pytest.mark.parametrize("body", sorted(BODIES))
def test_a_stopping_node_sends_the_responses_in_progress_whole(tmp_path, domain, hit_path, body):
    cache, files = start(tmp_path, domain, hit_path, drain=20.0)
    name = BODIES[body]
    warm(cache, name, files)
    with socket.create_connection(("127.0.0.1", cache.port), timeout=10) as idle, \
            socket.create_connection(("127.0.0.1", cache.port), timeout=10) as fresh:
        idle.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(idle, 1)[0][2] == files["/index.html"]
        slow, start_bytes = request_slowly(cache, name)
        with slow:
            stopped = time.monotonic()
            cache.proc.terminate()  # the launcher: SIGTERM to its node, which drains
            # Connections with no request in progress are closed at once...
            assert closed_by_peer(idle, 5.0) and closed_by_peer(fresh, 5.0)
            time.sleep(0.5)  # (the slow client takes its time)
            # ... the response in progress is sent whole, then its connection is closed.
            status, headers, got = split_response(read_to_end(slow, start_bytes))
            assert status == 200 and got == files[name]
        assert cache.stop() == 0
    # The node left once its last response was sent, well before the drain timeout.
    assert time.monotonic() - stopped < 15.0


def test_a_request_arriving_while_a_node_drains_is_answered_then_closed(tmp_path, domain,
                                                                          hit_path):
    cache, files = start(tmp_path, domain, hit_path, drain=20.0)
    warm(cache, "/f4096.bin", files)
    with socket.create_connection(("127.0.0.1", cache.port), timeout=10) as s:
        s.sendall(b"GET /f4096.bin HTTP/1.1\r\nHo")  # a request begun...
        time.sleep(0.2)
        cache.proc.terminate()
        time.sleep(0.5)
        s.sendall(b"st: x\r\n\r\n")  # ... and completed while the node drains
        status, headers, body = split_response(read_to_end(s, b""))
        assert status == 200 and body == files["/f4096.bin"]
    assert cache.stop() == 0


def test_a_request_pipelined_behind_a_response_in_progress_gets_the_last_word(tmp_path, domain,
                                                                               hit_path):
    # Served while the node drains: the hit path says Connection: close, then closes.
    cache, files = start(tmp_path, domain, hit_path, drain=20.0)
    warm(cache, BODIES["hit"], files)
    warm(cache, "/f4096.bin", files)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        s.connect(("127.0.0.1", cache.port))
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /f4096.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        start_bytes = s.recv(1000)
        time.sleep(0.3)
        cache.proc.terminate()
        time.sleep(0.5)
        (s1, h1, b1), (s2, h2, b2) = read_responses_from(read_to_end(s, start_bytes), 2)
        assert (s1, b1) == (200, files["/big.bin"]) and (s2, b2) == (200, files["/f4096.bin"])
        assert h2["connection"] == "close"
    assert cache.stop() == 0


def read_responses_from(raw: bytes, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    for _ in range(count):
        status, headers, rest = split_response(raw)
        length = int(headers["content-length"])
        out.append((status, headers, rest[:length]))
        raw = rest[length:]
    assert raw == b"", "bytes after the last response"
    return out


@pytest.mark.parametrize("body", sorted(BODIES))
def test_a_client_that_reads_nothing_holds_a_stop_for_the_drain_timeout_only(tmp_path, domain,
                                                                               hit_path, body):
    cache, files = start(tmp_path, domain, hit_path, drain=1.0)
    name = BODIES[body]
    warm(cache, name, files)
    slow, start_bytes = request_slowly(cache, name)
    with slow:
        time.sleep(0.3)  # the response fills the socket's buffers
        stopped = time.monotonic()
        cache.proc.terminate()
        assert cache.stop() == 0
        took = time.monotonic() - stopped
        assert 1.0 <= took < 10.0, took  # the drain timeout, then the node left
        assert len(split_response(read_to_end(slow, start_bytes, 5.0, reset_ok=True))[2]) < len(files[name])


@pytest.mark.parametrize("body", sorted(BODIES))
def test_with_no_drain_a_stop_cuts_the_responses_in_progress(tmp_path, domain, hit_path, body):
    # --drain-timeout 0: the behaviour before draining existed; it shows that the slow client
    # above really has its response in progress when the node is stopped.
    cache, files = start(tmp_path, domain, hit_path, drain=0.0)
    name = BODIES[body]
    warm(cache, name, files)
    slow, start_bytes = request_slowly(cache, name)
    with slow:
        cache.proc.terminate()
        assert cache.stop() == 0
        assert len(split_response(read_to_end(slow, start_bytes, 5.0, reset_ok=True))[2]) < len(files[name])



def test_input_after_the_last_response_does_not_cut_it(tmp_path, domain, hit_path):
    # Connection: close, and the client sends a request more while the response is still on its
    # way: closing the socket then would have the kernel answer that input with a reset that
    # drops the rest of the response (it did, on both paths: 3,776 of 921,600 bytes arrived).
    # A lingering close shuts our side and drops the input until the client closes.
    cache, files = start(tmp_path, domain, hit_path, drain=5.0)
    warm(cache, BODIES["hit"], files)
    for _ in range(2):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            s.connect(("127.0.0.1", cache.port))
            s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            time.sleep(0.2)  # the response is on its way (most of it in the socket's buffer)
            s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")  # not answered
            time.sleep(0.2)
            status, headers, body = split_response(read_to_end(s, b""))
            assert status == 200 and headers["connection"] == "close"
            assert body == files["/big.bin"]
    assert cache.stop() == 0


def test_a_client_that_shuts_its_side_gets_every_answer_then_the_end(tmp_path, domain,
                                                                      hit_path):
    # printf 'GET ...' | nc -N: the request, then a half-close. Answers that aiohttp writes (a
    # miss, a 404, a status page) were lost: its protocol let the transport close at the EOF.
    cache, files = start(tmp_path, domain, hit_path, drain=5.0)
    warm(cache, "/index.html", files)
    singles = [("/index.html", 200), ("/f4096.bin", 200), ("/nope.txt", 404), ("/sub/", 200),
               ("/_mcs/ready", 200)]
    batch = [("/nope.txt", 404), ("/index.html", 200), ("/f65536.bin", 200)]
    for requests in [[one] for one in singles] + [batch]:
        with socket.create_connection(("127.0.0.1", cache.port), timeout=10) as s:
            s.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode()
                               for name, _ in requests))
            s.shutdown(socket.SHUT_WR)
            got = read_responses_from(read_to_end(s, b""), len(requests))  # then the end
        assert [status for status, _, _ in got] == [status for _, status in requests], requests
        for (name, status), (_, _, body) in zip(requests, got):
            if status == 200 and name in files:
                assert body == files[name]
    assert cache.stop() == 0
