"""The descriptors a member holds on the other members, taken when it first sees them.

* A **pidfd** for every other member, verified to be the process that holds that member's life
  mutex: fencing signals through it, never through a bare pid (a reused pid is never trusted).
* An open **/proc/PID/stat** for every member that shares its node name with another member:
  when a member of a node dies, its node peers that are dying too (exiting, or SIGKILL pending)
  leave in the same generation, and that check must not need a new descriptor. Reading an open
  /proc file again from offset 0 gives fresh values; once the process is reaped it fails with
  ESRCH, even if its pid was reused meanwhile.

Both are opened through the member's :class:`FdReserve`, so a member at its RLIMIT_NOFILE still
takes them; when a member leaves the view its descriptors go back to the reserve.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from typing import Collection

from mcs import procfs
from mcs.bootstrap import Bootstrap

from membership.fdreserve import SHORTAGE_ERRNOS, FdReserve
from membership.view import MemberInfo

__all__ = ["Peers", "dying_by_path"]

EXIT_POLL = 0.001  # seconds between two checks of wait_exit
_STAT_MAX = 4096  # /proc/PID/stat is one line of about 52 numbers and a 16-byte name


def dying_by_path(pid: int) -> bool:
    """:attr:`mcs.procfs.ProcStat.dying` for ``pid``, opening /proc/PID/stat (needs a free
    descriptor); a process already reaped counts as dying."""
    try:
        return procfs.read_stat(pid).dying
    except (FileNotFoundError, ProcessLookupError):
        return True


def _exited(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has exited (never blocks). poll, not select:
    descriptor numbers of a process with many files exceed select's 1024."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


@dataclass
class _Handles:
    pid: int
    pidfd: int | None = None  # None: the process was gone or not that member's when first seen
    statfd: int | None = None

    def fds(self) -> list[int]:
        return [fd for fd in (self.pidfd, self.statfd) if fd is not None]


class Peers:
    """Descriptors on the other members of the view (see the module doc). Thread-safe: the
    monitor and the watchers use them while a view change updates them."""

    def __init__(self, boot: Bootstrap, reserve: FdReserve) -> None:
        self._boot = boot
        self._reserve = reserve
        self._handles: dict[tuple[int, int], _Handles] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.procfs_fallbacks = 0
        """Times a dying check had no /proc descriptor and no room to open one (pidfd used)."""

    def update(self, members: Collection[MemberInfo]) -> None:
        """Hold descriptors for exactly ``members`` (the other members of a view): the departed
        ones' go to the reserve, newcomers' are taken. Raises OSError when a pidfd cannot be had
        even from the reserve: the caller retries later (what was done is kept; idempotent)."""
        current = {(m.slot, m.incarnation): m for m in members}
        per_node = collections.Counter(m.node for m in members)
        with self._lock:
            if self._closed:  # a view handled while the member leaves: nothing to hold
                return
            for key in [k for k in self._handles if k not in current]:
                self._release(self._handles.pop(key))
            for key, m in current.items():
                if key not in self._handles:
                    self._handles[key] = _Handles(m.pid, self._open_pidfd(m))
            for key, m in current.items():
                h = self._handles[key]
                if per_node[m.node] > 1 and h.statfd is None and h.pidfd is not None:
                    h.statfd = self._open_stat(h)

    def _open_pidfd(self, m: MemberInfo) -> int | None:
        """A pidfd for member ``m``, verified to be the process that holds its life mutex."""
        try:
            fd = self._reserve.open(lambda: os.pidfd_open(m.pid))
        except ProcessLookupError:
            return None
        owner = self._boot.life_mutex(m.slot).owner
        if owner.pid != m.pid or owner.tag != m.incarnation:
            self._reserve.give(fd)  # the pid is not (or no longer) that member's: never signal it
            return None
        return fd

    def _open_stat(self, h: _Handles) -> int | None:
        """/proc/PID/stat of a verified member, or None (gone, or no descriptor: the dying
        check then falls back); checked against the pidfd so a reused pid is never read."""
        assert h.pidfd is not None
        try:
            fd = self._reserve.open(
                lambda: os.open(procfs.stat_path(h.pid), os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return None
        if _exited(h.pidfd):  # it may have died before the open: the pid may be another's
            self._reserve.give(fd)
            return None
        return fd

    def _release(self, h: _Handles) -> None:
        for fd in h.fds():
            self._reserve.give(fd)

    def dying(self, pid: int) -> bool:
        """Whether ``pid`` has exited, is exiting or has a SIGKILL pending, without opening a
        descriptor when one is held for it. With none held and no room to open /proc, the
        pidfd says whether it has exited (a pending SIGKILL is then not seen)."""
        try:
            stat = self._stat(pid)
        except OSError as exc:
            if exc.errno not in SHORTAGE_ERRNOS:
                raise
            with self._lock:
                self.procfs_fallbacks += 1
                h = self._find(pid)
                return h is not None and h.pidfd is not None and _exited(h.pidfd)
        return stat is None or stat.dying

    def stopped(self, pid: int) -> bool:
        """Whether ``pid`` is stopped (procfs state T or t); False when it cannot be read."""
        try:
            stat = self._stat(pid)
        except OSError:
            return False
        return stat is not None and stat.stopped

    def _stat(self, pid: int) -> procfs.ProcStat | None:
        """``pid``'s /proc stat through the descriptor held for it, else by path; None once
        reaped. The lock is held only while a held descriptor is read (it must not be closed
        meanwhile). OSError when it cannot be opened (no descriptor left)."""
        with self._lock:
            h = self._find(pid)
            if h is not None and h.statfd is not None:
                try:
                    return procfs.parse_stat(os.pread(h.statfd, _STAT_MAX, 0))
                except ProcessLookupError:
                    return None
        try:
            return procfs.read_stat(pid)
        except (FileNotFoundError, ProcessLookupError):
            return None

    def _find(self, pid: int) -> _Handles | None:
        return next((h for h in self._handles.values() if h.pid == pid), None)

    def kill(self, key: tuple[int, int]) -> bool:
        """SIGKILL member ``key`` (slot, incarnation) through its pidfd; False if it has no
        verified pidfd (then it is not signalled at all)."""
        with self._lock:
            h = self._handles.get(key)
            if h is None or h.pidfd is None:
                return False
            try:
                signal.pidfd_send_signal(h.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return True

    def wait_exit(self, key: tuple[int, int], timeout: float) -> None:
        """Wait up to ``timeout`` s for member ``key`` to exit (returns early if its handles are
        released meanwhile). The lock is held only for a poll that does not block, so neither
        updates nor a watcher's dying checks wait behind it."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                h = self._handles.get(key)
                if h is None or h.pidfd is None or _exited(h.pidfd):
                    return
            if time.monotonic() >= deadline:
                return
            time.sleep(EXIT_POLL)

    def close(self) -> None:
        """Close every descriptor held on the others."""
        with self._lock:
            self._closed = True
            for h in self._handles.values():
                for fd in h.fds():
                    os.close(fd)
            self._handles.clear()
