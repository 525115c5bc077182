"""Names in the shared ``/dev/shm`` name space, examined and opened without trusting them.

``/dev/shm`` is one world-writable, sticky directory for every user of the host: anyone can take
any name first, with a file, a symlink, a directory or a FIFO, and a per-user prefix would not
help (the squatter can take that name too). So a name is examined with ``lstat`` and opened with
``O_NOFOLLOW``; anything that is not a regular file owned by this user is reported with its type
and owner, and never followed, opened or removed. A new object gets its memory reserved with
``posix_fallocate`` before anyone maps it: on a full tmpfs a store into an unreserved page is a
SIGBUS, a failed reservation is a clean :class:`ShmFullError` and the object is removed again.

Removal renames the name to a hidden one before unlinking it, so the processes that still map
an object we removed show ``.mcs-retired.* (deleted)`` in their maps; ``<name> (deleted)`` is
left to removals by others (systemd ``RemoveIPC=yes``), which :func:`mappers_of_unlinked` finds.

``MCS_SHM_DIR`` replaces ``/dev/shm`` (for tests and containers that give mcs another tmpfs).
"""

from __future__ import annotations

import enum
import errno
import os
import pwd
import secrets
import stat
from dataclasses import dataclass
from typing import Iterator

from mcs.errors import BootstrapError, ForeignObjectError, ShmFullError

__all__ = ["Kind", "Entry", "shm_dir", "owner_name", "examine", "check_ours", "open_existing",
           "create", "is_linked", "remove_if_same", "mappers_of_unlinked", "maps_object",
           "RETIRED_PREFIX"]

ENV_DIR = "MCS_SHM_DIR"
DEFAULT_DIR = "/dev/shm"
RETIRED_PREFIX = ".mcs-retired."  # a removed object's name between its rename and its unlink
_FULL = (errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT)


class Kind(enum.Enum):
    """What a name in the directory is (from ``lstat``)."""

    REGULAR = "regular file"
    SYMLINK = "symbolic link"
    DIRECTORY = "directory"
    FIFO = "FIFO"
    SOCKET = "socket"
    CHAR_DEVICE = "character device"
    BLOCK_DEVICE = "block device"
    OTHER = "special file"

    @classmethod
    def of(cls, mode: int) -> "Kind":
        for test, kind in ((stat.S_ISREG, cls.REGULAR), (stat.S_ISLNK, cls.SYMLINK),
                           (stat.S_ISDIR, cls.DIRECTORY), (stat.S_ISFIFO, cls.FIFO),
                           (stat.S_ISSOCK, cls.SOCKET), (stat.S_ISCHR, cls.CHAR_DEVICE),
                           (stat.S_ISBLK, cls.BLOCK_DEVICE)):
            if test(mode):
                return kind
        return cls.OTHER


def shm_dir() -> str:
    """The directory of the name space: ``$MCS_SHM_DIR`` if set, else ``/dev/shm``."""
    path = os.environ.get(ENV_DIR) or DEFAULT_DIR
    if not os.path.isabs(path):
        raise BootstrapError(f"{ENV_DIR}={path!r}: must be an absolute path (a tmpfs directory)")
    return path


