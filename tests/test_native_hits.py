"""The native hit loop (webcache/native.py, webcache/native_loop.h).

In this process, on a real McsWebCache member (real sections, robust mutexes, pin journals),
the loop running in a real thread and real loopback sockets: a hit is served with the bytes
and headers of the asyncio fast path; a miss, a stale or corrupt entry, a closed gate, a
counted memory failure, a bucket lock held elsewhere are handed over with the request's bytes
and never served; a bucket mutex abandoned by a dead process is repaired as the Python path
does; pins and journal marks are released on every path; a real recovery gives the loop the
new shared memory. Sealed copies: a large body asked for again is sent from a memfd the kernel
refuses to change, only while the shared entry still has its version and checksum, within
the budget, and nothing of them outlives the loop. Its parser, target rule, cache key hash and
response head are compared with the Python path's (hypothesis). Through real nodes: a
connection handed over for a miss comes back to the loop at its next request, and the reasons
and sealed copies are reported.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcs import GlobalMutex, LockStatus
from mcs import layout as mcs_layout
from webcache import _native_loop
from webcache import layout as L
from webcache.cache import NATIVE_MARK, SETTLE_NS, McsWebCache, path_hash
from webcache.fastpath import (NOT_PLAIN_HEADERS, connection_tail, plain_request, plain_target,
                               response_block)
from webcache.limits import ConnectionLimits
from webcache.native import TRANSIENT, HandOff, make_loop, sealed_count
from webcache.paths import ResolvedFile
from webcache.sealdir import SealedDirError, open_sealed_dir
from webcache.semantics import content_types, http_date

from conftest import wait_for
from test_fastpath import read_responses
from test_webcache import Cache, make_site

TIMING = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.4}
MAX_ENTRY = 256 * 1024
GET = b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n"


# -- the loop on a real member, in this process --------------------------------------------------


class Harness:
    """A McsWebCache member of its own domain with the native loop attached (as webcache.native
    attaches it), and a loopback listener whose accepted sockets go to the loop."""

    def __init__(self, root: Path, domain: str, limits: ConnectionLimits | None = None,
                 sealed_copies: int = 0, max_sealed: int | None = None,
                 sealed_dir: Path | None = None) -> None:
        self.root = root.resolve()
        self.cache = McsWebCache(domain, cache_size=4 << 20, max_entry=MAX_ENTRY,
                                 **TIMING).start()
        self.root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.sealed_dir_fd = -1 if sealed_dir is None else open_sealed_dir(sealed_dir)
        # what readlink says of a copy's descriptor: "/memfd:NAME (deleted)", "DIR/#INODE (deleted)"
        self.sealed_prefix = SEALED if sealed_dir is None else f"{sealed_dir.resolve()}/#"
        self.loop = make_loop(self.root_fd, str(self.root) + "/", MAX_ENTRY,
                              limits or ConnectionLimits(), sealed_copies=sealed_copies,
                              max_sealed=max_sealed, sealed_dir_fd=self.sealed_dir_fd)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()
        self.cache.attach_native(self)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.handed: list[tuple[int, int, bytes]] = []

    # the worker interface McsWebCache.attach_native expects
    def open_gate(self, memory: tuple) -> None:
        self.loop.open_gate(*memory)

    def close_gate(self) -> None:
        self.loop.close_gate()

    def wait_quiet(self, timeout: float) -> bool:
        return self.loop.wait_quiet(timeout)

    def close(self) -> None:
        self.cache.detach_native()
        self.loop.stop()
        self.thread.join(10)
        for fd, _, _, _ in self.handed + self.loop.take():
            os.close(fd)
        self.loop.close()
        os.close(self.root_fd)
        if self.sealed_dir_fd >= 0:
            os.close(self.sealed_dir_fd)
        self.listener.close()
        self.cache.stop()

    def connect(self, rcvbuf: int = 0) -> socket.socket:
        client = socket.socket()
        if rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.settimeout(10)
        client.connect(self.listener.getsockname())
        server, _ = self.listener.accept()
        server.setblocking(False)
        self.loop.adopt(server.detach())
        return client

    def cache_file(self, name: str, data: bytes) -> ResolvedFile:
        path = self.root / name
        path.write_bytes(data)
        time.sleep(SETTLE_NS / 1e9 + 0.01)  # its ctime settles: the cache takes it
        f = ResolvedFile.from_stat(str(path), os.stat(path))
        assert self.cache.store(f, data)
        return f

    def handed_off(self, timeout: float = 5.0) -> tuple[int, HandOff, bytes]:
        """The next connection the loop hands over (its socket is closed here)."""
        deadline = time.monotonic() + timeout
        while True:
            taken = self.loop.take()
            if taken:
                self.handed += taken[1:]
                fd, reason, data, _ = taken[0]
                os.close(fd)
                return fd, HandOff(reason), data
            left = deadline - time.monotonic()
            assert left > 0, "nothing was handed off"
            select.select([self.loop.wake_fd], [], [], left)

    def sealed_fds(self) -> list[int]:
        return sealed_fds(self.sealed_prefix)

    def counters(self) -> dict[str, int]:
        values, _ = self.loop.counters()
        return dict(zip(_native_loop.COUNTERS, values))

    def entry_pins(self, f: ResolvedFile) -> tuple[int, int]:
        """(our pin counter on ``f``'s entry, our native journal mark's ref)."""
        area = self.cache.master_area
        h = path_hash(f.path)
        ref = area.load64(L.bucket_offset(h % L.BUCKETS) + L.B_HEAD)
        slot, off = L.split_ref(ref)
        arena = self.cache.contribution_of(slot)
        me = self.cache.slot
        return (arena.load64(off + L.E_PINS + 8 * me),
                area.load64(L.mark_offset(me, NATIVE_MARK) + L.M_REF))


@pytest.fixture
def harness(tmp_path, domain):
    root = tmp_path / "site"
    root.mkdir()
    h = Harness(root, domain)
    yield h
    h.close()


def test_a_hit_is_served_with_the_fast_paths_headers_and_bytes(harness):
    data = os.urandom(65536)
    f = harness.cache_file("page.html", data)
    with harness.connect() as c:
        c.sendall(GET % b"page.html")
        (status, headers, body), = read_responses(c, 1)
        c.sendall(b"HEAD /page.html HTTP/1.1\r\nHost: x\r\n\r\n")
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # no body follows
            chunk = c.recv(4096)
            assert chunk
            head += chunk
    assert status == 200 and body == data
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 65536\r\n" in head
    now = time.time_ns()
    expected = response_block(f.path, f.size, f.mtime_ns, f.inode, f.ctime_ns, now)
    lines = expected.decode().split("\r\n")[1:-1]
    assert {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)} == \
        {k: v for k, v in headers.items() if k != "date"}
    # counted just after the write: the client may read the answer first
    assert wait_for(lambda: (c := harness.counters())["hits"] == 1 and c["served"] == 2
                    and c["heads"] == 1, 5), harness.counters()
    assert harness.entry_pins(f) == (0, 0)


@pytest.mark.parametrize("sealed", [0, 1 << 20], ids=["copied", "sealed"])
def test_pipelined_hits_and_a_client_that_reads_late(tmp_path, domain, sealed):
    root = tmp_path / "site"
    root.mkdir()
    harness = Harness(root, domain, sealed_copies=sealed)
    try:
        data = os.urandom(200_000)
        harness.cache_file("big.bin", data)
        with harness.connect() as c:
            c.sendall(GET % b"big.bin" * 40)  # 8 MB of answers: the socket fills, the loop waits
            time.sleep(0.5)
            got = read_responses(c, 40, timeout=30)
        assert all(g[0] == 200 and g[2] == data for g in got)
        # with sealed copies, the 3rd response on (the rest waited, read from the copy); a
        # response is counted once it is written, which the client may see first
        assert wait_for(lambda: harness.counters()["served"] == 40)
        assert harness.counters()["sealed_hits"] == (38 if sealed else 0)
    finally:
        harness.close()


@pytest.mark.parametrize("request_, reason", [
    (GET % b"missing.bin", HandOff.NO_FILE),
    (GET % b"cold.bin", HandOff.MISS),
    (b"GET /page.html HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n", HandOff.NOT_PLAIN),
    (b"GET /page.html HTTP/2.0\r\nHost: x\r\n\r\n", HandOff.NOT_PLAIN),
    (b"GET /_mcs/status HTTP/1.1\r\nHost: x\r\n\r\n", HandOff.NOT_PLAIN),
    (b"GET /page.html HTTP/1.1\r\nHost: x\r\n", HandOff.PARTIAL),
])
def test_what_the_loop_does_not_serve_is_handed_over_with_its_bytes(harness, request_, reason):
    harness.cache_file("page.html", b"cached")
    (harness.root / "cold.bin").write_bytes(b"not cached")
    with harness.connect() as c:
        c.sendall(request_)
        _, why, data = harness.handed_off()
    assert why is reason and data == request_
    assert harness.counters()["served"] == 0


def test_stale_and_corrupt_entries_are_handed_over_never_served(harness):
    f = harness.cache_file("a.bin", b"A" * 5000)
    (harness.root / "a.bin").write_bytes(b"B" * 5000)  # same size, new ctime
    os.utime(harness.root / "a.bin", ns=(f.mtime_ns, f.mtime_ns))  # the mtime put back
    with harness.connect() as c:
        c.sendall(GET % b"a.bin")
        assert harness.handed_off()[1] is HandOff.STALE
    g = harness.cache_file("b.bin", b"C" * 5000)
    h = path_hash(g.path)
    ref = harness.cache.master_area.load64(L.bucket_offset(h % L.BUCKETS) + L.B_HEAD)
    slot, off = L.split_ref(ref)
    arena = harness.cache.contribution_of(slot)
    arena.view(L.data_offset(off, len(os.fsencode(g.path))) + 100, 1)[0] ^= 1
    with harness.connect() as c:
        c.sendall(GET % b"b.bin")
        assert harness.handed_off()[1] is HandOff.CORRUPT
    assert harness.counters()["served"] == 0
    assert harness.entry_pins(g) == (0, 0)


def test_the_gate_and_a_real_recovery(harness):
    data = os.urandom(4096)
    f = harness.cache_file("g.bin", data)
    harness.loop.close_gate()  # what the component does when it closes its gate
    assert harness.loop.wait_quiet(1.0)
    with harness.connect() as c:
        c.sendall(GET % b"g.bin")
        assert harness.handed_off()[1] is HandOff.RECOVERY
    epoch = harness.cache.stats.epoch
    harness.cache.request_recovery("test")  # closes, recovers, gives the loop its memory again
    assert wait_for(lambda: harness.cache.stats.epoch > epoch and not harness.cache.recovering,
                    10)
    assert not harness.loop.gate_closed
    with harness.connect() as c:
        c.sendall(GET % b"g.bin")
        (status, _, body), = read_responses(c, 1)
    assert status == 200 and body == data
    # A memory failure counted: the loop's block sees it and hands over (the component
    # recovers, as after any failure), then serves again.
    epoch = harness.cache.stats.epoch
    harness.cache._root.add64(mcs_layout.MEMORY_FAILURES, 1)
    with harness.connect() as c:
        c.sendall(GET % b"g.bin")
        assert harness.handed_off()[1] is HandOff.RECOVERY
    assert wait_for(lambda: harness.cache.stats.epoch > epoch and not harness.cache.recovering,
                    10)
    with harness.connect() as c:
        c.sendall(GET % b"g.bin")
        (status, _, body), = read_responses(c, 1)
    assert status == 200 and body == data
    assert harness.entry_pins(f) == (0, 0)


def test_a_busy_bucket_is_handed_over_and_an_abandoned_one_repaired(harness, spawn):
    data = b"x" * 3000
    f = harness.cache_file("m.bin", data)
    area = harness.cache.master_area
    offset = L.bucket_offset(path_hash(f.path) % L.BUCKETS) + L.B_MUTEX
    mutex = GlobalMutex.open(area, offset, tag=99)
    assert mutex.lock() is LockStatus.OK
    try:
        with harness.connect() as c:
            c.sendall(GET % b"m.bin")
            assert harness.handed_off()[1] is HandOff.BUSY
    finally:
        mutex.unlock()
    # A process that dies holding the bucket mutex: the loop repairs it (a bucket is whole
    # after any death: every update is one publishing store) and serves.
    child = spawn("""
        import sys
        from mcs import GlobalMutex
        from mcs.section import Section
        area = Section.attach(sys.argv[1])
        GlobalMutex.open(area, int(sys.argv[2]), tag=7).lock()
        print("locked", flush=True)
        sys.stdin.readline()
    """, harness.cache._master_ident, str(offset))
    child.expect("locked")
    child.kill()
    with harness.connect() as c:
        c.sendall(GET % b"m.bin")
        (status, _, body), = read_responses(c, 1)
    assert status == 200 and body == data
    assert harness.counters()["repaired"] == 1
    assert mutex.lock() is LockStatus.OK  # consistent again, not "not recoverable"
    mutex.unlock()


@pytest.mark.parametrize("sealed", [0, 1 << 20], ids=["copied", "sealed"])
def test_deadlines(tmp_path, domain, sealed):
    root = tmp_path / "site"
    root.mkdir()
    h = Harness(root, domain, ConnectionLimits(header_timeout=0.3, keepalive_timeout=0.3,
                                               send_timeout=0.5), sealed_copies=sealed)
    try:
        h.cache_file("d.bin", os.urandom(200_000))
        silent = h.connect()  # sends nothing: closed at the header deadline
        idle = h.connect()
        idle.sendall(GET % b"d.bin")
        read_responses(idle, 1)  # then idle: closed at the keep-alive deadline
        stuck = h.connect(rcvbuf=4096)
        stuck.sendall(GET % b"d.bin" * 50)  # never read: closed at the send deadline
        assert wait_for(lambda: (c := h.counters())["timed_out_header"] == 1
                        and c["timed_out_idle"] == 1 and c["timed_out_send"] == 1, 10, 0.05)
        for s in (silent, idle):
            s.settimeout(5)
            assert s.recv(1) == b""
            s.close()
        stuck.close()
        assert wait_for(lambda: h.loop.open == 0, 5)
    finally:
        h.close()


# -- sealed copies -----------------------------------------------------------------------------------

SEALED = "/memfd:mcs-sealed-hit "  # readlink of a memfd: "/memfd:NAME (deleted)"


def sealed_fds(prefix: str = SEALED) -> list[int]:
    """This process's descriptors of sealed copies (memfds, or files named from ``prefix``)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(prefix):
                out.append(int(name))
        except OSError:
            pass  # the descriptor listdir used, or one closed meanwhile
    return out


