"""McsComponent: the recoverable programming model (the MCS paper's Figures 3 and 6).

A component author writes four hooks and wraps every access to global state in
``with self.consistent() as view:``; the framework does the rest:

* membership (its own domain ``<domain>.<name>``), so the component's view is the agreed set of
  live members hosting it, with a master;
* one **recovery thread** per component instance, which runs the global recovery protocol every
  time anyone requests it (a death, a join or leave, an abandoned mutex, poisoned memory);
* worker gating: ``consistent()`` blocks while a recovery runs, and raises :class:`Recovering`
  inside a block (at its waits, and at its end) when one was requested, so the caller retries;
  :meth:`run` and :func:`transaction` do the retry loop.

The recovery of epoch *E* (every member runs it, in phases, in its recovery thread):

1. quiesce   close the local gate, interrupt waits, wait until local blocks are left;
             then acknowledge ``QUIESCED[slot] = E``;
2. agree     under the root mutex, the first member records the view of *E* (the membership
             view and its master); everyone reads that record;
3. master    once every member of the view has quiesced, the master (re)allocates the master
             area if needed (first time, new master, poisoned) and calls ``on_master(view)``;
             then ``MASTER_DONE = E``;
4. contribute every member attaches the master area, replaces its own contribution if it was
             poisoned, calls ``build_shared_state(view)``, and acknowledges ``ACKED[slot] = E``;
5. stable    when every member of the view has acknowledged *E*, workers resume.

A new request while *E* runs (a death, a timeout, an exception in a hook) abandons *E* and
starts over at the newest requested epoch.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar, overload

from mcs import component_record as rec
from mcs import faults, layout
from mcs._gsm import GlobalEvent, GlobalMutex, monotonic_ns
from mcs.locking import held
from mcs.errors import (
    ClosedError,
    CorruptObjectError,
    FencedError,
    InvalidIdentifier,
    McsError,
    NoTransactionError,
    NotRecoverableError,
    Recovering,
    TransactionConflict,
)
from mcs.bootstrap import validate_domain
from mcs.component_record import ComponentRecord, component_domain
from mcs.section import Section
from mcs.transactions import Transaction, TransactionLogs
from mcs.types import LockStatus, MasterAreaOutcome

import membership
from mcs import sdnotify
from membership.member import Member, ProgressSource
from membership.view import View

__all__ = ["McsComponent", "RecoveryStats", "transaction", "Transaction", "ComponentRecord",
           "component_domain"]

log = logging.getLogger("mcs.component")

T = TypeVar("T")

MEMORY_FAILURES = layout.MEMORY_FAILURES
WAIT_SLICE = 0.005  # blocking waits inside a block look for recovery requests this often
DEPARTURE_WAIT = 0.05  # how long an abandoned mutex waits for the membership to see the death
DEPARTURE_POLL = 0.0005  # ...looking this often
POLL = 0.05  # the recovery thread's and its phases' polling period (between event wake-ups)
BARRIER_POLL = 0.02  # a phase barrier's wait slice on the recovery event
ERROR_BACKOFF = 0.01  # pause after an unexpected error in the recovery thread
GATE_POLL = 0.5  # a worker waiting at the closed gate looks for stop() this often
STOP_JOIN = 10.0  # how long stop() waits for the recovery thread
SPARE_BLOCKS_MAX = 1024  # spare block objects kept (one per thread; threads come and go)
REQUEST_HISTORY = 16  # RecoveryStats.requests keeps this many
CONFLICT_BACKOFF = 0.001  # a transaction that conflicted waits up to this times its attempts
MIN_RECOVERY_TIMEOUT = 5.0  # default recovery timeout: this, or twice the eviction delay


class _Restart(Exception):
    """Internal: the epoch being recovered was superseded; start over."""


@dataclass
class RecoveryStats:
    """What :attr:`McsComponent.stats` reports."""

    recoveries: int = 0
    epoch: int = 0
    generation: int = 0
    restarts: int = 0
    last_reason: str = ""  # why this member last asked for a new epoch
    requests: list[tuple[int, str]] = field(default_factory=list)  # (epoch, reason), newest last
    covered: int = 0  # failures seen while a requested epoch was still to come (no new epoch)
    last_duration_ms: float = 0.0
    last_phases_ms: dict[str, float] = field(default_factory=dict)
    unlock_failures: int = 0  # unlocks of a mutex poisoned under its holder (left to recovery)
    master_area: MasterAreaOutcome = MasterAreaOutcome.NONE  # the last master phase here
    # (epoch, outcome) of the last master phases on this member that did not adopt, newest last
    master_area_history: list[tuple[int, MasterAreaOutcome]] = field(default_factory=list)
    tx_rolled_back: int = 0  # departed members' transactions this member rolled back (recovery)
    tx_repaired: int = 0  # mutexes found abandoned by a transaction and repaired from the log
    tx_aborts: int = 0  # transactions rolled back and retried (recovery request or conflict)
    tx_conflicts: int = 0  # of which: a lock waited too long while holding others
    contributions_adopted: int = 0  # contributions taken over from this slot's previous holder


class _Slot:
    """A thread's count of the consistent blocks it is inside. Only its thread writes it; the
    recovery thread reads every thread's (see :class:`_Block`)."""

    __slots__ = ("depth", "__weakref__")

    def __init__(self) -> None:
        self.depth = 0


