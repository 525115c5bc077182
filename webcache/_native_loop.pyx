# cython: language_level=3, embedsignature=True
"""The native hit loop (webcache/native_loop.h) as a Python object: what touches C only.

:class:`HitLoop` owns one loop: :meth:`HitLoop.run` (in a thread of its own: it never takes the
GIL until it returns) serves plain GET/HEAD hits on the connections given with
:meth:`HitLoop.adopt`, and hands every other request back with the bytes read
(:meth:`HitLoop.take`, when :attr:`HitLoop.wake_fd` is readable). The gate and the shared
memory the loop reads are set from the component's recovery (:meth:`HitLoop.open_gate`,
:meth:`HitLoop.close_gate`, :meth:`HitLoop.wait_quiet`). Policy lives in webcache/native.py.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

from mcs._native cimport mcs_init_process

from mcs.errors import ClosedError, LayoutMismatchError, native_error

mcs_init_process()

#: the hand-off reasons, by value (webcache.native.HandOff checks itself against them)
REASONS = {"NOT_PLAIN": HL_NOT_PLAIN, "PARTIAL": HL_PARTIAL, "NO_FILE": HL_NO_FILE,
           "MISS": HL_MISS, "STALE": HL_STALE, "CORRUPT": HL_CORRUPT,
           "RECOVERY": HL_RECOVERY, "BUSY": HL_BUSY, "UNAVAILABLE": HL_UNAVAILABLE,
           "ERROR": HL_ERROR}
#: the counters :meth:`HitLoop.counters` returns, in order
COUNTERS = ("adopted", "served", "hits", "heads", "body_bytes", "closed", "timed_out_header",
            "timed_out_idle", "timed_out_send", "repaired", "handed_off", "sealed_hits",
            "sealed_made", "sealed_dropped", "sealed_failed", "sealed_held", "sealed_bytes")
#: of COUNTERS, the ones that are levels (they go down too), not counts
GAUGES = ("sealed_held", "sealed_bytes")
_COUNTER_IDS = (HC_ADOPTED, HC_SERVED, HC_HITS, HC_HEADS, HC_BODY_BYTES, HC_CLOSED,
                HC_TIMEOUT_HEADER, HC_TIMEOUT_IDLE, HC_TIMEOUT_SEND, HC_REPAIRED, HC_HANDED_OFF,
                HC_SEALED_HITS, HC_SEALED_MADE, HC_SEALED_DROPPED, HC_SEALED_FAILED,
                HC_SEALED_HELD, HC_SEALED_BYTES)
if len(REASONS) != HL_REASONS:
    raise LayoutMismatchError("webcache._native_loop: REASONS does not name every reason")
#: what the layout dict given to HitLoop must name (webcache.native builds it)
LAYOUT_FIELDS = ("slots", "buckets", "buckets_at", "bucket_size", "b_mutex", "b_head", "e_next",
                 "e_hash", "e_size", "e_mtime", "e_inode", "e_dev", "e_sum", "e_access",
                 "e_path_len", "e_ctime", "e_pins", "entry_header", "arena_header", "a_id",
                 "m_ref", "m_arena", "slot_shift", "max_chain", "mf_offset")
MAX_SLOTS = HL_MAX_SLOTS
MAX_SEALED = HL_SEALED_MAX
#: seconds after a failed sealed copy during which the loop tries none
SEAL_RETRY = HL_SEAL_RETRY_NS / 1e9


def path_hash(bytes path):
    """The cache key's hash as the loop computes it (BLAKE2b, 8-byte digest, little-endian):
    the same as webcache.cache.path_hash."""
    return hl_path_hash(<const unsigned char*>PyBytes_AS_STRING(path), PyBytes_GET_SIZE(path))


cdef void _copy_str(char* dst, size_t cap, bytes value, str what) except *:
    if len(value) >= cap or b"\0" in value:
        raise ValueError(f"{what} is too long or holds a NUL")
    memcpy(dst, PyBytes_AS_STRING(value), len(value))
    dst[len(value)] = 0


cdef class HitLoop:
    """One native hit loop; see the module docstring. ``close()`` after :meth:`run` returned."""

    cdef hl_loop* _loop
    cdef hl_config _cfg
    cdef Py_buffer _bufs[66]  # the master area, the root, an arena per slot
    cdef int _nbufs
    cdef bint _running

    def __cinit__(self):
        self._loop = NULL
        self._nbufs = 0
        self._running = False

    def __init__(self, *, int root_fd, bytes prefix, uint64_t max_entry, bint check_readable,
                 double header_timeout, double keepalive_timeout, double send_timeout,
                 double sweep_interval, double lock_wait, dict layout, not_plain,
                 dict types, bytes default_type, bytes node, bytes server, bytes host=b"",
                 uint64_t sealed_budget=0, uint64_t sealed_min=0, uint64_t sealed_count=0,
                 int sealed_dir_fd=-1):
        cdef int err = 0
        cdef int k = 0
        memset(&self._cfg, 0, sizeof(hl_config))
        self._cfg.root_fd = root_fd
        _copy_str(self._cfg.prefix, sizeof(self._cfg.prefix), prefix, "the root path")
        self._cfg.prefix_len = len(prefix)
        self._cfg.max_entry = max_entry
        self._cfg.sealed_budget = sealed_budget
        self._cfg.sealed_min = sealed_min
        if sealed_count > HL_SEALED_MAX:
            raise ValueError(f"{sealed_count} sealed copies: the loop keeps {HL_SEALED_MAX}")
        self._cfg.sealed_count = sealed_count
        self._cfg.sealed_dir_fd = sealed_dir_fd
        self._cfg.check_readable = check_readable
        self._cfg.header_timeout_ns = <int64_t>(header_timeout * 1e9)
        self._cfg.keepalive_timeout_ns = <int64_t>(keepalive_timeout * 1e9)
        self._cfg.send_timeout_ns = <int64_t>(send_timeout * 1e9)
        self._cfg.sweep_ns = <int64_t>(sweep_interval * 1e9)
        self._cfg.lock_wait_ns = <int64_t>(lock_wait * 1e9)
        missing = [f for f in LAYOUT_FIELDS if f not in layout]
        if missing:
            raise ValueError(f"layout lacks {missing}")
        if not 0 < layout["slots"] <= HL_MAX_SLOTS:
            raise ValueError(f"{layout['slots']} member slots: the loop handles {HL_MAX_SLOTS}")
        cdef hl_layout* lay = &self._cfg.lay
        lay.slots = layout["slots"]
        lay.buckets = layout["buckets"]
        lay.buckets_at = layout["buckets_at"]
        lay.bucket_size = layout["bucket_size"]
        lay.b_mutex = layout["b_mutex"]
        lay.b_head = layout["b_head"]
        lay.e_next = layout["e_next"]
        lay.e_hash = layout["e_hash"]
        lay.e_size = layout["e_size"]
        lay.e_mtime = layout["e_mtime"]
        lay.e_inode = layout["e_inode"]
        lay.e_dev = layout["e_dev"]
        lay.e_sum = layout["e_sum"]
        lay.e_access = layout["e_access"]
        lay.e_path_len = layout["e_path_len"]
        lay.e_ctime = layout["e_ctime"]
        lay.e_pins = layout["e_pins"]
        lay.entry_header = layout["entry_header"]
        lay.arena_header = layout["arena_header"]
        lay.a_id = layout["a_id"]
        lay.m_ref = layout["m_ref"]
        lay.m_arena = layout["m_arena"]
        lay.slot_shift = layout["slot_shift"]
        lay.max_chain = layout["max_chain"]
        lay.mf_offset = layout["mf_offset"]
        if lay.buckets == 0:
            raise ValueError("no buckets")
        for name in not_plain:
            if k >= HL_NOT_PLAIN_MAX:
                raise ValueError("too many header names")
            _copy_str(self._cfg.not_plain[k], HL_NAME_MAX + 1, name.lower(), "a header name")
            k += 1
        self._cfg.n_not_plain = k
        _copy_str(self._cfg.node, HL_STR_MAX, node, "the node name")
        _copy_str(self._cfg.server, HL_STR_MAX, server, "the server name")
        _copy_str(self._cfg.host, HL_STR_MAX, host, "the host name")
        _copy_str(self._cfg.default_type, HL_STR_MAX, default_type, "the default type")
        self._loop = hl_new(&self._cfg, &err)
        if self._loop == NULL:
            raise native_error("native hit loop", err)
        for ext, ctype in types.items():
            err = hl_add_type(self._loop, PyBytes_AS_STRING(ext), len(ext),
                              PyBytes_AS_STRING(ctype), len(ctype))
            if err:
                raise native_error("native hit loop: media types", err)
        hl_types_done(self._loop)

    def __dealloc__(self):
        if self._loop != NULL and not self._running:
            hl_free(self._loop)
            self._loop = NULL
        self._release()

    cdef inline hl_loop* _get(self) except NULL:
        if self._loop == NULL:
            raise ClosedError("the native hit loop is closed")
        return self._loop

    def run(self):
        """Serve until :meth:`stop` (blocks; the GIL is released the whole time)."""
        cdef hl_loop* loop = self._get()
        cdef int rc
        if self._running:
            raise RuntimeError("the native hit loop runs already")
        self._running = True
        try:
            with nogil:
                rc = hl_run(loop)
        finally:
            self._running = False
        if rc:
            raise native_error("epoll_wait", rc)

    def stop(self):
        """Ask :meth:`run` to return (any thread)."""
        if self._loop != NULL:
            hl_stop(self._loop)

    def drain(self):
        """The node stops (any thread): every response from now on says ``Connection: close``
        and its connection is closed once it is sent; connections with no request in progress
        are closed at once. The loop serves on until :meth:`stop`."""
        hl_drain(self._get())

    @property
    def draining(self):
        return hl_is_draining(self._get()) != 0

    def close(self):
        """Close every connection the loop holds and free it (after :meth:`run` returned)."""
        if self._running:
            raise RuntimeError("stop the native hit loop and let run() return first")
        if self._loop != NULL:
            hl_free(self._loop)
            self._loop = NULL
        self._release()

    @property
    def wake_fd(self):
        """Readable when hand-offs wait for :meth:`take`."""
        return self._get().py_fd

    @property
    def open(self):
        """Connections the loop holds (queued to it, served by it, or handed off and not taken)."""
        return hl_open(self._get())

    def adopt(self, int fd, bytes data=b""):
        """Give the loop an accepted non-blocking socket; it owns the descriptor from now on.
        ``data``: bytes already received from it (its next request, begun)."""
        cdef int err = hl_adopt(self._get(), fd, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        if err:
            raise native_error("native hit loop: adopt", err)

    def take(self):
        """The connections handed off since the last call: ``[(fd, reason, data, deadline)]``
        (the descriptors are the caller's; ``deadline``: for a first head handed over partial,
        its header deadline on ``time.monotonic()``'s clock, else None)."""
        cdef hl_handoff items[64]
        cdef size_t n, i
        cdef hl_loop* loop = self._get()
        out = []
        while True:
            n = hl_take(loop, items, 64)
            for i in range(n):
                try:
                    data = PyBytes_FromStringAndSize(items[i].data, items[i].len) \
                        if items[i].len else b""
                finally:
                    free(items[i].data)
                out.append((items[i].fd, items[i].reason, data,
                            items[i].deadline / 1e9 if items[i].deadline else None))
            if n < 64:
                return out

    def counters(self):
        """``(COUNTERS values, {reason value: hand-offs})``."""
        cdef hl_loop* loop = self._get()
        values = tuple(hl_counter(loop, i) for i in _COUNTER_IDS)
        return values, {r: hl_counter(loop, HC_REASON0 + r) for r in range(HL_REASONS)}

    # -- the gate ----------------------------------------------------------------------------

    def close_gate(self):
        """The component's gate closed: the loop touches no shared memory from now on (once
        :meth:`wait_quiet` said it is out)."""
        hl_gate_close(self._get())

    def wait_quiet(self, double timeout):
        """True once the loop is out of shared memory (waits up to ``timeout`` seconds)."""
        cdef hl_loop* loop = self._get()
        cdef int64_t ns = <int64_t>(timeout * 1e9)
        cdef int quiet
        with nogil:
            quiet = hl_wait_quiet(loop, ns)
        return quiet != 0

    @property
    def gate_closed(self):
        return hl_gate_is_closed(self._get()) != 0

    def open_gate(self, master, root, dict arenas, int slot, uint64_t tag, uint64_t mark_offset,
                  uint64_t mf_seen):
        """Point the loop at the shared memory of the new stable state (the master area, the
        domain's root, ``{slot: arena}``; each is held mapped until the next call) and open its
        gate. Only while the gate is closed and the loop is out (the component's recovery)."""
        cdef hl_loop* loop = self._get()
        cdef hl_shared sh
        cdef Py_buffer bufs[66]
        cdef int n = 0, i
        if not hl_gate_is_closed(loop) or not hl_wait_quiet(loop, 0):
            raise RuntimeError("open_gate while the native loop may read shared memory")
        if not 0 <= slot < HL_MAX_SLOTS:
            raise ValueError(f"slot {slot} out of range")
        memset(&sh, 0, sizeof(hl_shared))
        try:
            PyObject_GetBuffer(master, &bufs[n], PyBUF_SIMPLE)
            sh.master = <char*>bufs[n].buf
            sh.master_len = bufs[n].len
            n += 1
            PyObject_GetBuffer(root, &bufs[n], PyBUF_SIMPLE)
            sh.root = <char*>bufs[n].buf
            sh.root_len = bufs[n].len
            n += 1
            for s, sec in arenas.items():
                if not 0 <= s < HL_MAX_SLOTS:
                    raise ValueError(f"arena slot {s} out of range")
                if n >= 66:
                    raise ValueError("too many arenas")
                PyObject_GetBuffer(sec, &bufs[n], PyBUF_SIMPLE)
                i = s
                sh.arena[i] = <char*>bufs[n].buf
                sh.arena_len[i] = bufs[n].len
                n += 1
            if (mark_offset % 8 or mark_offset + 16 > <uint64_t>sh.master_len
                    or self._cfg.lay.mf_offset % 8
                    or self._cfg.lay.mf_offset + 8 > <uint64_t>sh.root_len):
                raise ValueError("the journal mark or the failure counter is out of range")
        except BaseException:
            for i in range(n):
                PyBuffer_Release(&bufs[i])
            raise
        sh.slot = slot
        sh.tag = tag
        sh.mark_off = mark_offset
        sh.mf_seen = mf_seen
        hl_set_shared(loop, &sh)
        self._release()
        for i in range(n):
            self._bufs[i] = bufs[i]
        self._nbufs = n
        hl_gate_open(loop)

    cdef void _release(self):
        cdef int i
        for i in range(self._nbufs):
            PyBuffer_Release(&self._bufs[i])
        self._nbufs = 0

    # -- the parts the loop uses, for tests ---------------------------------------------------

    def parse(self, bytes head):
        """What the loop makes of a complete head (without its blank line): ``(method, target,
        http10, keep_alive)`` if it is a plain GET/HEAD, else None."""
        cdef hl_request rq
        if hl_parse(&self._cfg, PyBytes_AS_STRING(head), PyBytes_GET_SIZE(head), &rq) != HL_HIT:
            return None
        return (b"HEAD" if rq.head else b"GET", PyBytes_FromStringAndSize(rq.target, rq.target_len),
                rq.http10 != 0, rq.keep_alive != 0)

    def response_head(self, bytes target, uint64_t size, uint64_t mtime_ns, uint64_t inode,
                      uint64_t ctime_ns, bint keep_alive, bint http10, int64_t now_ns):
        """The status line and headers the loop writes for a file (its Date from ``now_ns``)."""
        cdef hl_request rq
        cdef hl_file f
        cdef hl_loop* loop = self._get()
        cdef size_t n
        rq.head = 0
        rq.http10 = http10
        rq.keep_alive = keep_alive
        rq.target = PyBytes_AS_STRING(target)
        rq.target_len = PyBytes_GET_SIZE(target)
        if self._running:
            raise RuntimeError("response_head is for a loop that does not run")
        f.size = size
        f.mtime_ns = mtime_ns
        f.inode = inode
        f.dev = 0
        f.ctime_ns = ctime_ns
        n = hl_response_head(loop, &rq, &f, now_ns)
        return PyBytes_FromStringAndSize(loop.head, n)


def seal_file(int dir_fd, bytes data):
    """A sealed copy of ``data`` as the loop makes one with a sealed directory: an unnamed
    read-only file in the directory ``dir_fd`` (its descriptor, read-only: the caller closes
    it). OSError if it cannot be made."""
    cdef int fd
    cdef int err
    cdef const char* p = PyBytes_AS_STRING(data)
    cdef size_t n = PyBytes_GET_SIZE(data)
    with nogil:
        fd = hl_seal_file(dir_fd, p, n)
        err = errno
    if fd < 0:
        raise native_error("sealed copy", err)
    return fd


def plain_target(bytes target):
    """Whether the loop would look ``target`` up (before the stat)."""
    return hl_plain_target(PyBytes_AS_STRING(target), PyBytes_GET_SIZE(target)) != 0