@pytest.fixture(params=["memfd", "file"])
def sealed(request, tmp_path, domain):
    """A loop with 200,000 bytes of sealed copies: memfds, or unnamed files (--sealed-dir)."""
    root = tmp_path / "site"
    root.mkdir()
    sealed_dir = None
    if request.param == "file":
        sealed_dir = tmp_path / "sealed"
        sealed_dir.mkdir()
    h = Harness(root, domain, sealed_copies=200_000, sealed_dir=sealed_dir)
    before = h.sealed_fds()
    yield h
    h.close()
    assert h.sealed_fds() == before, "sealed copies outlived their loop"
    if sealed_dir is not None:
        assert not os.listdir(sealed_dir), "a sealed copy got a name"


def entry_of(harness: Harness, f: ResolvedFile) -> tuple[object, int]:
    """(the arena, the entry's offset) of ``f``'s cached entry (the head of its bucket)."""
    h = path_hash(f.path)
    ref = harness.cache.master_area.load64(L.bucket_offset(h % L.BUCKETS) + L.B_HEAD)
    slot, off = L.split_ref(ref)
    return harness.cache.contribution_of(slot), off


def get_on(c: socket.socket, name: bytes, times: int = 1) -> list[bytes]:
    bodies = []
    for _ in range(times):
        c.sendall(GET % name)
        (status, _, body), = read_responses(c, 1)
        assert status == 200
        bodies.append(body)
    return bodies


