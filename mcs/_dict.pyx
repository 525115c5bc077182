# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False, cdivision=True
"""Native table of :class:`mcs.SharedDict`: a striped chained hash in one section, crash-atomic
through the undo log (mcs/_undo.pxd).

Layout of the area (offsets from the section's user area; all fixed at initialisation)::

    0      header (4096 B): magic, version, geometry, the recorded view (slot -> incarnation)
    4096   undo logs: MAX_MEMBERS x lanes x log_size (mcs.undo layout)
    ...    stripes: stripes x stripe_size, each 64-byte aligned:
             0   robust mutex (64 B)
             64  count u64 | 72 free_head u64 | 80 ephemeral slot mask u64
             128 buckets: u64 entry index + 1 (0: empty)
             ... entries: entry_size each
    entry: 0 next u64 (index + 1) | 8 hash u64 | 16 owner u64 (ephemerals) | 24 flags u32 |
           28 key length u32 | 32 value length u64 | 40 key[max_key] | value[max_value]

Writers on different stripes never share a word (each stripe has its own mutex, count, free
list and entries). A write: begin the lane's undo log, lock the stripe (the owner tag goes into
the mutex), record the before-images of the few words and bytes it changes, write, commit (one
store), unlock, finish. A locker that gets the stripe mutex ABANDONED rolls back the log the
dead holder's tag names, then marks the mutex consistent: a writer killed at any point leaves
the old or the new value, never a mix. Readers take the stripe mutex too.

Every op runs natively (``d[k]`` is this class's mapping slot); the GIL is released only while
waiting for a contended stripe.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLong, PyLong_Check, PyLong_FromLongLong
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from mcs._libc cimport CLOCK_MONOTONIC, EDEADLK, ENOTRECOVERABLE, EOWNERDEAD, ETIMEDOUT
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.exc cimport PyErr_CheckSignals
from mcs._native cimport (mcs_share_held_counters, mcs_watch_due, mcs_mutex_held_ms, mcs_mutex_meta,
                          mcs_init_process, mcs_load64, mcs_mutex_init, mcs_mutex_lock,
                          mcs_mutex_mark_consistent, mcs_mutex_meta_of, mcs_mutex_owned,
                          mcs_mutex_release, mcs_now_ns, mcs_pid, mcs_store64, MCS_MUTEX_SLOT_SIZE)
from mcs._undo cimport (UNDO_ACTIVE, UNDO_BUSY, UNDO_FULL, UNDO_OK, UNDO_STATE, undo_abort,
                        undo_begin, undo_commit, undo_finish, undo_init, undo_record,
                        undo_rollback_dead)

from mcs.errors import (ClosedError, CorruptObjectError, DictFullError, ForkedHandleError,
                        ItemTooLargeError, LockUsageError, LogFullError, NotRecoverableError,
                        TransactionConflict, native_error)

mcs_init_process()
from mcs import _gsm
from mcs._gsm import _held_counters
mcs_share_held_counters(PyCapsule_GetPointer(_held_counters(), "mcs._gsm.held_counters"))

cdef extern from "<unistd.h>" nogil:
    int usleep(unsigned int usec)

cdef extern from *:
    bint __builtin_add_overflow(int64_t a, int64_t b, int64_t* out) nogil

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

cdef extern from *:
    """
    static inline uint64_t mcs_dict_rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
    /* A fast 64-bit hash of a short key (8 bytes a step, then a murmur3 finaliser). */
    static inline uint64_t mcs_dict_hash(const unsigned char *p, size_t n, uint64_t seed) {
        const uint64_t K1 = 0x9E3779B185EBCA87ULL, K2 = 0xC2B2AE3D27D4EB4FULL;
        uint64_t h = seed ^ ((uint64_t)n * K1);
        uint64_t w;
        while (n >= 8) {
            memcpy(&w, p, 8);
            h ^= mcs_dict_rotl(w * K2, 31) * K1;
            h = mcs_dict_rotl(h, 27) * K1 + 0x52dce729;
            p += 8;
            n -= 8;
        }
        if (n) {
            w = 0;
            memcpy(&w, p, n);
            h ^= mcs_dict_rotl(w * K2, 31) * K1;
        }
        h ^= h >> 33; h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53ULL;
        h ^= h >> 33;
        return h;
    }
    """
    uint64_t mcs_dict_hash(const unsigned char* p, size_t n, uint64_t seed) nogil

DICT_MAGIC = int.from_bytes(b"MCSDICT1", "little")
DICT_VERSION = 1
HEADER_SIZE = 4096
MAX_MEMBERS = 64
INC_MASK = (1 << 48) - 1
READ_LANE = 0xFF  # the lane in a reader's mutex tag: a reader has no log to roll back

cdef enum:
    # header words
    H_MAGIC = 0
    H_VERSION = 8
    H_CAPACITY = 16
    H_MAX_KEY = 24
    H_MAX_VALUE = 32
    H_STRIPES = 40
    H_ENTRIES = 48  # per stripe
    H_BUCKETS = 56  # per stripe
    H_ENTRY_SIZE = 64
    H_STRIPE_SIZE = 72
    H_LOG_SIZE = 80
    H_LANES = 88
    H_LOGS_OFF = 96
    H_STRIPES_OFF = 104
    H_TOTAL = 112
    H_VIEW = 512  # 64 x u64: incarnation of each slot in the last recovered view (0: none)
    # stripe fields
    S_MUTEX = 0
    S_COUNT = 64
    S_FREE = 72
    S_EPH = 80
    S_BUCKETS = 128
    # entry fields
    E_NEXT = 0
    E_HASH = 8
    E_OWNER = 16
    E_FLAGS = 24
    E_KLEN = 28
    E_VLEN = 32
    E_KEY = 40
    # flags
    F_INT = 1
    F_STR = 2
    F_EPH = 4

cdef extern from "<signal.h>" nogil:
    int kill(int pid, int sig)
    int SIGKILL

# Crash points for tests (mcs.faults is Python, too slow for this path): arm_crash(name, n)
# makes this process SIGKILL itself the n-th time it reaches the named step of a write.
CRASH_POINTS = {"put.recorded": 1, "put.half": 2, "write.committed": 3, "del.recorded": 4}
cdef int _crash_step = 0
cdef int64_t _crash_left = 0


cdef inline void _crash(int step) noexcept nogil:
    global _crash_left
    if _crash_step == step:
        _crash_left -= 1
        if _crash_left <= 0:
            kill(mcs_pid(), SIGKILL)


def arm_crash(str name, int64_t after=1):
    """Test hook: SIGKILL this process the ``after``-th time it reaches write step ``name``
    (one of CRASH_POINTS); ``arm_crash("", 0)`` disarms."""
    global _crash_step, _crash_left
    _crash_step = CRASH_POINTS[name] if name else 0
    _crash_left = after


cdef uint64_t C_MAGIC = DICT_MAGIC
cdef uint64_t C_INC_MASK = INC_MASK
cdef int64_t TX_WAIT_NS = 20_000_000


cdef inline uint64_t _pad8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


cdef inline uint64_t _pad64(uint64_t n) noexcept nogil:
    return (n + 63) & ~(<uint64_t>63)


cdef inline uint64_t _ld(char* p) noexcept nogil:
    return (<uint64_t*>p)[0]


cdef inline void _st(char* p, uint64_t v) noexcept nogil:
    (<uint64_t*>p)[0] = v


def _pow2_at_least(n):
    p = 1
    while p < n:
        p <<= 1
    return p


def geometry(capacity, max_key, max_value, *, lanes=8, stripes=None, log_size=None):
    """The layout of a table for these limits: a dict of its sizes and offsets, with ``size``,
    the bytes of area it needs. Pure arithmetic (the same in every process)."""
    if capacity < 1 or max_key < 1 or max_value < 1:
        raise ValueError("capacity, max_key and max_value must be >= 1")
    if max_key > 1 << 20 or max_value > 1 << 30:
        raise ValueError("max_key / max_value too large")
    if not 1 <= lanes <= 64:
        raise ValueError("lanes must be in 1..64")
    if stripes is None:
        stripes = min(4096, max(16, _pow2_at_least(capacity // 32)))
    if stripes & (stripes - 1) or stripes < 1:
        raise ValueError("stripes must be a power of two")
    mean = -(-capacity // stripes)
    entries = mean + 4 * int(mean ** 0.5) + 4  # a stripe's share and room for the spread
    buckets = _pow2_at_least(entries)
    entry_size = E_KEY + _pad8(max_key) + _pad8(max(8, max_value))
    stripe_size = _pad64(S_BUCKETS + 8 * buckets) + entries * entry_size
    stripe_size = _pad64(stripe_size)
    if log_size is None:
        log_size = 128 + 16 * (_pad8(max(8, max_value)) + 160)
    log_size = -(-log_size // 4096) * 4096
    logs_off = HEADER_SIZE
    stripes_off = logs_off + MAX_MEMBERS * lanes * log_size
    total = stripes_off + stripes * stripe_size
    return {"capacity": capacity, "max_key": max_key, "max_value": max_value,
            "stripes": stripes, "entries": entries, "buckets": buckets,
            "entry_size": entry_size, "stripe_size": stripe_size, "log_size": log_size,
            "lanes": lanes, "logs_off": logs_off, "stripes_off": stripes_off, "size": total}


def init_table(section, dict geo):
    """Initialise a table in ``section`` (zeroed or not; nobody may be using it): logs idle,
    every entry free, the magic stored last."""
    cdef Py_buffer buf
    cdef char* base
    cdef char* st
    cdef char* ent
    cdef uint64_t s, i, nent, esize, ssize, nb, lanes, lsize, logs_off, stripes_off, eoff
    cdef int rc
    PyObject_GetBuffer(section, &buf, PyBUF_WRITABLE)
    try:
        if buf.len < geo["size"]:
            raise ValueError(f"section holds {buf.len} bytes, the table needs {geo['size']}")
        base = <char*>buf.buf
        mcs_store64(base + H_MAGIC, 0)
        nent = geo["entries"]
        esize = geo["entry_size"]
        ssize = geo["stripe_size"]
        nb = geo["buckets"]
        lanes = geo["lanes"]
        lsize = geo["log_size"]
        logs_off = geo["logs_off"]
        stripes_off = geo["stripes_off"]
        eoff = _pad64(S_BUCKETS + 8 * nb)
        memset(base, 0, HEADER_SIZE)
        for i in range(MAX_MEMBERS * lanes):
            rc = undo_init(base + logs_off + i * lsize, lsize)
            if rc != 0:
                raise native_error("pthread_mutex_init", rc)
        for s in range(<uint64_t>geo["stripes"]):
            st = base + stripes_off + s * ssize
            memset(st, 0, eoff)
            rc = mcs_mutex_init(st + S_MUTEX)
            if rc != 0:
                raise native_error("pthread_mutex_init", rc)
            for i in range(nent):
                ent = st + eoff + i * esize
                _st(ent + E_NEXT, i + 2 if i + 1 < nent else 0)
            _st(st + S_FREE, 1)
        _st(base + H_VERSION, DICT_VERSION)
        _st(base + H_CAPACITY, geo["capacity"])
        _st(base + H_MAX_KEY, geo["max_key"])
        _st(base + H_MAX_VALUE, geo["max_value"])
        _st(base + H_STRIPES, geo["stripes"])
        _st(base + H_ENTRIES, nent)
        _st(base + H_BUCKETS, nb)
        _st(base + H_ENTRY_SIZE, esize)
        _st(base + H_STRIPE_SIZE, ssize)
        _st(base + H_LOG_SIZE, lsize)
        _st(base + H_LANES, lanes)
        _st(base + H_LOGS_OFF, logs_off)
        _st(base + H_STRIPES_OFF, stripes_off)
        _st(base + H_TOTAL, geo["size"])
        mcs_store64(base + H_MAGIC, C_MAGIC)
    finally:
        PyBuffer_Release(&buf)


def table_magic(section):
    """The table's magic word (0: a fresh, never initialised area)."""
    return section.load64(H_MAGIC)


