# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False
"""Native core of mcs: sections, robust process-shared mutexes, futex events, atomics.

Only what touches C lives here. Identifier formats, bootstrap policy, membership and recovery
are Python (see mcs/*.py). Every offset coming from Python is bounds- and alignment-checked
before any pointer is formed, so bad input raises instead of crashing the interpreter.
"""

from cpython.buffer cimport (PyBUF_WRITABLE, PyBUF_FORMAT, PyBUF_ND, PyBUF_SIMPLE,
                             PyObject_GetBuffer, PyBuffer_Release)
from cpython.exc cimport PyErr_CheckSignals
from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.string cimport memset

from mcs._libc cimport *
from mcs._native cimport *

import os as _os

from mcs.errors import (
    ClosedError,
    CorruptObjectError,
    InvalidIdentifier,
    LockUsageError,
    NotRecoverableError,
    native_error,
)
from mcs.types import LockStatus, MutexOwner

mcs_init_process()

HEADER_SIZE = MCS_HEADER_SIZE
MUTEX_SIZE = MCS_MUTEX_SLOT_SIZE
EVENT_SIZE = MCS_EVENT_SLOT_SIZE

cdef uint64_t SECTION_MAGIC = int.from_bytes(b"MCSSECT1", "little")
cdef uint32_t SECTION_VERSION = 1
cdef int64_t SLICE_NS = 100_000_000  # blocking waits wake this often to run signal handlers
cdef int64_t MAX_SIZE = 1 << 40

cdef object _OK = LockStatus.OK
cdef object _ABANDONED = LockStatus.ABANDONED
cdef object _TIMEOUT = LockStatus.TIMEOUT

cdef enum:
    KIND_SYSV = 1
    KIND_FILE = 2

# The hold watch: a thread whose wait on a watched mutex timed out (a slice or its deadline)
# calls this with (mutex, holder pid, holder tag, milliseconds held), at most once per period
# per thread, so the layer that knows who the holder is (membership) can judge it: frozen,
# hung, or just busy. Policy lives there.
cdef object _hold_watch = None
cdef int64_t _watch_period_ns = 20_000_000


def set_hold_watch(watch, double period=0.02):
    """Install ``watch(mutex, pid, tag, held_ms)`` (None: remove it), called by threads waiting
    on a watched :class:`GlobalMutex` every ``period`` seconds of their wait."""
    global _hold_watch, _watch_period_ns
    if watch is not None and not callable(watch):
        raise TypeError("the hold watch must be callable or None")
    if not 0.001 <= period <= 10:
        raise ValueError("the watch period must be within 1 ms .. 10 s")
    _watch_period_ns = <int64_t>(period * 1e9)
    _hold_watch = watch


cpdef object call_hold_watch(object mutex, uint32_t pid, uint64_t tag, uint32_t held_ms):
    """Let the hold watch judge a holder (for native lockers outside this module: ``mutex``
    may be None, then the judge cannot re-read it before it acts)."""
    if _hold_watch is not None and pid != 0:
        _hold_watch(mutex, pid, tag, held_ms)


def hold_watch_period_ns():
    """How often (at most) a waiting thread calls the hold watch."""
    return _watch_period_ns


def _held_counters():
    """The process-wide locks-held counters, for the other native modules to share."""
    return PyCapsule_New(mcs_held_counters, "mcs._gsm.held_counters", NULL)


def monotonic_ns():
    """CLOCK_MONOTONIC in nanoseconds: the clock every mcs timeout and heartbeat uses."""
    return mcs_now_ns(CLOCK_MONOTONIC)


def checksum(data):
    """64-bit checksum of a contiguous buffer (bytes, memoryview, a section view): detects a
    corrupted copy (not an adversary). AVX2 when the CPU has it (same value either way): about
    9x faster than ``zlib.crc32`` on 64 KiB. The GIL is released above 256 KiB."""
    cdef Py_buffer buf
    cdef uint64_t h
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        if buf.len >= 262144:
            with nogil:
                h = mcs_checksum64(<const unsigned char *>buf.buf, <size_t>buf.len)
        else:
            h = mcs_checksum64(<const unsigned char *>buf.buf, <size_t>buf.len)
    finally:
        PyBuffer_Release(&buf)
    return h


