"""A member of a domain: life mutex, watchers, heartbeat, suspicion, eviction with fencing.

Threads of one member:

* the **life thread** locks the member's life mutex at join and holds it until ``leave()``: a
  robust mutex belongs to a thread, so it must be one that lives exactly as long as the
  membership. When the process dies, the kernel marks that mutex abandoned.
* a **native heartbeat thread** (C, never takes the GIL) stores a monotonic stamp in the slot,
  so a busy interpreter does not look frozen; only a stopped process stops it.
* one **watcher** per other member, blocked on that member's life mutex: it returns the moment
  the member dies (ABANDONED) or leaves (OK), and then republishes the view.
* the **monitor** waits on the domain's view event (or a short period), refreshes the local view,
  runs the callbacks, and evicts members whose heartbeat is older than ``evict_after`` (frozen)
  or whose progress signal is older than ``progress_timeout`` (hung): SIGKILL through a pidfd
  taken when the member was first seen, never a bare pid.
* any thread of the process that **waits on a global mutex** judges its holder every 20 ms of
  the wait (the hold watch of :mod:`mcs._gsm`): a holder that procfs shows stopped while its
  heartbeat is stale is evicted at once, one that held the mutex longer than ``hold_limit`` is
  evicted as hung. A member under a maintenance pause (:func:`pause`) is never evicted.

Descriptors: a view is *handled* once every other member has a watcher and the descriptors the
member keeps on it (:mod:`membership.peers`); only then does it become ``member.view`` and reach
the callbacks. Those descriptors come through a reserve (:mod:`membership.fdreserve`), so a
process at its RLIMIT_NOFILE still handles views; if even the reserve is spent, the view is
retried every monitor round (counted in :attr:`Member.stats`, logged at most every 10 s).

Every membership change goes through :meth:`Member._republish` under the root mutex, which
recomputes the view from the slot states (so concurrent detectors of one death agree and only
one new generation results).

State these threads share (the local view, the watcher map, the suspected set, the crashed
members waiting to be reaped, the callbacks, the counters) is guarded by ``Member._shared``, a
plain lock held only for a dictionary or list operation, never across a wait: a watcher that
just saw a death never waits on it for long.
"""

from __future__ import annotations

import atexit
import dataclasses
import enum
import functools
import logging
import os
import socket
import threading
import time
from typing import Callable

from mcs import layout
from mcs._gsm import GlobalEvent, GlobalMutex, Heartbeat, set_hold_watch
from mcs.bootstrap import FUTEX_OWNER_DIED, FUTEX_TID_MASK, Bootstrap
from mcs.locking import held
from mcs.errors import BootstrapError, FencedError, McsError, NotRecoverableError
from mcs.section import reap_orphans
from mcs.types import LockStatus

from membership.fdreserve import FdReserve
from membership.peers import Peers, dying_by_path
from membership.table import MemberTable
from membership.timing import Timing
from membership.view import EvictionCause, MemberInfo, View, choose_master

__all__ = ["Member", "MemberStats", "ProgressSource", "join"]

log = logging.getLogger("mcs.membership")

ViewCallback = Callable[[View], None]


def _node_name(node: str | None) -> bytes:
    if node is None:
        node = f"{socket.gethostname()}/{os.getpid()}"
    if not isinstance(node, str) or not node or not node.isprintable():
        raise ValueError(f"node must be a non-empty printable str, got {node!r}")
    raw = node.encode("utf-8")
    if len(raw) >= layout.NODE_NAME_MAX:
        raise ValueError(f"node name longer than {layout.NODE_NAME_MAX - 1} bytes: {node!r}")
    return raw


NODE_GRACE = 0.005  # a node's other members are given this long to be seen dying too
RESERVE_FDS = 8  # descriptors each member keeps in reserve for its failure detector
DEFER_LOG_EVERY = 10.0  # seconds between two warnings about views not handled yet
EXIT_WAIT = 1.0  # seconds an evicting member waits for the one it killed to exit
STOPPED_BEATS = 3  # a lock holder this many heartbeats late and stopped in procfs is fenced
LIFE_TAKE_WAIT = 0.05  # seconds a joiner waits for a free slot's life mutex before the next
JOIN_SLOT_WAIT = 1.0  # seconds a joiner goes on trying free slots whose life mutex is held
WATCH_SLICE = 0.25  # seconds a watcher blocks on a life mutex before it looks at the word
MAX_RESTARTS = 1 << 32  # bound on MCS_RESTARTS read from the environment


class ProgressSource(enum.Enum):
    """Who gives a progress signal (each is watched against ``progress_timeout`` once given)."""

    RECOVERY = layout.M_PROGRESS_NS
    """The component's recovery thread, every loop (:class:`mcs.McsComponent` does it)."""
    APP = layout.M_APP_PROGRESS_NS
    """The application: an event-loop ticker, a worker's main loop (the web cache's loop)."""


