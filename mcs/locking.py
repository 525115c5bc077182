"""One way to hold a global mutex that a dead holder may have abandoned.

Every caller that takes the root mutex (joins, leaves, view changes, gc, the component's agree
phase) has its own policy for *getting* the lock (a timeout, a retry loop that checks for a
frozen holder), but the same duty once it has it: an ABANDONED lock is marked consistent (the
caller's work under it re-derives what the dead holder may have half-written), and the lock is
released on every way out. :func:`held` is that duty, once.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from mcs._gsm import GlobalMutex
from mcs.types import LockStatus

__all__ = ["held"]


@contextmanager
def held(mutex: GlobalMutex, status: LockStatus) -> Iterator[LockStatus]:
    """Inside the block the caller holds ``mutex``, which ``lock()`` just returned ``status``
    (OK or ABANDONED; TIMEOUT means it is not held and is a usage error). An abandoned mutex is
    marked consistent first; the mutex is unlocked when the block ends, however it ends."""
    if status is LockStatus.TIMEOUT:
        raise ValueError("held(): the lock timed out, the mutex is not held")
    try:
        if status is LockStatus.ABANDONED:
            mutex.mark_consistent()
        yield status
    finally:
        mutex.unlock()
