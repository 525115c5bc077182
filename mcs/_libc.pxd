# C declarations of the system headers used by mcs/_gsm.pyx: clocks, errno, pthread robust
# mutexes, SysV shm, mmap. Only declarations live here; mcs/_native.pxd declares gsm_native.h.
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