def copy_checksum(dst, src):
    """Copy ``src`` into the start of the writable buffer ``dst`` and return the checksum of
    the bytes written, in one pass: ``checksum(dst[:len(src)])``, however ``src`` (shared memory)
    changes meanwhile. ValueError if ``dst`` is too small."""
    cdef Py_buffer d
    cdef Py_buffer s
    cdef uint64_t h
    PyObject_GetBuffer(dst, &d, PyBUF_WRITABLE)
    try:
        PyObject_GetBuffer(src, &s, PyBUF_SIMPLE)
        try:
            if d.len < s.len:
                raise ValueError(f"destination holds {d.len} bytes, source has {s.len}")
            if s.len >= 262144:
                with nogil:
                    h = mcs_copy_checksum64(<unsigned char *>d.buf,
                                            <const unsigned char *>s.buf, <size_t>s.len)
            else:
                h = mcs_copy_checksum64(<unsigned char *>d.buf, <const unsigned char *>s.buf,
                                        <size_t>s.len)
        finally:
            PyBuffer_Release(&s)
    finally:
        PyBuffer_Release(&d)
    return h


def _checksum_paths(data):
    """The checksum of ``data`` by each implementation this CPU can run ({"scalar": .., "avx2":
    ..}): they must agree (tests)."""
    cdef Py_buffer buf
    out = {}
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        out["scalar"] = mcs_checksum_impl(NULL, <const unsigned char *>buf.buf, <size_t>buf.len, 0)
        if mcs_use_avx2():
            out["avx2"] = mcs_checksum_impl(NULL, <const unsigned char *>buf.buf,
                                            <size_t>buf.len, 1)
    finally:
        PyBuffer_Release(&buf)
    return out


def shm_new(Py_ssize_t size, key_t key):
    """Create a 0600 SysV segment for ``size`` user bytes under ``key`` (``IPC_EXCL``: a
    FileExistsError if the key is taken); returns its id.

    The key is mcs's mark (see ``mcs.section``): until :meth:`Section._adopt_sysv` marks the
    segment for removal (which makes its key private again), a crash of this process would leave
    it behind, and :func:`shm_remove_orphan` lets the survivors reclaim it by that mark.
    """
    cdef int shmid
    if size <= 0 or size > MAX_SIZE:
        raise ValueError(f"section size must be in 1..{MAX_SIZE}, got {size}")
    if key == IPC_PRIVATE:
        raise ValueError("a section needs its mcs key (IPC_PRIVATE carries no mark)")
    shmid = shmget(key, size + MCS_HEADER_SIZE, IPC_CREAT | IPC_EXCL | 0o600)
    if shmid < 0:
        raise_errno("shmget", errno)
    return shmid


def shm_remove(int shmid):
    """Mark segment ``shmid`` for removal (freed once nobody has it attached); False if it
    was gone already."""
    return shmctl(shmid, IPC_RMID, NULL) == 0


def shm_remove_orphan(int shmid, int creator, long not_before, key_t key):
    """Mark segment ``shmid`` for removal if it is ours, carries ``key`` (the mark mcs gave it),
    was made by process ``creator`` no earlier than ``not_before`` (seconds since the epoch),
    and is not marked yet: a section whose creator died between ``shmget`` and marking it.
    Checked from ``IPC_STAT`` (never from the segment's memory). True if it was removed."""
    cdef shmid_ds ds
    if key == IPC_PRIVATE or shmctl(shmid, IPC_STAT, &ds) < 0:
        return False  # no mark, or gone already
    if (ds.shm_perm.uid != geteuid() or ds.shm_perm.key != key or ds.shm_cpid != creator
            or ds.shm_ctime < not_before or ds.shm_perm.mode & SHM_DEST):
        return False
    return shmctl(shmid, IPC_RMID, NULL) == 0


cdef inline raise_errno(str call, int err):
    raise native_error(call, err)


