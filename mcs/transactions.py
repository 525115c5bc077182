"""Crash-atomic transactions over a component's master area (issue 11). (Named in the plural:
``mcs.transaction`` is the decorator, exported lazily by :mod:`mcs`.)

``with comp.transaction() as tx:`` (or ``comp.run_transaction(fn)``, or a method decorated with
``@mcs.transaction``) runs inside a consistent block and writes shared data through ``tx``:

* ``tx.lock(mutex)`` takes a robust mutex of the master area (a handle or its offset) until the
  transaction ends (strict two-phase locking: a transaction sees and leaves a consistent state).
  The mutex records the transaction's *owner tag* (slot, lane, incarnation: :mod:`mcs.undo`),
  so whoever finds it ABANDONED rolls back that owner's log, marks the mutex consistent and
  goes on: no global recovery, no repair code. A lock that waits longer than
  ``transaction_lock_wait`` while the transaction holds other mutexes rolls the transaction
  back and raises :class:`TransactionConflict` (a possible deadlock): the retry loops retry it.
* ``tx.store64``, ``tx.write``, ``tx.add64`` record the before-image in the member's undo log
  first, then write. Reads go through ``comp.master_area`` as usual.
* The end of the block commits with one store (the log's state word): from then on the
  transaction is never rolled back and never re-run, whatever recovery was requested during it.
  An exception, a recovery request seen at a lock, or a poisoned area before the commit rolls it
  back (own before-images, newest first) and the retry loops run it again.

The logs are the undo logs of :mod:`mcs.undo` (one per member slot and lane) in a
:class:`~mcs.undo.LogRegion` placed after the component's own bytes of the master area, so the
author's offsets do not move. The master of every recovery rolls back the logs that departed
members left ACTIVE (before ``on_master``, before any worker resumes); the next locker of one of
a dead member's mutexes does the same, sooner, for that member's transaction.

Threads: the worker thread runs the transaction; the recovery thread runs
:meth:`TransactionLogs.create` and :meth:`TransactionLogs.recover` in the master phase.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from mcs import faults, layout
from mcs._gsm import GlobalMutex
from mcs.errors import (
    CorruptObjectError,
    McsError,
    NoTransactionError,
    NotRecoverableError,
    Recovering,
    TransactionConflict,
)
from mcs.section import Section
from mcs.types import LockStatus, LogState, RollbackOutcome
from mcs.undo import Lanes, LogRegion, decode_owner, owner_tag

if TYPE_CHECKING:
    from membership.view import View

# The component (mcs.component.McsComponent) sits above this module: it is typed as Any here.
McsComponent = Any

__all__ = ["Transaction", "TransactionLogs", "LOG_ALIGN"]

LOG_ALIGN = 4096  # the log region starts on a page after the author's bytes
WAIT_SLICE = 0.005  # a transaction's lock looks for recovery requests and conflicts this often
MASK64 = (1 << 64) - 1


class TransactionLogs:
    """The undo logs of one component instance: their place in the master area (after the
    author's ``master_area_size`` bytes), this process's lanes, and the region bound to the
    current master area (rebound when the area is replaced)."""

    def __init__(self, comp: McsComponent) -> None:
        self.comp = comp
        lanes, log_size = comp.transaction_lanes, comp.transaction_log_size
        self.enabled = bool(comp.master_area_size and lanes)
        self.offset = -(-comp.master_area_size // LOG_ALIGN) * LOG_ALIGN
        self.lanes = lanes
        self.log_size = log_size
        if self.enabled:
            if not 1 <= lanes <= 255 or log_size % 64 or not 0 < log_size < 64 << 16:
                raise ValueError(f"transaction_lanes must be 1..255 (got {lanes}) and "
                                 f"transaction_log_size a multiple of 64 below 4 MiB "
                                 f"(got {log_size})")
            #: the layout of the logs, recorded with the master area's descriptor
            self.geometry = self.offset << 24 | lanes << 16 | log_size // 64
            self.pool = Lanes(lanes)
        else:
            self.geometry = 0
        self._bind_lock = threading.Lock()  # workers rebinding after the area changed
        self._area: Section | None = None
        self._region: LogRegion | None = None
        self._handles: dict[tuple[int, int], GlobalMutex] = {}  # (lane, offset) -> tagged handle

    def area_size(self, user_size: int) -> int:
        """Bytes of the master area: the author's, then the logs."""
        if not self.enabled:
            return user_size
        return self.offset + LogRegion.size_for(self.log_size, lanes=self.lanes)

    def _region_of(self, area: Section) -> LogRegion:
        return LogRegion(area, self.offset, self.log_size, lanes=self.lanes)

    def create(self, area: Section) -> None:
        """Recovery thread, master: initialise the logs of a new (zeroed) master area."""
        if self.enabled:
            self._region_of(area).create()

    def check(self, area: Section) -> str:
        """Why the logs of an adopted area cannot be used ("" when they can)."""
        if not self.enabled:
            return ""
        try:
            self._region_of(area).open()
        except CorruptObjectError as exc:
            return f"its transaction logs are corrupt ({exc})"
        return ""

    def recover(self, area: Section, view: "View") -> int:
        """Recovery thread, master, every member quiesced: roll back the transactions that
        members no longer in ``view`` left ACTIVE (a committed one is kept and its log made
        idle). Returns how many were rolled back."""
        if not self.enabled:
            return 0
        region = self._region_of(area)
        live = {(m.slot, m.incarnation & ((1 << 48) - 1)) for m in view.members}
        rolled = 0
        for slot, lane in region.in_use():  # one load per log; handles only for those in use
            undo = region.log_for(slot, lane)
            if undo.state is not LogState.IDLE:
                owner = undo.owner
                who = decode_owner(owner)
                if (who.slot, who.incarnation) in live:
                    continue  # cannot be: its worker aborted before it quiesced
                if undo.rollback_dead(owner) is RollbackOutcome.ROLLED_BACK:
                    rolled += 1
        return rolled

    def region(self, area: Section) -> LogRegion:
        """The region bound to ``area`` (a worker, inside a block: the area is stable)."""
        region = self._region
        if self._area is area and region is not None:
            return region
        with self._bind_lock:
            if self._area is not area or self._region is None:
                self._region = self._region_of(area)
                self._handles = {}
                self._area = area
            return self._region

    def close(self) -> None:
        """Drop the region and the mutex handles (they keep the area's mapping alive)."""
        with self._bind_lock:
            self._region = None
            self._handles = {}
            self._area = None

    def handle(self, lane: int, offset: int, tag: int) -> GlobalMutex:
        """A handle on the master area's mutex at ``offset`` that tags it with ``tag``."""
        key = (lane, offset)
        h = self._handles.get(key)
        if h is None or h.tag != tag:
            h = self._handles[key] = GlobalMutex.open(self._area, offset, tag=tag)
        return h


class Transaction:
    """One transaction of one thread: see the module docstring. Made by
    :meth:`McsComponent.transaction`; nested ``with`` blocks (and nested ``@transaction``
    methods) join the outer transaction."""

    __slots__ = ("comp", "logs", "area", "region", "log", "lane", "owner", "depth", "_held",
                 "_block", "_mf")

    def __init__(self, comp: McsComponent) -> None:
        self.comp = comp
        self.logs: TransactionLogs | None = comp._txlogs
        self.depth = 0
        self.lane = -1
        self._held: dict[int, GlobalMutex] = {}

    # -- the block ----------------------------------------------------------------------------

    def __enter__(self) -> "Transaction":
        if self.depth:
            self.depth += 1  # a nested block joins this transaction
            return self
        comp, logs = self.comp, self.logs
        if logs is None:
            raise McsError(f"{comp.component_name}: component not started")
        if not logs.enabled:
            raise NoTransactionError(
                f"{comp.component_name}: no transaction logs (a master area and "
                "transaction_lanes > 0 are needed)")
        self.lane = logs.pool.acquire()  # outside the block: waiting here never holds recovery
        try:
            block = self._block = comp.consistent()
            block.__enter__()
        except BaseException:
            logs.pool.release(self.lane)
            raise
        try:
            area = comp.master_area
            if area is None:
                raise NoTransactionError(f"{comp.component_name}: no master area")
            self.area = area
            self.region = logs.region(area)
            member = comp.member
            self.owner = owner_tag(member.slot, self.lane, member.incarnation)
            self.log = self.region.log_for(member.slot, self.lane)
            self._mf = comp._mf_seen
            self.log.begin(self.owner)
        except BaseException as exc:
            self._end_block(type(exc), exc, committed=False)
            raise
        self.depth = 1
        comp._local.tx = self
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.depth -= 1
        if self.depth:
            return False  # the outer block decides
        comp = self.comp
        comp._local.tx = None
        if exc_type is None:
            why = self._doomed()
            if not why:
                self.log.commit()  # the point of no return: never rolled back, never re-run
                faults.point("tx.committed")
                self._release()
                faults.point("tx.released")
                self.log.finish()
                self._end_block(None, None, committed=True)
                return False
            exc = Recovering(why)
        faults.point("tx.rollback")
        self.log.abort()  # own before-images, newest first; then the locks go
        self._release()
        with comp._stats_lock:
            comp.stats.tx_aborts += 1
            if exc_type is TransactionConflict:
                comp.stats.tx_conflicts += 1
        self._end_block(exc_type, exc, committed=False)  # Recovering if one was requested
        if exc_type is None:
            raise exc
        return False

    def _doomed(self) -> str:
        """Why this transaction must not commit ("" if it may): it may have read a poisoned
        area (poison marks the area failed before it changes a byte), or this member was
        fenced (the others may already have rolled its log back)."""
        comp = self.comp
        if self.area.failed or comp._root.load64(layout.MEMORY_FAILURES) != self._mf:
            return "a memory failure was detected during the transaction; retry"
        if comp.member.fenced:
            return "this member was fenced"
        return ""

    def _end_block(self, exc_type: Any, exc: Any, *, committed: bool) -> None:
        block = self._block
        try:
            if committed:
                block.leave_committed()
            else:
                block.__exit__(exc_type, exc, None)
        finally:
            self.logs.pool.release(self.lane)
            self.lane = -1

    def _release(self) -> None:
        held, self._held = self._held, {}
        for h in reversed(held.values()):
            try:
                h.unlock()
            except CorruptObjectError as err:  # poisoned under us: left to the recovery
                with self.comp._stats_lock:
                    self.comp.stats.unlock_failures += 1

    # -- operations ---------------------------------------------------------------------------

    def lock(self, mutex: GlobalMutex | int) -> None:
        """Hold the master area's mutex ``mutex`` (a handle or its offset) until the end of the
        transaction. An ABANDONED mutex is repaired here (its dead owner's log rolled back);
        :class:`Recovering` when a recovery is requested meanwhile; :class:`TransactionConflict`
        after waiting ``transaction_lock_wait`` while holding other mutexes."""
        offset = mutex if isinstance(mutex, int) else mutex.offset
        if offset in self._held:
            return
        comp = self.comp
        h = self.logs.handle(self.lane, offset, self.owner)
        started = 0.0
        while True:
            if comp._gate_closed:
                raise Recovering("a recovery was requested")
            try:
                status = h.lock(WAIT_SLICE)
            except (NotRecoverableError, CorruptObjectError):
                comp._await_departure(None)
                comp.request_recovery(f"not recoverable mutex at offset {offset}")
                raise Recovering("mutex not recoverable: recovery requested") from None
            if status is LockStatus.OK:
                self._held[offset] = h
                if comp._gate_closed:
                    raise Recovering("a recovery was requested")
                return
            if status is LockStatus.ABANDONED:
                self._held[offset] = h
                self._repair(h)
                return
            if self._held:
                now = time.monotonic()
                if not started:
                    started = now
                elif now - started >= comp.transaction_lock_wait:
                    raise TransactionConflict(
                        f"mutex at offset {offset} not acquired in "
                        f"{comp.transaction_lock_wait}s while holding {len(self._held)}")

    def _repair(self, h: GlobalMutex) -> None:
        """Roll back the dead holder's transaction (its tag names its log), then declare the
        mutex consistent. Idempotent: the recovery or another locker may have done it."""
        previous = h.previous_owner
        tag = previous.tag if previous is not None else 0
        if tag:
            who = decode_owner(tag)
            if who.slot < layout.MAX_MEMBERS and who.lane < self.logs.lanes:
                self.region.log_for(who.slot, who.lane).rollback_dead(tag)
        h.mark_consistent()
        with self.comp._stats_lock:
            self.comp.stats.tx_repaired += 1

    def store64(self, offset: int, value: int) -> None:
        """Store a 64-bit word of the master area (before-image logged first)."""
        self.log.record(offset, 8)
        faults.point("tx.logged")
        self.area.store64(offset, value & MASK64)

    def add64(self, offset: int, delta: int) -> int:
        """Add ``delta`` (mod 2**64) to a word of the master area; returns the new value."""
        self.log.record(offset, 8)
        faults.point("tx.logged")
        area = self.area
        value = (area.load64(offset) + delta) & MASK64
        area.store64(offset, value)
        return value

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of the master area (before-image logged first)."""
        n = len(data)
        self.log.record(offset, n)
        faults.point("tx.logged")
        self.area.view(offset, n)[:] = data

    def load64(self, offset: int) -> int:
        """A word of the master area (the same as ``comp.master_area.load64``)."""
        return self.area.load64(offset)

    @property
    def txid(self) -> int:
        """This transaction's number in its log (+1 at every begin)."""
        return self.log.txid
