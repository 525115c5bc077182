"""Map a request path to a regular file under a document root, refuse every escape, and hold
the file open: every byte served is read from the descriptor that was confined when opened.

:meth:`DocumentRoot.open` is on the hot path (once per request, hits included): it checks the
path as a string first (no system call), then asks the kernel for the file relative to a
descriptor of the root held open, with ``openat2(O_PATH, RESOLVE_BENEATH |
RESOLVE_NO_MAGICLINKS)``: the walk cannot leave the root (``..`` escaping it and absolute
symlinks fail), ``O_PATH`` never opens the file itself (a FIFO or device is never opened), and
the descriptor names that very inode from then on. ``readlink("/proc/self/fd/N")`` gives its
canonical path, ``fstat`` the stat it is validated with, ``access`` checks readability (four
system calls and a ``close``, as before). The result, :class:`OpenFile`, must be closed (it is a
context manager). Its bytes are read by :meth:`OpenFile.read_span`, through
``open("/proc/self/fd/N")``: the same inode reopened for reading, never a name looked up again.

``RESOLVE_BENEATH`` rather than ``RESOLVE_IN_ROOT``: an escape is refused rather than
reinterpreted. ``IN_ROOT`` would read an absolute symlink ``/etc/passwd`` as ``ROOT/etc/passwd``
and a link to ``ROOT/page.txt`` written with its full path as ``ROOT/ROOT/page.txt``; both
change what a link means. With ``BENEATH`` a relative symlink that stays inside is followed by
the kernel in the same call; a path through an absolute symlink (``EXDEV``) takes a second road:
an unconfined ``O_PATH`` lookup (which opens nothing) says where it leads; if that is inside the
root, that canonical path is opened again confined and with no symlink at all
(``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``), and must be the same device and inode. So absolute
symlinks that lead inside the root are still served, and what is read is always something the
kernel found beneath the root.

Rules (each refusal is :class:`Forbidden`, 403, unless it says :class:`NotFound`, 404):

* The path must be absolute (start with ``/``), at most 4096 bytes, each segment at most 255 bytes
  (UTF-8), with no NUL, no backslash, no control character (C0, DEL, C1) and no lone surrogate;
  the root's path and the request path together must fit in 4095 bytes (the kernel's limit).
* Empty and ``.`` segments are dropped (``//a/./b`` is ``/a/b``); a ``..`` segment is refused, never
  interpreted. Segments starting with a dot (``.git``, ``.env``) are refused unless the root was
  built with ``allow_hidden=True``; ``.well-known`` (RFC 8615) is always allowed.
* Encoded tricks, checked on ``raw_path`` (the undecoded request target) when the caller gives it:
  an encoded slash or backslash (``%2F``, ``%5C``) is refused (as Apache's default does: it is never
  needed and decoders disagree about it), and every raw segment is decoded *once* and checked by
  the rules above, so ``%2e%2e``, ``.%2E`` or ``%00`` are refused whatever the decoder did with
  them. A double-encoded ``%252e%252e`` decodes once to the literal name ``%2e%2e``: the kernel
  never decodes, so that is a plain file name that cannot escape (usually a 404).
* The file is found by the kernel, symlinks followed; its canonical path must lie inside the root
  (a symlink anywhere on the way may point inside the root, never out of it). Missing, or a
  non-directory in the middle (``/file.txt/x``), or a trailing slash on a file → NotFound.
* A directory serves its ``index.html`` (NotFound when absent), with or without a trailing slash.
* Only regular files are served: a FIFO, socket or device is Forbidden; so is a file the server
  may not read (checked on every request, so a cached copy of a file that became unreadable is
  not served).

Files that change under a lookup: a file replaced (written elsewhere, then renamed over, as
deploy tools do) or unlinked between two steps (``nlink == 0``, a ``(deleted)`` name, another
inode at the canonical path) is looked up again, up to :data:`RESOLVE_ATTEMPTS` times; a path
that keeps existing is never answered 403 or 404 because it was being replaced: a file found
unlinked is a replace in progress, and a file really deleted is NotFound at the next look (the
kernel says ENOENT). What exhausts the attempts raises its last reason (:class:`FileChanged`,
503, when the file kept changing).

Without ``/proc`` (``_proc_fd`` false) the canonical path comes from ``os.path.realpath`` and a
read reopens that path confined, with no symlink, ``O_NONBLOCK`` (a FIFO swapped in is opened but
never waited on, never read) and the device and inode compared. Without ``openat2`` (Linux <
5.6, some seccomp filters) a confined open walks the canonical path one component at a time from
the root's descriptor with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import Callable, NamedTuple, Self
from urllib.parse import unquote

from mcs.errors import McsError

from webcache._fs import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, openat2

__all__ = ["PathError", "Forbidden", "NotFound", "FileChanged", "ResolvedFile", "OpenFile",
           "DocumentRoot", "MAX_PATH_BYTES", "MAX_SEGMENT_BYTES", "INDEX", "RESOLVE_ATTEMPTS"]

MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255
INDEX = "index.html"
RESOLVE_ATTEMPTS = 8  # lookups of one request while its file is being replaced
# UTF-8 takes at most 4 bytes per character: a string of at most limit // 4 characters is within
# a byte limit without being encoded (the hot path skips the encode).
_UTF8_MAX = 4

# C0 controls, DEL, C1 controls, backslash and lone surrogates (what a decoded URL never holds).
_BAD_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\\\\\ud800-\udfff]")
_ALLOWED_HIDDEN = frozenset({".well-known"})
_O_PATH = os.O_PATH
_FOLLOW_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
_CANONICAL_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_READ_FLAGS = os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC
_DELETED = " (deleted)"  # what /proc appends to the name of an unlinked file
# errno of a confined open of a canonical path that an unconfined lookup has just found: the
# path changed in between (a symlink or another inode put there), not a refusal.
_CHANGED_ERRNOS = frozenset({errno.ELOOP, errno.ENOENT, errno.ENOTDIR, errno.EXDEV, errno.EAGAIN})


class PathError(McsError):
    """A request path that cannot be served; ``reason`` says why (safe to show to the client)."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Forbidden(PathError):
    """The path is refused (HTTP 403): an escape attempt, a bad character, a non-regular file."""

    status = 403


