"""Small value types shared by the native core and the Python layer."""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = ["LockStatus", "MutexOwner"]


class LockStatus(enum.IntEnum):
    """What :meth:`mcs.GlobalMutex.lock` reports."""

    OK = 0
    """The mutex is now held by the calling thread."""
    ABANDONED = 1
    """The previous holder died while holding it: the caller now holds it, must repair the data
    it protects, call ``mark_consistent()`` and then ``unlock()``."""
    TIMEOUT = 2
    """The timeout expired; the mutex is not held."""


class MutexOwner(NamedTuple):
    """Who held a mutex: its process id and the tag its handle stored (e.g. slot+incarnation)."""

    pid: int
    tag: int