# Drops every capability (capset), then opens argv[1] to read and to write.
OPEN_WITHOUT_CAPABILITIES = r"""
import ctypes, os, sys
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]
libc = ctypes.CDLL(None, use_errno=True)
if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
    sys.exit("capset: " + os.strerror(ctypes.get_errno()))
os.close(os.open(sys.argv[1], os.O_RDONLY))
print("read")
try:
    os.close(os.open(sys.argv[1], os.O_RDWR))
    print("write-opened")
except PermissionError:
    print("write-refused")
"""


def test_a_large_body_asked_for_again_is_sent_from_a_sealed_copy(sealed):
    data = os.urandom(65536)
    f = sealed.cache_file("big.bin", data)
    small = os.urandom(4096)
    sealed.cache_file("small.bin", small)
    with sealed.connect() as c:
        # 1st: copied (a candidate); 2nd: copied, then sealed; then from the sealed copy
        assert get_on(c, b"big.bin", 5) == [data] * 5
        assert get_on(c, b"small.bin", 5) == [small] * 5  # below SEALED_MIN: always copied
    wait_for(lambda: sealed.counters()["hits"] == 10)  # counted once its response is written
    n = sealed.counters()
    assert (n["hits"], n["sealed_made"], n["sealed_hits"], n["sealed_held"], n["sealed_bytes"]) \
        == (10, 1, 3, 1, 65536), n
    assert sealed.entry_pins(f) == (0, 0)
    fd, = sealed.sealed_fds()
    assert os.pread(fd, 65537, 0) == data
    if sealed.sealed_dir_fd >= 0:
        # an unnamed file: no name, mode 0400, and the loop's descriptor is read-only (the
        # writable one it was written through is closed): only root could open one to write
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_mode & 0o7777 == 0o400 and st.st_uid == os.geteuid()
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"x", 0)
        assert err.value.errno == errno.EBADF
        # a process of this user without CAP_DAC_OVERRIDE, given the descriptor, can open the
        # file again to read, not to write
        opened = subprocess.run([sys.executable, "-P", "-c", OPEN_WITHOUT_CAPABILITIES,
                                 f"/proc/self/fd/{fd}"], capture_output=True, text=True,
                                timeout=30, pass_fds=(fd,))
        assert opened.stdout.split() == ["read", "write-refused"], opened.stderr
        return
    # the kernel refuses any change to it, from anyone (even through a new descriptor)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
    again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        with pytest.raises(PermissionError):
            os.pwrite(again, b"x", 0)
        assert os.pread(again, 65537, 0) == data
    finally:
        os.close(again)


