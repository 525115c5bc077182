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
import threading
import time
from _thread import get_ident
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

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
    NotRecoverableError,
    Recovering,
)
from mcs.bootstrap import validate_domain
from mcs.component_record import ComponentRecord, component_domain
from mcs.section import Section
from mcs.types import LockStatus

import membership
from membership.member import Member
from membership.view import View

__all__ = ["McsComponent", "RecoveryStats", "transaction", "ComponentRecord", "component_domain"]

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


class _Block:
    """One ``consistent()`` block: registers itself as active (under the component's
    ``_blocks_lock``), and detects recovery requests and memory failures that happened during it."""

    __slots__ = ("comp", "entry", "thread")

    def __init__(self, comp: "McsComponent", thread: int) -> None:
        self.comp = comp
        self.thread = thread

    def __enter__(self) -> Any:
        comp = self.comp
        while True:
            if comp._gate_closed:
                comp._wait_gate(self.thread)
            with comp._blocks_lock:
                comp._active.add(self)
            self.entry = comp._interrupts
            if not comp._gate_closed:
                return comp._view
            self._leave()  # a recovery began while we entered: wait for it, then enter

    def _leave(self, keep: bool = False) -> None:
        """Unregister; the last block to leave a closed gate wakes the quiescing recovery.
        ``keep``: keep this object as its thread's spare for the next block."""
        comp = self.comp
        with comp._blocks_lock:
            active = comp._active
            active.discard(self)
            if comp._gate_closed and not active:
                comp._idle.set()
            spare = comp._spare_blocks
            if keep and len(spare) < SPARE_BLOCKS_MAX:
                spare[self.thread] = self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        comp = self.comp
        self._leave(keep=True)
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
        # Shared by workers (entering and leaving blocks) and the recovery thread (quiesce):
        self._blocks_lock = threading.Lock()
        self._active: set[_Block] = set()  # blocks being run, under _blocks_lock
        self._spare_blocks: dict[int, _Block] = {}  # thread -> its spare block, under _blocks_lock
        self._idle = threading.Event()
        self._interrupts = 0
        self._interrupt = threading.Event()
        self._stopping = threading.Event()
        self._started = False
        # Other members' contributions, attached by workers and dropped by the recovery thread:
        self._contribs_lock = threading.Lock()
        self._contribs: dict[int, tuple[str, Section]] = {}  # slot -> (ident, section)
        self._master_ident = ""
        self._master_owned_by = 0  # incarnation that created master_area (0: attached)
        self._mf_seen = 0
        self._recovery_thread: threading.Thread | None = None

    # -- hooks for subclasses ---------------------------------------------------------------

    def init_local(self) -> None:
        """Once, before joining: set up local (non-shared) state. Touch nothing global."""

    def build_shared_state(self, view: View) -> None:
        """At first join and after every recovery: re-contribute this member's own state."""

    def on_master(self, view: View) -> None:
        """In the master only, during the master phase: reset :attr:`master_area`."""

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "McsComponent":
        """Initialise locally, join, and wait until the first recovery made us consistent."""
        if self._started:
            raise McsError("component already started")
        self._started = True
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
        thread = get_ident()
        # One spare block object per thread (a nested block makes its own): building one is
        # a third of what an empty block costs.
        with self._blocks_lock:
            block = self._spare_blocks.pop(thread, None)
        return block if block is not None else _Block(self, thread)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` inside a consistent block, retrying it after every recovery."""
        while True:
            try:
                with self.consistent():
                    return fn(*args, **kwargs)
            except Recovering:
                if self._stopping.is_set():
                    raise ClosedError(f"{self.component_name} is stopped") from None

    def _in_block(self, thread: int) -> bool:
        """True if ``thread`` is inside a consistent block of this component."""
        with self._blocks_lock:
            return any(b.thread == thread for b in self._active)

    def _has_active_blocks(self) -> bool:
        with self._blocks_lock:
            return bool(self._active)

    def _wait_gate(self, thread: int) -> None:
        if self._in_block(thread):
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

    def lock(self, mutex: GlobalMutex, timeout: float | None = None) -> _Held:
        """Lock a global mutex inside a block: ``with self.lock(m): ...``.

        Wakes up with :class:`Recovering` when a recovery is requested. An abandoned mutex means
        its holder died mid-update: it is released *unrepaired* (so nobody can read the
        half-update: every later lock raises NotRecoverable until the master re-creates it), a
        recovery is requested, and :class:`Recovering` is raised.
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

    def recovery_lock(self, mutex: GlobalMutex, timeout: float = 5.0) -> _Held:
        """Lock a mutex from a recovery hook (``build_shared_state``): ``with
        self.recovery_lock(m):``. A holder that died during this recovery (ABANDONED) or a
        timeout fails the hook, and the recovery starts over at the next epoch."""
        status = mutex.lock(timeout=timeout)
        if status is LockStatus.OK:
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
        thread = get_ident()
        self._request(self._working + 1, reason,
                      covering=rec.C_STABLE if self._in_block(thread) else rec.C_AGREED)

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
            self._interrupts += 1
            self._idle.clear()
            self._interrupt.set()

    # -- the recovery thread ------------------------------------------------------------------

    def _recovery_main(self) -> None:
        root = self._root
        seen = self._event.value
        while not self._stopping.is_set():
            try:
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
                self._gate_closed = False
                self._interrupt.clear()
            self._gate.notify_all()

    def _quiesce(self) -> None:
        self._close_gate()
        deadline = time.monotonic() + self._recovery_timeout
        while True:
            if not self._has_active_blocks():
                return
            self._idle.wait(POLL)
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
        size = self.master_area_size
        if size:
            area = self.master_area
            try:
                published: str | None = rec.master_ident(self._root)
            except InvalidIdentifier:
                published = None  # garbage in the record: re-create and republish
            if (area is None or area.closed or area.failed or published != self._master_ident
                    or self._master_owned_by != self.member.incarnation):
                if area is not None:
                    area.close()
                area = Section.create(size)
                self.master_area = area
                self._master_ident = area.ident
                self._master_owned_by = self.member.incarnation
                rec.set_master_ident(self._root, area.ident)
        self.on_master(view)

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
        if self.master_area.size < self.master_area_size:
            raise McsError(f"master area too small ({self.master_area.size} bytes)")
        self._master_ident = ident
        self._master_owned_by = 0

    def _ensure_contribution(self) -> None:
        if not self.contribution_size:
            return
        sec = self.contribution
        if sec is None or sec.closed or sec.failed:
            if sec is not None:
                log.warning("%s: contribution was poisoned; replacing it", self.component_name)
                sec.close()
            sec = Section.create(self.contribution_size)
            self.contribution = sec
            self.on_new_contribution(sec)
        rec.set_contribution_ident(self._root, self.member.slot, sec.ident)

    def on_new_contribution(self, section: Section) -> None:
        """Called when the framework (re)creates this member's contribution (first time, or
        after it was poisoned): rewrite it from local memory."""

    def contribution_of(self, slot: int) -> Section:
        """The contribution of member ``slot`` of the current view (attached once, cached)."""
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
        self.request_recovery(f"contribution of slot {slot} is gone")
        raise Recovering(f"contribution of slot {slot} is gone")

    def _drop_departed(self, view: View) -> None:
        keep = {m.slot for m in view.members}
        with self._contribs_lock:
            for slot in [s for s in self._contribs if s not in keep]:
                self._contribs.pop(slot)[1].close()


def transaction(method: Callable[..., T]) -> Callable[..., T]:
    """Decorate a component method so that it runs inside a consistent block and is retried
    after every recovery (the paper's "declarative transactions")."""

    @functools.wraps(method)
    def wrapper(self: McsComponent, *args: Any, **kwargs: Any) -> T:
        return self.run(method, self, *args, **kwargs)

    return wrapper
