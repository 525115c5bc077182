"""Contributed sections of global shared memory and their printable identifiers.

A section is a private SysV segment (mode 0600) marked for removal as soon as its creator has
attached it: other processes can still attach it by id until the last holder detaches or dies,
and then the kernel frees it, whatever way its holders ended. The identifier
``sysv:<shmid>:<nonce>`` carries the random nonce written in the section header, so an id that
the kernel has reused for another segment fails to attach instead of opening a stranger.
"""

from __future__ import annotations

import os
import re

from mcs import _gsm
from mcs.errors import InvalidIdentifier

__all__ = ["Section"]

_IDENT = re.compile(r"sysv:(\d{1,10}):([0-9a-f]{16})")


class Section(_gsm.Section):
    """A block of global shared memory contributed by this process (see module docstring)."""

    __slots__ = ()

    @classmethod
    def create(cls, size: int) -> "Section":
        """Create a section with ``size`` bytes of zeroed user area, mode 0600."""
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        return cls._create_sysv(size, int.from_bytes(os.urandom(8), "little"))

    @classmethod
    def attach(cls, ident: str) -> "Section":
        """Attach the section named by ``ident``; :class:`InvalidIdentifier` if stale or foreign."""
        if not isinstance(ident, str):
            raise InvalidIdentifier(f"identifier must be a str, not {type(ident).__name__}")
        match = _IDENT.fullmatch(ident)
        if match is None:
            raise InvalidIdentifier(f"malformed section identifier {ident!r}")
        shmid = int(match.group(1))
        if shmid > 0x7FFFFFFF:
            raise InvalidIdentifier(f"malformed section identifier {ident!r}")
        return cls._attach_sysv(shmid, int(match.group(2), 16))

    @property
    def ident(self) -> str:
        """The printable identifier another process passes to :meth:`attach`."""
        if self.shmid < 0:
            raise InvalidIdentifier("a file-backed section (bootstrap) has no identifier")
        return f"sysv:{self.shmid}:{self.nonce:016x}"

    def __repr__(self) -> str:
        if self.closed:
            return "<Section closed>"
        return f"<Section {self.ident if self.shmid >= 0 else 'bootstrap'} size={self.size}>"