def test_a_sealed_copy_is_sent_only_for_the_entry_it_was_verified_against(sealed):
    data = os.urandom(65536)
    f = sealed.cache_file("v.bin", data)
    with sealed.connect() as c:
        assert get_on(c, b"v.bin", 3) == [data] * 3
    assert wait_for(lambda: sealed.counters()["sealed_hits"] == 1)  # counted once written
    arena, off = entry_of(sealed, f)
    # Garbage in the shared entry's bytes: the sealed copy was verified and cannot change, so
    # what is sent is still the file's bytes.
    arena.view(L.data_offset(off, len(os.fsencode(f.path))) + 100, 1)[0] ^= 1
    with sealed.connect() as c:
        assert get_on(c, b"v.bin") == [data]
    assert wait_for(lambda: sealed.counters()["sealed_hits"] == 2)
    # Garbage in the entry's checksum: it no longer names the copy: the entry is checked as
    # any other, found corrupt and handed over.
    arena.add64(off + L.E_SUM, 1)
    with sealed.connect() as c:
        c.sendall(GET % b"v.bin")
        assert sealed.handed_off()[1] is HandOff.CORRUPT
    assert sealed.counters()["sealed_hits"] == 2
    # The file changed (same size and mtime, new ctime): never the sealed copy of the old one.
    new = os.urandom(65536)
    (sealed.root / "v.bin").write_bytes(new)
    os.utime(sealed.root / "v.bin", ns=(f.mtime_ns, f.mtime_ns))
    with sealed.connect() as c:
        c.sendall(GET % b"v.bin")
        assert sealed.handed_off()[1] is HandOff.STALE
    time.sleep(SETTLE_NS / 1e9 + 0.01)
    g = ResolvedFile.from_stat(f.path, os.stat(f.path))
    assert sealed.cache.lookup(g) is None  # the stale entry dropped
    assert sealed.cache.store(g, new)
    with sealed.connect() as c:
        assert get_on(c, b"v.bin", 4) == [new] * 4
    assert wait_for(lambda: sealed.counters()["sealed_hits"] == 4)
    n = sealed.counters()
    assert (n["sealed_made"], n["sealed_dropped"], n["sealed_held"], n["sealed_hits"]) \
        == (2, 1, 1, 4), n
    assert len(sealed.sealed_fds()) == 1