class NotFound(PathError):
    """No file at that path (HTTP 404)."""

    status = 404


class FileChanged(PathError):
    """The file changed while it was being looked up or read (HTTP 503, retry): the lookup
    starts again, a bounded number of times, before this reaches a client."""

    status = 503


class ResolvedFile(NamedTuple):
    """A regular file under the root: its canonical path and the stat fields that validate it
    (a cached copy is served only while all five still match). A named tuple: built once per
    request on the hot path."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    dev: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, path: str, st: os.stat_result) -> ResolvedFile:
        """Build from a canonical ``path`` and its ``os.stat`` result."""
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns)


class _Raced(Exception):
    """The file changed between two steps of one lookup: look again (``error`` if that was the
    last attempt)."""

    def __init__(self, error: PathError) -> None:
        super().__init__(error.reason)
        self.error = error


class _Closing:
    """Holds a descriptor, :attr:`fd`: closed by :meth:`close` (idempotent), at the end of a
    ``with``, or when collected."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self, _close: Callable[[int], None] = os.close) -> None:
        """Close the descriptor (idempotent; safe while the interpreter shuts down)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenFile(_Closing):
    """A regular file found under the root, held open: :attr:`file` is its canonical path and
    the stat it was validated with, :attr:`fd` an ``O_PATH`` descriptor of exactly that inode,
    opened confined to the root. Close it (a context manager); one left open is closed when it
    is collected, so a read job given to a worker thread can own a :meth:`dup` safely."""

    __slots__ = ("file", "_root")

    def __init__(self, file: ResolvedFile, fd: int, root: DocumentRoot) -> None:
        super().__init__(fd)
        self.file = file
        self._root = root

    def __repr__(self) -> str:
        return f"OpenFile({self.file.path!r}, fd={self.fd})"

    def dup(self) -> OpenFile:
        """Another OpenFile of the same inode, with its own descriptor: for a job that may
        outlive the request (a worker thread still reading when the client goes away)."""
        return OpenFile(self.file, os.dup(self.fd), self._root)

    def _reader(self) -> int:
        """A descriptor open for reading on this very inode (the caller closes it)."""
        root = self._root
        f = self.file
        try:
            if root._proc_fd:
                fd = os.open(f"/proc/self/fd/{self.fd}", _READ_FLAGS)
            else:
                fd = root._open_confined(f.path[len(root._prefix):], _READ_FLAGS | os.O_NONBLOCK)
        except PermissionError:
            raise Forbidden("permission denied") from None
        except OSError as exc:
            if exc.errno in _CHANGED_ERRNOS:
                raise FileChanged("file changed; retry") from None
            raise
        st = os.fstat(fd)
        if st.st_ino != f.inode or st.st_dev != f.dev:  # only without /proc: another file there
            os.close(fd)
            raise FileChanged("file changed; retry")
        return fd

    def unchanged(self, st: os.stat_result) -> bool:
        """Whether ``st`` (of this inode) still describes the bytes validated: same size,
        mtime and ctime. An unlinked file (``nlink == 0``, replaced by a rename) keeps its bytes
        though the unlink moved its ctime: it is still the old version, whole."""
        f = self.file
        return (st.st_size == f.size and st.st_mtime_ns == f.mtime_ns
                and (st.st_ctime_ns == f.ctime_ns or st.st_nlink == 0))

    def read_span(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of the file as validated, read with ``pread`` through this
        inode reopened for reading. Raises :class:`FileChanged` when the file changed (a short
        read, or a stat after the read that no longer matches): never a mix of two versions
        that the file's status could tell apart. Blocking: run it off the event loop."""
        fd = self._reader()
        try:
            parts = []
            pos = start
            while pos < stop:
                chunk = os.pread(fd, stop - pos, pos)
                if not chunk:
                    raise FileChanged("file changed while being read; retry")
                parts.append(chunk)
                pos += len(chunk)
            if not self.unchanged(os.fstat(fd)):
                raise FileChanged("file changed while being read; retry")
        finally:
            os.close(fd)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_all(self) -> bytes:
        """The whole file as validated (see :meth:`read_span`)."""
        return self.read_span(0, self.file.size)


