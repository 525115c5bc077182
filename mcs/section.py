"""Contributed sections of global shared memory and their printable identifiers.

A section is a SysV segment (mode 0600) marked for removal as soon as its creator has attached
it: other processes can still attach it by id until the last holder detaches or dies, and then
the kernel frees it, whatever way its holders ended. The one window it does not cover, a creator
killed between ``shmget`` and marking the segment, is closed by the survivors:
:func:`reap_orphans` marks the unmarked segments of a dead creator -- only those that carry the
mcs mark, so a segment the same process made with a plain ``shmget`` is never touched.

The mark is the segment's SysV key, the one attribute set atomically by ``shmget`` itself (the
header is written later, after the window, and memory is never trusted anyway): a tag byte
``KEY_TAG``, 16 random bits and a check byte computed from those bits and the creator's pid,
which the kernel records (``shm_cpid``). ``IPC_PRIVATE`` (0), the usual key of other programs,
never matches; an ``ftok`` key or a random one matches with odds of 1 in 65536, and must also
be unmarked, ours, and made by a member known dead since it joined. Marking a segment for removal
makes its key private again, so keys are only held during the window. The identifier
``sysv:<shmid>:<nonce>`` carries the random nonce written in the section header, so an id that
the kernel has reused for another segment fails to attach instead of opening a stranger.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from typing import Iterable

from mcs import faults, procfs
from mcs._gsm import Section as _NativeSection
from mcs._gsm import shm_new, shm_remove, shm_remove_orphan
from mcs.errors import InvalidIdentifier, NativeError

log = logging.getLogger("mcs.section")

__all__ = ["Section", "reap_orphans", "section_key", "is_section_key"]

KEY_TAG = 0xC5  # top byte of the key of every segment mcs creates (not a printable ftok id)
KEY_ATTEMPTS = 32  # random keys tried before giving up (a collision needs a held key)

_IDENT = re.compile(r"sysv:(\d{1,10}):([0-9a-f]{16})")


class Section(_NativeSection):
    """A block of global shared memory contributed by this process (see module docstring)."""

    __slots__ = ()

    @classmethod
    def create(cls, size: int) -> "Section":
        """Create a section with ``size`` bytes of zeroed user area, mode 0600."""
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        nonce = int.from_bytes(os.urandom(8), "little")
        shmid = _new_marked_segment(size)
        try:
            # A process killed here leaves an unmarked segment: see reap_orphans().
            faults.point("section.create.unmarked")
        except BaseException:
            shm_remove(shmid)
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


def _check_byte(rand: int, pid: int) -> int:
    return (((rand * 0x9E3779B1) ^ (pid * 0x85EBCA77)) & 0xFFFFFFFF) >> 24


def section_key(rand: int, pid: int) -> int:
    """The SysV key (a signed ``key_t``) marking a segment created by ``pid``: ``KEY_TAG``, the
    16 bits of ``rand``, and a check byte of both."""
    key = KEY_TAG << 24 | (rand & 0xFFFF) << 8 | _check_byte(rand & 0xFFFF, pid)
    return key - (1 << 32) if key >= 1 << 31 else key


def is_section_key(key: int, creator: int) -> bool:
    """Whether ``key`` is the mark mcs gives the segments that process ``creator`` creates."""
    key &= 0xFFFFFFFF
    return key >> 24 == KEY_TAG and key & 0xFF == _check_byte(key >> 8 & 0xFFFF, creator)


def _new_marked_segment(size: int) -> int:
    """shmget under a fresh marked key (another random one while a key is taken)."""
    pid = os.getpid()
    for _ in range(KEY_ATTEMPTS):
        try:
            return shm_new(size, section_key(int.from_bytes(os.urandom(2), "little"), pid))
        except FileExistsError:
            continue
    raise NativeError(errno.EEXIST, f"shmget: {KEY_ATTEMPTS} random keys with the mcs mark "
                      f"({KEY_TAG:#04x}......) were all taken; is someone squatting them?")


def reap_orphans(creators: Iterable[tuple[int, int]]) -> list[int]:
    """Reclaim the segments that dead processes created but never marked for removal.

    ``creators`` are ``(pid, started_ns)`` pairs of processes known to be dead (or SIGKILLed),
    ``started_ns`` their start in wall-clock ns. A segment of ours created by such a pid since
    it started, carrying the mcs mark (its key) and not yet marked for removal is marked now:
    the kernel frees it when its last holder is gone. Marked segments, segments without the mcs
    key (a plain ``shmget`` of the same process) and other users' are never touched. Returns
    the segment ids.
    """
    not_before = {pid: started_ns // 1_000_000_000 - 1 for pid, started_ns in creators}
    if not not_before:
        return []
    uid = os.geteuid()
    reaped = []
    try:
        rows = procfs.shm_segments()
    except OSError as exc:  # EMFILE: the caller's next chance (a later death, mcs gc) retries
        log.warning("could not read %s (%s): segments left by dead pids %s not reclaimed now",
                    procfs.SYSV_SHM, exc, sorted(not_before))
        return []
    for row in rows:
        if row.uid == uid and row.cpid in not_before and is_section_key(
                row.key, row.cpid) and shm_remove_orphan(
                    row.shmid, row.cpid, not_before[row.cpid], row.key):
            reaped.append(row.shmid)
    return reaped