def test_sealed_copies_stay_within_their_budget(sealed):
    files = {f"b{i}.bin".encode(): os.urandom(65536) for i in range(4)}  # budget: 200,000
    for name, data in files.items():
        sealed.cache_file(name.decode(), data)
    with sealed.connect() as c:
        for _ in range(3):
            for name, data in files.items():
                assert get_on(c, name, 3) == [data] * 3
                n = sealed.counters()
                assert n["sealed_bytes"] <= 200_000 and n["sealed_held"] <= 3
                assert len(sealed.sealed_fds()) == n["sealed_held"]
    n = sealed.counters()
    assert n["sealed_made"] >= 4 and n["sealed_dropped"] == n["sealed_made"] - n["sealed_held"]
    assert n["sealed_held"] == 3 and n["sealed_failed"] == 0


@contextlib.contextmanager
def no_free_descriptor() -> Iterator[None]:
    """Every descriptor this process may open is taken meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        while True:
            try:
                spare.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def no_file_larger_than(size: int) -> Iterator[None]:
    """Writes past ``size`` in any file fail meanwhile (EFBIG). Process-wide, so keep the
    window to one request; SIGXFSZ is ignored by Python and blocked by the loop thread."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("fault", ["no descriptor", "file size limit"])
def test_a_copy_that_cannot_be_made_loses_nothing(sealed, fault):
    # memfd_create or openat fails (EMFILE), or the copy's write does (EFBIG past
    # RLIMIT_FSIZE; ENOSPC on a full filesystem takes the same path): counted, nothing left
    # behind, the body copied and summed as before, and no copy tried for SEAL_RETRY
    data = os.urandom(65536)
    sealed.cache_file("body.bin", data)
    with sealed.connect() as c:
        assert get_on(c, b"body.bin") == [data]  # a candidate now
        with (no_free_descriptor() if fault == "no descriptor"
              else no_file_larger_than(len(data) - 1)):
            assert get_on(c, b"body.bin") == [data]  # its copy fails
        assert get_on(c, b"body.bin", 2) == [data] * 2  # not tried again so soon
        assert wait_for(lambda: sealed.counters()["hits"] == 4)
        n = sealed.counters()
        assert (n["sealed_failed"], n["sealed_made"], n["sealed_held"]) == (1, 0, 0), n
        assert not sealed.sealed_fds()
        time.sleep(_native_loop.SEAL_RETRY)
        assert get_on(c, b"body.bin", 2) == [data] * 2  # sealed, then sent from the copy
    assert wait_for(lambda: sealed.counters()["hits"] == 6)
    n = sealed.counters()
    assert (n["sealed_made"], n["sealed_hits"], n["sealed_failed"]) == (1, 1, 1), n


