# The undo log's native mechanism (mcs/_undo.pyx), on raw pointers, for native callers (the
# SharedDict table code in mcs/_dict.pyx): `base`/`total` are a section's user area and its size,
# `log` points at a log region inside it (LOG_HEADER bytes of header, then records). Every record
# offset is bounds-checked against `total`, on the way in and on the way back.
from libc.stdint cimport int64_t, uint64_t

cdef enum:
    UNDO_HEADER = 128
    UNDO_MUTEX = 0
    UNDO_STATE = 64
    UNDO_OWNER = 72
    UNDO_TXID = 80
    UNDO_USED = 88
    UNDO_CAPACITY = 96
    UNDO_IDLE = 0
    UNDO_ACTIVE = 1
    UNDO_COMMITTED = 2
    # undo_record results
    UNDO_OK = 0
    UNDO_FULL = -1
    UNDO_RANGE = -2
    # undo_rollback_dead results (>= 0: a RollbackOutcome), and undo_begin's "busy"
    UNDO_NOTHING = 0
    UNDO_ROLLED_BACK = 1
    UNDO_WAS_COMMITTED = 2
    UNDO_OTHER_OWNER = 3
    UNDO_BUSY = -3

cdef int undo_init(char* log, int64_t size) noexcept nogil
cdef int64_t undo_begin(char* base, int64_t total, char* log, uint64_t owner) noexcept nogil
cdef int undo_record(char* base, int64_t total, char* log, int64_t off,
                     int64_t length) noexcept nogil
cdef void undo_commit(char* log) noexcept nogil
cdef void undo_finish(char* log) noexcept nogil
cdef void undo_abort(char* base, int64_t total, char* log) noexcept nogil
cdef int undo_rollback_dead(char* base, int64_t total, char* log, uint64_t owner) noexcept nogil