class _Block:
    """One ``consistent()`` block, and the detection of recovery requests and memory failures
    that happened during it.

    Entering and leaving take no lock (the hot path: about half of what a locked set costs). A
    worker raises its thread's ``_Slot.depth`` and only then looks at the gate; the recovery
    closes the gate and only then reads every depth. Python runs one of them at a time, so
    either the worker sees the gate closed (and backs out before touching anything) or the
    recovery sees the depth (and waits for the block to end): the Dekker argument, with the
    interpreter's one-bytecode-at-a-time order as its fence."""

    __slots__ = ("comp", "slot", "entry", "inside")

    def __init__(self, comp: "McsComponent", slot: _Slot) -> None:
        self.comp = comp
        self.slot = slot
        self.inside = False

    def __enter__(self) -> Any:
        comp = self.comp
        slot = self.slot
        while True:
            slot.depth += 1
            self.entry = comp._interrupts
            if not comp._gate_closed:
                self.inside = True
                return comp._view
            self._leave()  # a recovery is running or began while we entered: wait, then enter
            comp._wait_gate()

    def _leave(self) -> None:
        """Unregister; a block that leaves a closed gate wakes the quiescing recovery."""
        slot = self.slot
        slot.depth -= 1
        if self.comp._gate_closed and not slot.depth:
            self.comp._idle.set()

    def leave_committed(self) -> None:
        """The end of a block whose transaction committed: it is never re-run, so a recovery
        requested meanwhile is no reason to raise (a memory failure is still reported)."""
        comp = self.comp
        self.inside = False
        self._leave()
        if comp._root.load64(MEMORY_FAILURES) != comp._mf_seen:
            comp.detect_memory_failure()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        comp = self.comp
        self.inside = False
        self._leave()
        if comp._root.load64(MEMORY_FAILURES) != comp._mf_seen and comp.detect_memory_failure():
            raise Recovering("a memory failure was detected during the block; retry")
        if comp._interrupts != self.entry and exc_type is not Recovering:
            # Whatever the block computed (or raised) may come from inconsistent state.
            raise Recovering("a recovery was requested during the block; retry") from exc


class _Held:
    """A mutex held inside a consistent block (``with self.lock(m):``)."""

    __slots__ = ("mutex", "comp")

    def __init__(self, mutex: GlobalMutex, comp: "McsComponent") -> None:
        self.mutex = mutex
        self.comp = comp

    def __enter__(self) -> GlobalMutex:
        return self.mutex

    def __exit__(self, *exc: Any) -> None:
        try:
            self.mutex.unlock()
        except CorruptObjectError as err:
            # Poisoned under us: the recovery that the memory failure asks for re-creates it
            # (the mapping stays alive meanwhile). Counted, never silent.
            comp = self.comp
            with comp._stats_lock:
                comp.stats.unlock_failures += 1
            log.warning("%s: unlock of the mutex at offset %d failed (%s); left to recovery",
                        comp.component_name, self.mutex.offset, err)