cdef int64_t _deadline_of(object timeout) except? -2:
    """Absolute monotonic deadline in ns for a timeout in seconds; -1 means none."""
    cdef double t
    if timeout is None:
        return -1
    t = timeout
    if t != t:
        raise ValueError("timeout must be a number, not NaN")
    if t <= 0:
        return 0
    if t > 1e9:
        return -1
    return mcs_now_ns(CLOCK_MONOTONIC) + <int64_t>(t * 1e9)


cdef class Section:
    """A block of global shared memory: a header, then ``size`` bytes of user area.

    Created by :meth:`mcs.Section.create` (a SysV segment reclaimed by the kernel when its last
    holder is gone) or mapped from a file descriptor (the domain bootstrap). Offsets passed to
    every method are relative to the user area.
    """

    cdef char* _base
    cdef char* _data
    cdef size_t _maplen
    cdef readonly Py_ssize_t size
    cdef int _kind
    cdef int _shmid
    cdef bint _closed
    cdef Py_ssize_t _holds
    cdef object __weakref__

    def __cinit__(self):
        self._base = NULL
        self._data = NULL
        self._closed = True
        self._holds = 0
        self._shmid = -1

    def __dealloc__(self):
        if self._base != NULL and self._holds == 0:
            self._unmap()

    cdef void _unmap(self) noexcept:
        if self._kind == KIND_SYSV:
            shmdt(self._base)
        else:
            munmap(self._base, self._maplen)
        self._base = NULL
        self._data = NULL

    cdef inline int _check(self) except -1:
        if self._closed:
            raise ClosedError("section is closed")
        return 0

    cdef inline void _release_hold(self) noexcept:
        self._holds -= 1
        if self._holds == 0 and self._closed and self._base != NULL:
            self._unmap()

    cdef char* _ptr(self, object offset, Py_ssize_t length, Py_ssize_t align) except NULL:
        """Pointer to [offset, offset+length) of the user area, after every check."""
        cdef Py_ssize_t off
        self._check()
        try:
            off = offset
        except OverflowError:
            raise IndexError(f"offset {offset} is outside the section (size {self.size})") from None
        if off < 0:
            raise ValueError(f"offset must be >= 0, got {off}")
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if off > self.size or length > self.size - off:
            raise IndexError(
                f"range [{off}, {off + length}) is outside the section (size {self.size})")
        if align > 1 and off % align:
            raise ValueError(f"offset {off} is not {align}-byte aligned")
        return self._data + off

    cdef _map_header(self, char* base, size_t maplen, int kind):
        self._base = base
        self._maplen = maplen
        self._data = base + MCS_HEADER_SIZE
        self.size = maplen - MCS_HEADER_SIZE
        self._kind = kind
        self._closed = False

    cdef _init_header(self, uint64_t magic, uint64_t nonce, uint32_t version):
        cdef mcs_header* h = <mcs_header*>self._base
        memset(self._base, 0, MCS_HEADER_SIZE)
        h.nonce = nonce
        h.size = self.size
        h.created_ns = mcs_now_ns(CLOCK_REALTIME)
        h.version = version
        h.uid = geteuid()
        mcs_store64(&h.magic, magic)  # published last: a reader seeing the magic sees the rest

    # -- construction -------------------------------------------------------------------

    @classmethod
    def _adopt_sysv(cls, int shmid, Py_ssize_t size, uint64_t nonce):
        """Attach the new segment ``shmid`` (from :func:`shm_new`), mark it for removal and
        write its header; on any error the segment is removed."""
        cdef Section self
        cdef void* addr
        addr = shmat(shmid, NULL, 0)
        if addr == <void*>-1:
            err = errno
            shmctl(shmid, IPC_RMID, NULL)
            raise_errno("shmat", err)
        # Marked for removal at once: the kernel frees it when the last holder detaches or dies.
        if shmctl(shmid, IPC_RMID, NULL) < 0:
            err = errno
            shmdt(addr)
            raise_errno("shmctl(IPC_RMID)", err)
        self = cls.__new__(cls)
        self._map_header(<char*>addr, size + MCS_HEADER_SIZE, KIND_SYSV)
        self._shmid = shmid
        self._init_header(SECTION_MAGIC, nonce, SECTION_VERSION)
        return self

    @classmethod
    def _attach_sysv(cls, int shmid, uint64_t nonce):
        """Attach segment ``shmid`` if its header carries ``nonce``; InvalidIdentifier otherwise."""
        cdef Section self
        cdef shmid_ds ds
        cdef void* addr
        cdef mcs_header* h
        if shmid < 0:
            raise InvalidIdentifier(f"invalid segment id {shmid}")
        if shmctl(shmid, IPC_STAT, &ds) < 0:
            err = errno
            if err in (EINVAL, EIDRM):
                raise InvalidIdentifier(f"segment {shmid} no longer exists (stale identifier)")
            raise_errno("shmctl(IPC_STAT)", err)
        if ds.shm_segsz <= MCS_HEADER_SIZE:
            raise InvalidIdentifier(f"segment {shmid} is not an mcs section (too small)")
        if ds.shm_perm.uid != geteuid():
            raise InvalidIdentifier(f"segment {shmid} belongs to uid {ds.shm_perm.uid}")
        addr = shmat(shmid, NULL, 0)
        if addr == <void*>-1:
            err = errno
            if err in (EINVAL, EIDRM):
                raise InvalidIdentifier(f"segment {shmid} no longer exists (stale identifier)")
            raise_errno("shmat", err)
        h = <mcs_header*>addr
        if (mcs_load64(&h.magic) != SECTION_MAGIC or h.nonce != nonce
                or h.size != ds.shm_segsz - MCS_HEADER_SIZE):
            shmdt(addr)
            raise InvalidIdentifier(
                f"segment {shmid} holds another object (nonce mismatch): stale identifier")
        self = cls.__new__(cls)
        self._map_header(<char*>addr, ds.shm_segsz, KIND_SYSV)
        self._shmid = shmid
        return self

    @classmethod
    def _map_fd(cls, int fd, Py_ssize_t maplen):
        """Map ``maplen`` bytes of a shared file (the bootstrap object); header not checked."""
        cdef Section self
        cdef void* addr
        if maplen <= MCS_HEADER_SIZE:
            raise ValueError("mapping too small for a section header")
        addr = mmap(NULL, maplen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if addr == MAP_FAILED:
            raise_errno("mmap", errno)
        self = cls.__new__(cls)
        self._map_header(<char*>addr, maplen, KIND_FILE)
        return self

    def _header(self):
        """The header fields as a dict (magic, nonce, size, failed, created_ns, version, uid, state)."""
        cdef mcs_header* h
        self._check()
        h = <mcs_header*>self._base
        return {
            "magic": mcs_load64(&h.magic),
            "nonce": h.nonce,
            "size": h.size,
            "failed": mcs_load64(&h.failed),
            "created_ns": h.created_ns,
            "version": h.version,
            "uid": h.uid,
            "state": mcs_load64(&h.state),
        }

    def _init(self, uint64_t magic, uint64_t nonce, uint32_t version):
        """(Re)initialise the header and zero the user area; the magic is stored last."""
        self._check()
        mcs_store64(self._base, 0)
        memset(self._data, 0, self.size)
        self._init_header(magic, nonce, version)

    def _publish(self, uint64_t magic):
        """Store the header magic: the last step of initialising a shared object."""
        self._check()
        mcs_store64(self._base, magic)

    def _set_state(self, uint64_t value):
        self._check()
        mcs_store64(&(<mcs_header*>self._base).state, value)

    # -- public API ---------------------------------------------------------------------

    @property
    def closed(self):
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def shmid(self):
        """The SysV segment id (-1 for a file-backed section)."""
        return self._shmid

    @property
    def nonce(self):
        """The random nonce stored in the header at creation."""
        self._check()
        return (<mcs_header*>self._base).nonce

    @property
    def failed(self):
        """True when the section was marked failed (poisoned)."""
        self._check()
        return mcs_load64(&(<mcs_header*>self._base).failed) != 0

    def _mark_failed(self, bint failed=True):
        self._check()
        mcs_store64(&(<mcs_header*>self._base).failed, 1 if failed else 0)

    def view(self, offset=0, length=None):
        """A writable zero-copy memoryview of ``[offset, offset+length)`` of the user area.

        The mapping stays valid while any view exists, even after :meth:`close`.
        """
        cdef Py_ssize_t off
        cdef Py_ssize_t n
        self._check()
        try:
            off = offset
            n = 0 if length is None else length
        except OverflowError:
            raise IndexError(f"range ({offset}, {length}) is outside the section") from None
        if length is None:
            if off < 0 or off > self.size:
                raise IndexError(f"offset {off} is outside the section (size {self.size})")
            n = self.size - off
        self._ptr(off, n, 1)
        return memoryview(self)[off:off + n]

    def load64(self, offset):
        """Atomically load the unsigned 64-bit word at ``offset`` (8-byte aligned)."""
        return mcs_load64(self._ptr(offset, 8, 8))

    def store64(self, offset, uint64_t value):
        """Atomically store an unsigned 64-bit ``value`` at ``offset``."""
        mcs_store64(self._ptr(offset, 8, 8), value)

    def cas64(self, offset, uint64_t expected, uint64_t new):
        """Compare-and-swap at ``offset``: store ``new`` if the word equals ``expected``."""
        return mcs_cas64(self._ptr(offset, 8, 8), expected, new)

    def add64(self, offset, delta):
        """Atomically add ``delta`` (may be negative; wraps modulo 2**64); return the old value."""
        cdef void* p = self._ptr(offset, 8, 8)
        cdef uint64_t d
        if not (-(1 << 63) <= delta < (1 << 64)):
            raise OverflowError("delta does not fit in 64 bits")
        d = <uint64_t>(delta & 0xFFFFFFFFFFFFFFFF)
        return mcs_add64(p, d)

    def close(self):
        """Detach this process from the section (idempotent).

        The mapping is released once no memoryview, blocking wait or held mutex still uses it.
        The segment itself is freed by the kernel when its last holder is gone.
        """
        if self._closed:
            return
        self._closed = True
        if self._holds == 0 and self._base != NULL:
            self._unmap()

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        self.close()

    def __getbuffer__(self, Py_buffer* buf, int flags):
        self._check()
        buf.buf = self._data
        buf.obj = self
        buf.len = self.size
        buf.readonly = 0
        buf.itemsize = 1
        if flags & PyBUF_FORMAT:
            buf.format = b"B"
        else:
            buf.format = NULL
        buf.ndim = 1
        if flags & PyBUF_ND:
            buf.shape = &self.size
        else:
            buf.shape = NULL
        buf.strides = NULL
        buf.suboffsets = NULL
        buf.internal = NULL
        self._holds += 1

    def __releasebuffer__(self, Py_buffer* buf):
        self._release_hold()

    def __repr__(self):
        state = "closed" if self._closed else f"size={self.size}"
        return f"<{type(self).__name__} shmid={self._shmid} {state}>"


cdef class GlobalMutex:
    """A robust, process-shared pthread mutex stored at an offset of a section.

    Belongs to the *thread* that locked it: only that thread may unlock it. If the holder's
    process dies, the next locker gets :attr:`LockStatus.ABANDONED` and holds the mutex.
    """

    SIZE = MCS_MUTEX_SLOT_SIZE

    cdef Section _section
    cdef char* _slot
    cdef readonly Py_ssize_t offset
    cdef readonly uint64_t tag
    cdef object _previous
    cdef public bint watched
    """Whether waiters on this handle consult the hold watch, and its holds count in the
    process's locks held (False for membership's life mutexes: held for a whole life)."""

    @staticmethod
    cdef GlobalMutex _bind(Section section, offset, uint64_t tag):
        cdef GlobalMutex self = GlobalMutex.__new__(GlobalMutex)
        self._slot = section._ptr(offset, MCS_MUTEX_SLOT_SIZE, 8)
        self._section = section
        self.offset = offset
        self.tag = tag
        self.watched = True
        return self

    @classmethod
    def create(cls, Section section not None, offset, *, tag=0):
        """Initialise a robust process-shared mutex at ``offset`` and return a handle to it.

        Never call this on a mutex that another process may hold.
        """
        cdef GlobalMutex self = GlobalMutex._bind(section, offset, tag)
        cdef int rc = mcs_mutex_init(self._slot)
        if rc != 0:
            raise_errno("pthread_mutex_init", rc)
        return self

    @classmethod
    def open(cls, Section section not None, offset, *, tag=0):
        """A handle to the mutex another process created at ``offset``.

        ``tag`` is stored next to the mutex while this handle holds it (e.g. slot+incarnation),
        and is what a later locker sees in :attr:`previous_owner` if this process dies.
        """
        cdef GlobalMutex self = GlobalMutex._bind(section, offset, tag)
        self._check_magic()
        return self

    cdef inline int _check_magic(self) except -1:
        if self._slot == NULL:
            raise ClosedError("mutex handle is closed")
        if self._section._closed:
            raise ClosedError("section is closed")
        if mcs_mutex_meta_of(self._slot).magic != MCS_MUTEX_MAGIC:
            raise CorruptObjectError(f"no mcs mutex at offset {self.offset} (bad magic)")
        return 0

    cdef inline object _acquired(self, object status):
        mcs_mutex_owned_as(self._slot, self.tag, self.watched)
        self._section._holds += 1
        return status

    cdef object _block(self, int64_t deadline):
        """Blocking part of lock(): GIL released, woken every slice for signals and close()."""
        cdef int rc
        cdef int64_t now, until
        cdef void* slot = self._slot
        cdef mcs_mutex_meta* meta = mcs_mutex_meta_of(slot)
        cdef bint watch = self.watched and _hold_watch is not None
        cdef int64_t slice_ns = _watch_period_ns if watch and _watch_period_ns < SLICE_NS else SLICE_NS
        cdef uint32_t pid
        self._section._holds += 1
        try:
            while True:
                now = mcs_now_ns(CLOCK_MONOTONIC)
                until = now + slice_ns
                if deadline >= 0 and deadline < until:
                    until = deadline
                with nogil:
                    rc = mcs_mutex_lock_until(slot, until)
                if rc != ETIMEDOUT:
                    return rc
                if watch and _hold_watch is not None and mcs_watch_due(_watch_period_ns):
                    pid = meta.pid
                    if pid != 0:
                        _hold_watch(self, pid, meta.tag, mcs_mutex_held_ms(slot))
                if deadline >= 0 and mcs_now_ns(CLOCK_MONOTONIC) >= deadline:
                    return rc
                PyErr_CheckSignals()
                if self._section._closed:
                    raise ClosedError("section was closed while waiting for the mutex")
        finally:
            self._section._release_hold()

    def lock(self, timeout=None):
        """Lock; return ``LockStatus.OK``, ``ABANDONED`` or ``TIMEOUT`` (``timeout`` in seconds).

        Tries first with the GIL held; only a contended lock releases the GIL and blocks.
        Raises :class:`NotRecoverableError` if a previous holder's death was never repaired.
        """
        cdef int rc
        cdef int64_t deadline
        cdef mcs_mutex_meta* meta
        self._check_magic()
        rc = mcs_mutex_trylock(self._slot)
        if rc == 0:
            return self._acquired(_OK)
        if rc == EBUSY:
            deadline = _deadline_of(timeout)
            if deadline == 0:
                return _TIMEOUT
            rc = self._block(deadline)
            if rc == 0:
                return self._acquired(_OK)
            if rc == ETIMEDOUT:
                return _TIMEOUT
        if rc == EOWNERDEAD:
            meta = mcs_mutex_meta_of(self._slot)
            self._previous = MutexOwner(meta.pid, meta.tag)
            mcs_mutex_abandoned(self._slot)
            if meta.pid == <uint32_t>mcs_pid():
                self._section._holds -= 1  # a thread of ours died holding it: drop its hold
            mcs_mutex_inherited(self._slot)
            return self._acquired(_ABANDONED)
        if rc == ENOTRECOVERABLE:
            mcs_mutex_not_recoverable(self._slot)
            raise NotRecoverableError(
                f"mutex at offset {self.offset} is not recoverable: a dead holder's state was "
                "never marked consistent; rebuild the data and re-create the mutex")
        if rc == EDEADLK:
            raise LockUsageError("this thread already holds the mutex")
        raise_errno("pthread_mutex_lock", rc)

    def unlock(self):
        """Unlock. Only the thread that locked the mutex may unlock it."""
        cdef mcs_mutex_meta* meta
        cdef int rc
        if self._slot == NULL or self._section._base == NULL:
            raise ClosedError("mutex handle is closed")
        meta = mcs_mutex_meta_of(self._slot)
        if meta.magic != MCS_MUTEX_MAGIC:
            raise CorruptObjectError(f"no mcs mutex at offset {self.offset} (bad magic)")
        if not mcs_mutex_held_by_me(self._slot):
            raise LockUsageError("unlock of a mutex this thread does not hold")
        rc = mcs_mutex_release(self._slot)
        if rc != 0:
            raise_errno("pthread_mutex_unlock", rc)
        self._section._release_hold()

    def mark_consistent(self):
        """Declare the data repaired after an ``ABANDONED`` lock; call before :meth:`unlock`."""
        cdef int rc
        cdef mcs_mutex_meta* meta
        self._check_magic()
        meta = mcs_mutex_meta_of(self._slot)
        if meta.state != MCS_MUTEX_INCONSISTENT or not mcs_mutex_held_by_me(self._slot):
            raise LockUsageError("mark_consistent: this thread does not hold an abandoned lock")
        rc = mcs_mutex_mark_consistent(self._slot)
        if rc == EINVAL:
            raise LockUsageError("mark_consistent: the mutex is not held in an abandoned state")
        if rc != 0:
            raise_errno("pthread_mutex_consistent", rc)

    @property
    def recoverable(self):
        """False once a dead holder's state was released unrepaired: every lock then raises
        :class:`NotRecoverableError` until the mutex is created again (with nobody using it)."""
        self._check_magic()
        return mcs_mutex_meta_of(self._slot).state != MCS_MUTEX_NOTRECOVERABLE

    @property
    def previous_owner(self):
        """Who held the mutex before the last ``ABANDONED`` lock through this handle, or None."""
        return self._previous

    @property
    def held_for(self):
        """Seconds the current holder has held the mutex (tick resolution), or None if free."""
        cdef mcs_mutex_meta* meta
        self._check_magic()
        meta = mcs_mutex_meta_of(self._slot)
        if not mcs_load32(&meta.taken) & 1:
            return None
        return mcs_mutex_held_ms(self._slot) / 1000.0

    @property
    def owner(self):
        """The current holder as recorded next to the mutex (pid 0: none). Informational."""
        cdef mcs_mutex_meta* meta
        self._check_magic()
        meta = mcs_mutex_meta_of(self._slot)
        return MutexOwner(meta.pid, meta.tag)

    def close(self):
        """Forget the section (idempotent). Does not unlock."""
        self._slot = NULL

    def __enter__(self):
        return self.lock()

    def __exit__(self, *exc):
        self.unlock()

    def __repr__(self):
        return f"<GlobalMutex offset={self.offset} tag={self.tag}>"


cdef class GlobalEvent:
    """A futex-based event across processes: a sequence number that ``set()`` moves on."""

    SIZE = MCS_EVENT_SLOT_SIZE

    cdef Section _section
    cdef mcs_event_slot* _slot
    cdef readonly Py_ssize_t offset

    @staticmethod
    cdef GlobalEvent _bind(Section section, offset):
        cdef GlobalEvent self = GlobalEvent.__new__(GlobalEvent)
        self._slot = <mcs_event_slot*>section._ptr(offset, MCS_EVENT_SLOT_SIZE, 8)
        self._section = section
        self.offset = offset
        return self

    @classmethod
    def create(cls, Section section not None, offset):
        """Initialise an event at ``offset`` (value 0) and return a handle to it."""
        cdef GlobalEvent self = GlobalEvent._bind(section, offset)
        mcs_store32(&self._slot.magic, 0)
        self._slot.seq = 0
        self._slot.waiters = 0
        mcs_store32(&self._slot.magic, MCS_EVENT_MAGIC)
        return self

    @classmethod
    def open(cls, Section section not None, offset):
        """A handle to the event another process created at ``offset``."""
        cdef GlobalEvent self = GlobalEvent._bind(section, offset)
        self._check()
        return self

    cdef inline int _check(self) except -1:
        if self._slot == NULL:
            raise ClosedError("event handle is closed")
        if self._section._closed:
            raise ClosedError("section is closed")
        if mcs_load32(&self._slot.magic) != MCS_EVENT_MAGIC:
            raise CorruptObjectError(f"no mcs event at offset {self.offset} (bad magic)")
        return 0

    @property
    def value(self):
        """The current sequence number (pass it to :meth:`wait`)."""
        self._check()
        return mcs_load32(&self._slot.seq)

    def set(self):
        """Move the sequence on and wake every waiter in every process."""
        self._check()
        mcs_add32(&self._slot.seq, 1)
        if mcs_load32(&self._slot.waiters):
            mcs_futex_wake(&self._slot.seq, 0x7fffffff)

    def wait(self, seen, timeout=None):
        """Wait until the value differs from ``seen``; True if it did, False on timeout."""
        cdef uint32_t expected = seen
        cdef int64_t deadline, now, rel
        cdef long rc
        cdef uint32_t* seq
        self._check()
        seq = &self._slot.seq
        if mcs_load32(seq) != expected:
            return True
        deadline = _deadline_of(timeout)
        if deadline == 0:
            return False
        self._section._holds += 1
        mcs_add32(&self._slot.waiters, 1)
        try:
            while mcs_load32(seq) == expected:
                now = mcs_now_ns(CLOCK_MONOTONIC)
                if deadline >= 0 and now >= deadline:
                    return False
                rel = SLICE_NS if deadline < 0 or deadline - now > SLICE_NS else deadline - now
                with nogil:
                    mcs_futex_wait(seq, expected, rel)
                if mcs_load32(seq) != expected:
                    break
                PyErr_CheckSignals()
                if self._section._closed:
                    raise ClosedError("section was closed while waiting for the event")
            return True
        finally:
            mcs_add32(&self._slot.waiters, <uint32_t>-1)
            self._section._release_hold()

    def close(self):
        """Forget the section (idempotent)."""
        self._slot = NULL

    def __repr__(self):
        return f"<GlobalEvent offset={self.offset}>"


cdef class Heartbeat:
    """A native thread that stores a monotonic stamp at ``stamp_offset`` and bumps the counter at
    ``counter_offset`` every ``interval`` seconds, without ever taking the GIL. With
    ``held_offset``, it also copies the process's locks held (count, and the coarse monotonic
    ns since which it holds any) to ``held_offset`` and ``held_offset + 8`` at every beat."""

    cdef Section _section
    cdef mcs_beat* _beat

    def __cinit__(self, Section section not None, stamp_offset, counter_offset, double interval,
                  held_offset=None):
        cdef void* stamp = section._ptr(stamp_offset, 8, 8)
        cdef void* counter = section._ptr(counter_offset, 8, 8)
        cdef void* held = NULL
        cdef int err = 0
        if held_offset is not None:
            held = section._ptr(held_offset, 16, 8)
        if not (0.0001 <= interval <= 60):
            raise ValueError("heartbeat interval must be within 0.1 ms .. 60 s")
        self._beat = mcs_beat_start(stamp, counter, held, NULL if held == NULL else <char*>held + 8,
                                    <int64_t>(interval * 1e9), &err)
        if self._beat == NULL:
            raise_errno("pthread_create", err)
        self._section = section
        section._holds += 1

    def stop(self):
        """Stop the thread and wait for it (idempotent)."""
        cdef mcs_beat* beat = self._beat
        if beat == NULL:
            return
        self._beat = NULL
        with nogil:
            mcs_beat_stop(beat)
        self._section._release_hold()

    def __dealloc__(self):
        if self._beat != NULL:
            mcs_beat_stop(self._beat)
            self._beat = NULL
            if self._section is not None:
                self._section._release_hold()