def test_a_sealed_dir_is_checked_before_use(tmp_path):
    # what --sealed-dir refuses, with the reason (the CLI prints it: test_webcache)
    (tmp_path / "file").write_text("x")
    for path, reason in ((tmp_path / "missing", "no such directory"),
                         (tmp_path / "file", "not a directory")):
        with pytest.raises(SealedDirError, match=reason):
            open_sealed_dir(path)
    fd = open_sealed_dir(tmp_path)  # one unnamed file was made there, and is gone
    try:
        assert os.listdir(tmp_path) == ["file"]
    finally:
        os.close(fd)


def test_sealed_copies_stay_within_their_descriptors(tmp_path, domain):
    # each copy is a descriptor: at most an eighth of what RLIMIT_NOFILE leaves for
    # connections, and never more than the loop's table
    assert [sealed_count(n) for n in (64, 100, 1024, 1 << 20, resource.RLIM_INFINITY)] == \
        [0, 4, 120, _native_loop.MAX_SEALED, _native_loop.MAX_SEALED]
    root = tmp_path / "site"
    root.mkdir()
    h = Harness(root, domain, sealed_copies=1 << 20, max_sealed=2)
    try:
        files = {f"c{i}.bin".encode(): os.urandom(20_000) for i in range(4)}
        for name, data in files.items():
            h.cache_file(name.decode(), data)
        with h.connect() as c:
            for _ in range(2):
                for name, data in files.items():
                    assert get_on(c, name, 3) == [data] * 3
                    assert h.counters()["sealed_held"] <= 2
        n = h.counters()
        assert n["sealed_held"] == 2 and n["sealed_made"] > 2 and n["sealed_bytes"] == 40_000
        assert len(sealed_fds()) == 2
    finally:
        h.close()
    assert not sealed_fds()
    fd = os.open(root, os.O_PATH)
    try:
        with pytest.raises(ValueError, match="sealed copies"):
            make_loop(fd, str(root) + "/", MAX_ENTRY, ConnectionLimits(), sealed_copies=1,
                      max_sealed=_native_loop.MAX_SEALED + 1)
    finally:
        os.close(fd)


# -- the loop's pieces against the Python path's ----------------------------------------------------


@pytest.fixture(scope="module")
def idle_loop(tmp_path_factory):
    """A loop that does not run: its parser and response head."""
    root = tmp_path_factory.mktemp("root")
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    loop = make_loop(fd, str(root) + "/", MAX_ENTRY, ConnectionLimits())
    yield loop
    loop.close()
    os.close(fd)


_NAMES = ["Host", "host", "HOST", "Connection", "connection", "Content-Length", "X-A", "Accept",
          "Range", "If-None-Match", "Upgrade", "Transfer-Encoding", "Expect", "content-type",
          "If-Range", "Host ", " Host", "Ho\tst", "", "X\x01", "User-Agent", "Cookie"]
_VALUES = [" x", "", " close", "close", " keep-alive", "Keep-Alive, close", "close,", " 0",
           "0 ", " 00", "1", " upgrade", "\tclose\t", " a\x7f", " caf\xe9", " keep-alive ,close",
           " x\r\n y", "TE"]
_TARGETS = ["/f4096.bin", "/", "/a/b.c", "/a//b", "/.x", "/a/.b", "/a/", "/%41", "/a?b", "/a b",
            "*", "", "/metrics", "/_mcs/status", "/_mcs", "/-~_.x", "/\xe9", "/" + "a" * 1100]
heads = st.builds(
    lambda method, target, version, host, headers, sep: (
        f"{method}{sep}{target}{sep}{version}".encode("latin-1")
        + b"".join(f"\r\n{n}:{v}".encode("latin-1") for n, v in [*host, *headers])),
    st.sampled_from(["GET"] * 6 + ["HEAD"] * 3 + ["POST", "get", "GET GET", ""]),
    st.sampled_from(_TARGETS[:1] * 8 + _TARGETS),
    st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0"] * 4
                    + ["HTTP/1.2", "HTTP/2.0", "http/1.1", "HTTP/1.1 "]),
    st.sampled_from([[("Host", " x")]] * 4 + [[], [("host", "")], [("Host", " a"), ("HOST", " b")]]),
    st.lists(st.tuples(st.sampled_from(_NAMES[4:] + ["Accept"] * 6),
                       st.sampled_from(_VALUES[:8] * 3 + _VALUES)), max_size=4),
    st.sampled_from([" "] * 10 + ["  ", "\t"]))


