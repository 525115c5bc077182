"""The cooperative web cache end to end: real node processes on one loopback port, real HTTP,
real kill -9 / SIGSTOP / poisoning under load; every body compared byte for byte with disk."""

from __future__ import annotations

import collections
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from conftest import gone, wait_for

FAST = json.dumps({"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.4})
# Which hit path the nodes of these tests use: MCS_TEST_HIT_PATH=native (the native hit loop,
# webcache/native.py) or asyncio (--no-native-hits: the asyncio fast path serves the hits);
# unset: the default of mcs-webcache serve. Run the web cache's test files once with each.
HIT_PATH = os.environ.get("MCS_TEST_HIT_PATH", "")
HIT_PATH_OPTIONS = {"": (), "native": ("--native-hits",), "asyncio": ("--no-native-hits",)}
if HIT_PATH not in HIT_PATH_OPTIONS:
    raise ValueError(f"MCS_TEST_HIT_PATH must be one of {sorted(HIT_PATH_OPTIONS)}, "
                     f"not {HIT_PATH!r}")
MAX_ENTRY = 256 * 1024
SIZES = [0, 1, 100, 4095, 4096, 65536, 200_000, MAX_ENTRY, MAX_ENTRY + 1, 1_000_000]


def make_site(root: Path) -> dict[str, bytes]:
    rng = random.Random(1)
    files = {}
    (root / "sub").mkdir()
    for size in SIZES:
        files[f"/f{size}.bin"] = rng.randbytes(size)
    files["/index.html"] = b"<html>home</html>\n"
    files["/sub/index.html"] = b"<html>sub</html>\n"
    files["/style.css"] = b"body{}\n"
    files["/page.txt"] = b"hello\n" * 100
    for name, data in files.items():
        (root / name.lstrip("/")).write_bytes(data)
    return files


class Cache:
    """A running `mcs-webcache serve` (the launcher and its nodes)."""

    def __init__(self, root: Path, domain: str, nodes: int = 3, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        exe = str(Path(sys.executable).with_name("mcs-webcache"))
        self.proc = subprocess.Popen(
            [exe, "serve", "--root", str(root), "--nodes", str(nodes), "--port", "0",
             "--domain", domain, "--cache-size", "8M", "--max-entry", str(MAX_ENTRY),
             "--timing", FAST, *HIT_PATH_OPTIONS[HIT_PATH], *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=None if env is None else {**os.environ, **env})
        self.domain = domain
        self.root = root
        deadline = time.monotonic() + 60
        while True:
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"launcher exited: {self.proc.wait()} {self.proc.stderr.read()}")
            if line.startswith("{"):
                info = json.loads(line)
                break
            if time.monotonic() > deadline:
                pytest.fail("launcher did not start")
        self.url = info["url"]
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))
        self.pids = info["pids"]
        self.drain = threading.Thread(target=self._drain, daemon=True)
        self.drain.start()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        self.drain_err = threading.Thread(target=self._drain_stderr, daemon=True)
        self.drain_err.start()

    def _drain(self) -> None:
        for _ in self.proc.stdout:
            pass

    def _drain_stderr(self) -> None:
        # Never let the nodes block on a full stderr pipe; keep the tail for diagnostics.
        for line in self.proc.stderr:
            self.stderr_tail.append(line)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def get(self, path: str, headers: dict | None = None, method: str = "GET"):
        c = self.conn()
        try:
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            c.close()

    def status(self) -> dict:
        return json.loads(self.get("/_mcs/status")[2])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.drain.join(10)
        self.drain_err.join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    return root, make_site(root)


@pytest.fixture
def cache(site, domain):
    c = Cache(site[0], domain)
    yield c
    assert c.stop() == 0


@pytest.mark.slow
def test_bodies_and_headers_byte_exact(cache, site):
    root, files = site
    for _ in range(2):  # a miss (disk), then hits from shared memory
        for name, data in files.items():
            status, headers, body = cache.get(name)
            assert status == 200, name
            assert body == data, name
            assert int(headers["Content-Length"]) == len(data)
            st = (root / name.lstrip("/")).stat()
            assert headers["Last-Modified"] == formatdate(st.st_mtime, usegmt=True)
            assert headers["ETag"].startswith('"')
    assert cache.get("/f4096.bin")[1]["Content-Type"] == "application/octet-stream"
    assert cache.get("/style.css")[1]["Content-Type"].startswith("text/css")
    assert cache.get("/")[2] == files["/index.html"]
    assert cache.get("/sub/")[2] == files["/sub/index.html"]
    status, headers, body = cache.get("/f65536.bin", method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == "65536"
    total = {"hits": 0}
    for _ in range(6):  # the port spreads connections over the nodes
        doc = cache.status()
        total["hits"] += doc["hits"]
    assert total["hits"] > 0
    assert doc["cache"]["entries"] >= len([s for s in SIZES if s <= MAX_ENTRY])


@pytest.mark.slow
def test_conditional_and_range_requests(cache, site):
    root, files = site
    data = files["/f65536.bin"]
    _, headers, _ = cache.get("/f65536.bin")
    tag, lm = headers["ETag"], headers["Last-Modified"]
    assert cache.get("/f65536.bin", {"If-None-Match": tag})[0] == 304
    assert cache.get("/f65536.bin", {"If-None-Match": '"other", ' + tag})[0] == 304
    assert cache.get("/f65536.bin", {"If-Modified-Since": lm})[0] == 304
    assert cache.get("/f65536.bin", {"If-None-Match": '"nope"', "If-Modified-Since": lm})[0] == 200
    assert cache.get("/f65536.bin", {"If-Match": '"nope"'})[0] == 412
    assert cache.get("/f65536.bin", {"If-Match": tag})[0] == 200
    for rng, (start, stop) in {"bytes=0-9": (0, 10), "bytes=100-": (100, 65536),
                               "bytes=-5": (65531, 65536), "bytes=65000-99999": (65000, 65536)}.items():
        status, headers, body = cache.get("/f65536.bin", {"Range": rng})
        assert status == 206, rng
        assert body == data[start:stop], rng
        assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/65536"
    status, headers, _ = cache.get("/f65536.bin", {"Range": "bytes=70000-"})
    assert status == 416 and headers["Content-Range"] == "bytes */65536"
    status, _, body = cache.get("/f65536.bin", {"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert status == 200 and body == data
    big = files[f"/f{MAX_ENTRY + 1}.bin"]
    status, _, body = cache.get(f"/f{MAX_ENTRY + 1}.bin", {"Range": "bytes=1000-2999"})
    assert status == 206 and body == big[1000:3000]  # streamed from disk


@pytest.mark.slow
def test_changed_and_deleted_files_are_never_stale(cache, site):
    root, files = site
    path = root / "page.txt"
    for _ in range(4):
        assert cache.get("/page.txt")[2] == files["/page.txt"]  # cached on some node
    new = b"HELLO\n" * 100  # same size, other bytes
    path.write_bytes(new)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    for _ in range(6):
        assert cache.get("/page.txt")[2] == new
    path.unlink()
    for _ in range(6):
        assert cache.get("/page.txt")[0] == 404


ESCAPES = ["/../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd",
           "/sub/../../etc/passwd", "/%00", "/a%00b", "//etc/passwd", "/.%2e/etc/passwd",
           "/" + "a" * 5000, "/sub/%2e%2e%2f%2e%2e%2fetc/passwd", "/escape", "/escape/passwd",
           "/\\..\\etc\\passwd"]


def raw_request(port: int, target: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.slow
def test_no_path_escapes_the_root(cache, site):
    root, _ = site
    (root / "escape").symlink_to("/etc")
    secret = Path("/etc/passwd").read_bytes()
    for target in ESCAPES:
        status, body = raw_request(cache.port, target)
        assert status in (400, 403, 404, 414), (target, status)
        assert secret[:20] not in body, target


@pytest.mark.slow
def test_methods_and_missing(cache):
    assert cache.get("/nope.html")[0] == 404
    assert cache.get("/page.txt", method="POST")[0] == 405
    assert cache.get("/page.txt", method="DELETE")[0] == 405


@pytest.mark.slow
def test_status_and_metrics(cache):
    doc = cache.status()
    for key in ("node", "pid", "slot", "generation", "master", "members", "cache", "hits",
                "misses", "evictions", "coalesced_misses", "checksum_failures",
                "stale_revalidations", "recoveries", "last_recovery_ms"):
        assert key in doc, key
    assert sorted(m["pid"] for m in doc["members"]) == sorted(cache.pids)
    status, headers, body = cache.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert "# TYPE mcs_webcache_hits_total counter" in text
    assert "\nmcs_webcache_members 3\n" in text  # a domain gauge: no node label (issue 15)
    assert text.count("mcs_webcache_hits_total{") == 3  # every member's series, from any node


class Load:
    """Client threads on persistent connections, checking every body against disk."""

    def __init__(self, cache: Cache, files: dict[str, bytes], threads: int = 4) -> None:
        self.cache, self.files = cache, files
        self.names = [n for n in files if not n.endswith("1000000.bin")]
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[tuple[int | None, str]] = []  # (node pid or None, error)
        self.wrong: list[str] = []
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(threads)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        conn, node = None, None
        while not self.stop.is_set():
            name = rng.choice(self.names)
            try:
                if conn is None:
                    conn, node = self.cache.conn(), None
                conn.request("GET", name)
                r = conn.getresponse()
                body = r.read()
                node = int(r.getheader("X-Mcs-Node", "0")) or node
                if r.status != 200 or body != self.files[name]:
                    self.wrong.append(f"{name}: {r.status} {len(body)} bytes")
                self.ok += 1
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append((node, repr(exc)))
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def failures_on_survivors(self, dead: set[int]) -> list:
        return [f for f in self.failures if f[0] is not None and f[0] not in dead]


def wait_members(cache: Cache, count: int, exclude: set[int] = frozenset(), timeout: float = 20):
    def ready():
        try:
            doc = cache.status()
        except (OSError, http.client.HTTPException, ValueError):
            return False
        pids = {m["pid"] for m in doc["members"]}
        return len(pids) == count and not pids & exclude and not doc["recovering"]
    assert wait_for(ready, timeout, 0.05), cache.status()
    return cache.status()


@pytest.mark.slow
def test_kill9_node_under_load(cache, site):
    _, files = site
    victim = cache.pids[1]
    generation = cache.status()["generation"]
    with Load(cache, files) as load:
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        time.sleep(1.5)
    assert load.ok > 100
    assert load.wrong == []
    assert load.failures_on_survivors({victim}) == []
    doc = wait_members(cache, 3, exclude={victim})  # the launcher restarted it
    assert doc["generation"] >= generation + 2  # its death, then its replacement's join


@pytest.mark.slow
def test_sigstop_node_is_evicted_and_survivors_serve(cache, site):
    _, files = site
    victim = cache.pids[2]
    with Load(cache, files) as load:
        time.sleep(0.5)
        os.kill(victim, signal.SIGSTOP)
        # (gone: a check of /proc then a read of it raced with the reaping of the victim)
        assert wait_for(lambda: gone(victim), 10)
        time.sleep(0.5)
    assert load.wrong == []
    assert load.failures_on_survivors({victim}) == []
    wait_members(cache, 3, exclude={victim})


@pytest.mark.slow
def test_kill_master_rebuilds_the_table(cache, site):
    _, files = site
    for name in files:
        cache.get(name)
    master = cache.status()["master"]["pid"]
    os.kill(master, signal.SIGKILL)
    doc = wait_members(cache, 3, exclude={master})
    assert doc["master"]["pid"] != master
    for name, data in files.items():
        assert cache.get(name)[2] == data


@pytest.mark.slow
def test_poisoned_arena_serves_nothing_corrupt(cache, site):
    _, files = site
    for _ in range(3):
        for name in files:
            cache.get(name)
    mcs_exe = str(Path(sys.executable).with_name("mcs"))
    slot = cache.status()["members"][0]["slot"]
    with Load(cache, files) as load:
        time.sleep(0.3)
        r = subprocess.run([mcs_exe, "fault", "poison", "--domain", cache.domain,
                            "--component", "webcache", "--slot", str(slot)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        time.sleep(0.3)
        r = subprocess.run([mcs_exe, "fault", "poison", "--domain", cache.domain,
                            "--component", "webcache", "--master"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
    assert load.wrong == []
    assert load.failures == []
    for name, data in files.items():
        assert cache.get(name)[2] == data


@pytest.mark.slow
def test_shutdown_leaves_no_shared_memory(site, domain):
    c = Cache(site[0], domain, nodes=2)
    assert c.get("/page.txt")[0] == 200
    os.kill(c.pids[0], signal.SIGKILL)  # a crashed node too
    time.sleep(0.3)
    assert c.stop() == 0
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"mcs.{domain}")]


def fd_links(pid: int) -> list[str]:
    """Where process ``pid``'s descriptors lead (readlink of /proc/PID/fd/*)."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return links


def get_four_times_each(c: Cache, files: dict[str, bytes], names: tuple[str, ...]) -> None:
    """Each of ``names`` four times on one keep-alive connection (the native loop's)."""
    conn = c.conn()
    try:
        for _ in range(4):
            for name in names:
                conn.request("GET", name)
                r = conn.getresponse()
                assert (r.status, r.read()) == (200, files[name])
    finally:
        conn.close()


def test_sealed_copies_in_a_directory_are_unnamed_files(site, domain, tmp_path):
    if HIT_PATH == "asyncio":
        pytest.skip("sealed copies are the native hit loop's")
    root, files = site
    sealed_dir = tmp_path / "sealed"
    sealed_dir.mkdir()
    c = Cache(root, domain, nodes=1, extra=("--sealed-dir", str(sealed_dir)))
    try:
        get_four_times_each(c, files, ("/f65536.bin", "/f200000.bin"))
        assert wait_for(lambda: c.status()["fast_path"]["native"]["sealed_hits"] >= 2)
        assert c.status()["fast_path"]["native"]["sealed_in"] == str(sealed_dir)
        links = fd_links(c.pids[0])
        copies = [link for link in links if link.startswith(f"{sealed_dir}/#")]
        assert len(copies) == 2 and all(link.endswith("(deleted)") for link in copies), links
        assert not [link for link in links if link.startswith("/memfd:mcs-sealed-hit")]
        assert not os.listdir(sealed_dir)  # never a name

        # The directory goes away; the node is killed and restarted: the new node says so and
        # keeps its copies in memfds.
        sealed_dir.rmdir()
        old = c.pids[0]
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: gone(old), 10)

        def restarted() -> bool:
            try:
                return c.status()["pid"] != old
            except (OSError, http.client.HTTPException, ValueError):  # not serving yet
                return False
        assert wait_for(restarted, 30, 0.1)
        new = c.status()["pid"]
        get_four_times_each(c, files, ("/f65536.bin",))
        assert wait_for(lambda: c.status()["fast_path"]["native"]["sealed_hits"] >= 1)
        assert c.status()["fast_path"]["native"]["sealed_in"] == "memfd"
        assert [link for link in fd_links(new) if link.startswith("/memfd:mcs-sealed-hit")]
        assert any("sealed copies are memfds" in line for line in c.stderr_tail)
    finally:
        assert c.stop() == 0


def test_launcher_errors(tmp_path):
    exe = str(Path(sys.executable).with_name("mcs-webcache"))

    def run(*args):
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)

    r = run("serve", "--root", str(tmp_path / "missing"), "--port", "0")
    assert r.returncode == 2 and "does not exist" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run("serve", "--root", str(tmp_path), "--port", str(s.getsockname()[1]))
        assert r.returncode == 2 and "already in use" in r.stderr
    r = run("serve", "--root", str(tmp_path), "--port", "0", "--cache-size", "lots")
    assert r.returncode == 2 and "bad size" in r.stderr
    r = run("serve", "--root", str(tmp_path), "--port", "0", "--sealed-copies", "-1")
    assert r.returncode == 2 and "--sealed-copies" in r.stderr and "bad size" in r.stderr
    r = run("serve", "--root", str(tmp_path), "--port", "0", "--sealed-copies", "2T")
    assert r.returncode == 2 and "at most 1024G" in r.stderr
    (tmp_path / "file").write_text("x")
    for where, reason in (("missing", "no such directory"), ("file", "not a directory")):
        r = run("serve", "--root", str(tmp_path), "--port", "0", "--sealed-dir",
                str(tmp_path / where))
        assert r.returncode == 2 and f"--sealed-dir {tmp_path / where}: {reason}" in r.stderr
        assert "Traceback" not in r.stderr
    r = run("serve", "--root", str(tmp_path), "--port", "0", "--nodes", "0")
    assert r.returncode == 2
    r = run("serve", "--root", str(tmp_path), "--port", "0", "--domain", "../x")
    assert r.returncode == 2 and "invalid domain name" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("hit_path", ["--native-hits", "--no-native-hits"])
def test_a_file_dated_before_1970_is_served_from_disk_and_costs_the_cache_nothing(
        tmp_path, domain, hit_path):
    # Times are kept as unsigned words: such a file is never cached, by any path. Before, each
    # request was a 500 that left its arena block allocated, until no file could be cached.
    root = tmp_path / "site"
    root.mkdir()
    files = make_site(root)
    old = root / "f200000.bin"
    os.utime(old, ns=(-86_400 * 10**9, -86_400 * 10**9))  # 1969-12-31
    cache = Cache(root, domain, nodes=1, extra=(hit_path,))
    try:
        for _ in range(60):  # 12 MB through an 8 MiB arena
            status, headers, body = cache.get("/f200000.bin")
            assert status == 200 and body == files["/f200000.bin"]
        assert headers["Last-Modified"] == "Thu, 01 Jan 1970 00:00:00 GMT"  # (clamped)
        tag = headers["ETag"]
        assert cache.get("/f200000.bin", {"If-None-Match": tag})[0] == 304
        doc = cache.status()
        assert doc["cache"]["entries"] == 0 and doc["cache"]["bytes"] == 0
        for _ in range(3):  # the cache still caches everything else
            assert cache.get("/f65536.bin")[2] == files["/f65536.bin"]
        assert cache.status()["cache"]["entries"] == 1
    finally:
        assert cache.stop() == 0
