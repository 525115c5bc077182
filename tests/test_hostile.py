"""Hostile input against a running cache: fuzzed raw HTTP (hypothesis), huge headers,
slowloris-style partial requests, and shared-memory objects corrupted behind the nodes' backs.
Never a 5xx, never a byte from outside the root, never a hung node, never a wrong byte."""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wait_for
from test_webcache import Cache, Load, make_site, wait_members

SECRET = f"TOPSECRET-{uuid.uuid4()}".encode()
FUZZ = settings(max_examples=150, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    (base / "secret.txt").write_bytes(SECRET)
    root = base / "site"
    root.mkdir()
    files = make_site(root)
    (root / "outside").symlink_to(base)
    (root / "secret-link.txt").symlink_to(base / "secret.txt")
    domain = f"hostile{os.getpid()}"
    cache = Cache(root, domain, nodes=2)
    yield cache, files
    assert cache.stop() == 0
    for name in os.listdir("/dev/shm"):
        if name.startswith(f"mcs.{domain}"):
            os.unlink(f"/dev/shm/{name}")


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def statuses(response: bytes) -> list[int]:
    out = []
    for line in response.split(b"\r\n"):
        if line.startswith(b"HTTP/1."):
            parts = line.split()
            if len(parts) > 1 and parts[1].isdigit():
                out.append(int(parts[1]))
    return out


def assert_alive(cache: Cache) -> None:
    start = time.monotonic()
    status, _, _ = cache.get("/index.html")
    assert status == 200 and time.monotonic() - start < 5


_PIECES = list("abcxyz019.-_%~!$&'()*+,;=:@/\\") + [
    "..", "%2e", "%2f", "%00", "%2F", "%5c", "%252e", "secret.txt", "outside",
    "secret-link.txt", "\u00e9", "index.html", "f4096.bin"]
segment = st.lists(st.sampled_from(_PIECES), max_size=30).map("".join)


@FUZZ
@given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE",
                               "CONNECT", "G\u00c9T", "", "GET GET"]),
       path=segment,
       version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/9.9", "", "HTTP/1.1 extra"]),
       header=st.sampled_from(["", "Range: bytes=0-5", "Range: bytes=--", "Range: bytes=9999999999999999999999-",
                               "If-None-Match: *", "If-Modified-Since: garbage",
                               "If-Range: \"x\"", "Content-Length: -1", "Transfer-Encoding: chunked",
                               "Host:", "X: \x01\x02"]))
def test_fuzzed_requests_never_5xx_never_outside_root(served, method, path, version, header):
    cache, _ = served
    target = "/" + path
    raw = f"{method} {target} {version}\r\nHost: x\r\n{header}\r\nConnection: close\r\n\r\n"
    response = exchange(cache.port, raw.encode("utf-8", "surrogateescape"))
    assert SECRET not in response
    for code in statuses(response):  # 505: a major version other than 1 (RFC 9110 15.6.6)
        assert code < 500 or code == 505 and version == "HTTP/9.9", (raw, response[:300])


@FUZZ
@given(value=st.text(alphabet=st.sampled_from(list("bytes=0123456789-, \t;")), max_size=40))
def test_fuzzed_ranges(served, value):
    cache, files = served
    status, headers, body = cache.get("/f65536.bin", {"Range": value})
    data = files["/f65536.bin"]
    assert status in (200, 206, 416)
    if status == 200:
        assert body == data
    elif status == 206:
        first, last = headers["Content-Range"].split()[1].split("/")[0].split("-")
        assert body == data[int(first):int(last) + 1]
    else:
        assert headers["Content-Range"] == "bytes */65536"


def test_symlinks_out_of_root_are_refused(served):
    cache, _ = served
    for target in ("/secret-link.txt", "/outside/secret.txt", "/outside/"):
        status, _, body = cache.get(target)
        assert status in (403, 404) and SECRET not in body


def test_huge_headers_are_refused_and_the_node_lives(served):
    cache, _ = served
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    response = exchange(cache.port, raw)
    assert all(400 <= code < 500 for code in statuses(response))
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(
        f"X-{i}: v\r\n".encode() for i in range(5000)) + b"\r\n"
    response = exchange(cache.port, many)
    assert all(code < 500 for code in statuses(response))
    assert_alive(cache)


@pytest.mark.slow
def test_slowloris_partial_requests_do_not_starve_others(served):
    cache, _ = served
    socks = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", cache.port), timeout=5)
            s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # trickle one byte per connection, bounded
            for s in socks:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass
            assert_alive(cache)
            time.sleep(0.2)
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_corrupted_master_table_and_arena_never_serve_wrong_bytes(served):
    """Garbage written into shared memory without any failure notification: chain walks are
    bounded and range-checked (a corrupt chain is cut at its head under its bucket lock, and
    counted), checksums catch corrupt data (served from disk, entry dropped)."""
    from mcs.bootstrap import Bootstrap
    from mcs.component import ComponentRecord, component_domain
    from mcs.section import Section

    from webcache import layout as L
    from webcache.cache import path_hash
    from webcache.check import check_domain

    cache, files = served
    root = Path(os.path.realpath(cache.root))
    for _ in range(3):
        for name in files:
            cache.get(name)
    rng = random.Random(5)
    buckets = [path_hash(str(root / n.lstrip("/"))) % L.BUCKETS for n in files]
    with Bootstrap.open(component_domain(cache.domain, "webcache"), create=False) as boot:
        record = ComponentRecord.read(boot.section)
        with Section.attach(record.master_ident) as area:
            arenas = {}
            for b in buckets:  # corrupt the data of every cached entry...
                ref = area.load64(L.bucket_offset(b) + L.B_HEAD)
                while ref:
                    slot, off = L.split_ref(ref)
                    if slot not in arenas:
                        arenas[slot] = Section.attach(record.contributions[slot])
                    arena = arenas[slot]
                    size = arena.load64(off + L.E_SIZE)
                    if size:
                        doff = L.data_offset(off, arena.load64(off + L.E_PATH_LEN))
                        arena.view(doff + rng.randrange(size), 1)[0] ^= 0x5A
                    ref = arena.load64(off + L.E_NEXT)
            for sec in arenas.values():
                sec.close()
            for b in buckets[::2]:  # ...and replace half of the chain heads with garbage
                area.store64(L.bucket_offset(b) + L.B_HEAD, rng.getrandbits(64))
    with Load(cache, files, threads=3) as load:
        time.sleep(2.0)
    assert load.wrong == []
    assert load.failures == []
    for name, data in files.items():
        assert cache.get(name)[2] == data
    wait_members(cache, 2)
    deadline = time.monotonic() + 20
    while (problems := check_domain(cache.domain)) and time.monotonic() < deadline:
        for name in files:
            cache.get(name)
        time.sleep(0.2)
    assert problems == []
    assert wait_for(lambda: cache.status()["domain"]["totals"]["chains_cut"] >= 1, 5, 0.1)
