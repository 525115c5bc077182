"""The hit fast path (webcache/fastpath.py) against real nodes: the same bytes and headers as the
aiohttp path, pipelining across the hand-over, HTTP/1.0 and Connection semantics, a client
that does not read, symlinks and paths the fast path must leave to the full resolver."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from test_webcache import MAX_ENTRY, Cache, make_site


@pytest.fixture
def one_node(tmp_path, domain):
    root = tmp_path / "site"
    root.mkdir()
    files = make_site(root)
    c = Cache(root, domain, nodes=1)
    yield c, root, files
    assert c.stop() == 0


def read_responses(sock: socket.socket, count: int, timeout: float = 10.0) -> list[tuple]:
    """Parse ``count`` responses (status, headers, body) off a keep-alive connection."""
    sock.settimeout(timeout)
    buf = b""
    out = []
    while len(out) < count:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            chunk = sock.recv(1 << 16)
            assert chunk, f"connection closed after {len(out)} responses"
            buf += chunk
            continue
        lines = buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        length = int(headers.get("content-length", 0))
        body_end = end + 4 + length
        while len(buf) < body_end:
            chunk = sock.recv(1 << 16)
            assert chunk, "connection closed in a body"
            buf += chunk
        out.append((status, headers, buf[end + 4:body_end]))
        buf = buf[body_end:]
    return out


def fast_served(cache: Cache) -> int:
    return cache.status()["fast_path"]["served"]


def test_hits_are_served_by_the_fast_path_with_the_same_headers(one_node):
    cache, root, files = one_node
    _, slow, body = cache.get("/f4096.bin")  # the miss: aiohttp fills the cache
    assert body == files["/f4096.bin"]
    before = fast_served(cache)
    status, fast, body = cache.get("/f4096.bin")
    assert status == 200 and body == files["/f4096.bin"]
    assert fast_served(cache) == before + 1
    drop = {"Date", "Connection", "Keep-Alive"}
    assert {k: v for k, v in fast.items() if k not in drop} == \
        {k: v for k, v in slow.items() if k not in drop}
    status, head, body = cache.get("/f4096.bin", method="HEAD")
    assert status == 200 and body == b"" and head["Content-Length"] == "4096"


@pytest.mark.slow
def test_pipelined_requests_cross_the_hand_over_in_order(one_node):
    cache, root, files = one_node
    for name in ("/f4096.bin", "/f65536.bin"):
        cache.get(name)  # cached
    reqs = [
        b"GET /f4096.bin HTTP/1.1\r\nHost: x\r\n\r\n",  # fast
        b"GET /f65536.bin HTTP/1.1\r\nHost: x\r\n\r\n",  # fast
        b"GET /f65536.bin HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\n\r\n",  # hand-over
        b"GET /f4096.bin HTTP/1.1\r\nHost: x\r\n\r\n",  # aiohttp from then on
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    with socket.create_connection(("127.0.0.1", cache.port)) as s:
        s.sendall(b"".join(reqs))
        got = read_responses(s, len(reqs))
    assert [g[0] for g in got] == [200, 200, 206, 200, 404]
    assert got[0][2] == files["/f4096.bin"] and got[1][2] == files["/f65536.bin"]
    assert got[2][2] == files["/f65536.bin"][10:20]
    assert got[3][2] == files["/f4096.bin"]


@pytest.mark.slow
def test_connection_semantics(one_node):
    cache, root, files = one_node
    cache.get("/f100.bin")
    for request, stays_open in [
        (b"GET /f100.bin HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET /f100.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
        (b"GET /f100.bin HTTP/1.0\r\n\r\n", False),
        (b"GET /f100.bin HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    ]:
        with socket.create_connection(("127.0.0.1", cache.port), timeout=5) as s:
            s.sendall(request)
            (status, headers, body), = read_responses(s, 1)
            assert status == 200 and body == files["/f100.bin"], request
            s.settimeout(0.5)
            try:
                closed = s.recv(1) == b""
            except socket.timeout:
                closed = False
            assert closed is not stays_open, request
            if request.startswith(b"GET /f100.bin HTTP/1.0\r\nConn"):
                assert headers["connection"].lower() == "keep-alive"


@pytest.mark.slow
def test_a_client_that_does_not_read_is_not_buffered_without_bound(one_node):
    cache, root, files = one_node
    cache.get("/f65536.bin")
    count = 400  # 26 MB of responses to requests sent all at once
    with socket.create_connection(("127.0.0.1", cache.port)) as s:
        s.sendall(b"GET /f65536.bin HTTP/1.1\r\nHost: x\r\n\r\n" * count)
        time.sleep(1.0)  # the node stops reading once its send buffer is full
        got = read_responses(s, count, timeout=20)
    assert all(g[0] == 200 and g[2] == files["/f65536.bin"] for g in got)


def test_symlinks_and_unusual_paths_go_to_the_full_resolver(one_node, tmp_path):
    cache, root, files = one_node
    (root / "link.bin").symlink_to(root / "f4096.bin")  # inside the root: served
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"SECRET-OUTSIDE")
    (root / "out.txt").symlink_to(outside)  # leads out: refused
    (root / ".hidden").write_bytes(b"SECRET-HIDDEN")
    os.mkfifo(root / "fifo")
    for _ in range(2):
        assert cache.get("/link.bin")[2] == files["/f4096.bin"]
        assert cache.get("/out.txt")[0] in (403, 404)
        assert cache.get("/.hidden")[0] == 403
        assert cache.get("/fifo")[0] == 403
        assert cache.get("/sub")[2] == files["/sub/index.html"]
        assert cache.get("/f4096.bin?x=1")[2] == files["/f4096.bin"]
        assert cache.get("/f%34096.bin")[2] == files["/f4096.bin"]
        assert cache.get(f"/f{MAX_ENTRY + 1}.bin")[2] == files[f"/f{MAX_ENTRY + 1}.bin"]
    assert cache.status()["fast_path"]["handed_over"] > 0


def test_status_and_metrics_are_not_files(one_node):
    cache, root, files = one_node
    (root / "metrics").write_bytes(b"not the metrics")
    (root / "_mcs").mkdir()
    (root / "_mcs" / "status").write_bytes(b"not the status")
    for _ in range(2):
        assert b"mcs_webcache_hits_total" in cache.get("/metrics")[2]
        assert cache.status()["fast_path"] is not None


@pytest.mark.slow
def test_no_fast_path_option_serves_everything_through_aiohttp(tmp_path, domain):
    root = tmp_path / "site"
    root.mkdir()
    files = make_site(root)
    cache = Cache(root, domain, nodes=1, extra=("--no-fast-path",))
    try:
        for _ in range(3):
            assert cache.get("/f4096.bin")[2] == files["/f4096.bin"]
        doc = cache.status()
        assert doc["hits"] >= 2
        assert doc["fast_path"]["served"] == 0 and doc["fast_path"]["connections"] == 0
    finally:
        assert cache.stop() == 0


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp"])
@pytest.mark.slow
def test_poison_after_verification_never_reaches_a_client(tmp_path, domain, fast_path):
    # The arena is poisoned while a hit, already verified, waits to be sent (a fault point
    # sleeps there). What is sent must be the verified bytes: a copy, not shared memory.
    from mcs.poison import poison

    root = tmp_path / "site"
    root.mkdir()
    files = make_site(root)
    # The fault point is in the Python hit path (the native loop has none; its copy is checked
    # the same way: tests/test_native_hits.py), so these nodes serve hits from Python.
    cache = Cache(root, domain, nodes=1,
                  extra=("--no-native-hits",) + (() if fast_path else ("--no-fast-path",)),
                  env={"MCS_FAULTS": "webcache.hit.verified=sleep:1.0"})
    try:
        assert cache.get("/f65536.bin")[2] == files["/f65536.bin"]  # the miss fills the cache
        got: list = []
        reader = threading.Thread(target=lambda: got.append(cache.get("/f65536.bin")))
        reader.start()  # the hit: verified, then the node sleeps 1 s before sending
        time.sleep(0.4)
        poison(domain, "webcache", slot=0)  # the only node's arena
        reader.join(20)
        status, _, body = got[0]
        assert status == 200 and body == files["/f65536.bin"]
        for _ in range(3):  # and after the recovery that follows
            assert cache.get("/f65536.bin")[2] == files["/f65536.bin"]
    finally:
        assert cache.stop() == 0
