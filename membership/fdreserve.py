"""Descriptors held in reserve, so that the failure detector can still open one at EMFILE.

A process at its RLIMIT_NOFILE (a server flooded with connections, a leak) fails every open at
once: the member's pidfd for a newcomer included. A member therefore keeps a few descriptors of
its own; an open that fails with EMFILE or ENFILE gives one of them back to the kernel and is
retried in the slot it freed. Descriptors the member no longer needs (the pidfd of a departed
member) are kept as reserve instead of closed, so their slots stay ours; the reserve is topped up
with fresh opens of /dev/null whenever the process has room again.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Callable

__all__ = ["FdReserve", "SHORTAGE_ERRNOS"]

SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
"""The errors that say "no descriptor left" (per process, system-wide)."""


class FdReserve:
    """Up to ``size`` descriptors of this process, spent only by :meth:`open` at a shortage.

    Each fresh reserve descriptor is its own open of /dev/null (its own open file), so giving one
    back also helps at ENFILE. Thread-safe.
    """

    def __init__(self, size: int = 8) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"reserve size must be an int >= 0, got {size!r}")
        self.size = size
        self.spent = 0
        """How many reserve descriptors were given back to the kernel to let an open through."""
        self._fds: list[int] = []
        self._lock = threading.Lock()
        self._closed = False
        self.replenish()

    @property
    def held(self) -> int:
        """How many descriptors are in reserve now."""
        with self._lock:
            return len(self._fds)

    def open(self, opener: Callable[[], int]) -> int:
        """``opener()`` (it returns a new descriptor); at EMFILE/ENFILE, free one reserve
        descriptor and retry, until it succeeds or the reserve is empty (then the error is
        raised). Any other error is raised at once."""
        with self._lock:
            while True:
                try:
                    return opener()
                except OSError as exc:
                    if exc.errno not in SHORTAGE_ERRNOS or not self._fds:
                        raise
                # Another thread may take the slot first: then the next reserve one is freed.
                os.close(self._fds.pop())
                self.spent += 1

    def give(self, fd: int) -> None:
        """Take ``fd``, a descriptor its owner no longer needs, as reserve (its slot stays
        ours); close it if the reserve is full."""
        with self._lock:
            if len(self._fds) < self.size and not self._closed:
                self._fds.append(fd)
                return
        os.close(fd)

    def replenish(self) -> int:
        """Top the reserve up while the process has descriptors to spare; returns how many are
        held. Cheap when full; one failing open when there is no room."""
        with self._lock:
            while len(self._fds) < self.size and not self._closed:
                try:
                    self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
                except OSError:
                    break
            return len(self._fds)

    def close(self) -> None:
        """Close every reserve descriptor; later gifts are closed at once."""
        with self._lock:
            self._closed = True
            while self._fds:
                os.close(self._fds.pop())
