"""Confinement and freshness of served files against real nodes over loopback, with real
attacker processes changing the document root under them:

* a directory swapped with a symlink to a directory outside the root (``renameat2
  (RENAME_EXCHANGE)`` in a loop) never gets a byte from outside served, cached or streamed,
  and the nodes' descriptors do not grow;
* a regular file swapped with a FIFO is never opened for reading (a writer would see it);
* an in-place rewrite of the same size with the mtime put back is not served stale;
* a file replaced atomically (write elsewhere + rename over, every ~2 ms) is always served
  whole, old or new, never 403/404/503;
* the fallback strategies of :class:`webcache.paths.DocumentRoot` (no ``/proc``, no
  ``openat2``) keep every path rule and every confinement property.

The attacker runs as root here (the suite does): the real attack is another user who may write
in the document root; what matters is the swap, which root and that user do alike.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import wait_for
from test_webcache import MAX_ENTRY, Cache, make_site
import test_webcache_semantics as semantics
from test_webcache_semantics import ESCAPES, served
from webcache.paths import DocumentRoot, FileChanged, Forbidden, NotFound, PathError

SECRET = f"TOPSECRET-{uuid.uuid4()}-".encode()
SMALL = 3000
BIG = MAX_ENTRY + 4096
NAMES = [f"f{i}.bin" for i in range(24)]
tree = semantics.tree  # the fixture: a root with every kind of symlink, escape and odd file

# Swaps two paths with renameat2(RENAME_EXCHANGE) until killed (plain renames where the kernel
# or libc lacks it); prints "ready" once the first swap is done.
SWAPPER = r"""
import ctypes, errno, os, sys
os.nice(5)
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2

def exchange():
    if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")

def renames():
    os.rename(a, a + b".swap")
    os.rename(b, a)
    os.rename(a + b".swap", b)

swap = exchange
try:
    exchange()
except (AttributeError, OSError) as exc:
    if isinstance(exc, OSError) and exc.errno not in (errno.ENOSYS, errno.EINVAL):
        raise
    swap = renames
    swap()
print("ready", swap.__name__, flush=True)
while True:
    swap()
    os.sched_yield()
"""

# Replaces files atomically (write a temporary file, rename it over), one round every ~2 ms,
# until killed. argv: the root, then one "name|every|version file|version file..." per file
# (replaced every ``every`` rounds).
REPLACER = r"""
import os, sys, time
root = sys.argv[1]
files = []
for arg in sys.argv[2:]:
    name, every, *versions = arg.split("|")
    files.append((name, int(every), [open(v, "rb").read() for v in versions]))
