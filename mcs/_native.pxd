# Declarations of mcs/gsm_native.h (layouts, atomics, clock, checksum, bounds check, heartbeat),
# shared by every native module that reads sections: mcs/_gsm.pyx and webcache/_hit.pyx cimport
# them from here instead of re-declaring them. Only declarations live here.
from libc.stdint cimport uint32_t, uint64_t, int64_t

from mcs._libc cimport pthread_mutex_t, timespec


cdef extern from "gsm_native.h" nogil:
    uint64_t mcs_checksum64(const unsigned char *p, size_t n)
    uint64_t mcs_copy_checksum64(unsigned char *dst, const unsigned char *src, size_t n)
    uint64_t mcs_checksum_impl(unsigned char *dst, const unsigned char *src, size_t n, int path)
    int mcs_use_avx2()
    # Section header (first 64 bytes of every mapping).
    ctypedef struct mcs_header:
        uint64_t magic
        uint64_t nonce
        uint64_t size
        uint64_t failed
        uint64_t created_ns
        uint32_t version
        uint32_t uid
        uint64_t state
        uint64_t reserved
    enum:
        MCS_HEADER_SIZE
        MCS_MUTEX_SLOT_SIZE
        MCS_EVENT_SLOT_SIZE
        MCS_MUTEX_MAGIC
        MCS_EVENT_MAGIC
        MCS_MUTEX_CONSISTENT
        MCS_MUTEX_INCONSISTENT
        MCS_MUTEX_NOTRECOVERABLE
    ctypedef struct mcs_mutex_slot:
        pthread_mutex_t mutex
    ctypedef struct mcs_mutex_meta:
        uint32_t magic
        uint32_t pid
        uint32_t taken
        uint32_t state
        uint64_t tag
    ctypedef struct mcs_event_slot:
        uint32_t seq
        uint32_t waiters
        uint32_t magic
        uint32_t spare
    ctypedef struct mcs_beat:
        pass

    mcs_mutex_meta* mcs_mutex_meta_of(void* slot)
    int mcs_pid()
    int mcs_tid()
    void mcs_init_process()
    int64_t mcs_now_ns(int clock)
    void mcs_deadline(int64_t ns, timespec* ts)
    long mcs_futex_wait(uint32_t* addr, uint32_t val, int64_t rel_ns)
    long mcs_futex_wake(uint32_t* addr, int n)

    bint mcs_span_ok(int64_t off, int64_t length, int64_t total, int64_t align)
    uint64_t mcs_load64(void* p)
    void mcs_store64(void* p, uint64_t v)
    bint mcs_cas64(void* p, uint64_t expected, uint64_t desired)
    uint64_t mcs_add64(void* p, uint64_t delta)
    uint32_t mcs_load32(void* p)
    uint32_t mcs_add32(void* p, uint32_t delta)
    void mcs_store32(void* p, uint32_t v)

    # the robust-mutex core (GlobalMutex and the native lockers)
    int mcs_mutex_init(void* slot)
    int mcs_mutex_trylock(void* slot)
    int mcs_mutex_lock_until(void* slot, int64_t until_ns)
    void mcs_mutex_owned(void* slot, uint64_t tag)
    void mcs_mutex_owned_as(void* slot, uint64_t tag, int counted)
    void mcs_mutex_inherited(void* slot)
    uint32_t mcs_mutex_held_ms(void* slot)
    bint mcs_watch_due(int64_t period_ns)
    void* mcs_held_counters
    void mcs_share_held_counters(void* owner)
    void mcs_mutex_abandoned(void* slot)
    void mcs_mutex_not_recoverable(void* slot)
    bint mcs_mutex_held_by_me(void* slot)
    int mcs_mutex_release(void* slot)
    int mcs_mutex_mark_consistent(void* slot)
    int mcs_mutex_lock(void* slot, uint64_t tag, int64_t deadline_ns)

    mcs_beat* mcs_beat_start(void* stamp, void* counter, void* held, void* held_since,
                             int64_t interval_ns, int* err)
    void mcs_beat_stop(mcs_beat* beat)
