# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False
"""Native mechanism of the undo log: before-images in shared memory, one commit store.

A transaction that changes a few words of a section records their before-images first
(``record``), then writes them, then commits with ONE store (``state = COMMITTED``, the point of
no return). If its process dies before that store, whoever inherits one of its mutexes (or the
recovery of the departed member) applies the before-images back, newest first
(``rollback_dead``), under the log's own robust mutex; a roller that dies mid-way is redone by
the next one (applying before-images is idempotent). Layout and rules: COMMON11.md / mcs.undo.

The cdef functions (declared in mcs/_undo.pxd) work on raw pointers for native callers; the
:class:`UndoLog` class is the checked Python face of the same functions.
"""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from mcs._libc cimport EOWNERDEAD, EDEADLK
from cpython.pycapsule cimport PyCapsule_GetPointer
from mcs._native cimport (mcs_share_held_counters, mcs_init_process, mcs_load64, mcs_mutex_init, mcs_mutex_lock,
                          mcs_mutex_mark_consistent,
                          mcs_mutex_meta_of, mcs_mutex_owned, mcs_mutex_release, mcs_span_ok,
                          mcs_store64, MCS_MUTEX_MAGIC, MCS_MUTEX_SLOT_SIZE)

from mcs.errors import ClosedError, CorruptObjectError, LockUsageError, LogFullError, native_error
from mcs.types import LogState, RollbackOutcome

cdef enum:
    _RECORD_HEADER = 16

# This module's copy of the cached pid (gsm_native.h keeps one per extension module), so the
# log mutexes record their real holder (pid, tid), reset in a forked child.
mcs_init_process()
from mcs._gsm import _held_counters
mcs_share_held_counters(PyCapsule_GetPointer(_held_counters(), "mcs._gsm.held_counters"))

LOG_HEADER = UNDO_HEADER
LOG_STATE = UNDO_STATE  # offset of the state word in a log (0: IDLE)
RECORD_HEADER = _RECORD_HEADER
assert MCS_MUTEX_SLOT_SIZE <= UNDO_STATE, "the log mutex must fit in 64 bytes"


cdef extern from *:
    """
    /* A release store and a compiler barrier: what the log's crash-ordering needs (a killed
     * process's earlier stores are all visible; the compiler must not move later data writes
     * before the store that publishes a record). Cheaper than a sequentially consistent store. */
    static inline void mcs_undo_store(void *p, uint64_t v) {
        __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELEASE);
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
    }
    """
    void _rel "mcs_undo_store"(void* p, uint64_t v) nogil


cdef inline uint64_t _pad8(uint64_t n) noexcept nogil:
    return (n + 7) & ~(<uint64_t>7)


cdef inline uint64_t _capacity(char* log) noexcept nogil:
    return (<uint64_t*>(log + UNDO_CAPACITY))[0]


cdef int undo_init(char* log, int64_t size) noexcept nogil:
    """Initialise a log of ``size`` bytes (header included): idle, empty. Returns 0 or errno."""
    cdef int rc
    mcs_store64(log + UNDO_STATE, UNDO_IDLE)
    mcs_store64(log + UNDO_OWNER, 0)
    mcs_store64(log + UNDO_TXID, 0)
    mcs_store64(log + UNDO_USED, 0)
    mcs_store64(log + UNDO_CAPACITY, <uint64_t>(size - UNDO_HEADER))
    return mcs_mutex_init(log + UNDO_MUTEX)


cdef int64_t undo_begin(char* base, int64_t total, char* log, uint64_t owner) noexcept nogil:
    """Start a transaction of ``owner``; returns its txid (>= 1), UNDO_BUSY when this owner's
    previous transaction is still ACTIVE, or a negative lock error. A log left by another
    owner (a dead previous incarnation of the slot) is rolled back first; a committed but
    unfinished one of this owner is finished."""
    cdef uint64_t state = mcs_load64(log + UNDO_STATE)
    cdef uint64_t prev
    cdef int rc
    if state != UNDO_IDLE:
        prev = mcs_load64(log + UNDO_OWNER)
        if prev != owner:
            rc = undo_rollback_dead(base, total, log, prev)
            if rc < 0:
                return rc
        elif state == UNDO_COMMITTED:
            undo_finish(log)
        else:
            return UNDO_BUSY
    _rel(log + UNDO_USED, 0)
    _rel(log + UNDO_OWNER, owner)
    prev = mcs_load64(log + UNDO_TXID) + 1
    _rel(log + UNDO_TXID, prev)
    _rel(log + UNDO_STATE, UNDO_ACTIVE)
    return <int64_t>prev