class McsComponent:
    """Base class of recoverable components. See the module docstring and
    docs/component.md ("Writing a recoverable component")."""

    #: bytes of shared memory the framework allocates in the master, as :attr:`master_area`
    master_area_size: int = 0
    #: bytes of shared memory each member contributes, as :attr:`contribution`
    contribution_size: int = 0
    #: component name (default: the class name, lower-cased)
    name: str = ""
    #: say ``READY=1`` (sd_notify: to ``mcs supervise`` or systemd) once :meth:`start` returns
    #: consistent; False for a program that is ready only later (the web cache: once it serves)
    notify_ready: bool = True
    #: layout version of the master area: a new master adopts a published area only if it has
    #: this version (raise it when the layout of the area changes)
    master_area_version: int = 1
    #: concurrent transactions per member (a thread holds a lane for one transaction); 0: none
    transaction_lanes: int = 4
    #: bytes of undo log per lane (a transaction's before-images and 16 B per write must fit)
    transaction_log_size: int = 16384
    #: seconds a transaction waits for a mutex while holding others before it rolls back and
    #: retries (TransactionConflict): no deadlock between transactions locking in any order
    transaction_lock_wait: float = 0.05
    #: keep departed members' contributions attached (their data stays readable), and let the
    #: next member of a slot take over the contribution its previous holder left
    #: (:meth:`adopt_contribution` decides); False: a departed member's contribution is dropped
    adopt_contributions: bool = False

    def __init__(self, domain: str, *, node: str | None = None, recovery_timeout: float | None = None,
                 **timing: float) -> None:
        self.domain = validate_domain(domain)
        self.component_name = self.name or type(self).__name__.lower()
        self._member_domain = component_domain(self.domain, self.component_name)
        self._node = node
        self._timing = timing
        self._recovery_timeout = recovery_timeout
        self.member: Member | None = None
        self.master_area: Section | None = None
        self.contribution: Section | None = None
        self.stats = RecoveryStats()
        self._stats_lock = threading.Lock()  # stats are updated by workers and the recovery thread
        self._root: Section | None = None  # the root of the component's domain (start())
        self._event: GlobalEvent | None = None  # its recovery event (start())
        self._view: View | None = None
        self._epoch = 0  # newest epoch this member saw become stable
        self._working = 0  # the epoch being recovered (or _epoch)
        self._gate_closed = True  # closed until the first recovery completes
        self._gate = threading.Condition()
        # Each thread's block and depth (_Block explains the lock-free protocol); the recovery
        # thread reads the depths of every thread that ever entered a block:
        self._local = threading.local()  # .block: this thread's reusable block; .tx: its transaction
        self._slots_lock = threading.Lock()  # guards _slots (a thread's first block, quiesce)
        self._slots: weakref.WeakSet[_Slot] = weakref.WeakSet()  # dies with its thread's local
        self._idle = threading.Event()
        self._interrupts = 0
        self._interrupt = threading.Event()
        self._stopping = threading.Event()
        self._started = False
        # Other members' contributions, attached by workers and dropped by the recovery thread:
        self._contribs_lock = threading.Lock()
        self._contribs: dict[int, tuple[str, Section]] = {}  # slot -> (ident, section)
        self._master_ident = ""  # identifier of master_area as published ("": not yet)
        #: True while ``on_master`` runs on an area that was just created (zeroed): initialise it
        self.master_area_fresh = False
        self._txlogs: TransactionLogs | None = None  # the undo logs in the master area (start())
        self._mf_seen = 0
        self._recovery_thread: threading.Thread | None = None

    # -- hooks for subclasses ---------------------------------------------------------------

    def init_local(self) -> None:
        """Once, before joining: set up local (non-shared) state. Touch nothing global."""

    def build_shared_state(self, view: View) -> None:
        """At first join and after every recovery: re-contribute this member's own state."""

    def on_master(self, view: View) -> None:
        """In the master only, during the master phase: reset :attr:`master_area`."""

    def on_gate(self, closed: bool) -> None:
        """Called holding the gate's lock, just after the gate closed (``closed``) and just
        before it opens after a recovery. For workers that are not Python threads (a native
        loop reading shared memory without the GIL, as webcache.native): they keep a gate of
        their own, closed and opened here, and :meth:`workers_quiet` says when they are out."""

    def workers_quiet(self, timeout: float) -> bool:
        """Asked by the quiesce phase once no Python thread is inside a block (with the gate
        closed): True when the workers of :meth:`on_gate` are out of their blocks too (they may
        be waited for up to ``timeout`` seconds)."""
        return True

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "McsComponent":
        """Initialise locally, join, and wait until the first recovery made us consistent."""
        if self._started:
            raise McsError("component already started")
        self._started = True
        self._txlogs = TransactionLogs(self)
        self.init_local()
        self.member = membership.join(self._member_domain, node=self._node, **self._timing)
        self._root = self.member.boot.section
        if self._recovery_timeout is None:
            self._recovery_timeout = max(MIN_RECOVERY_TIMEOUT, 2 * self.member.timing.evict_after)
        self._event = GlobalEvent.open(self._root, rec.C_RECOVERY_EVENT)
        self._mf_seen = self._root.load64(layout.MEMORY_FAILURES)
        self._working = self._epoch = self._root.load64(rec.C_STABLE)
        # Joining needs one recovery that includes us: join a pending one if there is one.
        self._request(max(self._root.load64(rec.C_REQUESTED), self._epoch + 1), "join")
        self.member.on_view_change(self._on_view_change)
        self._recovery_thread = threading.Thread(
            target=self._recovery_main, name=f"mcs-recovery-{self.component_name}", daemon=True)
        self._recovery_thread.start()
        deadline = time.monotonic() + timeout
        with self._gate:
            while self._gate_closed and not self._stopping.is_set():
                if not self._gate.wait(max(0.0, deadline - time.monotonic())):
                    if time.monotonic() >= deadline:
                        self.stop()
                        raise TimeoutError(f"{self.component_name}: no consistent state in {timeout}s")
        if self.notify_ready:
            sdnotify.notify(f"READY=1\nSTATUS={self.component_name}: member slot "
                            f"{self.member.slot} of {self.domain}")
        return self

    def stop(self) -> None:
        """Leave the domain cleanly (others recover without us) and release everything."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._interrupt.set()
        with self._gate:
            self._gate.notify_all()
        if self._recovery_thread is not None and self._recovery_thread is not threading.current_thread():
            self._event.set()
            self._recovery_thread.join(STOP_JOIN)
        if self.member is not None:
            self.member.leave()
        with self._contribs_lock:
            for _, sec in self._contribs.values():
                sec.close()
            self._contribs.clear()
        if self._txlogs is not None:
            self._txlogs.close()
        for sec in (self.master_area, self.contribution):
            if sec is not None:
                sec.close()

    def __enter__(self) -> "McsComponent":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def view(self) -> View | None:
        """The view of the newest stable epoch (members, master, generation)."""
        return self._view

    @property
    def slot(self) -> int:
        return self.member.slot

    @property
    def is_master(self) -> bool:
        return self._view is not None and self._view.master is not None and \
            self._view.master.slot == self.member.slot

    # -- workers --------------------------------------------------------------------------

    def consistent(self) -> _Block:
        """``with comp.consistent() as view:`` — a block that sees consistent global state."""
        # One block object per thread, reused (a nested block makes its own): building one is
        # a third of what an empty block costs.
        try:
            block = self._local.block
        except AttributeError:
            block = self._thread_block()
        return block if not block.inside else _Block(self, block.slot)

    def _thread_block(self) -> _Block:
        slot = _Slot()
        with self._slots_lock:
            self._slots.add(slot)
        block = self._local.block = _Block(self, slot)
        return block

    def transaction(self) -> Transaction:
        """``with comp.transaction() as tx:`` — a crash-atomic transaction over the master area
        (see :mod:`mcs.transactions`): it commits at the end of the block, and once committed
        it is never rolled back or run again. Interrupted before the commit (a recovery, a
        conflict, an exception), it is rolled back and the exception propagates
        (:class:`Recovering` or :class:`TransactionConflict`: run it again;
        :meth:`run_transaction` and ``@transaction`` do). Inside a transaction of this thread,
        the same transaction (nested blocks join it)."""
        current = getattr(self._local, "tx", None)
        return current if current is not None else Transaction(self)

    @property
    def tx(self) -> Transaction:
        """The calling thread's current transaction (in a ``@transaction`` method);
        :class:`NoTransactionError` outside one."""
        current = getattr(self._local, "tx", None)
        if current is None:
            raise NoTransactionError("not inside a transaction of this component")
        return current

    def run_transaction(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(tx, *args, **kwargs)`` in a transaction, run again after every rollback
        (recovery, conflict) until it commits: exactly once. Another exception rolls it back
        and propagates."""
        attempt = 0
        while True:
            try:
                with self.transaction() as tx:
                    return fn(tx, *args, **kwargs)
            except TransactionConflict:
                attempt += 1
                time.sleep(random.uniform(0, CONFLICT_BACKOFF * min(attempt, 8)))
            except Recovering:
                pass
            if self._stopping.is_set():
                raise ClosedError(f"{self.component_name} is stopped") from None

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` inside a consistent block, retrying it after every recovery (at least
        once: a plain block that finished is run again if a recovery was requested during it;
        use :meth:`run_transaction` for exactly once)."""
        while True:
            try:
                with self.consistent():
                    return fn(*args, **kwargs)
            except Recovering:
                if self._stopping.is_set():
                    raise ClosedError(f"{self.component_name} is stopped") from None

    def _in_block(self) -> bool:
        """True if the calling thread is inside a consistent block of this component."""
        block = getattr(self._local, "block", None)
        return block is not None and block.slot.depth > 0

    def _active_blocks(self) -> int:
        """How many blocks the threads of this process are inside (nested ones included)."""
        with self._slots_lock:
            return sum(slot.depth for slot in self._slots)

    def _has_active_blocks(self) -> bool:
        return self._active_blocks() > 0

    def _wait_gate(self) -> None:
        if self._in_block():
            # A nested block: waiting here would deadlock the recovery, which waits for the
            # outer block to end. The outer block retries instead.
            raise Recovering("a recovery is running (nested consistent block)")
        with self._gate:
            while self._gate_closed:
                if self._stopping.is_set():
                    raise ClosedError(f"{self.component_name} is stopped")
                self._gate.wait(GATE_POLL)

    def _check_interrupt(self) -> None:
        if self._gate_closed:
            raise Recovering("a recovery was requested")

    def lock(self, mutex: GlobalMutex, timeout: float | None = None, *,
             repair: Callable[[], None] | None = None) -> _Held:
        """Lock a global mutex inside a block: ``with self.lock(m): ...``.

        Wakes up with :class:`Recovering` when a recovery is requested. An abandoned mutex means
        its holder died mid-update: it is released *unrepaired* (so nobody can read the
        half-update: every later lock raises NotRecoverable until the master re-creates it), a
        recovery is requested, and :class:`Recovering` is raised. Unless ``repair`` is given:
        for data that every step leaves consistent (one publishing store per update, as LMDB
        does), ``repair()`` runs holding the mutex, which is then marked consistent and held, and
        no recovery is asked for (the membership sees the death by itself).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_interrupt()
            try:
                status = mutex.lock(WAIT_SLICE)
            except (NotRecoverableError, CorruptObjectError):
                self._await_departure(None)  # whoever saw it abandoned is on it
                self.request_recovery(f"not recoverable mutex at offset {mutex.offset}")
                raise Recovering("mutex not recoverable: recovery requested") from None
            if status is LockStatus.OK:
                if self._gate_closed:
                    mutex.unlock()
                    raise Recovering("a recovery was requested")
                return _Held(mutex, self)
            if status is LockStatus.ABANDONED and repair is not None:
                _repair(mutex, repair)
                if self._gate_closed:
                    mutex.unlock()
                    raise Recovering("a recovery was requested")
                return _Held(mutex, self)
            if status is LockStatus.ABANDONED:
                owner = mutex.previous_owner
                mutex.unlock()  # unrepaired on purpose: see the docstring
                self._await_departure(owner)
                self.request_recovery(f"abandoned mutex at offset {mutex.offset} (owner {owner})")
                raise Recovering("abandoned mutex: recovery requested")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"mutex at offset {mutex.offset} not acquired in {timeout}s")

    def _await_departure(self, owner: Any, timeout: float = DEPARTURE_WAIT) -> None:
        """The robust futex reports a dead holder before the membership publishes its death
        (~1 ms later). Give the membership that long (until ``owner`` is out of the view, or
        any recovery is asked for), so the recovery that the view change asks for is the one
        that also repairs this mutex, instead of a second epoch agreeing on a view that still
        holds the dead member. ``owner`` None: wait for a recovery request only."""
        if owner is not None and (not owner.pid or owner.pid == os.getpid()):
            return
        root = self._root
        deadline = time.monotonic() + timeout
        while root.load64(rec.C_REQUESTED) <= root.load64(rec.C_STABLE):
            if time.monotonic() >= deadline or owner is not None and not any(
                    m.pid == owner.pid for m in self.member.table.read_view().members):
                return
            time.sleep(DEPARTURE_POLL)

    def recovery_lock(self, mutex: GlobalMutex, timeout: float = 5.0, *,
                      repair: Callable[[], None] | None = None) -> _Held:
        """Lock a mutex from a recovery hook (``build_shared_state``): ``with
        self.recovery_lock(m):``. A holder that died during this recovery (ABANDONED) or a
        timeout fails the hook, and the recovery starts over at the next epoch; with
        ``repair`` (see :meth:`lock`), an abandoned mutex is repaired and held instead."""
        status = mutex.lock(timeout=timeout)
        if status is LockStatus.OK:
            return _Held(mutex, self)
        if status is LockStatus.ABANDONED and repair is not None:
            _repair(mutex, repair)
            return _Held(mutex, self)
        if status is LockStatus.ABANDONED:
            mutex.unlock()  # unrepaired: the next master phase re-creates it
        raise McsError(f"mutex at offset {mutex.offset}: {status.name} during recovery")

    def wait(self, event: GlobalEvent, seen: int, timeout: float | None = None) -> bool:
        """Wait for a global event inside a block; :class:`Recovering` on a recovery request."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_interrupt()
            if event.wait(seen, WAIT_SLICE):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def sleep(self, seconds: float) -> None:
        """Sleep inside a block; :class:`Recovering` as soon as a recovery is requested."""
        self._check_interrupt()
        if self._interrupt.wait(seconds):
            raise Recovering("a recovery was requested")

    # -- recovery requests ------------------------------------------------------------------

    def request_recovery(self, reason: str) -> None:
        """Ask every member for a global recovery (idempotent for one failure: everyone who
        sees the same failure asks for the same epoch, the one after the epoch they are in).

        Called from inside a consistent block, an epoch already requested and not yet stable
        covers the failure: its master and contribution phases have not started (they wait for
        this block to end), so they rebuild after it. No second epoch is started then."""
        if self.member is None:
            raise McsError("component not started")
        self._request(self._working + 1, reason,
                      covering=rec.C_STABLE if self._in_block() else rec.C_AGREED)

    def _request(self, target: int, reason: str, covering: int = rec.C_AGREED) -> None:
        """Raise the requested epoch to ``target`` unless an epoch that will see this failure is
        already asked for. ``covering`` says which: ``C_AGREED``, an epoch requested that has
        not agreed on its view yet (it records the view, and its master rebuilds the shared
        structures, after now); ``C_STABLE`` (failures seen inside a block), any epoch not
        finished yet."""
        root = self._root
        while True:
            current = root.load64(rec.C_REQUESTED)
            if current >= target:
                break
            if current > root.load64(covering):
                with self._stats_lock:
                    self.stats.covered += 1
                break
            if root.cas64(rec.C_REQUESTED, current, target):
                log.info("%s slot %d requests recovery %d: %s", self.component_name,
                         self.member.slot, target, reason)
                with self._stats_lock:
                    st = self.stats
                    st.last_reason = reason
                    st.requests = st.requests[1 - REQUEST_HISTORY:] + [(target, reason)]
                break
        self._close_gate()
        self._event.set()

    def detect_memory_failure(self) -> bool:
        """True (and a recovery requested) if the domain counted a new memory failure."""
        count = self._root.load64(layout.MEMORY_FAILURES)
        if count == self._mf_seen:
            return False
        self._mf_seen = count
        self.request_recovery("memory failure")
        return True

    def _on_view_change(self, view: View) -> None:
        if self._stopping.is_set() or self._view_covered(view.generation):
            return
        self.request_recovery(f"membership generation {view.generation}")

    def _view_covered(self, generation: int) -> bool:
        """True if an epoch already agreed on membership ``generation`` or a later one: one
        failure seen by every survivor must start one global recovery, not one per survivor
        that is late. (An epoch requested but not agreed yet covers it too; ``_request`` sees
        to that: it records the view current when it agrees, which is at least this one, since
        views are published and agreed under the same root mutex.) A covering epoch that fails
        or is superseded asks for the next one itself."""
        return self._root.load64(rec.C_VIEW_GEN) >= generation

    def _close_gate(self) -> None:
        with self._gate:
            if not self._gate_closed:
                self._gate_closed = True
                self.on_gate(True)
            self._interrupts += 1
            self._idle.clear()
            self._interrupt.set()

    # -- the recovery thread ------------------------------------------------------------------

    def _recovery_main(self) -> None:
        root = self._root
        seen = self._event.value
        while not self._stopping.is_set():
            try:
                self._tick()
                target = root.load64(rec.C_REQUESTED)
                if target > self._epoch and target >= self._working:
                    self._recover(target)
                    continue
                self.detect_memory_failure()
                self._event.wait(seen, timeout=POLL)
                seen = self._event.value
            except FencedError:
                log.error("%s: this member was fenced; stopping", self.component_name)
                self._stopping.set()
                return
            except ClosedError:
                if self._stopping.is_set():
                    return
                raise
            except Exception:
                if self._stopping.is_set():
                    return
                log.exception("%s: recovery thread error", self.component_name)
                time.sleep(ERROR_BACKOFF)

    def _tick(self) -> None:
        """The recovery thread's progress signal: a member whose interpreter is stuck (this
        thread cannot run) for ``progress_timeout`` is evicted as hung by the others."""
        self.member.progress(ProgressSource.RECOVERY)

    def _recover(self, epoch: int) -> None:
        self._working = epoch
        started = monotonic_ns()
        phases: dict[str, float] = {}
        mark = started

        def phase(name: str) -> None:
            nonlocal mark
            now = monotonic_ns()
            phases[name] = (now - mark) / 1e6
            mark = now

        try:
            self._quiesce()
            faults.point("recovery.quiesce")
            self._root.store64(rec.quiesced_offset(self.member.slot), epoch)
            self._event.set()
            phase("quiesce")
            view = self._agree(epoch)
            faults.point("recovery.agree")
            phase("agree")
            self._barrier(rec.quiesced_offset, view, epoch)
            phase("barrier")
            if view.master is not None and view.master.slot == self.member.slot:
                faults.point("recovery.master")
                self._master_phase(view)
                faults.point("recovery.master.done")
                self._root.store64(rec.C_MASTER_DONE, epoch)
                self._event.set()
            else:
                self._wait_for(lambda: self._root.load64(rec.C_MASTER_DONE) >= epoch, epoch)
            phase("master")
            self._attach_master_area()
            self._ensure_contribution()
            self._drop_departed(view)
            self.build_shared_state(view)
            faults.point("recovery.contribute")
            self._root.store64(rec.acked_offset(self.member.slot), epoch)
            self._event.set()
            phase("contribute")
            self._barrier(rec.acked_offset, view, epoch)
            self._keep_contributions(view)
            self._stable(epoch)
            phase("stable")
            faults.point("recovery.stable")
        except _Restart:
            with self._stats_lock:
                self.stats.restarts += 1
            return
        except (FencedError, ClosedError):
            raise
        except Exception as exc:
            log.exception("%s: recovery %d failed; retrying at the next epoch", self.component_name, epoch)
            with self._stats_lock:
                self.stats.restarts += 1
            self.request_recovery(f"recovery {epoch} failed: {exc!r}")
            return
        self._view = view
        self._epoch = epoch
        with self._stats_lock:
            st = self.stats
            st.recoveries += 1
            st.epoch = epoch
            st.generation = view.generation
            st.last_duration_ms = (monotonic_ns() - started) / 1e6
            st.last_phases_ms = phases
        with self._gate:
            if self._root.load64(rec.C_REQUESTED) <= epoch and not self._stopping.is_set():
                self.on_gate(False)
                self._gate_closed = False
                self._interrupt.clear()
            self._gate.notify_all()

    def _quiesce(self) -> None:
        self._close_gate()
        deadline = time.monotonic() + self._recovery_timeout
        while True:
            self._idle.clear()  # a block that ends after this wakes us (see _Block._leave)
            if not self._has_active_blocks() and self.workers_quiet(POLL):
                return
            self._idle.wait(POLL)
            self._tick()
            if self._stopping.is_set():
                raise ClosedError("stopping")
            if time.monotonic() > deadline:
                log.warning("%s: workers did not leave their blocks in %.1fs (still waiting)",
                            self.component_name, self._recovery_timeout)
                deadline = time.monotonic() + self._recovery_timeout

    def _agree(self, epoch: int) -> View:
        """Record (first member) or read (others) the view of ``epoch``."""
        root = self._root
        mutex = self.member.boot.root_mutex(tag=self.member.incarnation)
        while True:
            status = mutex.lock(timeout=POLL)
            if status is not LockStatus.TIMEOUT:
                break
            self._tick()
            self._check_superseded(epoch)
        with held(mutex, status):
            agreed = root.load64(rec.C_AGREED)
            if agreed > epoch:
                raise _Restart
            if agreed < epoch:
                view = self.member.table.read_view()
                root.store64(rec.C_VIEW_GEN, view.generation)
                root.store64(rec.C_VIEW_MASK, sum(1 << m.slot for m in view.members))
                root.store64(rec.C_MASTER, 0 if view.master is None else view.master.slot + 1)
                root.store64(rec.C_AGREED, epoch)
            generation = root.load64(rec.C_VIEW_GEN)
            mask = root.load64(rec.C_VIEW_MASK)
            master_slot = root.load64(rec.C_MASTER)
        table = self.member.table
        members = tuple(
            m for m in (table.read(s).info for s in range(layout.MAX_MEMBERS) if mask >> s & 1))
        master = next((m for m in members if m.slot + 1 == master_slot), None)
        view = View(generation, members, master)
        if view.member(self.member.slot) is None or \
                view.member(self.member.slot).incarnation != self.member.incarnation:
            # We joined after this epoch's view was recorded: the others finish it without us,
            # and the next epoch includes us.
            self._request(epoch + 1, "joined after the view was recorded")
            raise _Restart
        return view

    def _check_superseded(self, epoch: int) -> None:
        if self._stopping.is_set():
            raise ClosedError("stopping")
        if self.member.fenced:
            raise FencedError("member fenced")
        if self._root.load64(rec.C_REQUESTED) > epoch:
            raise _Restart

    def _wait_for(self, predicate: Callable[[], bool], epoch: int) -> None:
        """Wait on the recovery event until ``predicate``; restart if superseded or too slow."""
        deadline = time.monotonic() + self._recovery_timeout
        seen = self._event.value
        while not predicate():
            self._tick()
            self._check_superseded(epoch)
            if time.monotonic() > deadline:
                self.request_recovery(f"recovery {epoch} timed out")
                raise _Restart
            self._event.wait(seen, timeout=BARRIER_POLL)
            seen = self._event.value

    def _barrier(self, word_of: Callable[[int], int], view: View, epoch: int) -> None:
        """Wait until the per-slot word ``word_of(slot)`` of every member of ``view`` reached
        ``epoch``."""
        root = self._root
        offsets = [word_of(m.slot) for m in view.members]
        self._wait_for(lambda: all(root.load64(off) >= epoch for off in offsets), epoch)

    def _stable(self, epoch: int) -> None:
        root = self._root
        while True:
            current = root.load64(rec.C_STABLE)
            if current >= epoch or root.cas64(rec.C_STABLE, current, epoch):
                break
        self._event.set()

    # -- shared areas ---------------------------------------------------------------------

    def _master_phase(self, view: View) -> None:
        """Adopt the published master area if it is sound, else create a zeroed one; roll back
        the transactions that departed members left in it; ``on_master``; publish."""
        if not self.master_area_size:
            self.on_master(view)
            return
        outcome, why = self._adopt_or_create()
        area = self.master_area
        with self._stats_lock:
            st = self.stats
            st.master_area = outcome
            if outcome is not MasterAreaOutcome.ADOPTED:
                st.master_area_history = st.master_area_history[1 - REQUEST_HISTORY:] + [
                    (self._working, outcome)]
        if outcome is MasterAreaOutcome.ADOPTED:
            rolled = self._txlogs.recover(area, view)  # before anyone reads what they half-wrote
            if rolled:
                with self._stats_lock:
                    self.stats.tx_rolled_back += rolled
        else:
            if outcome is not MasterAreaOutcome.CREATED:
                log.warning("%s: master area rebuilt (%s): %s; its shared state is lost",
                            self.component_name, outcome.name, why)
            self._txlogs.create(area)
        self.master_area_fresh = outcome is not MasterAreaOutcome.ADOPTED
        try:
            self.on_master(view)
        finally:
            self.master_area_fresh = False
        if outcome is not MasterAreaOutcome.ADOPTED:
            # Published once initialised: a master that dies before this leaves the previous
            # descriptor, and its successor decides again from that.
            rec.publish_master(self._root, area.ident, self.master_area_size,
                               self.master_area_version, self._txlogs.geometry)
            self._master_ident = area.ident

    def _adopt_or_create(self) -> tuple[MasterAreaOutcome, str]:
        """Validate the published master area (the descriptor's checksum, layout version, size
        and log geometry; the section's header magic and nonce, which attaching checks; not
        poisoned) and keep it as :attr:`master_area`; else replace it with a zeroed one.
        Returns the outcome and, for a rebuild, why."""
        total = self._txlogs.area_size(self.master_area_size)
        try:
            published: str | None = rec.master_ident(self._root)
        except InvalidIdentifier:
            published = None
        desc = rec.master_descriptor(self._root)
        outcome = MasterAreaOutcome.REBUILT_INVALID
        if published == "":
            outcome, why = MasterAreaOutcome.CREATED, "first master"
        elif published is None or not desc.intact:
            why = "the published descriptor is torn or garbage"
        elif desc.version != self.master_area_version:
            why = f"layout version {desc.version}, this component has {self.master_area_version}"
        elif desc.size < self.master_area_size or desc.logs != self._txlogs.geometry:
            why = (f"layout of {desc.size} bytes and logs {desc.logs:#x}, this component needs "
                   f"{self.master_area_size} bytes and logs {self._txlogs.geometry:#x}")
        else:
            area = self.master_area
            try:
                probe = Section.attach(published)  # checks the header's magic and nonce again
            except InvalidIdentifier as exc:
                why = f"the published area is gone ({exc})"
            else:
                if area is not None and not area.closed and self._master_ident == published:
                    probe.close()  # ours already: keep the mapping others' handles use
                else:
                    if area is not None:
                        area.close()
                    area = self.master_area = probe
                    self._master_ident = published
                if area.failed:
                    outcome, why = MasterAreaOutcome.REBUILT_AFTER_POISON, "it was poisoned"
                elif area.size < total:
                    why = f"section of {area.size} bytes, {total} needed"
                else:
                    why = self._txlogs.check(area)
                    if not why:
                        return MasterAreaOutcome.ADOPTED, ""
        if self.master_area is not None:
            self.master_area.close()
        self.master_area = Section.create(total)
        self._master_ident = ""  # not published until on_master has initialised it
        return outcome, why

    def _attach_master_area(self) -> None:
        if not self.master_area_size:
            return
        try:
            ident = rec.master_ident(self._root)
        except InvalidIdentifier as exc:
            self.request_recovery(f"master area unavailable: {exc}")
            raise _Restart from None
        if ident == self._master_ident and self.master_area is not None and not self.master_area.closed:
            return
        if self.master_area is not None:
            self.master_area.close()
        try:
            self.master_area = Section.attach(ident)
        except InvalidIdentifier as exc:
            self.master_area = None
            self.request_recovery(f"master area unavailable: {exc}")
            raise _Restart from None
        needed = self._txlogs.area_size(self.master_area_size)
        if self.master_area.size < needed:
            raise McsError(f"master area too small ({self.master_area.size} bytes, "
                           f"{needed} needed)")
        self._master_ident = ident

    def _ensure_contribution(self) -> None:
        if not self.contribution_size:
            return
        sec = self.contribution
        if sec is None and self.adopt_contributions:
            sec = self._adopt_previous()
        if sec is None or sec.closed or sec.failed:
            if sec is not None:
                log.warning("%s: contribution was poisoned; replacing it", self.component_name)
                sec.close()
            sec = Section.create(self.contribution_size)
            self.contribution = sec
            self.on_new_contribution(sec)
        rec.set_contribution_ident(self._root, self.member.slot, sec.ident)

    def _adopt_previous(self) -> Section | None:
        """The contribution this slot's previous holder left, if it is still there, has our
        size, is not poisoned and :meth:`adopt_contribution` accepts it; else None."""
        slot = self.member.slot
        sec = self.contribution_of(slot, missing_ok=True)  # attached (or kept) like any other
        with self._contribs_lock:
            self._contribs.pop(slot, None)  # ours from now on, or closed below
        if sec is None:
            return None  # none yet, or gone (nobody kept it attached)
        if sec.size != self.contribution_size or sec.failed or not self.adopt_contribution(sec):
            log.info("%s: slot %d's previous contribution not adopted (%s)", self.component_name,
                     slot, "poisoned" if sec.failed else f"{sec.size} bytes, refused or resized")
            sec.close()
            return None
        self.contribution = sec
        with self._stats_lock:
            self.stats.contributions_adopted += 1
        return sec

    def adopt_contribution(self, section: Section) -> bool:
        """With :attr:`adopt_contributions`: called in the recovery thread (contribute phase,
        before :meth:`build_shared_state`) with the contribution this member slot's previous
        holder left (departed: dead, fenced or left). Return True to keep it as
        :attr:`contribution` (its data stays where others can read it), False to get a fresh one
        (:meth:`on_new_contribution`)."""
        return False

    def on_new_contribution(self, section: Section) -> None:
        """Called when the framework (re)creates this member's contribution (first time, or
        after it was poisoned): rewrite it from local memory."""

    @overload
    def contribution_of(self, slot: int) -> Section: ...

    @overload
    def contribution_of(self, slot: int, *, missing_ok: bool) -> Section | None: ...

    def contribution_of(self, slot: int, *, missing_ok: bool = False) -> Section | None:
        """The contribution of member ``slot`` of the current view (attached once, cached); with
        :attr:`adopt_contributions`, also the one a departed member left in ``slot``. One that
        is gone requests a recovery and raises :class:`Recovering` (None with ``missing_ok``,
        and no request)."""
        if slot == self.member.slot and self.contribution is not None:
            return self.contribution
        with self._contribs_lock:
            try:
                ident = rec.contribution_ident(self._root, slot)
                cached = self._contribs.get(slot)
                if cached is not None and cached[0] == ident and not cached[1].closed:
                    return cached[1]
                sec = Section.attach(ident)
            except InvalidIdentifier:
                pass  # gone: the recovery is asked for outside the lock, below
            else:
                if cached is not None:
                    cached[1].close()
                self._contribs[slot] = (ident, sec)
                return sec
        if missing_ok:
            return None
        self.request_recovery(f"contribution of slot {slot} is gone")
        raise Recovering(f"contribution of slot {slot} is gone")

    def _keep_contributions(self, view: View) -> None:
        """With :attr:`adopt_contributions`, once every member of ``view`` has published its
        contribution: attach them all, so that a death leaves its contribution attached here."""
        if self.adopt_contributions and self.contribution_size:
            for m in view.members:
                if m.slot != self.member.slot:
                    self.contribution_of(m.slot, missing_ok=True)

    def _drop_departed(self, view: View) -> None:
        if self.adopt_contributions:
            return  # kept until the slot's next holder adopts or replaces it (contribution_of)
        keep = {m.slot for m in view.members}
        with self._contribs_lock:
            for slot in [s for s in self._contribs if s not in keep]:
                self._contribs.pop(slot)[1].close()


def _repair(mutex: GlobalMutex, repair: Callable[[], None]) -> None:
    """Holding ``mutex`` found ABANDONED: ``repair()``, then mark it consistent (still held);
    if the repair fails, release it unrepaired (not recoverable) and re-raise."""
    try:
        repair()
        mutex.mark_consistent()
    except BaseException:
        mutex.unlock()
        raise


def transaction(method: Callable[..., T]) -> Callable[..., T]:
    """Decorate a component method so that it runs in a crash-atomic transaction (the paper's
    "declarative transactions"): ``self.tx`` is the transaction; rolled back and run again
    after a recovery or a conflict until it commits, and never run again once committed. A
    decorated method called from inside a transaction joins it."""

    @functools.wraps(method)
    def wrapper(self: McsComponent, *args: Any, **kwargs: Any) -> T:
        if getattr(self._local, "tx", None) is not None:
            return method(self, *args, **kwargs)
        return self.run_transaction(lambda tx: method(self, *args, **kwargs))

    return wrapper
