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
  runs the callbacks, and evicts members whose heartbeat is older than ``evict_after``: SIGKILL
  through a pidfd taken when the member was first seen, never a bare pid.

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
import logging
import os
import socket
import threading
import time
from typing import Callable

from mcs import layout
from mcs._gsm import GlobalEvent, GlobalMutex, Heartbeat
from mcs.bootstrap import FUTEX_OWNER_DIED, FUTEX_TID_MASK, Bootstrap
from mcs.locking import held
from mcs.errors import BootstrapError, FencedError, McsError, NotRecoverableError
from mcs.section import reap_orphans
from mcs.types import LockStatus

from membership.fdreserve import FdReserve
from membership.peers import Peers, dying_by_path
from membership.table import MemberTable
from membership.timing import Timing
from membership.view import MemberInfo, View, choose_master

__all__ = ["Member", "MemberStats", "join"]

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


def _dying_soon(pids: list[int], grace: float,
                dying_now: Callable[[int], bool] = dying_by_path) -> set[int]:
    """The pids that are dying (``dying_now``) within ``grace`` seconds, all watched together
    (one grace for the whole node, not one per process): deaths of one node seen together are
    one change."""
    deadline = time.monotonic() + grace
    dying: set[int] = set()
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
            t = self._requested_timing or Timing()
            table.set_timing_ns(*t.as_ns())
        hb, suspect, evict = table.timing_ns()
        self.timing = Timing.from_ns(hb, suspect, evict)
        if self._requested_timing is not None and self._requested_timing != self.timing:
            log.warning("domain %s runs with %s; adopting it instead of %s", self.domain,
                        self.timing, self._requested_timing)
        free = [s for s in range(layout.MAX_MEMBERS) if table.state(s) == layout.SLOT_FREE]
        if not free:
            raise McsError(f"domain {self.domain!r} is full ({layout.MAX_MEMBERS} members)")
        self.slot = free[0]
        self.incarnation = boot.section.add64(layout.NEXT_INCARNATION, 1) + 1
        self._start_life_thread()
        now = time.monotonic_ns()
        table.fill(self.slot, os.getpid(), self.incarnation, self._node, now)
        self._beat = Heartbeat(boot.section,
                               layout.member_offset(self.slot, layout.M_HEARTBEAT_NS),
                               layout.member_offset(self.slot, layout.M_HEARTBEAT_COUNT),
                               self.timing.heartbeat)
        self._republish_locked()
        self._refresh_view()

    def _start_life_thread(self) -> None:
        acquired = threading.Event()
        result: list[object] = []

        def life() -> None:
            mutex = self.boot.life_mutex(self.slot, tag=self.incarnation)
            try:
                status = mutex.lock()
                if status is LockStatus.ABANDONED:
                    mutex.mark_consistent()
                result.append(status)
            except BaseException as exc:  # reported to the joiner
                result.append(exc)
                acquired.set()
                return
            acquired.set()
            self._leave_event.wait()
            mutex.unlock()

        self._life = threading.Thread(target=life, name=f"mcs-life-{self.slot}", daemon=True)
        self._life.start()
        acquired.wait()
        if isinstance(result[0], BaseException):
            raise result[0]
        self._life_tid = self._life.native_id

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
        return MemberStats(deferred, self._reserve.held, self._reserve.spent,
                           self._peers.procfs_fallbacks, watcher_errors)

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
        """Block on a member's life mutex; when we get it, the member died or left."""
        mutex = self.boot.life_mutex(slot)
        while not self._closing.is_set():
            try:
                status = mutex.lock(timeout=0.25)
            except McsError as exc:
                if not self._closing.is_set():
                    with self._shared:
                        self._watcher_errors += 1
                    log.warning("domain %s: the watcher of slot %d incarnation %d stopped (%s); "
                                "that member is still evicted if its heartbeat stops",
                                self.domain, slot, incarnation, exc)
                return
            if status is LockStatus.TIMEOUT:
                continue
            try:
                # We hold its life mutex, so that incarnation is not alive. A clean leave has
                # already set LEFT; anything else (ABANDONED, or a probe that consumed the
                # abandonment first) is a death.
                if self.table.field(slot, layout.M_INCARNATION) == incarnation:
                    self.table.sec.cas64(layout.member_offset(slot, layout.M_STATE),
                                         layout.SLOT_MEMBER, layout.SLOT_DEAD)
                if status is LockStatus.ABANDONED:
                    mutex.mark_consistent()
            finally:
                mutex.unlock()
            if not self._closing.is_set():
                # Every survivor's watcher gets this life mutex in turn; the first one publishes
                # the view and clears the slot. The others find the slot cleared (or reused)
                # and publish nothing: no redundant recomputation under the root mutex.
                self._republish(unless=lambda: self.table.field(
                    slot, layout.M_INCARNATION) != incarnation)
                # This thread is awake and the view is published (by us or by the survivor
                # that got the life mutex first): run the callbacks now rather than after a
                # wake-up of the monitor thread.
                self._refresh_view()
                self._reap_pending()
            return

    def _monitor_main(self) -> None:
        seen = self._view_event.value
        while not self._closing.is_set():
            try:
                self._view_event.wait(seen, timeout=self.timing.check_interval)
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
        ``evict_after`` (the monitor, and a republisher blocked on a frozen holder)."""
        with self._shared:
            view = self._view
        if view is None:
            return
        now = time.monotonic_ns()
        table = self.table
        for m in view.members:
            if m.slot == self.slot:
                continue
            age = now - table.field(m.slot, layout.M_HEARTBEAT_NS)
            key = (m.slot, m.incarnation)
            if age > self.timing.evict_after_ns:
                self._evict(m)
                continue
            with self._shared:
                newly = age > self.timing.suspect_after_ns and key not in self._suspected
                if age > self.timing.suspect_after_ns:
                    self._suspected.add(key)
                else:
                    self._suspected.discard(key)
            if newly:
                log.warning("member %s suspected (silent for %.0f ms)", m, age / 1e6)

    def _evict(self, m: MemberInfo) -> None:
        """Fence a frozen member: mark it, SIGKILL it through its pidfd, publish the view."""
        root = self.boot.root_mutex(tag=self.incarnation)
        status = root.lock(timeout=self.timing.check_interval)
        if status is LockStatus.TIMEOUT:
            # The root mutex may be held by the frozen member itself: fence it without the lock;
            # its death releases the root mutex (ABANDONED) and the next locker republishes.
            if root.owner.tag == m.incarnation:
                self._fence(m, "it holds the root mutex")
            return
        with held(root, status):
            table = self.table
            age = time.monotonic_ns() - table.field(m.slot, layout.M_HEARTBEAT_NS)
            if (table.field(m.slot, layout.M_INCARNATION) != m.incarnation
                    or table.state(m.slot) != layout.SLOT_MEMBER
                    or age <= self.timing.evict_after_ns):
                return  # somebody else already acted, or it woke up
            killed = self._fence(m, f"silent for {age / 1e6:.0f} ms")
            self._republish_locked()
        if killed:  # an unsignalled one is not waited for: it may never exit
            self._peers.wait_exit((m.slot, m.incarnation), EXIT_WAIT)
        self._reap_pending()

    def _fence(self, m: MemberInfo, why: str) -> bool:
        """Record the fence and SIGKILL the member through the pidfd taken when first seen;
        whether it was signalled (False: no verified pidfd, the pid may be a stranger's: the
        fence stands, and the member stops itself if it ever runs again). Logged once."""
        table = self.table
        newly = table.field(m.slot, layout.M_FENCED) != m.incarnation
        table.set_field(m.slot, layout.M_FENCED, m.incarnation)
        # Marked before the kill, so that watchers that see it die report "fenced", not "dead".
        table.sec.cas64(layout.member_offset(m.slot, layout.M_STATE),
                        layout.SLOT_MEMBER, layout.SLOT_FENCED)
        killed = self._peers.kill((m.slot, m.incarnation))
        if newly and killed:
            log.warning("member %s evicted and fenced (%s)", m, why)
        elif newly:
            log.warning("member %s fenced (%s) but not signalled: no verified pidfd on it", m,
                        why)
        return killed

    # -- publishing ---------------------------------------------------------------------

    def _republish(self, unless: Callable[[], bool] | None = None) -> None:
        """Publish the view from the slot states, under the root mutex; ``unless`` (checked
        before and under the mutex) says the change was already published."""
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


def join(domain: str, *, node: str | None = None, **timing: float) -> Member:
    """Join ``domain`` (creating it if needed) and return the live :class:`Member`.

    ``timing`` takes ``heartbeat``, ``suspect_after`` and ``evict_after`` in seconds (see
    :class:`membership.Timing`); the first member of a domain sets them for everyone.
    """
    return Member(domain, node=node, timing=Timing(**timing) if timing else None)
