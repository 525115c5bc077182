# C declarations used by mcs/_gsm.pyx: pthread robust mutexes, SysV shm, futex, atomics.
# Only declarations live here; the code that uses them is in _gsm.pyx.
from libc.stdint cimport uint32_t, uint64_t, int64_t


cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(clockid_t, timespec*)
    int CLOCK_MONOTONIC
    int CLOCK_REALTIME


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EBUSY
        EAGAIN
        EINTR
        EINVAL
        EIDRM
        EPERM
        EACCES
        EDEADLK
        ETIMEDOUT
        EOWNERDEAD
        ENOTRECOVERABLE
        ENOMEM
        ENOSPC


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    enum:
        PTHREAD_PROCESS_SHARED
        PTHREAD_MUTEX_ROBUST
        PTHREAD_MUTEX_ERRORCHECK
    int pthread_mutexattr_init(pthread_mutexattr_t*)
    int pthread_mutexattr_destroy(pthread_mutexattr_t*)
    int pthread_mutexattr_setpshared(pthread_mutexattr_t*, int)
    int pthread_mutexattr_setrobust(pthread_mutexattr_t*, int)
    int pthread_mutexattr_settype(pthread_mutexattr_t*, int)
    int pthread_mutex_init(pthread_mutex_t*, const pthread_mutexattr_t*)
    int pthread_mutex_trylock(pthread_mutex_t*)
    int pthread_mutex_clocklock(pthread_mutex_t*, clockid_t, const timespec*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_mutex_consistent(pthread_mutex_t*)


cdef extern from "<sys/shm.h>" nogil:
    ctypedef int key_t
    struct ipc_perm:
        key_t key "__key"
        unsigned int uid
        unsigned int mode
    struct shmid_ds:
        ipc_perm shm_perm
        size_t shm_segsz
        unsigned long shm_nattch
        int shm_cpid
        long shm_ctime
    enum:
        IPC_PRIVATE
        IPC_CREAT
        IPC_EXCL
        IPC_RMID
        IPC_STAT
        SHM_DEST
    int shmget(key_t, size_t, int)
    void* shmat(int, const void*, int)
    int shmdt(const void*)
    int shmctl(int, int, shmid_ds*)


cdef extern from "<sys/mman.h>" nogil:
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED
    void* MAP_FAILED
    void* mmap(void*, size_t, int, int, int, long)
    int munmap(void*, size_t)


cdef extern from "<unistd.h>" nogil:
    unsigned int geteuid()


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
        uint32_t tid
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

    uint64_t mcs_load64(void* p)
    void mcs_store64(void* p, uint64_t v)
    bint mcs_cas64(void* p, uint64_t expected, uint64_t desired)
    uint64_t mcs_add64(void* p, uint64_t delta)
    uint32_t mcs_load32(void* p)
    uint32_t mcs_add32(void* p, uint32_t delta)
    void mcs_store32(void* p, uint32_t v)

    mcs_beat* mcs_beat_start(void* stamp, void* counter, int64_t interval_ns, int* err)
    void mcs_beat_stop(mcs_beat* beat)