print("ready", flush=True)
i = 0
while True:
    for name, every, versions in files:
        if i % every == 0:
            tmp = os.path.join(root, f".tmp-{name}")
            with open(tmp, "wb") as fh:
                fh.write(versions[(i // every) % len(versions)])
            os.replace(tmp, os.path.join(root, name))
    i += 1
    time.sleep(0.002)
"""

# Swaps a regular file with a FIFO; after each swap, opens the FIFO (through a hard link of it
# outside the root) for writing without blocking, which succeeds only while a reader has it
# open: prints how often it did.
FIFO_SWAPPER = r"""
import ctypes, errno, os, signal, sys, time
a, b, fifo = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2]), sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
opened = swaps = 0
stop = False

def done(*_):
    global stop
    stop = True

signal.signal(signal.SIGTERM, done)
print("ready", flush=True)
while not stop:
    if libc.renameat2(-100, a, -100, b, 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        opened += 1
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
    swaps += 1
    if swaps % 64 == 0:  # a pause now and then, a swap apart: each name holds still a while
        time.sleep(0.001)
    else:
        os.sched_yield()
print("opened", opened, flush=True)
"""


def new_site(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "site"
    root.mkdir()
    return root, make_site(root)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


CUT = -1  # the status reported for a response whose body the server cut short


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request on its own connection: (status, body), or (CUT, the part received)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        try:
            return r.status, r.read()
        except http.client.IncompleteRead as exc:
            return CUT, exc.partial
    finally:
        c.close()


def hammer(work: list[tuple[str, dict[str, str]]], port: int,
           threads: int = 4) -> list[tuple[str, dict[str, str], int, bytes]]:
    """Run the requests of ``work`` from ``threads`` client threads; every answer."""
    out: list[tuple[str, dict[str, str], int, bytes]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(part: list[tuple[str, dict[str, str]]]) -> None:
        try:
            for path, headers in part:
                status, body = get(port, path, headers)
                with lock:
                    out.append((path, headers, status, body))
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(work[i::threads],)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    assert not errors, errors[0]
    return out


def cut_stream(port: int, path: str) -> None:
    """Ask for ``path``, read a little of the body, then close the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.recv(4096)


def node_fds(cache: Cache) -> dict[int, int]:
    return {pid: fd_count(pid) for pid in cache.pids}


# -- confinement -------------------------------------------------------------------------------


@pytest.fixture
def swap_site(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A root with ``dir/`` (public files) and ``link`` (a symlink to ``secret/`` outside the
    root: the same names and sizes, root-only). The public files carry the secret files' mtimes,
    as an attacker who owns them would set."""
    base = tmp_path
    root, _ = new_site(base)
    public = root / "dir"
    secret = base / "secret"
    public.mkdir()
    secret.mkdir(mode=0o700)
    files = {}
    for name in NAMES + ["big.bin"]:
        size = BIG if name == "big.bin" else SMALL
        (secret / name).write_bytes((SECRET * (size // len(SECRET) + 1))[:size])
        os.chmod(secret / name, 0o600)
        data = (f"public {name} ".encode() * size)[:size]
        (public / name).write_bytes(data)
        st = (secret / name).stat()
        os.utime(public / name, ns=(st.st_atime_ns, st.st_mtime_ns))
        files[name] = data
    (root / "link").symlink_to(secret)
    return root, secret, files


@pytest.mark.slow
def test_symlink_swap_never_serves_a_byte_from_outside(swap_site, domain, spawn):
    root, secret, files = swap_site
    cache = Cache(root, domain, nodes=2)
    try:
        # Warm up each node's thread pool, then take the descriptors' baseline.
        for _ in range(6):
            assert get(cache.port, "/dir/big.bin", {"Range": "bytes=0-9"})[0] == 206
            assert get(cache.port, "/nope")[0] == 404
        time.sleep(0.5)
        baseline = node_fds(cache)

        swapper = spawn(SWAPPER, str(root / "dir"), str(root / "link"))
        assert swapper.readline().startswith("ready")
        work: list[tuple[str, dict[str, str]]] = []
        for round_ in range(12):
            for name in NAMES:
                work.append((f"/dir/{name}", {}))
                if round_ % 3 == 0:
                    work.append((f"/dir/{name}", {"Range": "bytes=10-2009"}))
            work += [("/dir/big.bin", {}), ("/dir/big.bin", {"Range": "bytes=1000-300999"}),
                     ("/dir/big.bin", {"Range": f"bytes=-{SMALL}"})]
        cutter = threading.Thread(target=lambda: [cut_stream(cache.port, "/dir/big.bin")
                                                  for _ in range(30)])
        cutter.start()
        answers = hammer(work, cache.port)
        cutter.join(60)
        swapper.kill()

        statuses: dict[int, int] = {}
        for path, headers, status, body in answers:
            statuses[status] = statuses.get(status, 0) + 1
            assert SECRET[:16] not in body, (path, headers, status)
            assert status in (200, 206, 403, 404, 503, CUT), (path, status, body[:80])
            if status in (200, 206, CUT):
                name = path.rsplit("/", 1)[1]
                assert body in files[name], (path, headers)
        assert statuses.get(200, 0) + statuses.get(206, 0) > len(answers) // 10, statuses

        # Put the directory back and ask again: nothing from outside was cached either.
        if (root / "dir").is_symlink():
            os.rename(root / "dir", root / "tmp")
            os.rename(root / "link", root / "dir")
            os.rename(root / "tmp", root / "link")
        for name in NAMES + ["big.bin"]:
            status, body = get(cache.port, f"/dir/{name}")
            assert status == 200 and body == files[name], name
        # No descriptor left behind: not by refusals, races, streams cut short or retries.
        assert wait_for(lambda: all(fd_count(p) <= baseline[p] for p in cache.pids), 10), \
            (baseline, node_fds(cache))
    finally:
        assert cache.stop() == 0


@pytest.mark.slow
def test_a_fifo_swapped_in_is_never_opened_for_reading(tmp_path, domain, spawn):
    root, _ = new_site(tmp_path)
    data = (b"regular file " * BIG)[:BIG]  # streamed: read from disk on every request
    (root / "file.bin").write_bytes(data)
    os.mkfifo(root / "other")
    os.link(root / "other", tmp_path / "fifo")  # the FIFO, whichever name it has in the root
    cache = Cache(root, domain, nodes=1)
    try:
        swapper = spawn(FIFO_SWAPPER, str(root / "file.bin"), str(root / "other"),
                        str(tmp_path / "fifo"))
        swapper.expect("ready")
        answers = hammer([("/file.bin", {})] * 300 + [("/file.bin", {"Range": "bytes=5-9"})] * 300,
                         cache.port)
        swapper.signal(15)
        line = swapper.readline()
        for path, headers, status, body in answers:
            # a stream is cut when the file changes under it (here: renamed, its ctime moved)
            assert status in (200, 206, 403, 503, CUT), (status, body[:80])
            if status in (200, 206, CUT):
                assert body in data
        assert sum(a[2] in (200, 206) for a in answers) > 0
        assert line == "opened 0", line
    finally:
        assert cache.stop() == 0


# -- freshness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "aiohttp"])
@pytest.mark.slow
def test_rewrite_in_place_with_the_mtime_put_back_is_not_served_stale(tmp_path, domain,
                                                                       fast_path):
    root, files = new_site(tmp_path)
    path = root / "page.txt"
    before = path.stat()
    cache = Cache(root, domain, nodes=1, extra=() if fast_path else ("--no-fast-path",))
    try:
        for _ in range(3):
            status, headers, body = cache.get("/page.txt")
            assert body == files["/page.txt"]
        old_tag = headers["ETag"]
        assert cache.get("/page.txt", {"If-None-Match": old_tag})[0] == 304
        assert cache.status()["hits"] >= 2  # cached, then served from shared memory
        new = files["/page.txt"].upper()
        with open(path, "r+b") as fh:  # same inode, same size
            fh.write(new)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
            (before.st_size, before.st_mtime_ns, before.st_ino)
        for _ in range(3):
            status, headers, body = cache.get("/page.txt")
            assert status == 200 and body == new
        assert headers["ETag"] != old_tag  # ctime is in the tag: the client's copy is stale
        status, _, body = cache.get("/page.txt", {"If-None-Match": old_tag})
        assert status == 200 and body == new
        assert cache.status()["stale_revalidations"] >= 1
    finally:
        assert cache.stop() == 0


@pytest.mark.slow
def test_atomic_replace_in_a_loop_is_always_served_whole(tmp_path, domain, spawn):
    root, _ = new_site(tmp_path)
    versions_dir = tmp_path / "versions"
    versions_dir.mkdir()

    def versions(name: str, sizes: list[int]) -> list[bytes]:
        out = []
        for k, size in enumerate(sizes):
            data = (f"<{name} version {k}>".encode() * size)[:size]
            (versions_dir / f"{name}.{k}").write_bytes(data)
            out.append(data)
        (root / name).write_bytes(out[0])
        return out

    small = versions("page.html", [3000, 5000, 4000])
    big = versions("big.bin", [MAX_ENTRY + 1000, MAX_ENTRY + 9000])
    cache = Cache(root, domain, nodes=2)
    try:
        groups = ["|".join([name, str(every), *(str(versions_dir / f"{name}.{k}")
                                                 for k in range(n))])
                  for name, every, n in (("page.html", 1, len(small)), ("big.bin", 5, len(big)))]
        replacer = spawn(REPLACER, str(root), *groups)
        replacer.expect("ready")
        work = [("/page.html", {})] * 2000 + [("/page.html", {"Range": "bytes=100-2099"})] * 300
        work += [("/big.bin", {})] * 150 + [("/big.bin", {"Range": "bytes=-5000"})] * 150
        answers = hammer(work, cache.port)
        replacer.kill()
        bad = []
        for path, headers, status, body in answers:
            whole = small if path == "/page.html" else big
            if "Range" not in headers:
                ok = status == 200 and body in whole
            elif path == "/page.html":
                ok = status == 206 and body in [v[100:2100] for v in whole]
            else:
                ok = status == 206 and body in [v[-5000:] for v in whole]
            if not ok:
                bad.append((path, headers, status, body[:60]))
        assert not bad, f"{len(bad)} of {len(answers)} wrong: {bad[:5]}"
        seen = {body for path, _, _, body in answers if path == "/page.html"}
        assert len(seen) >= 2  # the replacer did change the file under the requests
    finally:
        assert cache.stop() == 0


# -- the strategies of DocumentRoot ---------------------------------------------------------

STRATEGIES = [(True, True), (True, False), (False, True), (False, False)]
STRATEGY_IDS = ["proc+openat2", "proc-only", "openat2-only", "neither"]


def strategy_root(path: Path, proc_fd: bool, openat2: bool) -> DocumentRoot:
    root = DocumentRoot(path)
    assert root._proc_fd and root._openat2, "both are available on the test machine"
    root._proc_fd, root._openat2 = proc_fd, openat2
    return root


@pytest.mark.parametrize("proc_fd, openat2", STRATEGIES, ids=STRATEGY_IDS)
def test_every_strategy_keeps_the_path_rules(tree, proc_fd, openat2):
    with strategy_root(tree[0], proc_fd, openat2) as root:
        for url, raw, error, reason in ESCAPES:
            with pytest.raises(error) as info:
                root.resolve(url, raw)
            assert type(info.value) is error and reason in info.value.reason, url
        for url, content in [("/", "root index"), ("/sub", "sub index"), ("/to_page", "page"),
                             ("/rel_to_page", "page"), ("/chain", "page"),
                             ("/to_sub/a.css", "body{}"), ("/out_and_back/back/a.css", "body{}"),
                             ("//etc/passwd", "not the real one")]:
            assert served(root, url) == content, url
            with root.open(url) as opened:
                assert opened.read_all() == content.encode(), url
                assert opened.read_span(1, 3) == content.encode()[1:3], url


@pytest.mark.parametrize("proc_fd, openat2", STRATEGIES, ids=STRATEGY_IDS)
@pytest.mark.slow
def test_every_strategy_reads_only_what_it_confined(swap_site, spawn, proc_fd, openat2):
    root_dir, secret, files = swap_site
    swapper = spawn(SWAPPER, str(root_dir / "dir"), str(root_dir / "link"))
    assert swapper.readline().startswith("ready")
    outcomes: dict[str, int] = {}
    with strategy_root(root_dir, proc_fd, openat2) as root:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for name in NAMES[:4] + ["big.bin"]:
                try:
                    with root.open(f"/dir/{name}") as opened:
                        data = opened.read_all()
                except (Forbidden, NotFound, FileChanged) as exc:
                    outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                    continue
                assert SECRET[:16] not in data
                assert data == files[name]
                outcomes["read"] = outcomes.get("read", 0) + 1
    swapper.kill()
    assert outcomes.get("read", 0) > 0, outcomes


def test_open_files_are_closed_on_every_path(tree):
    """open() leaves one descriptor per OpenFile and none after close, after a refusal, or
    after an OpenFile is dropped unclosed."""
    before = fd_count(os.getpid())
    with DocumentRoot(tree[0]) as root:
        assert fd_count(os.getpid()) == before + 1  # the root's own descriptor
        for _ in range(50):
            for url, raw, _error, _reason in ESCAPES:
                with pytest.raises(PathError):
                    root.open(url, raw)
            with root.open("/to_page") as opened:
                opened.dup()  # dropped unclosed: closed when collected
                assert opened.read_all() == b"page"
            root.open("/sub/")  # never closed by the caller
        assert fd_count(os.getpid()) == before + 1
    assert fd_count(os.getpid()) == before
