# cython: language_level=3, embedsignature=True
"""Native helper of the web cache's fast path: find a file beneath the document root in one
``openat2(2)`` call that the kernel confines to the root.

``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``: every component of the path
must be a real directory entry under the root (``..`` escaping it, absolute paths and any
symlink fail with ``EXDEV``/``ELOOP``), so the path as given *is* the canonical path. The file is
opened with ``O_PATH`` (a FIFO or device is never opened), ``fstat``ed, checked for
readability and closed. Anything the
fast path cannot answer this way goes to the full resolver (webcache/paths.py).
"""

from libc.stdint cimport uint64_t
from libc.errno cimport errno
from posix.stat cimport struct_stat, fstat
from posix.unistd cimport close

cdef extern from *:
    """
    #include <fcntl.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #ifndef SYS_openat2
    #define SYS_openat2 437
    #endif
    #ifndef SYS_faccessat2
    #define SYS_faccessat2 439
    #endif
    typedef struct { unsigned long long flags, mode, resolve; } mcs_open_how;
    #define MCS_RESOLVE_NO_MAGICLINKS 0x02
    #define MCS_RESOLVE_NO_SYMLINKS 0x04
    #define MCS_RESOLVE_BENEATH 0x08
    static int mcs_open_beneath(int dirfd, const char *path) {
        mcs_open_how how = {O_PATH | O_CLOEXEC, 0,
                            MCS_RESOLVE_BENEATH | MCS_RESOLVE_NO_SYMLINKS | MCS_RESOLVE_NO_MAGICLINKS};
        return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    }
    /* access(R_OK) of the file an O_PATH descriptor names (real ids, as access(2)). */
    static int mcs_readable(int fd) {
        return syscall(SYS_faccessat2, fd, "", R_OK, AT_EMPTY_PATH) == 0;
    }
    """
    int mcs_open_beneath(int dirfd, const char *path) nogil
    int mcs_readable(int fd) nogil


def stat_beneath(int dirfd, bytes path):
    """``(mode, uid, size, mtime_ns, inode, dev, nlink, readable)`` of ``path`` beneath
    ``dirfd``, with no symlink on the way; ``readable`` is ``access(R_OK)`` of that file (the
    kernel's answer, ACLs included; False where faccessat2 is missing). Raises ``OSError``
    (``ELOOP``/``EXDEV`` for a symlink or an escape, ``ENOSYS`` on kernels before 5.6)."""
    cdef struct_stat st
    cdef const char *c_path = path
    cdef int fd, rc, err, readable
    if b"\0" in path:
        raise ValueError("embedded NUL in path")
    fd = mcs_open_beneath(dirfd, c_path)
    if fd < 0:
        err = errno
        raise OSError(err, "openat2 beneath the document root")
    rc = fstat(fd, &st)
    err = errno
    readable = rc == 0 and mcs_readable(fd)
    close(fd)
    if rc != 0:
        raise OSError(err, "fstat")
    return (st.st_mode, st.st_uid, st.st_size,
            <uint64_t>st.st_mtim.tv_sec * 1000000000 + <uint64_t>st.st_mtim.tv_nsec,
            st.st_ino, st.st_dev, st.st_nlink, readable != 0)