cdef int undo_record(char* base, int64_t total, char* log, int64_t off,
                     int64_t length) noexcept nogil:
    """Append the before-image of ``[off, off+length)`` of the section. The record is written
    completely before ``used`` is stored to cover it, so a reader of the log never sees half a
    record. UNDO_FULL / UNDO_RANGE leave the log as it was."""
    cdef uint64_t used = mcs_load64(log + UNDO_USED)
    cdef uint64_t need
    cdef char* rec
    if not mcs_span_ok(off, length, total, 1):
        return UNDO_RANGE
    need = _RECORD_HEADER + _pad8(<uint64_t>length)
    if used > _capacity(log) or need > _capacity(log) - used:
        return UNDO_FULL
    rec = log + UNDO_HEADER + used
    (<uint64_t*>rec)[0] = <uint64_t>off
    (<uint64_t*>rec)[1] = <uint64_t>length
    memcpy(rec + _RECORD_HEADER, base + off, <size_t>length)
    _rel(log + UNDO_USED, used + need)
    return UNDO_OK


cdef void undo_commit(char* log) noexcept nogil:
    """The point of no return: one store."""
    _rel(log + UNDO_STATE, UNDO_COMMITTED)


cdef void undo_finish(char* log) noexcept nogil:
    """Back to IDLE (after the transaction's locks are released)."""
    _rel(log + UNDO_STATE, UNDO_IDLE)
    _rel(log + UNDO_USED, 0)


cdef int _apply(char* base, int64_t total, char* log) noexcept nogil:
    """Apply every record back, newest first. Records that do not fit the section (corrupt
    shared memory) are skipped. Returns the number applied."""
    cdef uint64_t used = mcs_load64(log + UNDO_USED)
    cdef uint64_t cap = _capacity(log)
    cdef uint64_t pos = 0, off, length, step
    cdef Py_ssize_t n = 0, i, j, done = 0
    cdef uint64_t* starts
    cdef char* rec
    if used > cap:
        used = cap
    # Forward walk: where each record starts (records have variable sizes).
    while pos + _RECORD_HEADER <= used:
        length = (<uint64_t*>(log + UNDO_HEADER + pos))[1]
        step = _RECORD_HEADER + _pad8(length)
        if length > cap or step > used - pos:
            break
        pos += step
        n += 1
    starts = <uint64_t*>malloc(<size_t>(n + 1) * sizeof(uint64_t))
    pos = 0
    for i in range(n):
        if starts != NULL:
            starts[i] = pos
        pos += _RECORD_HEADER + _pad8((<uint64_t*>(log + UNDO_HEADER + pos))[1])
    i = n - 1
    while i >= 0:
        if starts != NULL:
            pos = starts[i]
        else:  # no memory: find record i again from the start (quadratic, still correct)
            pos = 0
            for j in range(i):
                pos += _RECORD_HEADER + _pad8((<uint64_t*>(log + UNDO_HEADER + pos))[1])
        rec = log + UNDO_HEADER + pos
        off = (<uint64_t*>rec)[0]
        length = (<uint64_t*>rec)[1]
        if off <= <uint64_t>total and mcs_span_ok(<int64_t>off, <int64_t>length, total, 1):
            memcpy(base + off, rec + _RECORD_HEADER, <size_t>length)
            done += 1
        i -= 1
    free(starts)
    return <int>done


cdef void undo_abort(char* base, int64_t total, char* log) noexcept nogil:
    """Undo the caller's own ACTIVE transaction (its locks still held), then IDLE."""
    if mcs_load64(log + UNDO_STATE) == UNDO_ACTIVE:
        _apply(base, total, log)
    undo_finish(log)


cdef int undo_rollback_dead(char* base, int64_t total, char* log, uint64_t owner) noexcept nogil:
    """Recovery of a dead owner's log, under the log's mutex: ACTIVE -> applied back, IDLE;
    COMMITTED -> IDLE; another owner's log is left alone. An ABANDONED log mutex means a roller
    died mid-way: the rollback is simply redone (idempotent). Returns a RollbackOutcome value or
    a negative errno of the lock."""
    cdef void* m = log + UNDO_MUTEX
    cdef int rc = mcs_mutex_lock(m, owner, -1)
    cdef int outcome
    cdef uint64_t state
    if rc != 0 and rc != EOWNERDEAD:
        return -rc
    if mcs_load64(log + UNDO_OWNER) != owner:
        outcome = UNDO_OTHER_OWNER
    else:
        state = mcs_load64(log + UNDO_STATE)
        if state == UNDO_ACTIVE:
            _apply(base, total, log)
            outcome = UNDO_ROLLED_BACK
        elif state == UNDO_COMMITTED:
            outcome = UNDO_WAS_COMMITTED
        else:
            outcome = UNDO_NOTHING
        if state != UNDO_IDLE:
            undo_finish(log)
    if rc == EOWNERDEAD:
        mcs_mutex_mark_consistent(m)
        mcs_mutex_owned(m, owner)
    mcs_mutex_release(m)
    return outcome