def _restarts_from_env() -> int:
    """``MCS_RESTARTS`` as set by ``mcs supervise`` (0 when absent or malformed)."""
    raw = os.environ.get("MCS_RESTARTS", "")
    return int(raw) if raw.isdigit() and int(raw) < MAX_RESTARTS else 0


class _HoldWatch:
    """The process's hold watch: every live member judges the holders its waiting threads see
    (installed in mcs._gsm at the first join; one member at a time judges per thread)."""

    def __init__(self) -> None:
        self._members: list[Member] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._installed = False

    def add(self, member: "Member") -> None:
        with self._lock:
            self._members.append(member)
            if not self._installed:
                set_hold_watch(self)
                self._installed = True

    def discard(self, member: "Member") -> None:
        with self._lock:
            if member in self._members:
                self._members.remove(member)

    def __call__(self, mutex: GlobalMutex | None, pid: int, tag: int, held_ms: int) -> None:
        if getattr(self._local, "judging", False):
            return  # an eviction's own waits (the root mutex) are not judged again
        self._local.judging = True
        try:
            with self._lock:
                members = list(self._members)
            for member in members:
                if member._judge_holder(mutex, pid, held_ms):
                    return
        except Exception:  # the waiter must go on waiting whatever happens here
            log.exception("hold watch error")
        finally:
            self._local.judging = False


_hold_watch = _HoldWatch()


@dataclasses.dataclass(frozen=True)
class MemberStats:
    """Counters of one member's failure detector under resource pressure."""

    views_deferred: int
    """Times a new view could not be handled yet (no descriptor or thread) and was retried."""
    reserve_held: int
    """Descriptors in reserve now (the target is ``RESERVE_FDS``)."""
    reserve_spent: int
    """Reserve descriptors given back to the kernel to let one of the detector's opens through."""
    procfs_fallbacks: int
    """Dying checks of a node peer that had no /proc descriptor and no room to open one."""
    watcher_errors: int = 0
    """Watchers stopped by an error on a life mutex (logged; the heartbeat still evicts)."""
    evictions: tuple[tuple[str, int], ...] = ()
    """Evictions this member carried out, by cause (frozen, stopped, hung, stalled)."""
    deaths_unlocked: int = 0
    """Deaths (or leaves) seen from a life mutex's word alone: another thread had taken that
    mutex and kept it past a watch slice (a survivor's watcher stopped, or slow, while holding
    it), so this watcher could not lock it."""


def _dying_soon(pids: list[int], grace: float,
                dying_now: Callable[[int], bool] = dying_by_path) -> set[int]:
    """The pids that are dying (``dying_now``) within ``grace`` seconds, all watched together
    (one grace for the whole node, not one per process): deaths of one node seen together are
    one change. The grace is waited only with cause: when at least one of them is already
    dying at the first look (the node is going down); otherwise nobody is waited for."""
    deadline = time.monotonic() + grace
    dying = {pid for pid in pids if dying_now(pid)}
    if not dying:
        return dying
    while True:
        dying.update(pid for pid in pids if pid not in dying and dying_now(pid))
        if len(dying) == len(pids) or time.monotonic() >= deadline:
            return dying
        time.sleep(0.0005)


