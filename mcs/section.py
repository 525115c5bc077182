"""Contributed sections of global shared memory and their printable identifiers.

A section is a private SysV segment (mode 0600) marked for removal as soon as its creator has
attached it: other processes can still attach it by id until the last holder detaches or dies,
and then the kernel frees it, whatever way its holders ended. The one window it does not cover, a
creator killed between ``shmget`` and marking the segment, is closed by the survivors:
:func:`reap_orphans` marks the unmarked segments of a dead creator. The identifier
``sysv:<shmid>:<nonce>`` carries the random nonce written in the section header, so an id that
the kernel has reused for another segment fails to attach instead of opening a stranger.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

from mcs import _gsm, faults
from mcs.errors import InvalidIdentifier

__all__ = ["Section", "reap_orphans"]

SYSV_TABLE = "/proc/sysvipc/shm"

_IDENT = re.compile(r"sysv:(\d{1,10}):([0-9a-f]{16})")


class Section(_gsm.Section):
    """A block of global shared memory contributed by this process (see module docstring)."""

    __slots__ = ()

    @classmethod
    def create(cls, size: int) -> "Section":
        """Create a section with ``size`` bytes of zeroed user area, mode 0600."""
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        nonce = int.from_bytes(os.urandom(8), "little")
        shmid = _gsm.shm_new(size)
        try:
            # A process killed here leaves an unmarked segment: see reap_orphans().
            faults.point("section.create.unmarked")
        except BaseException:
            _gsm.shm_remove(shmid)
            raise
        return cls._adopt_sysv(shmid, size, nonce)  # removes the segment if it fails

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


def reap_orphans(creators: Iterable[tuple[int, int]]) -> list[int]:
    """Reclaim the segments that dead processes created but never marked for removal.

    ``creators`` are ``(pid, started_ns)`` pairs of processes known to be dead (or SIGKILLed),
    ``started_ns`` their start in wall-clock ns. A segment of ours created by such a pid since
    it started and not yet marked is marked now: the kernel frees it when its last holder is
    gone. Marked segments and other users' are never touched. Returns the segment ids.
    """
    not_before = {pid: started_ns // 1_000_000_000 - 1 for pid, started_ns in creators}
    if not not_before:
        return []
    uid = os.geteuid()
    reaped = []
    try:
        with open(SYSV_TABLE) as table:
            next(table, None)
            rows = [line.split() for line in table]
    except OSError:
        return []
    for fields in rows:
        # key shmid perms size cpid lpid nattch uid ...
        if len(fields) < 8 or int(fields[7]) != uid:
            continue
        shmid, cpid = int(fields[1]), int(fields[4])
        if cpid in not_before and _gsm.shm_remove_orphan(shmid, cpid, not_before[cpid]):
            reaped.append(shmid)
    return reaped