def owner_name(uid: int) -> str:
    """``alice (uid 1001)``, or ``uid 1001`` for a uid without a user name."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True)
class Entry:
    """A name of the directory and what ``lstat`` said about it."""

    name: str
    path: str
    st: os.stat_result

    @property
    def kind(self) -> Kind:
        return Kind.of(self.st.st_mode)

    @property
    def ours(self) -> bool:
        """A regular file owned by this (effective) user."""
        return self.kind is Kind.REGULAR and self.st.st_uid == os.geteuid()

    def describe(self) -> str:
        """``a symbolic link (-> /etc/passwd) owned by alice (uid 1001)``."""
        target = ""
        if self.kind is Kind.SYMLINK:
            try:
                target = f" (-> {os.readlink(self.path)})"
            except OSError:
                pass
        return f"a {self.kind.value}{target} owned by {owner_name(self.st.st_uid)}"


def examine(name: str) -> Entry | None:
    """``lstat`` of ``name`` in the directory (never follows a symlink); None if absent."""
    path = os.path.join(shm_dir(), name)
    try:
        return Entry(name, path, os.lstat(path))
    except FileNotFoundError:
        return None


def check_ours(entry: Entry) -> None:
    """Raise :class:`ForeignObjectError` unless ``entry`` is a regular file of this user."""
    if entry.ours:
        return
    if entry.kind is not Kind.REGULAR:
        raise ForeignObjectError(
            f"{entry.path} is {entry.describe()}, not an mcs object: refusing to follow or open "
            f"it. Remove it (rm {'-r ' if entry.kind is Kind.DIRECTORY else ''}{entry.path}, as "
            "its owner or root) or use another domain name")
    raise ForeignObjectError(
        f"{entry.path} is {entry.describe()}, not by you ({owner_name(os.geteuid())}): another "
        f"user took this name first (anyone can create any name in {shm_dir()}). Its owner or "
        f"root must remove it (rm {entry.path}), or use another domain name")


def open_existing(name: str) -> tuple[int, os.stat_result] | None:
    """Open ``name`` for mapping if it is a regular file of ours: ``(fd, fstat)``, None if
    absent, :class:`ForeignObjectError` if it is anything else. The descriptor is checked with
    ``fstat`` (authoritative: the name may have changed since the ``lstat``)."""
    entry = examine(name)
    if entry is None:
        return None
    check_ours(entry)
    try:
        # O_NONBLOCK: a FIFO swapped in after the lstat must not block the open.
        fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        again = examine(name)
        if again is None:
            return None
        check_ours(again)
        raise BootstrapError(f"{entry.path}: cannot open it ({exc.strerror})") from None
    st = os.fstat(fd)
    try:
        check_ours(Entry(name, entry.path, st))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def create(name: str, size: int) -> tuple[int, os.stat_result] | None:
    """Create ``name`` (``O_EXCL``, mode 0600) with ``size`` bytes reserved: ``(fd, fstat)``, or
    None if the name exists. :class:`ShmFullError` if the tmpfs has no room; then nothing is
    left behind."""
    path = os.path.join(shm_dir(), name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        return None
    except OSError as exc:
        if exc.errno in _FULL:
            raise ShmFullError(f"{shm_dir()} is full: cannot create {path} "
                               f"({exc.strerror}); {_space()}") from None
        raise BootstrapError(f"{path}: cannot create it ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            remove_if_same(name, st.st_ino)
            if exc.errno in _FULL:
                raise ShmFullError(
                    f"{shm_dir()} is full: no room for the {size}-byte object {path} "
                    f"({exc.strerror}); {_space()}. Nothing was left behind") from None
            raise BootstrapError(f"{path}: cannot reserve {size} bytes ({exc.strerror})") from None
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _space() -> str:
    try:
        vfs = os.statvfs(shm_dir())
    except OSError:
        return "free space unknown"
    return (f"{vfs.f_bavail * vfs.f_frsize} of {vfs.f_blocks * vfs.f_frsize} bytes free. "
            "Free space there ('mcs gc' removes the objects of dead domains) or enlarge the tmpfs")


def is_linked(name: str, inode: int) -> bool:
    """True if ``name`` still names the regular file ``inode`` (``lstat``: never follows)."""
    entry = examine(name)
    return entry is not None and entry.kind is Kind.REGULAR and entry.st.st_ino == inode


def remove_if_same(name: str, inode: int) -> bool:
    """Remove ``name`` if it still names the regular file ``inode``; True if removed.

    Renamed to a hidden random name first, then unlinked: see the module docstring."""
    if not is_linked(name, inode):
        return False
    hidden = os.path.join(shm_dir(), RETIRED_PREFIX + secrets.token_hex(8))
    try:
        os.rename(os.path.join(shm_dir(), name), hidden)
    except FileNotFoundError:
        return False
    try:
        os.unlink(hidden)
    except FileNotFoundError:
        pass
    return True


def _shm_device() -> bytes | None:
    """The shm directory's device as /proc/PID/maps prints it (``major:minor`` in hex)."""
    try:
        dev = os.stat(shm_dir()).st_dev
    except OSError:
        return None
    return f"{os.major(dev):02x}:{os.minor(dev):02x}".encode()


def _maps_fields(pid: int | str, needle: bytes) -> Iterator[list[bytes]]:
    """The split lines of /proc/PID/maps, if its text contains ``needle`` (nothing when the
    process is gone or its maps are not ours to read)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            maps = f.read()
    except OSError:
        return
    if needle in maps:
        for line in maps.splitlines():
            yield line.split(maxsplit=5)


def maps_object(pid: int, inode: int) -> bool:
    """Whether process ``pid`` maps the shm object ``inode`` now (by device and inode, so it
    holds whatever the object's name has become since)."""
    device = _shm_device()
    if device is None:
        return False
    ino = str(inode).encode()
    return any(len(f) >= 5 and f[3] == device and f[4] == ino
               for f in _maps_fields(pid, b" " + ino + b" "))


def mappers_of_unlinked(name: str) -> list[int]:
    """Pids of this user's processes that still map ``name`` although it was unlinked by
    somebody else (their ``/proc/PID/maps`` show ``<dir>/<name> (deleted)`` on the directory's
    device). Processes whose maps this user may not read are not seen."""
    device = _shm_device()
    if device is None:
        return []
    target = (os.path.join(shm_dir(), name) + " (deleted)").encode()
    me = os.geteuid()
    pids = []
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit():
            continue
        try:
            if proc.stat().st_uid != me:
                continue
        except OSError:
            continue
        if any(len(f) == 6 and f[5] == target and f[3] == device
               for f in _maps_fields(proc.name, target)):
            pids.append(int(proc.name))
    return sorted(pids)
