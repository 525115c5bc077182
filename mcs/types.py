"""Small value types shared by the native core and the Python layer."""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = ["LockStatus", "MutexOwner", "LogState", "RollbackOutcome"]


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


# -- undo log (helper "dict", issue 11) ---------------------------------------------------------


class LogState(enum.IntEnum):
    """The state word of an undo log (:class:`mcs.undo.UndoLog`)."""

    IDLE = 0
    """No transaction: nothing to undo."""
    ACTIVE = 1
    """A transaction is writing: if its owner dies, its records are applied back."""
    COMMITTED = 2
    """The transaction passed its point of no return: never rolled back, never re-run."""


class RollbackOutcome(enum.IntEnum):
    """What :meth:`mcs.undo.UndoLog.rollback_dead` did."""

    NOTHING = 0
    """The log was idle: no transaction of that owner to undo."""
    ROLLED_BACK = 1
    """An ACTIVE transaction: its before-images were applied back, newest first."""
    WAS_COMMITTED = 2
    """A committed transaction that never finished: kept, the log made idle."""
    OTHER_OWNER = 3
    """The log belongs to another owner now (the slot's next incarnation): left alone."""