def read_geometry(section):
    """The geometry recorded in an initialised table (CorruptObjectError if there is none)."""
    if section.load64(H_MAGIC) != C_MAGIC or section.load64(H_VERSION) != DICT_VERSION:
        raise CorruptObjectError("no SharedDict table in this area (magic / version)")
    names = [("capacity", H_CAPACITY), ("max_key", H_MAX_KEY), ("max_value", H_MAX_VALUE),
             ("stripes", H_STRIPES), ("entries", H_ENTRIES), ("buckets", H_BUCKETS),
             ("entry_size", H_ENTRY_SIZE), ("stripe_size", H_STRIPE_SIZE),
             ("log_size", H_LOG_SIZE), ("lanes", H_LANES), ("logs_off", H_LOGS_OFF),
             ("stripes_off", H_STRIPES_OFF), ("size", H_TOTAL)]
    return {name: section.load64(off) for name, off in names}


def recorded_view(section):
    """slot -> incarnation of the members of the last view the recovery recorded."""
    out = {}
    for slot in range(MAX_MEMBERS):
        inc = section.load64(H_VIEW + 8 * slot)
        if inc:
            out[slot] = inc
    return out


def record_view(section, members):
    """Record ``{slot: incarnation}`` as the view the recovery has dealt with."""
    for slot in range(MAX_MEMBERS):
        section.store64(H_VIEW + 8 * slot, members.get(slot, 0))


