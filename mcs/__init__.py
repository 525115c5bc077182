"""mcs: recoverable components over global shared memory.

The public API: :class:`Section`, :class:`GlobalMutex`, :class:`GlobalEvent`,
:class:`LockStatus`, :func:`monotonic_ns`, :class:`Bootstrap` and the errors of
:mod:`mcs.errors` (the GSM core), and the component layer, which builds on
:mod:`membership`: :class:`McsComponent`, :func:`transaction`, :class:`RecoveryStats`,
:class:`ComponentRecord` (the typed reader of a component's record) and :func:`component_domain`,
and :class:`SharedDict` (a dict in shared memory, a component).

The component layer sits *above* membership, which sits above the core, so it is exported
lazily (PEP 562): ``import mcs`` loads only the core, and ``mcs.McsComponent`` imports
:mod:`mcs.component` on first use. The layers are checked by import-linter (pyproject.toml).
"""

from __future__ import annotations

from mcs.errors import (
    BootstrapError,
    ClosedError,
    CorruptObjectError,
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

# Names of the component layer, imported on first access (see the module docstring).
_COMPONENT_LAYER = frozenset({"McsComponent", "RecoveryStats", "transaction", "ComponentRecord",
                              "component_domain"})


# SharedDict sits on the component layer (mcs.shared_dict): lazy too.
_DICT_LAYER = frozenset({"SharedDict"})


def __getattr__(name: str) -> object:
    if name in _DICT_LAYER:
        from mcs import shared_dict  # the sanctioned upward edge (ignored by the layers contract)

        return getattr(shared_dict, name)
    if name in _COMPONENT_LAYER:
        from mcs import component  # the sanctioned upward edge (ignored by the layers contract)

        return getattr(component, name)
    raise AttributeError(f"module 'mcs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _COMPONENT_LAYER | _DICT_LAYER)


__all__ = [
    "Bootstrap",
    "BootstrapError",
    "ClosedError",
    "ComponentRecord",
    "CorruptObjectError",
    "FencedError",
    "GlobalEvent",
    "GlobalMutex",
    "InvalidIdentifier",
    "LockStatus",
    "LockUsageError",
    "McsComponent",
    "McsError",
    "MutexOwner",
    "NativeError",
    "NotRecoverableError",
    "Recovering",
    "RecoveryStats",
    "Section",
    "SharedDict",
    "checksum",
    "component_domain",
    "copy_checksum",
    "monotonic_ns",
    "transaction",
]

__version__ = "0.1.0"
