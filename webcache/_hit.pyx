# cython: language_level=3, boundscheck=False, wraparound=False
"""The two steps of a cache hit that run once per request, in C: walking a bucket's chain
(under the bucket mutex, held by the caller) and copying a pinned entry out with its checksum.

Mechanism only, on the layout of ``webcache/layout.py`` (as declared in ``webcache/_layout.pxd``,
checked against it at import by :func:`check_layout`): locking, pinning, recovery and statistics stay in Python (``webcache/cache.py``).
Every offset read from shared memory is bounds- and alignment-checked before use: a corrupt
table yields a reason string (or a :class:`CopyOutcome`), never a stray read.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcmp

from mcs._libc cimport CLOCK_MONOTONIC
from mcs._native cimport mcs_copy_checksum64, mcs_load64, mcs_now_ns, mcs_span_ok, mcs_store64
from webcache._layout cimport *

from enum import IntEnum

from mcs.errors import LayoutMismatchError
from webcache import layout as _python_layout

# The constants of webcache/_layout.pxd, by name, as webcache/layout.py spells them.
LAYOUT = {"E_NEXT": E_NEXT, "E_HASH": E_HASH, "E_SIZE": E_SIZE, "E_MTIME": E_MTIME,
          "E_INODE": E_INODE, "E_DEV": E_DEV, "E_SUM": E_SUM, "E_ACCESS": E_ACCESS,
          "E_PATH_LEN": E_PATH_LEN, "E_CTIME": E_CTIME, "ENTRY_HEADER": ENTRY_HEADER,
          "ARENA_HEADER": ARENA_HEADER, "SLOT_SHIFT": SLOT_SHIFT}


def check_layout(layout):
    """Raise :class:`mcs.errors.LayoutMismatchError`, naming each constant, if ``layout`` (a
    module, webcache.layout) disagrees with the layout this native code was compiled with. A
    real check (not an ``assert``, which ``python -O`` strips), run at import."""
    wrong = [f"{name} is {value} here but {getattr(layout, name, 'missing')} in "
             f"{layout.__name__}" for name, value in LAYOUT.items()
             if getattr(layout, name, None) != value]
    if wrong:
        raise LayoutMismatchError(
            "webcache._hit was built for another web cache layout (" + "; ".join(wrong)
            + "): rebuild it (pip install .) after editing webcache/layout.py and "
            "webcache/_layout.pxd together")


check_layout(_python_layout)


class CopyOutcome(IntEnum):
    """What :func:`copy_out` answers when it copied nothing fit to send."""

    STALE = 0  # the entry describes another version of the file
    OUT_OF_RANGE = 1  # the entry's data would run past its section (corrupt)
    CORRUPT = 2  # the copy's checksum is not the entry's


cdef object _STALE = CopyOutcome.STALE
cdef object _OUT_OF_RANGE = CopyOutcome.OUT_OF_RANGE
cdef object _CORRUPT = CopyOutcome.CORRUPT


def walk(master, section_of, Py_ssize_t head, uint64_t h, bytes path, int slots, int max_chain):
    """Find ``path`` (hash ``h``) in the chain whose head pointer is at offset ``head`` of the
    master area. ``section_of(slot)`` gives a member's contribution. Returns ``(ref, pred, slot,
    section)``, None when absent, or a str saying how the chain is corrupt."""
    cdef Py_buffer buf
    cdef uint64_t ref, pred = 0, off, plen
    cdef long slot
    cdef int steps = 0
    cdef char* p
    cdef Py_ssize_t n = len(path)
    PyObject_GetBuffer(master, &buf, PyBUF_SIMPLE)
    try:
        if not mcs_span_ok(head, WORD, buf.len, WORD):
            raise IndexError(f"chain head offset {head} is outside the master area")
        ref = mcs_load64(<char*>buf.buf + head)
    finally:
        PyBuffer_Release(&buf)
    while ref:
        slot = <long>(ref >> SLOT_SHIFT) - 1
        off = ref & ((<uint64_t>1 << SLOT_SHIFT) - 1)
        if not 0 <= slot < slots:
            return f"ref to slot {slot}"
        sec = section_of(slot)
        PyObject_GetBuffer(sec, &buf, PyBUF_SIMPLE)
        try:
            if off < ARENA_HEADER or not mcs_span_ok(<int64_t>off, ENTRY_HEADER, buf.len, WORD):
                return f"ref offset {off} out of range"
            p = <char*>buf.buf + off
            if mcs_load64(p + E_HASH) == h:
                plen = mcs_load64(p + E_PATH_LEN)
                if (plen == <uint64_t>n and mcs_span_ok(<int64_t>off + ENTRY_HEADER, n, buf.len, 1)
                        and memcmp(p + ENTRY_HEADER, PyBytes_AS_STRING(path), n) == 0):
                    return ref, pred, slot, sec
            pred = ref
            ref = mcs_load64(p + E_NEXT)
        finally:
            PyBuffer_Release(&buf)
        steps += 1
        if steps > max_chain:
            return "chain too long (cycle?)"
    return None


def copy_out(sec, Py_ssize_t off, Py_ssize_t path_len, Py_ssize_t size, uint64_t mtime_ns,
             uint64_t inode, uint64_t dev, uint64_t ctime_ns, into):
    """Copy the data of the (pinned) entry at ``off`` if it describes the file (``size``,
    ``mtime_ns``, ``inode``, ``dev``, ``ctime_ns``), checksumming the copy in the same pass, and
    stamp its last access. Into ``into`` when it is a writable buffer large enough (returns
    True), else into a new bytes (returned). A :class:`CopyOutcome` when nothing fit to send was
    copied."""
    cdef Py_buffer buf
    cdef Py_buffer dst
    cdef char* p
    cdef Py_ssize_t doff
    cdef uint64_t summed
    cdef object out = True
    PyObject_GetBuffer(sec, &buf, PyBUF_SIMPLE)
    try:
        if (off < ARENA_HEADER or not mcs_span_ok(off, ENTRY_HEADER, buf.len, WORD)
                or not mcs_span_ok(off + ENTRY_HEADER, path_len, buf.len, 1)):
            return _OUT_OF_RANGE
        p = <char*>buf.buf + off
        if (mcs_load64(p + E_SIZE) != <uint64_t>size or mcs_load64(p + E_MTIME) != mtime_ns
                or mcs_load64(p + E_INODE) != inode or mcs_load64(p + E_DEV) != dev
                or mcs_load64(p + E_CTIME) != ctime_ns):
            return _STALE
        doff = off + ((ENTRY_HEADER + path_len + WORD - 1) & ~(WORD - 1))
        if not mcs_span_ok(doff, size, buf.len, 1):
            return _OUT_OF_RANGE
        if into is not None:
            PyObject_GetBuffer(into, &dst, PyBUF_WRITABLE)
            try:
                if dst.len >= size:
                    summed = mcs_copy_checksum64(<unsigned char*>dst.buf,
                                                 <unsigned char*>buf.buf + doff, <size_t>size)
                else:
                    out = None
            finally:
                PyBuffer_Release(&dst)
        else:
            out = None
        if out is None:
            out = PyBytes_FromStringAndSize(NULL, size)  # not shared yet: ours to fill
            summed = mcs_copy_checksum64(<unsigned char*>PyBytes_AS_STRING(out),
                                         <unsigned char*>buf.buf + doff, <size_t>size)
        if summed != mcs_load64(p + E_SUM):
            return _CORRUPT
        mcs_store64(p + E_ACCESS, <uint64_t>mcs_now_ns(CLOCK_MONOTONIC))
        return out
    finally:
        PyBuffer_Release(&buf)