@settings(max_examples=600, deadline=None)
@given(head=heads | st.binary(max_size=80).map(lambda b: b"GET / HTTP/1.1\r\nHost: x" + b))
def test_the_parser_accepts_exactly_what_the_fast_path_accepts(idle_loop, head):
    assert idle_loop.parse(head) == plain_request(head)


@pytest.mark.parametrize("version, tokens, keep_alive", [
    ("1.0", "close, keep-alive", False), ("1.0", "keep-alive, close", False),
    ("1.0", "keep-alive", True), ("1.0", "", False), ("1.1", "keep-alive, close", False),
    ("1.1", "close, keep-alive", False), ("1.1", "keep-alive", True), ("1.1", "", True)])
def test_close_wins_over_keep_alive_in_any_order(idle_loop, version, tokens, keep_alive):
    head = f"GET /a HTTP/{version}\r\nHost: x".encode() + (
        f"\r\nConnection: {tokens}".encode() if tokens else b"")
    assert plain_request(head)[3] is keep_alive
    assert idle_loop.parse(head)[3] is keep_alive


@settings(max_examples=400, deadline=None)
@given(target=st.sampled_from(_TARGETS) | st.text(
    alphabet=st.sampled_from(list("/.ab_~-%?9")), max_size=12).map(lambda t: "/" + t))
def test_the_target_rule_is_the_fast_paths(target):
    raw = target.encode("latin-1")
    assert _native_loop.plain_target(raw) == plain_target(raw)


@settings(max_examples=300, deadline=None)
@given(name=st.text(alphabet=st.sampled_from(list("abcXYZ019")), min_size=1, max_size=8),
       ext=st.sampled_from(sorted(content_types())) | st.sampled_from(["", ".", ".XYZ", ".Html",
                                                                      ".tar.gz", ".unknownext"]),
       size=st.integers(0, MAX_ENTRY), mtime=st.integers(0, (1 << 64) - 1),
       inode=st.integers(0, (1 << 64) - 1), ctime=st.integers(0, (1 << 64) - 1),
       keep_alive=st.booleans(), http10=st.booleans(),
       now=st.integers(10**18, 4 * 10**18))
def test_the_response_head_is_the_fast_paths(idle_loop, name, ext, size, mtime, inode, ctime,
                                             keep_alive, http10, now):
    target = f"/d/{name}{ext}"
    path = "/root" + target
    expected = (response_block(path, size, mtime, inode, ctime, now)
                + http_date(now).encode() + connection_tail(keep_alive, http10))
    got = idle_loop.response_head(target.encode(), size, mtime, inode, ctime, keep_alive, http10,
                                  now)
    assert got == expected


def test_the_cache_key_hash_is_the_caches():
    for n in (0, 1, 7, 8, 127, 128, 129, 255, 256, 257, 1000, 4200):
        path = "/" + "".join(chr(0x61 + (i * 7) % 26) for i in range(n))
        assert _native_loop.path_hash(os.fsencode(path)) == path_hash(path)


def test_the_reasons_and_the_headers_it_leaves_to_aiohttp_are_the_pythons():
    assert {h.name: h.value for h in HandOff} == _native_loop.REASONS
    assert HandOff.NOT_PLAIN not in TRANSIENT and HandOff.PARTIAL not in TRANSIENT
    assert HandOff.MISS in TRANSIENT and HandOff.RECOVERY in TRANSIENT
    assert HandOff.NO_FILE in TRANSIENT
    assert {n.decode() for n in NOT_PLAIN_HEADERS} >= {"range", "if-none-match", "upgrade"}


# -- through real nodes ------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path, domain):
    root = tmp_path / "site"
    root.mkdir()
    files = make_site(root)
    cache = Cache(root, domain, nodes=1, extra=("--native-hits",))
    yield cache, files
    assert cache.stop() == 0


def native_status(cache: Cache) -> dict:
    return cache.status()["fast_path"]["native"]


