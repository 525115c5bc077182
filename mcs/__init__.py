"""mcs: recoverable components over global shared memory.

The public API: :class:`Section`, :class:`GlobalMutex`, :class:`GlobalEvent`,
:class:`LockStatus`, :func:`monotonic_ns`, :class:`Bootstrap` and the errors of
:mod:`mcs.errors`.
"""

from __future__ import annotations

from mcs.errors import (
    BootstrapError,
    ClosedError,
    CorruptObjectError,
    DomainLiveError,
    FencedError,
    InvalidIdentifier,
    LockUsageError,
    McsError,
    NativeError,
    NotRecoverableError,
    Recovering,
)
from mcs.types import LockStatus, MutexOwner

try:
    from mcs._gsm import GlobalEvent, GlobalMutex, checksum, copy_checksum, monotonic_ns
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "mcs: the native core mcs._gsm is not built. Install the package with "
        "'pip install .' (or 'pip install -e .' for development); it needs gcc and the "
        f"Python headers. Original error: {exc}"
    ) from exc

from mcs.section import Section
from mcs.bootstrap import Bootstrap

__all__ = [
    "Bootstrap",
    "BootstrapError",
    "ClosedError",
    "CorruptObjectError",
    "DomainLiveError",
    "FencedError",
    "GlobalEvent",
    "GlobalMutex",
    "InvalidIdentifier",
    "LockStatus",
    "LockUsageError",
    "McsError",
    "MutexOwner",
    "NativeError",
    "NotRecoverableError",
    "Recovering",
    "Section",
    "checksum",
    "copy_checksum",
    "monotonic_ns",
]

__version__ = "0.1.0"
