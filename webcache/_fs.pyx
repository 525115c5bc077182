# cython: language_level=3, embedsignature=True
"""Native file-system helpers of the web cache: ``openat2(2)``, which Python's ``os`` lacks.

:func:`openat2` opens a path relative to a directory descriptor with ``RESOLVE_*`` flags: the
kernel itself confines the walk (``RESOLVE_BENEATH``: ``..`` escaping the directory, an absolute
path and an absolute symlink fail with ``EXDEV``; ``RESOLVE_NO_SYMLINKS``: any symlink fails with
``ELOOP``; ``RESOLVE_NO_MAGICLINKS``: ``/proc/PID/fd`` style links fail). The document root
(webcache/paths.py) opens every file it serves this way.

:func:`stat_beneath` is the fast path's whole lookup in one call: ``openat2(O_PATH,
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`` (every component a real
directory entry under the root, so the path as given *is* the canonical path; ``O_PATH`` never
opens a FIFO or device), ``fstat``, ``access(R_OK)`` on that descriptor, ``close``. Anything the
fast path cannot answer this way goes to the full resolver.
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
    static int mcs_openat2(int dirfd, const char *path, unsigned long long flags,
                           unsigned long long resolve) {
        mcs_open_how how = {flags, 0, resolve};
        return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    }
    /* access(R_OK) of the file an O_PATH descriptor names (real ids, as access(2)). */
    static int mcs_readable(int fd) {
        return syscall(SYS_faccessat2, fd, "", R_OK, AT_EMPTY_PATH) == 0;
    }
    """
    int mcs_openat2(int dirfd, const char *path, unsigned long long flags,
                    unsigned long long resolve) nogil
    int mcs_readable(int fd) nogil
    int O_PATH, O_CLOEXEC
    int MCS_RESOLVE_NO_MAGICLINKS, MCS_RESOLVE_NO_SYMLINKS, MCS_RESOLVE_BENEATH

RESOLVE_NO_MAGICLINKS = MCS_RESOLVE_NO_MAGICLINKS
RESOLVE_NO_SYMLINKS = MCS_RESOLVE_NO_SYMLINKS
RESOLVE_BENEATH = MCS_RESOLVE_BENEATH


def openat2(int dirfd, bytes path, int flags, int resolve):
    """A new descriptor (``O_CLOEXEC`` added) for ``path`` relative to ``dirfd``, looked up as
    ``resolve`` (``RESOLVE_*`` flags) says. Raises ``OSError`` (``EXDEV``/``ELOOP`` for what the
    flags refuse, ``ENOSYS`` on kernels before 5.6, ``EPERM`` under some seccomp filters)."""
    cdef const char *c_path = path
    cdef int fd, err
    cdef unsigned long long c_flags = <unsigned long long>(flags | O_CLOEXEC)
    cdef unsigned long long c_resolve = <unsigned long long>resolve
    if b"\0" in path:
        raise ValueError("embedded NUL in path")
    with nogil:  # a lookup may wait for the disk (or the network)
        fd = mcs_openat2(dirfd, c_path, c_flags, c_resolve)
        err = errno
    if fd < 0:
        raise OSError(err, "openat2", path.decode("utf-8", "surrogateescape"))
    return fd


def stat_beneath(int dirfd, bytes path):
    """``(mode, uid, size, mtime_ns, ctime_ns, inode, dev, nlink, readable)`` of ``path``
    beneath ``dirfd``, with no symlink on the way; ``readable`` is ``access(R_OK)`` of that file
    (the kernel's answer, ACLs included; False where faccessat2 is missing). Raises ``OSError``
    (``ELOOP``/``EXDEV`` for a symlink or an escape, ``ENOSYS`` on kernels before 5.6)."""
    cdef struct_stat st
    cdef const char *c_path = path
    cdef int fd, rc, err, readable
    if b"\0" in path:
        raise ValueError("embedded NUL in path")
    fd = mcs_openat2(dirfd, c_path, O_PATH | O_CLOEXEC,
                     MCS_RESOLVE_BENEATH | MCS_RESOLVE_NO_SYMLINKS | MCS_RESOLVE_NO_MAGICLINKS)
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
            <uint64_t>st.st_ctim.tv_sec * 1000000000 + <uint64_t>st.st_ctim.tv_nsec,
            st.st_ino, st.st_dev, st.st_nlink, readable != 0)