# -- keys and values ------------------------------------------------------------------------


cdef struct Key:
    const char* p
    Py_ssize_t n
    uint32_t flags
    uint64_t h


cdef struct Val:
    const char* p
    Py_ssize_t n
    int64_t i
    uint32_t flags


cdef class Table:
    """The native table: every item operation of SharedDict. Bound to an area by ``_bind``."""

    cdef char* _base
    cdef int64_t _total
    cdef object _view  # a memoryview on the bound section: keeps the mapping alive
    cdef list _old_views
    cdef uint64_t _stripes, _smask, _entries, _buckets, _bmask, _esize, _ssize, _eoff
    cdef uint64_t _max_key, _max_value, _lanes, _lsize, _logs_off, _stripes_off, _voff
    cdef uint64_t _slot, _inc, _ephtag, _readtag
    cdef uint64_t _busy
    cdef int64_t _tx_wait_ns
    cdef int _pid
    cdef readonly uint64_t abandoned_repairs
    cdef readonly uint64_t conflicts

    def __cinit__(self, *args, **kwargs):
        self._base = NULL
        self._old_views = []
        self._pid = 0
        self._busy = 0
        self._tx_wait_ns = TX_WAIT_NS

    # -- binding ------------------------------------------------------------------------

    def _bind(self, section, uint64_t slot, uint64_t incarnation):
        """Bind to the table in ``section`` as member (slot, incarnation); the previous binding's
        mapping is kept alive (an op in flight may still use it) until :meth:`_unbind`."""
        geo = read_geometry(section)
        view = memoryview(section)
        if view.nbytes < geo["size"]:
            raise CorruptObjectError("area smaller than its table")
        if self._view is not None:
            self._old_views.append(self._view)
        cdef const unsigned char[::1] mv = view
        self._view = view
        self._total = view.nbytes
        self._stripes = geo["stripes"]
        self._smask = self._stripes - 1
        self._entries = geo["entries"]
        self._buckets = geo["buckets"]
        self._bmask = self._buckets - 1
        self._esize = geo["entry_size"]
        self._ssize = geo["stripe_size"]
        self._eoff = _pad64(S_BUCKETS + 8 * self._buckets)
        self._max_key = geo["max_key"]
        self._max_value = geo["max_value"]
        self._voff = E_KEY + _pad8(self._max_key)
        self._lanes = geo["lanes"]
        self._lsize = geo["log_size"]
        self._logs_off = geo["logs_off"]
        self._stripes_off = geo["stripes_off"]
        self._slot = slot
        self._inc = incarnation & C_INC_MASK
        self._ephtag = (slot << 56) | self._inc
        self._readtag = (slot << 56) | (<uint64_t>READ_LANE << 48) | self._inc
        self._pid = mcs_pid()
        self._base = <char*>&mv[0]
        # Logs of this slot left by a dead previous incarnation: roll them back before use.
        cdef uint64_t lane, tag, owner
        cdef char* log
        for lane in range(self._lanes):
            log = self._log(slot, lane)
            owner = mcs_load64(log + 72)
            tag = self._tag(lane)
            if mcs_load64(log + UNDO_STATE) != 0 and owner != tag:
                with nogil:
                    undo_rollback_dead(self._base, self._total, log, owner)

    def _unbind(self):
        """Forget the area (stop()): later ops raise ClosedError."""
        self._base = NULL
        self._view = None
        self._old_views = []

    @property
    def bound(self):
        return self._base != NULL

    cdef inline char* _log(self, uint64_t slot, uint64_t lane) noexcept:
        return self._base + self._logs_off + (slot * self._lanes + lane) * self._lsize

    cdef inline uint64_t _tag(self, uint64_t lane) noexcept:
        return (self._slot << 56) | (lane << 48) | self._inc

    cdef inline int _check(self) except -1:
        if self._base == NULL:
            raise ClosedError("SharedDict is not started (or was stopped)")
        if self._pid != mcs_pid():
            raise ForkedHandleError(
                "this SharedDict handle belongs to the parent process; a forked child must "
                "make its own SharedDict")
        return 0

    # -- keys ----------------------------------------------------------------------------

    cdef inline int _key(self, object key, Key* k) except -1:
        if PyUnicode_Check(key):
            k.p = PyUnicode_AsUTF8AndSize(key, &k.n)
            k.flags = F_STR
        elif PyBytes_Check(key):
            k.p = PyBytes_AS_STRING(key)
            k.n = PyBytes_GET_SIZE(key)
            k.flags = 0
        else:
            raise TypeError(f"SharedDict keys are str or bytes, not {type(key).__name__}")
        if <uint64_t>k.n > self._max_key:
            raise ItemTooLargeError(f"key of {k.n} bytes; this dict's max_key is {self._max_key}")
        k.h = mcs_dict_hash(<const unsigned char*>k.p, <size_t>k.n, k.flags)
        return 0

    cdef inline int _val(self, object value, Val* v) except -1:
        if PyBytes_Check(value):
            v.p = PyBytes_AS_STRING(value)
            v.n = PyBytes_GET_SIZE(value)
            v.flags = 0
            if <uint64_t>v.n > self._max_value:
                raise ItemTooLargeError(
                    f"value of {v.n} bytes; this dict's max_value is {self._max_value}")
        elif PyLong_Check(value):
            try:
                v.i = PyLong_AsLongLong(value)
            except OverflowError:
                raise ItemTooLargeError("int values must fit in 64 bits (int64)") from None
            v.p = <const char*>&v.i
            v.n = 8
            v.flags = F_INT
        else:
            raise TypeError(f"SharedDict values are bytes or int, not {type(value).__name__}")
        return 0

    cdef inline char* _stripe(self, uint64_t h) noexcept:
        return self._base + self._stripes_off + (h & self._smask) * self._ssize

    cdef inline char* _entry(self, char* st, uint64_t idx) noexcept:
        return st + self._eoff + (idx - 1) * self._esize

    cdef inline char* _bucket(self, char* st, uint64_t h) noexcept:
        return st + S_BUCKETS + ((h >> 32) & self._bmask) * 8

    cdef char* _find(self, char* st, Key* k, char** link) except? NULL:
        """The entry of ``k`` in stripe ``st`` (lock held), or NULL; ``link`` gets the word that
        points at it (bucket head or previous entry's next)."""
        cdef char* lk = self._bucket(st, k.h)
        cdef uint64_t idx = _ld(lk)
        cdef uint64_t steps = 0
        cdef char* e
        while idx != 0:
            if idx > self._entries or steps > self._entries:
                raise CorruptObjectError("SharedDict chain points outside its stripe")
            e = self._entry(st, idx)
            if (_ld(e + E_HASH) == k.h and (<uint32_t*>(e + E_KLEN))[0] == <uint32_t>k.n
                    and ((<uint32_t*>(e + E_FLAGS))[0] & F_STR) == k.flags
                    and memcmp(e + E_KEY, k.p, <size_t>k.n) == 0):
                if link != NULL:
                    link[0] = lk
                return e
            lk = e + E_NEXT
            idx = _ld(lk)
            steps += 1
        return NULL

    # -- locks and lanes -----------------------------------------------------------------

    cdef int _lock(self, char* st, uint64_t tag, int64_t deadline) except -1:
        """Lock stripe ``st``: 0 held, 1 timed out. An abandoned stripe is repaired first."""
        cdef void* m = st + S_MUTEX
        cdef int rc = mcs_mutex_lock(m, tag, 0)
        cdef int64_t until, period
        cdef mcs_mutex_meta* meta
        if rc == ETIMEDOUT and deadline != 0:
            # Wait in slices: between two, signals run and the hold watch judges the holder
            # (a member that holds a stripe past hold_limit while we wait is evicted as hung).
            period = _gsm.hold_watch_period_ns()
            meta = mcs_mutex_meta_of(m)
            while True:
                until = mcs_now_ns(CLOCK_MONOTONIC) + period
                if deadline > 0 and deadline < until:
                    until = deadline
                with nogil:
                    rc = mcs_mutex_lock(m, tag, until)
                if rc != ETIMEDOUT or (deadline > 0 and mcs_now_ns(CLOCK_MONOTONIC) >= deadline):
                    break
                PyErr_CheckSignals()
                if mcs_watch_due(period):
                    _gsm.call_hold_watch(None, meta.pid, meta.tag, mcs_mutex_held_ms(m))
        if rc == 0:
            return 0
        if rc == ETIMEDOUT:
            return 1
        if rc == EOWNERDEAD:
            self._repair(m, tag)
            return 0
        if rc == ENOTRECOVERABLE:
            raise NotRecoverableError("a SharedDict stripe mutex is not recoverable")
        if rc == EDEADLK:
            raise LockUsageError("this thread already holds this stripe: inside a transaction, "
                                 "use the transaction object (tx[k]), not the dict")
        raise native_error("pthread_mutex_lock", rc)

    cdef int _repair(self, void* m, uint64_t tag) except -1:
        """The stripe mutex was ABANDONED: roll back the log its dead holder's tag names, mark
        it consistent, and record ourselves as holder (only then: a repairer killed here leaves
        the first owner's tag for the next locker)."""
        cdef uint64_t dead = mcs_mutex_meta_of(m).tag
        cdef uint64_t slot = dead >> 56
        cdef uint64_t lane = (dead >> 48) & 0xFF
        cdef char* log
        if slot < MAX_MEMBERS and lane < self._lanes:
            log = self._log(slot, lane)
            with nogil:
                undo_rollback_dead(self._base, self._total, log, dead)
        mcs_mutex_mark_consistent(m)
        mcs_mutex_owned(m, tag)
        self.abandoned_repairs += 1
        return 0

    cdef inline void _unlock(self, char* st) noexcept:
        mcs_mutex_release(st + S_MUTEX)

    cdef int _take_lane(self) except -1:
        cdef uint64_t lane
        while True:
            for lane in range(self._lanes):
                if not (self._busy >> lane) & 1:
                    self._busy |= (<uint64_t>1) << lane
                    return <int>lane
            with nogil:
                usleep(50)

    cdef inline void _give_lane(self, int lane) noexcept:
        self._busy &= ~((<uint64_t>1) << lane)

    cdef int _begin(self, char* log, uint64_t tag) except -1:
        cdef int64_t rc = undo_begin(self._base, self._total, log, tag)
        if rc == UNDO_BUSY:
            raise LockUsageError("undo log busy")
        if rc < 0:
            raise native_error("undo log mutex", <int>-rc)
        return 0

    cdef inline int _rec(self, char* log, char* p, uint64_t n) except -1:
        cdef int rc = undo_record(self._base, self._total, log, p - self._base, <int64_t>n)
        if rc == UNDO_FULL:
            raise LogFullError("the transaction's undo log is full: too many writes in one "
                               "transaction")
        if rc != UNDO_OK:
            raise CorruptObjectError("undo record outside the area")
        return 0

    # -- the operations on a locked stripe (log ACTIVE) -------------------------------------

    cdef int _put_locked(self, char* st, Key* k, Val* v, bint eph, char* log) except -1:
        cdef char* e = self._find(st, k, NULL)
        cdef char* bucket = NULL
        cdef uint64_t idx = 0, oldn, n
        cdef uint32_t flags = k.flags | v.flags | (F_EPH if eph else 0)
        cdef uint64_t bit
        cdef bint new = e == NULL
        if not new:
            oldn = _ld(e + E_VLEN)
            n = <uint64_t>v.n if <uint64_t>v.n < oldn else oldn
            self._rec(log, e + E_OWNER, 24)  # owner, flags, klen, vlen
            if n:
                self._rec(log, e + self._voff, n)
        else:
            idx = _ld(st + S_FREE)
            if idx == 0:
                raise DictFullError("SharedDict is full (no free entry in the key's stripe)")
            if idx > self._entries:
                raise CorruptObjectError("SharedDict free list points outside its stripe")
            e = self._entry(st, idx)
            bucket = self._bucket(st, k.h)
            self._rec(log, st + S_COUNT, 24)  # count, free head, ephemeral mask
            self._rec(log, bucket, 8)
            self._rec(log, e + E_NEXT, 8)
            _st(st + S_FREE, _ld(e + E_NEXT))
            _st(e + E_HASH, k.h)
            (<uint32_t*>(e + E_KLEN))[0] = <uint32_t>k.n
            memcpy(e + E_KEY, k.p, <size_t>k.n)
        _crash(1)
        if eph:
            bit = (<uint64_t>1) << self._slot
            if not _ld(st + S_EPH) & bit:
                if not new:
                    self._rec(log, st + S_EPH, 8)
                _st(st + S_EPH, _ld(st + S_EPH) | bit)
        _st(e + E_OWNER, self._ephtag if eph else 0)
        (<uint32_t*>(e + E_FLAGS))[0] = flags
        _st(e + E_VLEN, <uint64_t>v.n)
        if _crash_step == 2:
            memcpy(e + self._voff, v.p, <size_t>(v.n // 2))
            _crash(2)
        memcpy(e + self._voff, v.p, <size_t>v.n)
        if new:
            # published last: until the bucket points at it, the entry is invisible
            _st(e + E_NEXT, _ld(bucket))
            _st(bucket, idx)
            _st(st + S_COUNT, _ld(st + S_COUNT) + 1)
        return 0

    cdef object _get_locked(self, char* st, Key* k, bint* found):
        cdef char* e = self._find(st, k, NULL)
        cdef int64_t i
        if e == NULL:
            found[0] = False
            return None
        found[0] = True
        if (<uint32_t*>(e + E_FLAGS))[0] & F_INT:
            memcpy(&i, e + self._voff, 8)
            return PyLong_FromLongLong(i)
        n = _ld(e + E_VLEN)
        if n > self._max_value:
            raise CorruptObjectError("SharedDict value length out of range")
        return PyBytes_FromStringAndSize(e + self._voff, <Py_ssize_t>n)

    cdef bint _del_locked(self, char* st, Key* k, char* log) except -1:
        cdef char* link
        cdef char* e = self._find(st, k, &link)
        cdef uint64_t idx
        if e == NULL:
            return False
        idx = <uint64_t>((e - (st + self._eoff)) // self._esize) + 1
        self._rec(log, link, 8)
        self._rec(log, e + E_NEXT, 8)
        self._rec(log, st + S_COUNT, 16)  # count, free head
        _crash(4)
        _st(link, _ld(e + E_NEXT))
        _st(e + E_NEXT, _ld(st + S_FREE))
        _st(st + S_FREE, idx)
        _st(st + S_COUNT, _ld(st + S_COUNT) - 1)
        return True

    cdef int64_t _incr_locked(self, char* st, Key* k, int64_t delta, char* log) except? -1:
        cdef char* e = self._find(st, k, NULL)
        cdef int64_t cur, new
        cdef Val v
        if e == NULL:
            v.i = delta
            v.p = <const char*>&v.i
            v.n = 8
            v.flags = F_INT
            self._put_locked(st, k, &v, False, log)
            return delta
        if not (<uint32_t*>(e + E_FLAGS))[0] & F_INT:
            raise TypeError("incr of a key whose value is bytes, not int")
        memcpy(&cur, e + self._voff, 8)
        if __builtin_add_overflow(cur, delta, &new):
            raise OverflowError("SharedDict.incr: int64 overflow")
        self._rec(log, e + self._voff, 8)
        memcpy(e + self._voff, &new, 8)
        return new

    # -- single operations -------------------------------------------------------------------

    cdef object _write(self, int kind, object key, object value, bint eph, int64_t delta):
        """One crash-atomic write: PUT (kind 0), DEL (1, returns found), INCR (2, returns the
        new value)."""
        cdef Key k
        cdef Val v
        cdef int lane
        cdef uint64_t tag
        cdef char* log
        cdef char* st
        cdef object result = None
        self._check()
        self._key(key, &k)
        if kind == 0:
            self._val(value, &v)
        lane = self._take_lane()
        try:
            tag = self._tag(lane)
            log = self._log(self._slot, lane)
            st = self._stripe(k.h)
            self._begin(log, tag)
            try:
                self._lock(st, tag, -1)
                try:
                    if kind == 0:
                        self._put_locked(st, &k, &v, eph, log)
                    elif kind == 1:
                        result = self._del_locked(st, &k, log)
                    else:
                        result = self._incr_locked(st, &k, delta, log)
                except BaseException:
                    undo_abort(self._base, self._total, log)
                    raise
                else:
                    undo_commit(log)
                    _crash(3)
                finally:
                    self._unlock(st)
            finally:
                undo_finish(log)
        finally:
            self._give_lane(lane)
        return result

    def __setitem__(self, key, value):
        self._write(0, key, value, False, 0)

    def set(self, key, value, *, bint ephemeral=False):
        """``d[key] = value``; ``ephemeral=True``: the item is removed when this process dies
        or leaves (by the recovery). A plain set of an ephemeral key makes it persistent."""
        self._write(0, key, value, ephemeral, 0)

    def __delitem__(self, key):
        if not self._write(1, key, None, False, 0):
            raise KeyError(key)

    def pop(self, key, default=None):
        """Remove ``key``; return True if it was there (``default`` otherwise)."""
        return True if self._write(1, key, None, False, 0) else default

    def incr(self, key, int64_t delta=1):
        """Add ``delta`` to the int at ``key`` (created as ``delta`` if missing), atomically;
        return the new value. TypeError if the value is bytes; OverflowError past int64."""
        return self._write(2, key, None, False, delta)

    cdef object _read(self, object key, bint* found):
        cdef Key k
        cdef char* st
        cdef object r
        self._check()
        self._key(key, &k)
        st = self._stripe(k.h)
        self._lock(st, self._readtag, -1)
        try:
            r = self._get_locked(st, &k, found)
        finally:
            self._unlock(st)
        return r

    def __getitem__(self, key):
        cdef bint found
        r = self._read(key, &found)
        if not found:
            raise KeyError(key)
        return r

    def get(self, key, default=None):
        cdef bint found
        r = self._read(key, &found)
        return r if found else default

    def __contains__(self, key):
        cdef bint found
        self._read(key, &found)
        return found

    def __len__(self):
        cdef uint64_t s, n = 0
        self._check()
        for s in range(self._stripes):
            n += mcs_load64(self._base + self._stripes_off + s * self._ssize + S_COUNT)
        return n

    # -- snapshots ---------------------------------------------------------------------------

    cdef object _key_of(self, char* e):
        cdef uint32_t kl = (<uint32_t*>(e + E_KLEN))[0]
        if kl > self._max_key:
            raise CorruptObjectError("SharedDict key length out of range")
        if (<uint32_t*>(e + E_FLAGS))[0] & F_STR:
            return PyUnicode_DecodeUTF8(e + E_KEY, kl, "surrogatepass")
        return PyBytes_FromStringAndSize(e + E_KEY, kl)

    cdef object _value_of(self, char* e):
        cdef int64_t i
        cdef uint64_t n
        if (<uint32_t*>(e + E_FLAGS))[0] & F_INT:
            memcpy(&i, e + self._voff, 8)
            return PyLong_FromLongLong(i)
        n = _ld(e + E_VLEN)
        if n > self._max_value:
            raise CorruptObjectError("SharedDict value length out of range")
        return PyBytes_FromStringAndSize(e + self._voff, <Py_ssize_t>n)

    def _snapshot(self, int what):
        """Every item at one instant: all stripes locked (ascending, so snapshots never
        deadlock each other), copied, unlocked. what: 0 keys, 1 values, 2 items."""
        cdef uint64_t s, locked = 0, b, idx, steps
        cdef char* st
        cdef char* e
        cdef list out = []
        self._check()
        try:
            for s in range(self._stripes):
                self._lock(self._base + self._stripes_off + s * self._ssize, self._readtag, -1)
                locked += 1
            for s in range(self._stripes):
                st = self._base + self._stripes_off + s * self._ssize
                for b in range(self._buckets):
                    idx = _ld(st + S_BUCKETS + 8 * b)
                    steps = 0
                    while idx != 0:
                        if idx > self._entries or steps > self._entries:
                            raise CorruptObjectError("SharedDict chain points outside its stripe")
                        e = self._entry(st, idx)
                        if what == 0:
                            out.append(self._key_of(e))
                        elif what == 1:
                            out.append(self._value_of(e))
                        else:
                            out.append((self._key_of(e), self._value_of(e)))
                        idx = _ld(e + E_NEXT)
                        steps += 1
        finally:
            for s in range(locked):
                self._unlock(self._base + self._stripes_off + s * self._ssize)
        return out

    def keys(self):
        """The keys, as a list taken at one instant (a consistent snapshot)."""
        return self._snapshot(0)

    def values(self):
        """The values, as a list taken at one instant."""
        return self._snapshot(1)

    def items(self):
        """The (key, value) pairs, as a list taken at one instant."""
        return self._snapshot(2)

    def __iter__(self):
        return iter(self._snapshot(0))

    def transaction(self, wait=None):
        """``with d.transaction() as tx:`` -- atomic over several keys (see Tx). ``wait``: how
        long (seconds) to wait for a stripe while holding others (default: the dict's)."""
        cdef Tx tx
        self._check()
        tx = Tx.__new__(Tx)
        tx.t = self
        tx.wait_ns = self._tx_wait_ns if wait is None else <int64_t>(<double>wait * 1e9)
        return tx

    def _set_tx_wait(self, double wait):
        if not wait > 0:
            raise ValueError("tx_wait must be > 0")
        self._tx_wait_ns = <int64_t>(wait * 1e9)

    # -- recovery ----------------------------------------------------------------------------

    def rollback_member(self, uint64_t slot, uint64_t incarnation):
        """Roll back every lane log of the departed member (slot, incarnation); returns how
        many were ACTIVE (rolled back). Harmless if done twice."""
        cdef uint64_t lane, tag
        cdef int rc, n = 0
        cdef char* log
        self._check()
        if slot >= MAX_MEMBERS:
            raise ValueError("slot out of range")
        for lane in range(self._lanes):
            tag = (slot << 56) | (lane << 48) | (incarnation & C_INC_MASK)
            log = self._log(slot, lane)
            with nogil:
                rc = undo_rollback_dead(self._base, self._total, log, tag)
            if rc == 1:
                n += 1
        return n

    def remove_ephemerals(self, uint64_t slot, uint64_t incarnation):
        """Remove the ephemeral items of the departed member (slot, incarnation); returns how
        many. Visits only the stripes whose ephemeral mask has the slot's bit: the cost follows
        what the member held, not the dict's size. Each removal is its own crash-atomic write."""
        cdef uint64_t owner = (slot << 56) | (incarnation & C_INC_MASK)
        cdef uint64_t bit = (<uint64_t>1) << slot
        cdef uint64_t s, b, idx, steps
        cdef int lane
        cdef uint64_t tag
        cdef char* log
        cdef char* st
        cdef char* link
        cdef char* e
        cdef uint32_t fl
        cdef bint keep
        cdef int removed = 0
        self._check()
        if slot >= MAX_MEMBERS:
            raise ValueError("slot out of range")
        lane = self._take_lane()
        try:
            tag = self._tag(lane)
            log = self._log(self._slot, lane)
            for s in range(self._stripes):
                st = self._base + self._stripes_off + s * self._ssize
                if not mcs_load64(st + S_EPH) & bit:
                    continue
                self._lock(st, tag, -1)
                try:
                    keep = False
                    for b in range(self._buckets):
                        link = st + S_BUCKETS + 8 * b
                        idx = _ld(link)
                        steps = 0
                        while idx != 0:
                            if idx > self._entries or steps > self._entries:
                                raise CorruptObjectError("SharedDict chain out of its stripe")
                            steps += 1
                            e = self._entry(st, idx)
                            fl = (<uint32_t*>(e + E_FLAGS))[0]
                            if fl & F_EPH and _ld(e + E_OWNER) == owner:
                                self._begin(log, tag)
                                try:
                                    self._rec(log, link, 8)
                                    self._rec(log, e + E_NEXT, 8)
                                    self._rec(log, st + S_COUNT, 16)
                                    _st(link, _ld(e + E_NEXT))
                                    _st(e + E_NEXT, _ld(st + S_FREE))
                                    _st(st + S_FREE, idx)
                                    _st(st + S_COUNT, _ld(st + S_COUNT) - 1)
                                except BaseException:
                                    undo_abort(self._base, self._total, log)
                                    raise
                                undo_commit(log)
                                undo_finish(log)
                                removed += 1
                                idx = _ld(link)
                                continue
                            if fl & F_EPH and (_ld(e + E_OWNER) >> 56) == slot:
                                keep = True  # the slot's next incarnation has ephemerals here
                            link = e + E_NEXT
                            idx = _ld(link)
                    if not keep:
                        self._begin(log, tag)
                        self._rec(log, st + S_EPH, 8)
                        _st(st + S_EPH, _ld(st + S_EPH) & ~bit)
                        undo_commit(log)
                        undo_finish(log)
                finally:
                    self._unlock(st)
        finally:
            self._give_lane(lane)
        return removed

    def _geometry(self):
        self._check()
        return {"stripes": self._stripes, "entries": self._entries, "buckets": self._buckets,
                "entry_size": self._esize, "max_key": self._max_key,
                "max_value": self._max_value, "lanes": self._lanes, "log_size": self._lsize}


cdef class Tx:
    """One transaction: ``with d.transaction() as tx:``. Item operations like the dict's;
    every stripe it touches stays locked until the end, so it is serializable; the end commits
    (one store) or, on an exception, undoes everything. A stripe held by another transaction is
    waited for at most ``wait`` seconds while this one holds others (a possible deadlock): then
    this one is rolled back and :class:`TransactionConflict` raised -- run the block again
    (:meth:`SharedDict.transact` does)."""

    cdef Table t
    cdef int lane
    cdef uint64_t tag
    cdef char* log
    cdef int64_t wait_ns
    cdef char* _inline[16]
    cdef char** held  # stripes held, in the order taken
    cdef Py_ssize_t nheld, cap
    cdef bint active
    cdef bint entered

    def __cinit__(self):
        self.held = self._inline
        self.nheld = 0
        self.cap = 16
        self.active = False
        self.entered = False

    def __enter__(self):
        if self.entered:
            raise LockUsageError("a transaction object is used once")
        self.entered = True
        self.t._check()
        self.lane = self.t._take_lane()
        try:
            self.tag = self.t._tag(self.lane)
            self.log = self.t._log(self.t._slot, self.lane)
            self.t._begin(self.log, self.tag)
        except BaseException:
            self.t._give_lane(self.lane)
            raise
        self.active = True
        return self

    cdef void _end(self, bint commit) noexcept:
        cdef Py_ssize_t i
        if not self.active:
            return
        self.active = False
        if commit:
            undo_commit(self.log)
            _crash(3)
        else:
            undo_abort(self.t._base, self.t._total, self.log)
        i = self.nheld - 1
        while i >= 0:
            self.t._unlock(self.held[i])
            i -= 1
        self.nheld = 0
        undo_finish(self.log)
        self.t._give_lane(self.lane)

    def __exit__(self, exc_type, exc, tb):
        self._end(exc_type is None)
        return False

    cdef char* _stripe_for(self, Key* k) except NULL:
        cdef char* st
        cdef int64_t deadline
        cdef Py_ssize_t i
        cdef char** grown
        if not self.active:
            raise ClosedError("the transaction is over")
        self.t._check()
        st = self.t._stripe(k.h)
        for i in range(self.nheld):
            if self.held[i] == st:
                return st
        if self.nheld == self.cap:
            grown = <char**>malloc(<size_t>(2 * self.cap) * sizeof(char*))
            if grown == NULL:
                raise MemoryError()
            memcpy(grown, self.held, <size_t>self.nheld * sizeof(char*))
            if self.held != self._inline:
                free(self.held)
            self.held = grown
            self.cap *= 2
        if self.nheld == 0:
            deadline = -1  # holding nothing: waiting cannot deadlock
        else:
            deadline = mcs_now_ns(CLOCK_MONOTONIC) + self.wait_ns
        if self.t._lock(st, self.tag, deadline) == 1:
            self.t.conflicts += 1
            self._end(False)
            raise TransactionConflict(
                "a stripe this transaction needs is held by another one (possible deadlock): "
                "rolled back; run the block again")
        self.held[self.nheld] = st
        self.nheld += 1
        return st

    cdef inline char* _prep(self, object key, Key* k) except NULL:
        if not self.active:
            raise ClosedError("the transaction is over")
        self.t._key(key, k)
        return self._stripe_for(k)

    def __getitem__(self, key):
        cdef Key k
        cdef bint found
        r = self.t._get_locked(self._prep(key, &k), &k, &found)
        if not found:
            raise KeyError(key)
        return r

    def get(self, key, default=None):
        cdef Key k
        cdef bint found
        r = self.t._get_locked(self._prep(key, &k), &k, &found)
        return r if found else default

    def __contains__(self, key):
        cdef Key k
        cdef bint found
        self.t._get_locked(self._prep(key, &k), &k, &found)
        return found

    cdef int _put(self, object key, object value, bint ephemeral) except -1:
        cdef Key k
        cdef Val v
        cdef char* st = self._prep(key, &k)
        self.t._val(value, &v)
        return self.t._put_locked(st, &k, &v, ephemeral, self.log)

    def set(self, key, value, *, bint ephemeral=False):
        self._put(key, value, ephemeral)

    def __setitem__(self, key, value):
        self._put(key, value, False)

    def __delitem__(self, key):
        cdef Key k
        if not self.t._del_locked(self._prep(key, &k), &k, self.log):
            raise KeyError(key)

    def pop(self, key, default=None):
        cdef Key k
        return True if self.t._del_locked(self._prep(key, &k), &k, self.log) else default

    def incr(self, key, int64_t delta=1):
        cdef Key k
        return self.t._incr_locked(self._prep(key, &k), &k, delta, self.log)

    def __dealloc__(self):
        self._end(False)
        if self.held != self._inline:
            free(self.held)
