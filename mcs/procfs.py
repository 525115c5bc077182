"""The two /proc files mcs reads, parsed in one place: the SysV segment table and a process's
``stat`` line.

``/proc/sysvipc/shm`` is a header line and one row of numbers per segment (``perms`` printed in
octal, ``key`` as a signed ``key_t``); :func:`shm_segments` returns them as :class:`ShmRow`.
``/proc/PID/stat`` is one line whose second field, the command name, may contain spaces and
parentheses: :func:`parse_stat` splits at the *last* ``)``, so no name can shift the fields that
follow. :func:`parse_stat` takes bytes, so a caller that holds the file open (a member watching
its node peers, :mod:`membership.peers`) re-reads it with ``pread`` at offset 0 and needs no new
descriptor.
"""

from __future__ import annotations

import os
import signal
import time
from typing import NamedTuple

__all__ = ["SYSV_SHM", "SHM_DEST", "PF_EXITING", "ShmRow", "ProcStat", "shm_segments",
           "shm_segment", "parse_stat", "read_stat", "stat_path", "boot_time_ns"]

SYSV_SHM = "/proc/sysvipc/shm"
SHM_DEST = 0o1000  # perms bit: the segment is marked for removal (freed at its last detach)
PF_EXITING = 0x4  # task flag: the process is in its exit path
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_SHM_COLUMNS = 14  # key .. ctime; newer kernels append rss and swap, which mcs does not read


class ShmRow(NamedTuple):
    """One row of /proc/sysvipc/shm (times in seconds since the epoch, 0: never)."""

    key: int
    shmid: int
    perms: int  # mode bits and the SHM_DEST / SHM_LOCKED flags
    size: int
    cpid: int  # creator
    lpid: int  # last process to attach or detach
    nattch: int
    uid: int
    gid: int
    cuid: int
    cgid: int
    atime: int
    dtime: int
    ctime: int

    @property
    def mode(self) -> int:
        """The permission bits (0o600 for every segment mcs creates)."""
        return self.perms & 0o777

    @property
    def marked_removed(self) -> bool:
        """Whether the segment is marked for removal (the kernel frees it at its last detach)."""
        return bool(self.perms & SHM_DEST)


def _shm_row(line: str) -> ShmRow:
    f = line.split()[:_SHM_COLUMNS]
    return ShmRow(int(f[0]), int(f[1]), int(f[2], 8), *map(int, f[3:]))


def shm_segments() -> list[ShmRow]:
    """Every SysV segment of the host (the rows this process may see). Raises OSError (EMFILE:
    the caller decides whether that is worth a retry)."""
    with open(SYSV_SHM) as table:
        next(table, None)  # the header
        return [_shm_row(line) for line in table if line.strip()]


def shm_segment(shmid: int) -> ShmRow | None:
    """The row of segment ``shmid``, or None if it is gone."""
    return next((row for row in shm_segments() if row.shmid == shmid), None)


class ProcStat(NamedTuple):
    """The fields of /proc/PID/stat that mcs reads (times in clock ticks)."""

    pid: int
    comm: str
    state: str  # R, S, D, T, t, Z, X, ...
    ppid: int
    flags: int  # PF_* task flags
    utime: int
    stime: int
    starttime: int  # since boot
    pending: int  # the thread's own pending signals (a fatal signal is added to every thread's)

    @property
    def exited(self) -> bool:
        """A zombie (exited, not reaped yet) or dead task."""
        return self.state in ("Z", "X")

    @property
    def exiting(self) -> bool:
        """In its exit path (PF_EXITING)."""
        return bool(self.flags & PF_EXITING)

    def signal_pending(self, signo: int) -> bool:
        return bool(self.pending & (1 << (signo - 1)))

    @property
    def dying(self) -> bool:
        """Exited, exiting, or with a SIGKILL pending (a fatal signal is added to every
        thread's own pending set): a process that will not run user code again."""
        return self.exited or self.exiting or self.signal_pending(signal.SIGKILL)

    @property
    def stopped(self) -> bool:
        """Stopped by a signal (T: SIGSTOP, SIGTSTP...) or by a tracer (t): runs no code until
        continued."""
        return self.state in ("T", "t")

    def started_ns(self) -> int:
        """When the process started, as CLOCK_REALTIME nanoseconds (clock-tick precision)."""
        return boot_time_ns() + self.starttime * 1_000_000_000 // _CLK_TCK


def boot_time_ns() -> int:
    """CLOCK_REALTIME of the boot (what ``starttime`` counts from), from the two clocks now."""
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def parse_stat(raw: bytes) -> ProcStat:
    """Parse one /proc/PID/stat (or /proc/PID/task/TID/stat) line; ValueError if malformed."""
    head, paren, tail = raw.rpartition(b")")
    pid, open_paren, comm = head.partition(b" (")
    fields = tail.split()
    if not paren or not open_paren or len(fields) < 29:
        raise ValueError(f"not a /proc/PID/stat line: {raw[:80]!r}")
    return ProcStat(int(pid), comm.decode("utf-8", "replace"), fields[0].decode(),
                    int(fields[1]), int(fields[6]), int(fields[11]), int(fields[12]),
                    int(fields[19]), int(fields[28]))


def stat_path(pid: int | str, task: int | None = None) -> str:
    """/proc/PID/stat, or /proc/PID/task/TID/stat for one thread (``pid`` may be "self")."""
    return f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"


def read_stat(pid: int | str, task: int | None = None) -> ProcStat:
    """Read and parse :func:`stat_path`; FileNotFoundError or ProcessLookupError once the process
    is gone (reaped)."""
    with open(stat_path(pid, task), "rb") as f:
        return parse_stat(f.read())