def _bad_char_reason(ch: str) -> str:
    if ch == "\x00":
        return "NUL byte in path"
    if ch == "\\":
        return "backslash in path"
    if "\ud800" <= ch <= "\udfff":
        return "invalid character in path"
    return "control character in path"


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))  # surrogates are refused later


class DocumentRoot(_Closing):
    """A directory whose regular files may be served; see the module docstring for the rules.
    Holds a descriptor of the directory: :meth:`close` it (or use it as a context manager); the
    root cannot be used afterwards."""

    __slots__ = ("root", "allow_hidden", "_prefix", "_proc_fd", "_openat2")

    def __init__(self, root: str | os.PathLike[str], *, allow_hidden: bool = False) -> None:
        """``root`` must be an existing directory; it is made canonical (``os.path.realpath``).
        :attr:`fd` is an ``O_PATH`` descriptor of it, held until :meth:`close`."""
        super().__init__(-1)
        given = os.fspath(root)
        real = os.path.realpath(given)
        if not os.path.exists(real):
            raise ValueError(f"document root {given!r} does not exist")
        if not os.path.isdir(real):
            raise ValueError(f"document root {given!r} is not a directory")
        self.root: str = real
        self.allow_hidden = allow_hidden
        self._prefix = real if real.endswith("/") else real + "/"
        self.fd = os.open(real, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._openat2 = self._openat2_works()
        self._proc_fd = self._proc_fd_works()

    def __repr__(self) -> str:
        return f"DocumentRoot({self.root!r})"

    def _openat2_works(self) -> bool:
        """Whether the kernel has ``openat2`` (Linux >= 5.6, not refused by a seccomp filter)."""
        try:
            os.close(openat2(self.fd, b".", _O_PATH, _CANONICAL_BENEATH))
            return True
        except OSError:
            return False

    def _proc_fd_works(self) -> bool:
        """Whether /proc/self/fd names our descriptors by their canonical path (a /proc of our
        own PID namespace): then it also reopens them for reading."""
        try:
            return os.readlink(f"/proc/self/fd/{self.fd}") == self.root
        except OSError:
            return False

    # -- the string checks (no system call) ------------------------------------------------

    def _check_segment(self, seg: str) -> None:
        """Refuse ``..``, hidden names and overlong segments (``seg`` is non-empty, not ``.``)."""
        if seg[0] == ".":
            if seg == "..":
                raise Forbidden("'..' in path")
            if not self.allow_hidden and seg not in _ALLOWED_HIDDEN:
                raise Forbidden("hidden file")
        if len(seg) > MAX_SEGMENT_BYTES // _UTF8_MAX and _utf8_len(seg) > MAX_SEGMENT_BYTES:
            raise Forbidden("path too long")

    def _check_raw(self, raw_path: str) -> None:
        """Refuse encoded slashes, and raw segments that decode (once) to a refused segment."""
        raw = raw_path.partition("?")[0]
        low = raw.lower()
        if "%2f" in low or "%5c" in low:
            raise Forbidden("encoded slash in path")
        for seg in raw.split("/"):
            if "%" not in seg:
                continue  # undecoded segments are checked in the decoded path
            dec = unquote(seg)
            bad = _BAD_CHAR.search(dec)
            if bad is not None:
                raise Forbidden(_bad_char_reason(bad.group()))
            if dec and dec != ".":
                self._check_segment(dec)

    def relative(self, url_path: str, raw_path: str | None = None) -> str:
        """The checked path relative to the root (``""`` for the root; a trailing ``/`` kept)."""
        if not url_path.startswith("/"):
            raise Forbidden("not an absolute path")
        if len(url_path) > MAX_PATH_BYTES // _UTF8_MAX and _utf8_len(url_path) > MAX_PATH_BYTES:
            raise Forbidden("path too long")
        bad = _BAD_CHAR.search(url_path)
        if bad is not None:
            raise Forbidden(_bad_char_reason(bad.group()))
        if raw_path is not None and "%" in raw_path:
            self._check_raw(raw_path)
        if ("//" not in url_path and "/." not in url_path
                and len(url_path) <= MAX_SEGMENT_BYTES // _UTF8_MAX):
            return url_path[1:]  # the common case: nothing to drop, nothing to refuse
        segs = [s for s in url_path.split("/") if s and s != "."]
        for seg in segs:
            self._check_segment(seg)
        rel = "/".join(segs)
        if rel and (url_path.endswith("/") or url_path.endswith("/.")):
            rel += "/"
        return rel

    # -- the file system -------------------------------------------------------------------

    def open(self, url_path: str, raw_path: str | None = None) -> OpenFile:
        """The regular file that ``url_path`` (decoded, starting with ``/``) names under the
        root, held open: close the result (or use it in a ``with``).

        ``raw_path`` is the undecoded request target (a query string is ignored); give it to
        refuse encoded tricks whatever the URL decoder did. Raises :class:`Forbidden`,
        :class:`NotFound` or :class:`FileChanged`; other ``OSError`` (EIO...) propagate.
        """
        rel = self.relative(url_path, raw_path)
        if len(rel) + len(self._prefix) >= MAX_PATH_BYTES // _UTF8_MAX \
                and _utf8_len(self._prefix + rel) >= MAX_PATH_BYTES:
            raise Forbidden("path too long")  # root + path: over the kernel's PATH_MAX
        error: PathError = FileChanged("file changed during lookup; retry")
        for _ in range(RESOLVE_ATTEMPTS):
            try:
                return self._open(rel)
            except _Raced as raced:
                error = raced.error
            except OSError as exc:
                if exc.errno != errno.EAGAIN:  # openat2: a rename raced the lookup
                    raise _map_os_error(exc) from None
                error = FileChanged("file changed during lookup; retry")
        raise error

    def resolve(self, url_path: str, raw_path: str | None = None) -> ResolvedFile:
        """What :meth:`open` finds, without keeping it open (its stat and canonical path)."""
        with self.open(url_path, raw_path) as opened:
            return opened.file

    def _inside(self, real: str) -> bool:
        return real.startswith(self._prefix) or real == self.root

    def _rel(self, real: str) -> str:
        """The path relative to the root of a canonical path inside it."""
        return real[len(self._prefix):]

    def _open(self, rel: str) -> OpenFile:
        """One attempt: the confined descriptor, its directory index, the checks."""
        fd, real = self._find(rel)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                os.close(fd)
                fd = -1
                index = self._rel(real)
                fd, real = self._find(f"{index}/{INDEX}" if index else INDEX)
                st = os.fstat(fd)
            elif rel.endswith("/"):
                raise NotFound("no such file")
            if not stat.S_ISREG(st.st_mode):
                raise Forbidden("not a regular file")
            if st.st_nlink == 0:  # unlinked (or replaced) since the open: look again
                raise _Raced(FileChanged("file replaced during lookup; retry"))
            if not os.access(f"/proc/self/fd/{fd}" if self._proc_fd else real, os.R_OK):
                raise Forbidden("permission denied")
            opened = OpenFile(ResolvedFile.from_stat(real, st), fd, self)
            fd = -1
            return opened
        finally:
            if fd >= 0:
                os.close(fd)

    def _find(self, rel: str) -> tuple[int, str]:
        """An ``O_PATH`` descriptor of what ``rel`` names, opened confined to the root, and its
        canonical path (a directory too: the caller decides)."""
        if not (self._proc_fd and self._openat2):
            return self._find_canonical(rel)
        try:
            fd = openat2(self.fd, os.fsencode(rel) or b".", _O_PATH, _FOLLOW_BENEATH)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return self._find_canonical(rel)  # an absolute symlink on the way, or an escape
        try:
            real = self._name(fd)
            if not self._inside(real):  # moved out of the root since the open
                raise _Raced(Forbidden("path leads outside the document root"))
        except BaseException:
            os.close(fd)
            raise
        return fd, real

    def _find_canonical(self, rel: str) -> tuple[int, str]:
        """Learn where ``rel`` leads (symlinks followed, even out of the root and back), then
        open that canonical path confined and with no symlink at all: with /proc, it must be
        the inode the first lookup found."""
        full = self._prefix + rel
        ident = None
        if self._proc_fd:
            probe = os.open(full, _O_PATH | os.O_CLOEXEC)  # O_PATH: nothing is opened
            try:
                real = self._name(probe)
                st = os.fstat(probe)
                ident = (st.st_dev, st.st_ino)
            finally:
                os.close(probe)
        else:
            try:
                real = os.path.realpath(full)
            except OSError as exc:  # a symlink it saw was something else when it read it
                if exc.errno != errno.EINVAL:
                    raise
                raise _Raced(FileChanged("file changed during lookup; retry")) from None
        if not self._inside(real):
            raise Forbidden("path leads outside the document root")
        try:
            fd = self._open_confined(self._rel(real), _O_PATH)
        except OSError as exc:
            if ident is None or exc.errno not in _CHANGED_ERRNOS:
                raise
            raise _Raced(FileChanged("file changed during lookup; retry")) from None
        if ident is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ident:
                os.close(fd)
                raise _Raced(FileChanged("file changed during lookup; retry"))
        return fd, real

    def _name(self, fd: int) -> str:
        """The canonical path of ``fd`` (from /proc). An unlinked file's name ends in
        ``(deleted)``: raced, unless a file is really called that."""
        real = os.readlink(f"/proc/self/fd/{fd}")
        if real.endswith(_DELETED):
            st = os.fstat(fd)
            try:
                named = os.stat(real, follow_symlinks=False)
            except OSError:
                named = None
            if named is None or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
                raise _Raced(FileChanged("file replaced during lookup; retry"))
        return real

    def _open_confined(self, rel: str, flags: int) -> int:
        """Open the canonical path ``rel`` beneath the root with no symlink on the way (the
        kernel's ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``, or one ``O_NOFOLLOW`` component at
        a time from the root's descriptor)."""
        if self._openat2:
            return openat2(self.fd, os.fsencode(rel) or b".", flags, _CANONICAL_BENEATH)
        parts = [p for p in rel.split("/") if p]
        if not parts:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=self.fd)
        cur = self.fd
        try:
            for i, name in enumerate(parts):
                if name in (".", ".."):
                    raise OSError(errno.EXDEV, "not a canonical path", rel)
                last = i == len(parts) - 1
                mode = flags if last else _O_PATH | os.O_DIRECTORY
                nxt = os.open(name, mode | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
                if cur != self.fd:
                    os.close(cur)
                cur = nxt
            if stat.S_ISLNK(os.fstat(cur).st_mode):  # O_PATH | O_NOFOLLOW opens the link
                raise OSError(errno.ELOOP, "symbolic link", rel)
            return cur
        except BaseException:
            if cur != self.fd:
                os.close(cur)
            raise


def _map_os_error(exc: OSError) -> PathError | OSError:
    """The HTTP meaning of a lookup failure; unexpected errors are returned unchanged."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return NotFound("no such file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Forbidden("permission denied")
    if exc.errno == errno.ELOOP:
        return Forbidden("too many levels of symbolic links")
    if exc.errno == errno.ENAMETOOLONG:
        return Forbidden("path too long")
    return exc