def test_a_connection_handed_over_for_a_miss_comes_back_at_its_next_request(node):
    cache, files = node
    with socket.create_connection(("127.0.0.1", cache.port), timeout=10) as s:
        s.sendall(b"GET /f65536.bin HTTP/1.1\r\nHost: x\r\n\r\n")  # a miss: aiohttp fills
        (status, _, body), = read_responses(s, 1)
        assert status == 200 and body == files["/f65536.bin"]
        before = native_status(cache)
        for _ in range(3):
            s.sendall(b"GET /f65536.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            (status, _, body), = read_responses(s, 1)
            assert status == 200 and body == files["/f65536.bin"]
    after = native_status(cache)
    assert before["handed_off_by_reason"]["miss"] >= 1
    assert after["given_back"] == before["given_back"] + 1
    assert after["hits"] == before["hits"] + 3


def test_a_connection_handed_over_for_a_file_it_does_not_serve_comes_back_too(node):
    # a file over max_entry (streamed by aiohttp) and a 404: the next plain hits are the loop's
    cache, files = node
    big = next(n for n, d in files.items() if len(d) > 256 * 1024)
    with socket.create_connection(("127.0.0.1", cache.port), timeout=10) as s:
        for _ in range(2):  # the miss (cached, handed over), then a hit (given back)
            s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_responses(s, 1)[0][0] == 200
        for target, status in ((big, 200), ("/missing.html", 404)):
            before = native_status(cache)
            s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target.encode())
            (got, _, body), = read_responses(s, 1)
            assert got == status and (status != 200 or body == files[big])
            for _ in range(3):
                s.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
                (got, _, body), = read_responses(s, 1)
                assert got == 200 and body == files["/index.html"]
            after = native_status(cache)
            assert after["handed_off_by_reason"]["no_file"] == \
                before["handed_off_by_reason"].get("no_file", 0) + 1
            assert after["given_back"] == before["given_back"] + 1
            assert after["hits"] == before["hits"] + 3


def test_status_and_metrics_report_the_loop(node):
    cache, files = node
    cache.get("/index.html")  # the miss
    for _ in range(3):
        assert cache.get("/index.html")[2] == files["/index.html"]
    for _ in range(4):  # a miss, a copy, a copy sealed, a sealed hit (every node: one here)
        assert cache.get("/f65536.bin")[2] == files["/f65536.bin"]
    assert cache.get("/index.html", method="HEAD")[0] == 200
    doc = cache.status()
    native = doc["fast_path"]["native"]
    assert native["running"] and native["hits"] >= 3 and native["heads"] >= 1
    assert native["handed_off_by_reason"]["not_plain"] >= 1  # the status requests
    assert doc["hits"] >= 3 and doc["fast_path"]["served"] >= 4
    metrics = cache.get("/metrics")[2].decode()
    assert "mcs_webcache_native_served_total{" in metrics
    assert "mcs_webcache_native_handed_off_total{" in metrics
    assert native["sealed_hits"] == 1 and native["sealed_held"] == 1
    assert native["sealed_bytes"] == 65536
    assert re.search(r"^mcs_webcache_native_sealed_hits_total\{[^}]*\} 1$", metrics, re.M)
    assert re.search(r"^mcs_webcache_sealed_copy_bytes\{[^}]*\} 65536$", metrics, re.M)


# A client that pipelines HEADs without end and reads the answers as fast as they come: its
# pump and its reader are threads of their own process.
FLOOD = r"""
import socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
batch = b"HEAD /index.html HTTP/1.1\r\nHost: x\r\n\r\n" * 20000
s = socket.create_connection(("127.0.0.1", port))
end = time.monotonic() + seconds
def pump():
    try:
        while time.monotonic() < end:
            s.sendall(batch)
    except OSError:
        pass
threading.Thread(target=pump, daemon=True).start()
s.settimeout(2)
got = 0
try:
    while time.monotonic() < end:
        data = s.recv(1 << 20)
        if not data:
            break
        got += len(data)
except OSError:
    pass
print(got)
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_a_client_that_pipelines_without_end_cannot_hold_the_loop(node):
    # Each connection gets a turn of at most HL_TURN answers, and no more of its input is read
    # while answers of it wait their turn: the others are served meanwhile (before, one such
    # client held the loop thread: 1.5 s per request of every other client), and its buffered
    # input stays bounded (before, it grew with every wake-up).
    cache, files = node
    for _ in range(2):
        assert cache.get("/index.html")[2] == files["/index.html"]
    (pid,) = cache.pids
    with socket.create_connection(("127.0.0.1", cache.port), timeout=10) as probe:
        probe.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(probe, 1)[0][2] == files["/index.html"]  # the loop holds it now
        heads, rss = native_status(cache)["heads"], rss_kib(pid)
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, str(cache.port), "4"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)
            waits = []
            while flood.poll() is None and len(waits) < 200:
                started = time.monotonic()
                probe.sendall(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
                (status, _, body), = read_responses(probe, 1)
                waits.append(time.monotonic() - started)
                assert status == 200 and body == files["/index.html"]
                time.sleep(0.01)
            grown = rss_kib(pid) - rss
        finally:
            flood.wait(30)
            flooded = int(flood.stdout.read() or 0)
            flood.stdout.close()
    waits.sort()
    assert len(waits) >= 20 and flooded > 1 << 20  # the flood ran beside the probes
    assert native_status(cache)["heads"] - heads > 10_000
    assert waits[len(waits) // 2] < 0.2, waits  # (before: 1.5 s)
    assert grown < 64 << 10, f"the node grew by {grown} KiB"
