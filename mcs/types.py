"""Small value types shared by the native core and the Python layer."""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = ["LockStatus", "MutexOwner", "MasterAreaOutcome"]


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


# -- issue 11 (helper tx): the master area's fate at a master phase -------------------------

class MasterAreaOutcome(enum.Enum):
    """What the last master phase did with the master area (``RecoveryStats.master_area``)."""

    NONE = "none"
    """No master phase ran on this member yet, or the component has no master area."""
    CREATED = "created"
    """Nothing was published yet: a zeroed area was created (the domain's first master)."""
    ADOPTED = "adopted"
    """The published area passed validation and was kept, with everything in it."""
    REBUILT_AFTER_POISON = "rebuilt_after_poison"
    """The published area was poisoned (a memory failure): a zeroed one replaced it."""
    REBUILT_INVALID = "rebuilt_invalid"
    """The published area was gone, torn, of another layout version or too small: a zeroed
    one replaced it."""
