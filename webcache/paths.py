"""Map a request path to a regular file under a document root, and refuse every escape.

:meth:`DocumentRoot.resolve` is on the hot path (once per request, hits included): it checks the
path as a string first (no system call), then asks the kernel for the file in four system calls
(``open(O_PATH)``, ``fstat``, ``readlink("/proc/PID/fd/N")``, ``close``) plus one ``access`` for
readability. ``O_PATH`` never opens the file itself, so a FIFO or a device is never opened.

Rules (each refusal is :class:`Forbidden`, 403, unless it says :class:`NotFound`, 404):

* The path must be absolute (start with ``/``), at most 4096 bytes, each segment at most 255 bytes
  (UTF-8), with no NUL, no backslash, no control character (C0, DEL, C1) and no lone surrogate.
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

Between :meth:`~DocumentRoot.resolve` and the ``open`` of :attr:`ResolvedFile.path` someone with
write access to the root could swap a directory for a symlink; the returned path is canonical
(no symlink in it at resolution time), which keeps that window as narrow as a path API allows.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import NamedTuple
from urllib.parse import unquote

from mcs.errors import McsError

__all__ = ["PathError", "Forbidden", "NotFound", "ResolvedFile", "DocumentRoot",
           "MAX_PATH_BYTES", "MAX_SEGMENT_BYTES", "INDEX"]

MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255
INDEX = "index.html"

# C0 controls, DEL, C1 controls, backslash and lone surrogates (what a decoded URL never holds).
_BAD_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\\\\\ud800-\udfff]")
_ALLOWED_HIDDEN = frozenset({".well-known"})
_O_PATH = getattr(os, "O_PATH", 0)


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


class ResolvedFile(NamedTuple):
    """A regular file under the root: its canonical path and the stat fields that validate it.
    (A named tuple: built once per request on the hot path.)"""

    path: str
    size: int
    mtime_ns: int
    inode: int
    dev: int

    @classmethod
    def from_stat(cls, path: str, st: os.stat_result) -> ResolvedFile:
        """Build from a canonical ``path`` and its ``os.stat`` result."""
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


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


class DocumentRoot:
    """A directory whose regular files may be served; see the module docstring for the rules."""

    __slots__ = ("root", "allow_hidden", "_prefix", "_proc_fd")

    def __init__(self, root: str | os.PathLike[str], *, allow_hidden: bool = False) -> None:
        """``root`` must be an existing directory; it is made canonical (``os.path.realpath``)."""
        given = os.fspath(root)
        real = os.path.realpath(given)
        if not os.path.exists(real):
            raise ValueError(f"document root {given!r} does not exist")
        if not os.path.isdir(real):
            raise ValueError(f"document root {given!r} is not a directory")
        self.root: str = real
        self.allow_hidden = allow_hidden
        self._prefix = real if real.endswith("/") else real + "/"
        self._proc_fd = _O_PATH != 0 and self._proc_fd_works()

    def __repr__(self) -> str:
        return f"DocumentRoot({self.root!r})"

    def _proc_fd_works(self) -> bool:
        """Whether /proc/PID/fd names an O_PATH descriptor by its canonical path (Linux, with
        a /proc of our own PID namespace); otherwise resolution uses ``os.path.realpath``."""
        try:
            fd = os.open(self.root, _O_PATH | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return os.readlink(f"/proc/{os.getpid()}/fd/{fd}") == self.root
        except OSError:
            return False
        finally:
            os.close(fd)

    # -- the string checks (no system call) ------------------------------------------------

    def _check_segment(self, seg: str) -> None:
        """Refuse ``..``, hidden names and overlong segments (``seg`` is non-empty, not ``.``)."""
        if seg[0] == ".":
            if seg == "..":
                raise Forbidden("'..' in path")
            if not self.allow_hidden and seg not in _ALLOWED_HIDDEN:
                raise Forbidden("hidden file")
        if len(seg) > MAX_SEGMENT_BYTES // 4 and _utf8_len(seg) > MAX_SEGMENT_BYTES:
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
        if len(url_path) > MAX_PATH_BYTES // 4 and _utf8_len(url_path) > MAX_PATH_BYTES:
            raise Forbidden("path too long")
        bad = _BAD_CHAR.search(url_path)
        if bad is not None:
            raise Forbidden(_bad_char_reason(bad.group()))
        if raw_path is not None and "%" in raw_path:
            self._check_raw(raw_path)
        if "//" not in url_path and "/." not in url_path and len(url_path) <= MAX_SEGMENT_BYTES // 4:
            return url_path[1:]  # the common case: nothing to drop, nothing to refuse
        segs = [s for s in url_path.split("/") if s and s != "."]
        for seg in segs:
            self._check_segment(seg)
        rel = "/".join(segs)
        if rel and (url_path.endswith("/") or url_path.endswith("/.")):
            rel += "/"
        return rel

    # -- the file system -------------------------------------------------------------------

    def resolve(self, url_path: str, raw_path: str | None = None) -> ResolvedFile:
        """The regular file that ``url_path`` (decoded, starting with ``/``) names under the root.

        ``raw_path`` is the undecoded request target (a query string is ignored); give it to
        refuse encoded tricks whatever the URL decoder did. Raises :class:`Forbidden` or
        :class:`NotFound`; other ``OSError`` (EIO...) propagate.
        """
        rel = self.relative(url_path, raw_path)
        try:
            if self._proc_fd:
                real, st = self._lookup_fd(self._prefix + rel)
            else:
                real, st = self._lookup_realpath(self._prefix + rel, rel.endswith("/"))
        except OSError as exc:
            raise _map_os_error(exc) from None
        if not os.access(real, os.R_OK):
            raise Forbidden("permission denied")
        return ResolvedFile(real, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def _inside(self, real: str) -> bool:
        return real.startswith(self._prefix) or real == self.root

    def _lookup_fd(self, full: str) -> tuple[str, os.stat_result]:
        """Let the kernel walk the path (O_PATH: nothing is opened for I/O), then check where
        it led: ``/proc/<pid>/fd/<fd>`` names the file by its canonical path."""
        fd = os.open(full, _O_PATH | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                try:
                    index = os.open(INDEX, _O_PATH | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    if not self._inside(os.readlink(f"/proc/{os.getpid()}/fd/{fd}")):
                        raise Forbidden("path leads outside the document root") from None
                    raise
                os.close(fd)
                fd = index
                st = os.fstat(fd)
            real = os.readlink(f"/proc/{os.getpid()}/fd/{fd}")
        finally:
            os.close(fd)
        if not real.startswith(self._prefix):
            raise Forbidden("path leads outside the document root")
        if not stat.S_ISREG(st.st_mode):
            raise Forbidden("not a regular file")
        if st.st_nlink == 0:  # unlinked since the open: /proc names it "... (deleted)"
            raise NotFound("no such file")
        return real, st

    def _lookup_realpath(self, full: str, trailing_slash: bool) -> tuple[str, os.stat_result]:
        """Portable fallback: ``os.path.realpath`` then ``os.stat`` (stat never opens a FIFO)."""
        real = os.path.realpath(full)
        st = os.stat(real)
        if stat.S_ISDIR(st.st_mode):
            if not self._inside(real):
                raise Forbidden("path leads outside the document root")
            real = os.path.realpath(os.path.join(real, INDEX))
            st = os.stat(real)
        elif trailing_slash:
            raise NotFound("no such file")
        if not real.startswith(self._prefix):
            raise Forbidden("path leads outside the document root")
        if not stat.S_ISREG(st.st_mode):
            raise Forbidden("not a regular file")
        return real, st


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