class Member:
    """A live member of a domain. Create with :func:`join`; end with :meth:`leave`."""

    def __init__(self, domain: str, *, node: str | None = None, timing: Timing | None = None) -> None:
        self.domain = domain
        self._node = _node_name(node)
        self._requested_timing = timing
        self._refresh_lock = threading.RLock()  # one view handled at a time, callbacks in order
        self._shared = threading.Lock()  # guards what the threads share (module doc)
        self._callbacks: list[ViewCallback] = []
        self._watchers: dict[tuple[int, int], threading.Thread] = {}
        self._suspected: set[tuple[int, int]] = set()
        self._to_reap: list[tuple[int, int]] = []  # (pid, joined_ns) of crashed members
        self._view: View | None = None
        self._fenced = threading.Event()
        self._deferred = 0  # counters, under _shared
        self._watcher_errors = 0
        self._deaths_unlocked = 0
        self._evictions: dict[EvictionCause, int] = {}
        self._paused_logged: set[tuple[int, int]] = set()  # pauses already logged, under _shared
        self._next_defer_log = 0.0
        self._closing = threading.Event()
        self._handled = threading.Event()  # set once a view has been handled
        self._leave_event = threading.Event()  # tells the life thread to unlock and end
        self._life: threading.Thread | None = None
        self._life_tid = 0  # the life thread's kernel id: the one its life mutex's word holds
        self._monitor: threading.Thread | None = None
        self._beat: Heartbeat | None = None
        self.slot = -1
        self.incarnation = 0
        self.timing = timing or Timing()  # until the join adopts the domain's own
        self._reserve = FdReserve(RESERVE_FDS)  # before anything else takes the last descriptors
        try:
            self.boot, root, status = self._lock_root()
        except BaseException:
            self._reserve.close()
            raise
        try:
            with held(root, status):
                self.table = MemberTable(self.boot)
                self._peers = Peers(self.boot, self._reserve)
                self._view_event = GlobalEvent.open(self.boot.section, layout.VIEW_EVENT)
                self._join_locked()
        except BaseException:
            self._reserve.close()
            raise
        self._join_finish()

    # -- joining ------------------------------------------------------------------------

    def _lock_root(self) -> tuple[Bootstrap, GlobalMutex, LockStatus]:
        """Open the domain and lock its root mutex (a root gc retired meanwhile is reopened)."""
        while True:
            boot = Bootstrap.open(self.domain)
            root = boot.root_mutex()
            try:
                status = root.lock()
            except NotRecoverableError:
                boot.close()
                raise BootstrapError(
                    f"{boot.path}: root mutex is not recoverable; stop the domain and run mcs gc")
            if boot.removed:  # retired by gc between our open and our lock
                root.unlock()
                boot.close()
                continue
            return boot, root, status

    def _join_finish(self) -> None:
        """Start the monitor and wait until the first view is handled (or leave again)."""
        self._monitor = threading.Thread(target=self._monitor_main, name=f"mcs-monitor-{self.slot}",
                                         daemon=True)
        self._monitor.start()
        atexit.register(self.leave)
        _hold_watch.add(self)
        if not self._handled.wait(max(1.0, self.timing.evict_after)):
            self.leave()
            raise McsError(f"domain {self.domain!r}: could not take a descriptor on every member "
                           "(out of file descriptors?); left the domain again")

    def _join_locked(self) -> None:
        boot, table = self.boot, self.table
        occupied = table.occupied()
        if occupied and not boot.live_slots():
            log.info("domain %s: no live member left, re-initialising its member table", self.domain)
            boot.reap_dead_members_segments()
            table.reset()
            occupied = []
        if not any(r.state == layout.SLOT_MEMBER for r in occupied):
            table.set_timing(self._requested_timing or Timing())
        self.timing = table.timing()
        if self._requested_timing is not None and self._requested_timing != self.timing:
            log.warning("domain %s runs with %s; adopting it instead of %s", self.domain,
                        self.timing, self._requested_timing)
        free = [s for s in range(layout.MAX_MEMBERS) if table.state(s) == layout.SLOT_FREE]
        if not free:
            raise McsError(f"domain {self.domain!r} is full ({layout.MAX_MEMBERS} members)")
        # A free slot whose life mutex another process still holds is skipped: a member that
        # left clears its slot before its life thread lets go, and a survivor's watcher holds
        # a dead member's a moment (for good if it is stopped then). Passes over the free
        # slots go on for JOIN_SLOT_WAIT at most: this join holds the root mutex meanwhile.
        deadline = time.monotonic() + JOIN_SLOT_WAIT
        while not self._take_a_free_slot(free):
            if time.monotonic() >= deadline:
                raise McsError(f"domain {self.domain!r}: the life mutex of every free slot "
                               f"stayed held by another process for {JOIN_SLOT_WAIT:g} s (a "
                               "member stopped while it watched a death?)")
        now = time.monotonic_ns()
        table.fill(self.slot, os.getpid(), self.incarnation, self._node, now,
                   _restarts_from_env())
        self._beat = Heartbeat(boot.section,
                               layout.member_offset(self.slot, layout.M_HEARTBEAT_NS),
                               layout.member_offset(self.slot, layout.M_HEARTBEAT_COUNT),
                               self.timing.heartbeat,
                               held_offset=layout.member_offset(self.slot, layout.M_HELD))
        self._republish_locked()
        self._refresh_view()

    def _take_a_free_slot(self, free: list[int]) -> bool:
        """Join the first of ``free`` whose life mutex can be had (self.slot, incarnation)."""
        for slot in free:
            self.slot = slot
            self.incarnation = self.boot.section.add64(layout.NEXT_INCARNATION, 1) + 1
            if self._start_life_thread():
                return True
        return False

    def _start_life_thread(self) -> bool:
        """Start the thread that holds this member's life mutex until it leaves; False (and no
        thread) if that mutex stays held by another process for ``LIFE_TAKE_WAIT``: a survivor's
        watcher holds it a few microseconds after a death, but one stopped meanwhile keeps it
        (and the root mutex, held by this join, must not wait on it)."""
        acquired = threading.Event()
        result: list[object] = []

        def life() -> None:
            mutex = self.boot.life_mutex(self.slot, tag=self.incarnation)
            try:
                status = mutex.lock(timeout=LIFE_TAKE_WAIT)
                if status is LockStatus.ABANDONED:
                    mutex.mark_consistent()
                result.append(status)
            except BaseException as exc:  # reported to the joiner
                result.append(exc)
                acquired.set()
                return
            acquired.set()
            if status is LockStatus.TIMEOUT:
                return
            self._leave_event.wait()
            mutex.unlock()

        life_thread = threading.Thread(target=life, name=f"mcs-life-{self.slot}", daemon=True)
        life_thread.start()
        acquired.wait()
        if isinstance(result[0], BaseException):
            raise result[0]
        if result[0] is LockStatus.TIMEOUT:
            life_thread.join()
            log.info("domain %s: slot %d is free but another process holds its life mutex; "
                     "joining another slot", self.domain, self.slot)
            return False
        self._life = life_thread
        self._life_tid = life_thread.native_id
        return True

    # -- the view -----------------------------------------------------------------------

    @property
    def view(self) -> View:
        """The latest view this member has seen."""
        if self._fenced.is_set():
            raise FencedError(f"member slot {self.slot} incarnation {self.incarnation} was fenced")
        with self._shared:
            view = self._view
        assert view is not None
        return view

    @property
    def fenced(self) -> bool:
        return self._fenced.is_set()

    @property
    def stats(self) -> MemberStats:
        """The failure detector's counters (descriptor reserve, deferred views, watchers)."""
        with self._shared:
            deferred, watcher_errors = self._deferred, self._watcher_errors
            evictions = tuple((c.label, self._evictions.get(c, 0)) for c in EvictionCause)
            deaths_unlocked = self._deaths_unlocked
        return MemberStats(deferred, self._reserve.held, self._reserve.spent,
                           self._peers.procfs_fallbacks, watcher_errors, evictions,
                           deaths_unlocked)

    def progress(self, source: ProgressSource = ProgressSource.APP) -> None:
        """Say that ``source`` made progress now. Once a source has said so, the others evict
        this member as hung when it stays silent for ``progress_timeout``: call it at least
        every ``timing.progress_every`` seconds (an event-loop ticker, a worker's loop)."""
        if not self._closing.is_set():
            self.table.set_field(self.slot, source.value, time.monotonic_ns())

    @property
    def info(self) -> MemberInfo:
        return MemberInfo(self.slot, os.getpid(), self._node.decode(), self.incarnation)

    def on_view_change(self, callback: ViewCallback) -> None:
        """Call ``callback(view)`` (in the monitor thread) on every new generation."""
        with self._shared:
            self._callbacks.append(callback)

    def _refresh_view(self) -> View | None:
        """Read the published view; if it is new, handle it (watchers, descriptors), then make it
        the local view and run the callbacks. None if not new, or not handled yet (retried)."""
        if self._closing.is_set():
            return None
        with self._refresh_lock:  # watchers and the monitor: callbacks once each, in order
            return self._refresh_view_locked()

    def _refresh_view_locked(self) -> View | None:
        view = self.table.read_view()
        with self._shared:
            previous = self._view
        if previous is not None and view.generation == previous.generation:
            return None
        if previous is not None:
            gone = [m for m in previous.members if m not in view.members]
            view = dataclasses.replace(view, departed=tuple(
                (m, self.table.exit_reason(m.slot, m.incarnation)) for m in gone))
        try:
            self._track(view)
        except (OSError, RuntimeError) as exc:  # no descriptor / thread left, even in reserve
            self._defer(view, exc)
            return None
        with self._shared:
            self._view = view
            callbacks = list(self._callbacks)
        self._handled.set()
        if view.member(self.slot) is None or view.member(self.slot).incarnation != self.incarnation:
            self._check_fenced()
        for cb in callbacks:
            try:
                cb(view)
            except Exception:  # a component's bug must not kill membership
                log.exception("view-change callback failed")
        return view

    def _track(self, view: View) -> None:
        """Watch every other member of ``view`` and hold its descriptors; forget the others.
        Watchers first: they need no descriptor, so deaths are seen even while the descriptors
        wait. Raises OSError or RuntimeError if not complete; what was done is kept."""
        current = {(m.slot, m.incarnation): m for m in view.members if m.slot != self.slot}
        with self._shared:
            if self._closing.is_set():  # set under this lock: _stop_threads sees every watcher
                return
            for key in current:
                if key not in self._watchers or not self._watchers[key].is_alive():
                    t = threading.Thread(target=self._watch, args=key, daemon=True,
                                         name=f"mcs-watch-{key[0]}.{key[1]}")
                    t.start()  # a RuntimeError (no thread left) leaves the map as it was
                    self._watchers[key] = t
            for key in [k for k, t in self._watchers.items()
                        if k not in current and not t.is_alive()]:
                del self._watchers[key]
        self._peers.update(current.values())

    def _defer(self, view: View, exc: Exception) -> None:
        """``view`` could not be handled: it is neither the local view nor given to the
        callbacks; the monitor retries it (or a newer one) next round. Counted; logged at
        most every DEFER_LOG_EVERY seconds."""
        now = time.monotonic()
        with self._shared:
            self._deferred += 1
            deferred = self._deferred
            due = now >= self._next_defer_log
            if due:
                self._next_defer_log = now + DEFER_LOG_EVERY
        if due:
            log.warning("domain %s: generation %d not handled yet (%s); retrying every %.0f ms "
                        "(%d time(s) so far)", self.domain, view.generation, exc,
                        self.timing.check_interval * 1e3, deferred)

    # -- detection ----------------------------------------------------------------------

    def _watch(self, slot: int, incarnation: int) -> None:
        """Block on a member's life mutex; when we get it, the member died or left. When
        another thread takes it first (another survivor's watcher) and does not let it go (its
        process was stopped meanwhile, holding it), the word no longer names the member's life
        thread: that is proof enough, and the death is published without the mutex."""
        mutex = self.boot.life_mutex(slot)
        # The member's life thread holds its mutex from before it is in any view until it
        # leaves or dies: while it lives, the word's thread id is this one.
        living = self.boot.life_word(slot) & FUTEX_TID_MASK
        while not self._closing.is_set():
            try:
                status = mutex.lock(timeout=WATCH_SLICE)
            except McsError as exc:
                if not self._closing.is_set():
                    with self._shared:
                        self._watcher_errors += 1
                    log.warning("domain %s: the watcher of slot %d incarnation %d stopped (%s); "
                                "that member is still evicted if its heartbeat stops",
                                self.domain, slot, incarnation, exc)
                return
            if status is LockStatus.TIMEOUT:
                try:
                    word = self.boot.life_word(slot)
                except McsError:  # the section closed under a leave: nothing left to watch
                    return
                if (word & FUTEX_TID_MASK) == living and not word & FUTEX_OWNER_DIED:
                    continue
                with self._shared:
                    self._deaths_unlocked += 1
                # Marked under the root mutex (in _republish), not here: without the life mutex
                # nothing else keeps the slot from being cleared and filled by a joiner between
                # the incarnation check and the mark, and joins and clears hold the root mutex.
                first = functools.partial(self._mark_dead, slot, incarnation)
            else:
                first = None
                try:
                    # We hold its life mutex, so that incarnation is not alive. A clean leave
                    # has already set LEFT; anything else (ABANDONED, or a probe that consumed
                    # the abandonment first) is a death.
                    self._mark_dead(slot, incarnation)
                    if status is LockStatus.ABANDONED:
                        mutex.mark_consistent()
                finally:
                    mutex.unlock()
            if not self._closing.is_set():
                # Every survivor's watcher gets this life mutex in turn; the first one publishes
                # the view and clears the slot. The others find the slot reused and publish
                # nothing, or (a cleared slot keeps its incarnation) recompute the same view
                # under the root mutex: no new generation.
                self._republish(unless=lambda: self.table.field(
                    slot, layout.M_INCARNATION) != incarnation, first=first)
                # This thread is awake and the view is published (by us or by the survivor
                # that got the life mutex first): run the callbacks now rather than after a
                # wake-up of the monitor thread.
                self._refresh_view()
                self._reap_pending()
            return

    def _mark_dead(self, slot: int, incarnation: int) -> None:
        """Member ``slot`` ``incarnation`` is not alive: a death unless it left (set LEFT)."""
        if self.table.field(slot, layout.M_INCARNATION) == incarnation:
            self.table.sec.cas64(layout.member_offset(slot, layout.M_STATE),
                                 layout.SLOT_MEMBER, layout.SLOT_DEAD)

    def _monitor_main(self) -> None:
        seen = self._view_event.value
        while not self._closing.is_set():
            try:
                self._view_event.wait(seen, timeout=self._monitor_interval())
                seen = self._view_event.value
                self._reserve.replenish()
                self._refresh_view()
                self._reap_pending()
                if self._check_fenced():
                    return
                self._check_heartbeats()
            except Exception:
                if self._closing.is_set():
                    return
                log.exception("membership monitor error")
                time.sleep(self.timing.check_interval)

    def _monitor_interval(self) -> float:
        """``check_interval`` while a member is suspected or a published view waits to be
        handled (a deferred one), else ``Timing.relaxed_check_interval``."""
        with self._shared:
            view, suspecting = self._view, bool(self._suspected)
        if suspecting or view is None or self.table.published_generation() != view.generation:
            return self.timing.check_interval
        return self.timing.relaxed_check_interval

    def _check_fenced(self) -> bool:
        table = self.table
        if (table.field(self.slot, layout.M_INCARNATION) != self.incarnation
                or table.field(self.slot, layout.M_FENCED) == self.incarnation):
            self._fence_self("was fenced")
            return True
        word = self.boot.life_word(self.slot)
        if ((word & FUTEX_TID_MASK) != self._life_tid or word & FUTEX_OWNER_DIED) and (
                not self._closing.is_set()):  # (a leave releases it after setting _closing)
            # Others now see this member dead (or will at their next look): it must stop
            # acting as one, exactly as if it had been fenced.
            self._fence_self(f"lost its life mutex (futex word {word:#x}, life thread "
                             f"{self._life_tid}): the others count it dead")
            return True
        return False

    def _fence_self(self, why: str) -> None:
        with self._shared:  # the monitor and a watcher may both see it: one stops
            first = not self._fenced.is_set()
            self._fenced.set()
        if first:
            log.error("member slot %d incarnation %d %s; stopping", self.slot, self.incarnation,
                      why)
            self._stop_threads(release=False)

    def _check_heartbeats(self) -> None:
        """Suspect the members silent for ``suspect_after``, evict those silent for
        ``evict_after`` (frozen) and those beating whose progress signal is older than
        ``progress_timeout`` (hung); members under a pause are left alone, and the time they
        spent paused does not count (the monitor, and a republisher blocked on a frozen
        holder)."""
        with self._shared:
            view = self._view
        if view is None:
            return
        now = time.monotonic_ns()
        table = self.table
        timing = self.timing
        paused = set()
        for m in view.members:
            if m.slot == self.slot:
                continue
            paused_until = table.paused_until(m.slot)
            if paused_until > now:
                paused.add(m.slot)
                continue
            age = now - max(table.field(m.slot, layout.M_HEARTBEAT_NS), paused_until)
            key = (m.slot, m.incarnation)
            if age > timing.evict_after_ns:
                self._evict(m, EvictionCause.FROZEN,
                            lambda m=m: self._silent_for(m) > timing.evict_after_ns)
                continue
            if age <= timing.suspect_after_ns:
                late = self._progress_late(m.slot, now, paused_until)
                if late is not None:
                    self._evict(m, EvictionCause.STALLED,
                                lambda s=m.slot: self._progress_late(
                                    s, time.monotonic_ns(), table.paused_until(s)) is not None,
                                f"no progress from its {late[0]} for {late[1] / 1e6:.0f} ms")
                    continue
            with self._shared:
                newly = age > self.timing.suspect_after_ns and key not in self._suspected
                if age > self.timing.suspect_after_ns:
                    self._suspected.add(key)
                else:
                    self._suspected.discard(key)
            if newly:
                log.warning("member %s suspected (silent for %.0f ms)", m, age / 1e6)
        if view.paused != paused:
            with self._shared:
                if self._view is not None and self._view.generation == view.generation:
                    self._view = dataclasses.replace(self._view, paused=frozenset(paused))

    def _silent_for(self, m: MemberInfo) -> int:
        """Nanoseconds since ``m``'s last heartbeat or the end of its pause (0 while paused)."""
        now = time.monotonic_ns()
        paused_until = self.table.paused_until(m.slot)
        if paused_until > now:
            return 0
        return now - max(self.table.field(m.slot, layout.M_HEARTBEAT_NS), paused_until)

    def _progress_late(self, slot: int, now: int, paused_until: int) -> tuple[str, int] | None:
        """(source, ns) of a progress signal of ``slot`` older than ``progress_timeout``."""
        for source in ProgressSource:
            stamp = self.table.field(slot, source.value)
            if stamp and now - max(stamp, paused_until) > self.timing.progress_timeout_ns:
                return source.name.lower(), now - max(stamp, paused_until)
        return None

    def _judge_holder(self, mutex: GlobalMutex | None, pid: int, held_ms: int) -> bool:
        """A thread of this process has waited on ``mutex`` for a watch period; ``pid`` holds it
        for ``held_ms``. If ``pid`` is another member of this domain (and not paused): evict it
        when it is provably stopped (heartbeat ``STOPPED_BEATS`` late, procfs state T/t), or hung
        (held longer than ``hold_limit`` with a live heartbeat). True if it was judged here."""
        if self._closing.is_set() or self._fenced.is_set():
            return False
        with self._shared:
            view = self._view
        m = None if view is None else next(
            (m for m in view.members if m.pid == pid and m.slot != self.slot), None)
        if m is None:
            return False
        key = (m.slot, m.incarnation)
        now = time.monotonic_ns()
        if self.table.paused_until(m.slot) > now:
            with self._shared:
                first = key not in self._paused_logged
                self._paused_logged.add(key)
            if first:
                log.warning("member %s is paused and holds a lock others wait for (held %d ms)",
                            m, held_ms)
            return True
        timing = self.timing
        silent = self._silent_for(m)
        if silent > STOPPED_BEATS * timing.heartbeat * 1e9 and self._peers.stopped(pid):
            self._evict(m, EvictionCause.STOPPED,
                        lambda: self._silent_for(m) > STOPPED_BEATS * timing.heartbeat * 1e9
                        and self._peers.stopped(pid),
                        f"stopped (procfs) and silent for {silent / 1e6:.0f} ms while holding a "
                        "lock others wait for")
        elif held_ms * 1_000_000 >= timing.hold_limit_ns and silent <= timing.suspect_after_ns:
            self._evict(m, EvictionCause.HUNG,
                        lambda: mutex is None or _still_held(mutex, pid, timing.hold_limit),
                        f"held a lock for {held_ms} ms (hold_limit {timing.hold_limit:g} s) "
                        "while another member waited")
        return True

    def _evict(self, m: MemberInfo, cause: EvictionCause, still: Callable[[], bool],
               why: str = "") -> None:
        """Fence a frozen or hung member: mark it, SIGKILL it through its pidfd, publish the
        view. ``still()`` re-checks the cause under the root mutex (it may have woken up)."""
        root = self.boot.root_mutex(tag=self.incarnation)
        status = root.lock(timeout=self.timing.check_interval)
        if status is LockStatus.TIMEOUT:
            # The root mutex may be held by the frozen member itself: fence it without the lock;
            # its death releases the root mutex (ABANDONED) and the next locker republishes.
            if root.owner.tag == m.incarnation and still():
                self._fence(m, cause, why or "it holds the root mutex")
            return
        with held(root, status):
            table = self.table
            if (table.field(m.slot, layout.M_INCARNATION) != m.incarnation
                    or table.state(m.slot) != layout.SLOT_MEMBER
                    or table.paused_until(m.slot) > time.monotonic_ns() or not still()):
                return  # somebody else already acted, or it woke up, or it was paused
            killed = self._fence(m, cause, why or f"silent for {self._silent_for(m) / 1e6:.0f} ms")
            self._republish_locked()
        if killed:  # an unsignalled one is not waited for: it may never exit
            self._peers.wait_exit((m.slot, m.incarnation), EXIT_WAIT)
        self._reap_pending()

    def _fence(self, m: MemberInfo, cause: EvictionCause, why: str) -> bool:
        """Record the fence (and its cause) and SIGKILL the member through the pidfd taken when
        first seen; whether it was signalled (False: no verified pidfd, the pid may be a
        stranger's: the fence stands, and the member stops itself if it ever runs again).
        Logged and counted once."""
        table = self.table
        newly = table.field(m.slot, layout.M_FENCED) != m.incarnation
        if newly:
            table.set_field(m.slot, layout.M_FENCE_CAUSE, cause)
            table.count_eviction(cause)
            with self._shared:
                self._evictions[cause] = self._evictions.get(cause, 0) + 1
        table.set_field(m.slot, layout.M_FENCED, m.incarnation)
        # Marked before the kill, so that watchers that see it die report "fenced", not "dead".
        table.sec.cas64(layout.member_offset(m.slot, layout.M_STATE),
                        layout.SLOT_MEMBER, layout.SLOT_FENCED)
        killed = self._peers.kill((m.slot, m.incarnation))
        if newly and killed:
            log.warning("member %s evicted and fenced as %s (%s)", m, cause.label, why)
        elif newly:
            log.warning("member %s fenced as %s (%s) but not signalled: no verified pidfd on it",
                        m, cause.label, why)
        return killed

    # -- publishing ---------------------------------------------------------------------

    def _republish(self, unless: Callable[[], bool] | None = None,
                   first: Callable[[], None] | None = None) -> None:
        """Publish the view from the slot states, under the root mutex; ``unless`` (checked
        before and under the mutex) says the change was already published; ``first`` runs
        under the mutex before it (a change of slot state that must not race a join, and a
        no-op once ``unless`` holds: the watcher's mark checks the same incarnation)."""
        if unless is not None and unless():
            return
        root = self.boot.root_mutex(tag=self.incarnation)
        while True:
            status = root.lock(timeout=self.timing.check_interval)
            if status is not LockStatus.TIMEOUT:
                break
            if self._closing.is_set():
                return
            self._check_heartbeats()  # the holder may be frozen: evicting it frees the lock
        with held(root, status):
            if first is not None:
                first()
            if status is LockStatus.ABANDONED or unless is None or not unless():
                self._republish_locked()

    def _republish_locked(self) -> None:
        """Recompute the view from slot states; publish a new generation if it changed."""
        table = self.table
        records = table.occupied()
        gone = [r for r in records if r.state != layout.SLOT_MEMBER]
        members = [r for r in records if r.state == layout.SLOT_MEMBER]
        # A node that dies at once is one change: members of a node that lost a member and
        # that are dying themselves (exited, or SIGKILL pending) leave in the same generation.
        dead_nodes = {r.node for r in gone if r.state in (layout.SLOT_DEAD, layout.SLOT_FENCED)}
        peers = [r for r in members if r.node in dead_nodes and r.slot != self.slot]
        dying = (_dying_soon([r.pid for r in peers], NODE_GRACE, self._peers.dying) if peers
                 else set())
        crashed = [(r.pid, r.joined_ns) for r in gone
                   if r.state in (layout.SLOT_DEAD, layout.SLOT_FENCED)]
        for r in peers:
            if r.pid in dying:
                table.sec.cas64(layout.member_offset(r.slot, layout.M_STATE),
                                layout.SLOT_MEMBER, layout.SLOT_DEAD)
                members.remove(r)
                crashed.append((r.pid, r.joined_ns))
        infos = tuple(r.info for r in members)
        current = table.read_view()
        master = choose_master(infos, current.master)
        if infos != current.members or master != current.master:
            generation = table.publish(infos, master)
            log.info("domain %s generation %d: %d member(s), master slot %s", self.domain,
                     generation, len(infos), None if master is None else master.slot)
        for r in gone:
            if r.state != layout.SLOT_FREE:
                table.clear(r.slot)
        self._view_event.set()
        # A member killed while creating a section (before marking it for removal) left the
        # segment behind; the survivor that publishes its death reclaims it, once the view
        # and the callbacks are out (not on the detection path): see _reap_pending().
        if crashed:
            with self._shared:
                self._to_reap.extend(crashed)

    def _reap_pending(self) -> None:
        with self._shared:
            crashed, self._to_reap = self._to_reap, []
        if crashed:
            reap_orphans(crashed)

    # -- leaving ------------------------------------------------------------------------

    def leave(self) -> None:
        """Leave cleanly: others see a leave (a new generation without us), not a failure."""
        with self._shared:
            if self._closing.is_set():
                return
            self._closing.set()
        _hold_watch.discard(self)
        if not self._fenced.is_set():
            try:
                root = self.boot.root_mutex(tag=self.incarnation)
                status = root.lock(timeout=self.timing.evict_after)
                if status is not LockStatus.TIMEOUT:
                    with held(root, status):
                        if self.table.field(self.slot, layout.M_INCARNATION) == self.incarnation:
                            self.table.set_field(self.slot, layout.M_STATE, layout.SLOT_LEFT)
                        self._republish_locked()
                        if not self.table.read_view().members:
                            self.boot.retire()  # the last one out removes the domain's root
            except McsError:
                log.exception("leave: could not publish the view")
        self._stop_threads(release=not self._fenced.is_set())
        self.boot.close()
        atexit.unregister(self.leave)

    def _stop_threads(self, release: bool) -> None:
        _hold_watch.discard(self)
        with self._shared:  # under the lock: no watcher is added after the copy below
            self._closing.set()
        if self._beat is not None:
            self._beat.stop()
        if release and self._life is not None:
            self._leave_event.set()
            self._life.join(5)
        if self._monitor is not None and threading.current_thread() is not self._monitor:
            self._monitor.join(5)
        with self._shared:
            watchers = list(self._watchers.values())
        for t in watchers:
            if t is not threading.current_thread():
                t.join(1)
        self._peers.close()
        self._reserve.close()

    def __enter__(self) -> "Member":
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()

    def __repr__(self) -> str:
        return (f"<Member domain={self.domain!r} slot={self.slot} "
                f"incarnation={self.incarnation}{' fenced' if self._fenced.is_set() else ''}>")


def _still_held(mutex: GlobalMutex, pid: int, limit: float) -> bool:
    """Whether ``pid`` still holds ``mutex``, for ``limit`` seconds or more."""
    held_for = mutex.held_for
    return mutex.owner.pid == pid and held_for is not None and held_for >= limit


def join(domain: str, *, node: str | None = None, **timing: float) -> Member:
    """Join ``domain`` (creating it if needed) and return the live :class:`Member`.

    ``timing`` takes ``heartbeat``, ``suspect_after``, ``evict_after``, ``hold_limit`` and
    ``progress_timeout`` in seconds (see :class:`membership.Timing`); the first member of a
    domain sets them for everyone.
    """
    return Member(domain, node=node, timing=Timing(**timing) if timing else None)
