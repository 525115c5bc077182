"""Undo logs in shared memory: owner tags, the region of a component's logs, and lanes.

The mechanism is native (:class:`UndoLog`, mcs/_undo.pyx): before-images, one commit store,
rollback of a dead owner's log under the log's robust mutex. This module is the policy around
it:

* an **owner tag** names one transaction owner: ``(slot << 56) | (lane << 48) | incarnation``
  (48 bits of incarnation). A transaction writes it into every mutex it takes, so whoever gets
  one of them ABANDONED knows whose log to roll back;
* a :class:`LogRegion` is ``MAX_MEMBERS x lanes`` logs of ``log_size`` bytes inside an area (a
  component's master area): one log per (member slot, lane), so concurrent transactions of one
  process (one lane per thread at a time) never share a log;
* :class:`Lanes` hands a process's threads their lanes.

Recovery rule: a committed transaction is never rolled back or re-run; an ACTIVE one whose owner
died is rolled back by the next locker of one of its mutexes or by the recovery of the departed
member (:meth:`LogRegion.rollback_member`). Rolling back twice is harmless.

Log layout (``LOG_HEADER`` = 128 bytes, then records)::

    0    robust mutex (64 B): serialises rollbacks of this log by other processes
    64   state u64: 0 IDLE, 1 ACTIVE, 2 COMMITTED
    72   owner u64        80 txid u64 (+1 at every begin)
    88   used u64: bytes of records, stored only after a record is complete
    96   capacity u64 (bytes of record space)
    128  records: offset u64 | length u64 | before-image, padded to 8 bytes
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

from mcs._undo import LOG_HEADER, LOG_STATE, RECORD_HEADER, UndoLog
from mcs.layout import MAX_MEMBERS
from mcs.types import LogState, RollbackOutcome

__all__ = ["UndoLog", "LogRegion", "Lanes", "OwnerTag", "owner_tag", "decode_owner",
           "LOG_HEADER", "RECORD_HEADER", "LANES", "MAX_MEMBERS", "LogState", "RollbackOutcome"]

LANES = 8  # default lanes per member: concurrent transactions of one process
INCARNATION_BITS = 48
INCARNATION_MASK = (1 << INCARNATION_BITS) - 1
MAX_LANES = 256


class OwnerTag(NamedTuple):
    """A decoded owner tag."""

    slot: int
    lane: int
    incarnation: int  # its low 48 bits


def owner_tag(slot: int, lane: int, incarnation: int) -> int:
    """The owner tag of (member slot, lane, incarnation)."""
    if not 0 <= slot < 256 or not 0 <= lane < MAX_LANES:
        raise ValueError(f"slot {slot} / lane {lane} out of range")
    return (slot << 56) | (lane << INCARNATION_BITS) | (incarnation & INCARNATION_MASK)


def decode_owner(tag: int) -> OwnerTag:
    """The (slot, lane, incarnation) of an owner tag."""
    return OwnerTag(tag >> 56, (tag >> INCARNATION_BITS) & 0xFF, tag & INCARNATION_MASK)


class LogRegion:
    """``members x lanes`` undo logs of ``log_size`` bytes each, from ``offset`` of a section.

    Log (slot, lane) is at ``offset + (slot * lanes + lane) * log_size``; :attr:`size` is the
    room the region takes. :meth:`create` initialises every log, :meth:`open` checks and binds
    them (a handle per log, made on first use).
    """

    def __init__(self, section: Any, offset: int, log_size: int, *, lanes: int = LANES,
                 members: int = MAX_MEMBERS) -> None:
        if log_size % 64 or log_size < LOG_HEADER + 64:
            raise ValueError("log_size must be a multiple of 64 and hold a record")
        if not 1 <= lanes <= MAX_LANES or not 1 <= members <= 256:
            raise ValueError("bad lanes / members")
        self.section = section
        self.offset = offset
        self.log_size = log_size
        self.lanes = lanes
        self.members = members
        self._logs: dict[tuple[int, int], UndoLog] = {}

    @staticmethod
    def size_for(log_size: int, *, lanes: int = LANES, members: int = MAX_MEMBERS) -> int:
        """Bytes a region of these dimensions takes."""
        return members * lanes * log_size

    @property
    def size(self) -> int:
        return self.size_for(self.log_size, lanes=self.lanes, members=self.members)

    def offset_of(self, slot: int, lane: int) -> int:
        """Offset (in the section) of log (slot, lane)."""
        if not 0 <= slot < self.members or not 0 <= lane < self.lanes:
            raise IndexError(f"no log for slot {slot} lane {lane}")
        return self.offset + (slot * self.lanes + lane) * self.log_size

    def create(self) -> "LogRegion":
        """Initialise every log (only while no process uses the region)."""
        for slot in range(self.members):
            for lane in range(self.lanes):
                self._logs[slot, lane] = UndoLog.create(
                    self.section, self.offset_of(slot, lane), self.log_size)
        return self

    def open(self) -> "LogRegion":
        """Check that every log is there (CorruptObjectError if not)."""
        for slot in range(self.members):
            for lane in range(self.lanes):
                self.log_for(slot, lane)
        return self

    def log_for(self, slot: int, lane: int) -> UndoLog:
        """The log of (slot, lane)."""
        log = self._logs.get((slot, lane))
        if log is None:
            log = UndoLog.open(self.section, self.offset_of(slot, lane), self.log_size)
            self._logs[slot, lane] = log
        return log

    def in_use(self) -> list[tuple[int, int]]:
        """The (slot, lane) of every log that is not IDLE, read from the state words alone (no
        handle opened): what a recovery has to look at, at the cost of one load per log."""
        load = self.section.load64
        return [(slot, lane) for slot in range(self.members) for lane in range(self.lanes)
                if load(self.offset_of(slot, lane) + LOG_STATE) != 0]

    def rollback_member(self, slot: int, incarnation: int) -> list[RollbackOutcome]:
        """Recover every lane of a departed member (slot, incarnation): one outcome per lane."""
        return [self.log_for(slot, lane).rollback_dead(owner_tag(slot, lane, incarnation))
                for lane in range(self.lanes)]

    def close(self) -> None:
        """Drop the log handles (they hold the section's mapping)."""
        self._logs.clear()


class Lanes:
    """The lanes of this process: a thread takes one for the duration of one transaction
    (``with lanes.take() as lane:``); it blocks while all are busy."""

    def __init__(self, count: int = LANES) -> None:
        if not 1 <= count <= MAX_LANES:
            raise ValueError(f"lanes must be in 1..{MAX_LANES}")
        self.count = count
        self._free = list(range(count - 1, -1, -1))
        self._cond = threading.Condition()

    def acquire(self, timeout: float | None = None) -> int:
        """Take a free lane (the lowest); TimeoutError after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout):
                raise TimeoutError("no free lane")
            return self._free.pop()

    def release(self, lane: int) -> None:
        with self._cond:
            if lane in self._free or not 0 <= lane < self.count:
                raise ValueError(f"lane {lane} is not taken")
            self._free.append(lane)
            self._free.sort(reverse=True)
            self._cond.notify()

    @contextmanager
    def take(self, timeout: float | None = None) -> Iterator[int]:
        lane = self.acquire(timeout)
        try:
            yield lane
        finally:
            self.release(lane)

    @property
    def busy(self) -> int:
        with self._cond:
            return self.count - len(self._free)