cdef class UndoLog:
    """One undo log: ``size`` bytes at ``offset`` of a section (see mcs.undo for the layout).

    Holds a buffer on the section, so the mapping stays valid while the log object lives.
    Offsets given to :meth:`record` are offsets of the same section's user area.
    """

    cdef Py_buffer _buf
    cdef bint _held
    cdef char* _base
    cdef int64_t _total
    cdef char* _log
    cdef readonly Py_ssize_t offset
    cdef readonly Py_ssize_t size
    cdef object _section

    def __cinit__(self):
        self._held = False

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._buf)
            self._held = False

    @staticmethod
    cdef UndoLog _bind(object section, Py_ssize_t offset, Py_ssize_t size):
        cdef UndoLog self = UndoLog.__new__(UndoLog)
        if getattr(section, "closed", False):
            raise ClosedError("section is closed")
        PyObject_GetBuffer(section, &self._buf, PyBUF_WRITABLE)
        self._held = True
        self._base = <char*>self._buf.buf
        self._total = self._buf.len
        if size < UNDO_HEADER + _RECORD_HEADER + 8:
            raise ValueError(f"an undo log needs at least {UNDO_HEADER + _RECORD_HEADER + 8} bytes")
        if not mcs_span_ok(offset, size, self._total, 64):
            raise ValueError(f"log [{offset}, {offset + size}) is outside the section or not "
                             "64-byte aligned")
        self._log = self._base + offset
        self.offset = offset
        self.size = size
        self._section = section
        return self

    @classmethod
    def create(cls, section, Py_ssize_t offset, Py_ssize_t size):
        """Initialise an idle, empty log (never on a log another process may be using)."""
        cdef UndoLog self = UndoLog._bind(section, offset, size)
        cdef int rc = undo_init(self._log, size)
        if rc != 0:
            raise native_error("pthread_mutex_init", rc)
        return self

    @classmethod
    def open(cls, section, Py_ssize_t offset, Py_ssize_t size):
        """A handle to a log another process created; CorruptObjectError if it is not one."""
        cdef UndoLog self = UndoLog._bind(section, offset, size)
        if (mcs_mutex_meta_of(self._log).magic != MCS_MUTEX_MAGIC
                or _capacity(self._log) != <uint64_t>(size - UNDO_HEADER)):
            raise CorruptObjectError(f"no undo log of {size} bytes at offset {offset}")
        return self

    def begin(self, uint64_t owner):
        """Start a transaction of ``owner`` (an owner tag, mcs.undo.owner_tag); returns its txid.
        A previous owner's unfinished log is rolled back (or finished) first."""
        cdef int64_t rc = undo_begin(self._base, self._total, self._log, owner)
        if rc == UNDO_BUSY:
            raise LockUsageError("begin: this owner's transaction on this log is still active")
        if rc < 0:
            raise native_error("undo log mutex", <int>-rc)
        return rc

    def record(self, Py_ssize_t offset, Py_ssize_t length):
        """Save the before-image of ``[offset, offset+length)`` of the section (do it before
        writing there). LogFullError when the log has no room; ValueError out of bounds."""
        cdef int rc
        if mcs_load64(self._log + UNDO_STATE) != UNDO_ACTIVE:
            raise LockUsageError("record: no active transaction on this log")
        rc = undo_record(self._base, self._total, self._log, offset, length)
        if rc == UNDO_RANGE:
            raise ValueError(f"range [{offset}, {offset + length}) is outside the section")
        if rc == UNDO_FULL:
            raise LogFullError(f"undo log at offset {self.offset} is full "
                               f"({self.used} of {_capacity(self._log)} bytes used)")

    def commit(self):
        """The point of no return (one store): from now on the transaction is never undone."""
        if mcs_load64(self._log + UNDO_STATE) != UNDO_ACTIVE:
            raise LockUsageError("commit: no active transaction on this log")
        undo_commit(self._log)

    def finish(self):
        """Back to IDLE, after the transaction's locks were released."""
        undo_finish(self._log)

    def abort(self):
        """Undo this process's own active transaction (apply its records back), then IDLE."""
        undo_abort(self._base, self._total, self._log)

    def rollback_dead(self, uint64_t owner):
        """Recover the log of a dead ``owner``: a RollbackOutcome (see mcs.types)."""
        cdef int rc
        with nogil:
            rc = undo_rollback_dead(self._base, self._total, self._log, owner)
        if rc < 0:
            if -rc == EDEADLK:
                raise LockUsageError("rollback_dead: this thread already holds the log's mutex")
            raise native_error("undo log mutex", -rc)
        return RollbackOutcome(rc)

    @property
    def state(self):
        """The log's state (LogState)."""
        return LogState(mcs_load64(self._log + UNDO_STATE))

    @property
    def owner(self):
        """The owner tag of the last transaction begun here."""
        return mcs_load64(self._log + UNDO_OWNER)

    @property
    def txid(self):
        """How many transactions were begun on this log."""
        return mcs_load64(self._log + UNDO_TXID)

    @property
    def used(self):
        """Bytes of records (0 when idle)."""
        return mcs_load64(self._log + UNDO_USED)

    @property
    def capacity(self):
        """Bytes of record space."""
        return _capacity(self._log)

    def __repr__(self):
        return (f"<UndoLog offset={self.offset} size={self.size} state={self.state.name} "
                f"owner={self.owner:#x} txid={self.txid}>")
