"""The whole mcs exception hierarchy.

Flat, as in trio: every error is a direct subclass of :class:`McsError` (some also derive from
the built-in exception a caller would naturally catch), except the specific bootstrap errors,
which are subclasses of :class:`BootstrapError` so that one ``except BootstrapError`` covers
them. A dead previous owner of a mutex is not an error: it is the lock status
:attr:`mcs.LockStatus.ABANDONED`, because the caller holds the mutex when it learns of it.
"""

from __future__ import annotations

__all__ = [
    "McsError",
    "NativeError",
    "ClosedError",
    "InvalidIdentifier",
    "CorruptObjectError",
    "LayoutMismatchError",
    "BootstrapError",
    "DomainNotFoundError",
    "ForeignObjectError",
    "ShmFullError",
    "UninitialisedError",
    "DomainUnlinkedError",
    "NotRecoverableError",
    "LockUsageError",
    "FencedError",
    "Recovering",
    "LogFullError",
    "DictFullError",
    "ItemTooLargeError",
    "ForkedHandleError",
    "TransactionConflict",
    "NoTransactionError",
    "SupervisorError",
    "native_error",
]


class McsError(Exception):
    """Base class of every error raised by mcs."""


class NativeError(McsError, OSError):
    """A system call failed; the message names the call and ``errno`` is set."""


class ClosedError(McsError, ValueError):
    """A section or handle was used after ``close()``."""


class InvalidIdentifier(McsError, ValueError):
    """A section identifier is malformed, stale (its segment is gone) or names another object."""


class CorruptObjectError(McsError):
    """A shared-memory object (mutex, event, header) does not carry the expected magic or sizes."""


class LayoutMismatchError(McsError, ImportError):
    """Two declarations of one shared-memory layout disagree (native code built from another
    source than the Python beside it, or a layout edited on one side only): raised at import,
    naming what differs, so that nothing reads shared memory at the wrong offsets."""


class BootstrapError(McsError):
    """A domain's bootstrap object is foreign, truncated, of another layout version or owner."""


class DomainNotFoundError(BootstrapError):
    """The domain has no bootstrap object (and the caller did not ask to create one)."""


class ForeignObjectError(BootstrapError):
    """The domain's name in the shared ``/dev/shm`` name space is taken by something mcs did not
    make for this user: another user's file, a symlink, a directory, a FIFO... It is never
    followed, opened for writing or removed; the message names its type and owner."""


class ShmFullError(BootstrapError):
    """``/dev/shm`` (a tmpfs) has no room for a new bootstrap object; nothing was left behind."""


class UninitialisedError(BootstrapError):
    """A bootstrap object whose creator never finished initialising it (it died meanwhile)."""


class DomainUnlinkedError(BootstrapError):
    """The domain's bootstrap name was unlinked (e.g. systemd ``RemoveIPC=yes``) while
    processes still run the domain: a new object would start a second domain beside it."""


class NotRecoverableError(McsError):
    """A robust mutex was released after its owner died without being marked consistent.

    Every later lock of that mutex raises this error: the data it protects must be rebuilt and
    the mutex re-created.
    """


class LockUsageError(McsError, RuntimeError):
    """A mutex was misused: unlocked by a thread that does not hold it, relocked by its holder,
    or marked consistent when it was not abandoned."""


class FencedError(McsError):
    """This member's incarnation was evicted from the domain; it must not touch shared memory."""


class Recovering(McsError):
    """Raised inside a ``consistent()`` block when a global recovery was requested."""


_ERRNO_CLASSES: dict[int, type[NativeError]] = {}


def native_error(call: str, err: int) -> NativeError:
    """Build the error for system call ``call`` failing with ``err`` (an errno value).

    The class is a subclass of both :class:`NativeError` and the built-in ``OSError`` subclass
    Python would pick (``PermissionError``, ``FileNotFoundError``...), so both can be caught.
    """
    import os

    probe = OSError(err, os.strerror(err))
    base = type(probe)
    cls = _ERRNO_CLASSES.get(err)
    if cls is None:
        if base is OSError:
            cls = NativeError
        else:
            cls = type(f"Native{base.__name__}", (NativeError, base), {"__module__": __name__})
        _ERRNO_CLASSES[err] = cls
    return cls(err, f"{call}: {os.strerror(err)}")


# -- undo log and SharedDict (helper "dict", issue 11) ------------------------------------------


class LogFullError(McsError):
    """An undo log has no room for another before-image: the transaction is too large for it
    (it is rolled back; nothing of it stays written)."""


class DictFullError(McsError):
    """A SharedDict has no free entry for a new key (in the key's stripe): nothing was written."""


class ItemTooLargeError(McsError, ValueError):
    """A SharedDict key or value is longer than the dict's ``max_key`` / ``max_value`` (or a
    key or value of an unsupported type): nothing was written."""


class ForkedHandleError(McsError):
    """A handle made in one process was used in a child forked from it; the child must make its
    own (its membership, locks and undo logs are the parent's)."""


class TransactionConflict(McsError):
    """A SharedDict transaction waited too long for a stripe another transaction holds (a
    possible deadlock): it was rolled back entirely; run the block again
    (:meth:`mcs.SharedDict.transact` does that itself)."""


# -- issue 11 (helper tx): transactions ----------------------------------------------------

class NoTransactionError(McsError):
    """A transaction operation outside a transaction, or a component without transaction
    logs (``transaction_lanes = 0`` or no master area)."""


# -- issue 12: supervision (mcs.supervise) --------------------------------------------------

class SupervisorError(McsError):
    """A supervisor was given a malformed policy (``--restart-intensity``, ``--backoff``...),
    no command or no member, or was run where it cannot supervise (outside the main thread, or
    a second time)."""
