"""The directory for the native hit loop's sealed copies when they are files (``--sealed-dir``).

By default a sealed copy (webcache/native_loop.h) is a memfd, sealed against every change. Its
pages are shared memory pages of 4 KiB, and a socket that is given a 64 KiB body by
``sendfile`` takes sixteen page references, and the reader copies sixteen pieces. With
``--sealed-dir DIR`` a copy is instead an unnamed file in DIR: made with ``O_TMPFILE | O_EXCL``
(it never gets a name, and is gone with its last descriptor), written once, made mode 0400 and
reopened read-only, its writable descriptor closed. On a filesystem whose page cache keeps
files in large folios (ext4 since Linux 6.16, XFS) a 64 KiB body is one folio: one reference,
one piece, which is what nginx's ``sendfile`` of the same file from the page cache gets.

What changes (docs/webcache.md, "Sealed copies in a directory"): the kernel seal becomes
mode 0400, no name and no writable descriptor, which no accidental write gets through, but a
process of the same user that reopens a copy through ``/proc/PID/fd`` and chmods it on purpose
could change it (as it could rewrite a cached entry in the 0600 shared memory together with its
checksum); the copies are as trustworthy as their filesystem, which writes them back to its
disk and reads evicted pages back from it; and a full filesystem makes a copy fail (counted in
``sealed_failed``; the body is copied per response as without sealed copies).
"""

from __future__ import annotations

import os

from mcs.errors import McsError
from webcache import _native_loop

__all__ = ["SealedDirError", "open_sealed_dir", "check_sealed_dir"]


class SealedDirError(McsError, ValueError):
    """A ``--sealed-dir`` in which unnamed read-only copies cannot be made (and why)."""


def open_sealed_dir(path: str | os.PathLike[str]) -> int:
    """An ``O_PATH`` descriptor of the directory ``path`` (the caller closes it), once one
    sealed copy was made there by the loop's own function (webcache/native_loop.h:
    hl_seal_file: made, written, made read-only, reopened read-only) and dropped;
    :class:`SealedDirError` saying why not."""
    name = os.fspath(path)
    try:
        dir_fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SealedDirError(f"--sealed-dir {name}: no such directory") from None
    except NotADirectoryError:
        raise SealedDirError(f"--sealed-dir {name}: not a directory") from None
    except OSError as exc:
        raise SealedDirError(f"--sealed-dir {name}: {exc.strerror}") from None
    try:
        _make_one(dir_fd, name)
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def check_sealed_dir(path: str) -> str:
    """``path`` made absolute, if sealed copies can be made there (:func:`open_sealed_dir`)."""
    os.close(open_sealed_dir(path))
    return os.path.abspath(path)


def _make_one(dir_fd: int, name: str) -> None:
    try:
        os.close(_native_loop.seal_file(dir_fd, b"\0"))  # the loop's own way (hl_seal_file)
    except OSError as exc:  # EOPNOTSUPP: no O_TMPFILE there; EACCES, EROFS, ENOSPC, no /proc
        raise SealedDirError(f"--sealed-dir {name}: cannot make an unnamed read-only file "
                             f"there: {exc.strerror}") from None
