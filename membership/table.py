"""The member table in a domain's bootstrap section: slots, the published view, timing.

Writers hold the root mutex. Readers of the view use a seqlock (VIEW_SEQ is odd while a writer
is publishing), so they never block behind a frozen writer. Lengths read from shared memory are
bounded before use (node names are at most NODE_NAME_MAX bytes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mcs import layout
from mcs.bootstrap import Bootstrap
from mcs.section import Section

from membership.timing import Timing
from membership.view import EvictionCause, MemberInfo, MemberState, View

__all__ = ["SlotRecord", "MemberTable", "member_state"]


@dataclass(frozen=True)
class SlotRecord:
    """A raw member slot as stored in the root."""

    slot: int
    state: int
    pid: int
    incarnation: int
    node: str
    heartbeat_ns: int
    heartbeat_count: int
    joined_ns: int
    fenced: int
    progress_ns: int = 0
    app_progress_ns: int = 0
    paused_until_ns: int = 0
    held: int = 0
    held_since_ns: int = 0
    restarts: int = 0
    fence_cause: int = 0

    @property
    def info(self) -> MemberInfo:
        return MemberInfo(self.slot, self.pid, self.node, self.incarnation)

    @property
    def state_name(self) -> str:
        return layout.SLOT_STATE_NAMES.get(self.state, f"corrupt({self.state})")


def member_state(rec: SlotRecord, timing: Timing, now_ns: int) -> MemberState:
    """How the others see the member in ``rec`` now: paused while its pause lasts; suspected
    or frozen as its heartbeat (counted from the end of a pause) ages past the thresholds, or
    suspected when a progress signal is late; once fenced, frozen or hung by its cause."""
    if rec.state == layout.SLOT_FENCED or (rec.state != layout.SLOT_FREE
                                            and rec.fenced == rec.incarnation):
        try:
            return EvictionCause(rec.fence_cause).state
        except ValueError:
            return MemberState.FENCED
    if rec.state != layout.SLOT_MEMBER:
        return MemberState(layout.SLOT_STATE_NAMES.get(rec.state, "dead"))
    if rec.paused_until_ns > now_ns:
        return MemberState.PAUSED
    age = now_ns - max(rec.heartbeat_ns, rec.paused_until_ns)
    if age > timing.evict_after_ns:
        return MemberState.FROZEN
    late = any(stamp and now_ns - max(stamp, rec.paused_until_ns) > timing.progress_timeout_ns / 2
               for stamp in (rec.progress_ns, rec.app_progress_ns))
    if age > timing.suspect_after_ns or late:
        return MemberState.SUSPECTED
    return MemberState.MEMBER


class MemberTable:
    """Typed access to the member table of an open bootstrap."""

    def __init__(self, boot: Bootstrap) -> None:
        self.boot = boot
        self.sec: Section = boot.section

    # -- slots --------------------------------------------------------------------------

    def field(self, slot: int, field: int) -> int:
        return self.sec.load64(layout.member_offset(slot, field))

    def set_field(self, slot: int, field: int, value: int) -> None:
        self.sec.store64(layout.member_offset(slot, field), value)

    def state(self, slot: int) -> int:
        return self.field(slot, layout.M_STATE)

    def node(self, slot: int) -> str:
        raw = bytes(self.sec.view(layout.member_offset(slot, layout.M_NODE), layout.NODE_NAME_MAX))
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")

    def read(self, slot: int) -> SlotRecord:
        f = self.field
        return SlotRecord(
            slot=slot,
            state=f(slot, layout.M_STATE),
            pid=f(slot, layout.M_PID),
            incarnation=f(slot, layout.M_INCARNATION),
            node=self.node(slot),
            heartbeat_ns=f(slot, layout.M_HEARTBEAT_NS),
            heartbeat_count=f(slot, layout.M_HEARTBEAT_COUNT),
            joined_ns=f(slot, layout.M_JOINED_NS),
            fenced=f(slot, layout.M_FENCED),
            progress_ns=f(slot, layout.M_PROGRESS_NS),
            app_progress_ns=f(slot, layout.M_APP_PROGRESS_NS),
            paused_until_ns=f(slot, layout.M_PAUSED_UNTIL_NS),
            held=f(slot, layout.M_HELD),
            held_since_ns=f(slot, layout.M_HELD_SINCE_NS),
            restarts=f(slot, layout.M_RESTARTS),
            fence_cause=f(slot, layout.M_FENCE_CAUSE),
        )

    def exit_reason(self, slot: int, incarnation: int) -> str:
        """How incarnation ``incarnation`` of ``slot`` left: "left", "dead", "fenced" or "gone"."""
        state = self.state(slot)
        if self.field(slot, layout.M_INCARNATION) == incarnation and state != layout.SLOT_FREE:
            return layout.SLOT_STATE_NAMES.get(state, "gone")
        if self.field(slot, layout.M_EXIT_INCARNATION) == incarnation:
            return layout.SLOT_STATE_NAMES.get(self.field(slot, layout.M_EXIT_STATE), "gone")
        return "gone"

    def occupied(self) -> list[SlotRecord]:
        """Every slot that is not free."""
        return [self.read(s) for s in range(layout.MAX_MEMBERS)
                if self.state(s) != layout.SLOT_FREE]

    def fill(self, slot: int, pid: int, incarnation: int, node: bytes, now_ns: int,
             restarts: int = 0) -> None:
        """Write a joining member's fields; the state is stored last."""
        base = layout.member_offset(slot)
        self.sec.view(base + layout.M_NODE, layout.NODE_NAME_MAX)[:] = node.ljust(
            layout.NODE_NAME_MAX, b"\0")
        for field, value in ((layout.M_PID, pid), (layout.M_INCARNATION, incarnation),
                             (layout.M_HEARTBEAT_NS, now_ns), (layout.M_HEARTBEAT_COUNT, 0),
                             (layout.M_JOINED_NS, time.time_ns()), (layout.M_FENCED, 0),
                             (layout.M_PROGRESS_NS, 0), (layout.M_APP_PROGRESS_NS, 0),
                             (layout.M_PAUSED_UNTIL_NS, 0), (layout.M_HELD, 0),
                             (layout.M_HELD_SINCE_NS, 0), (layout.M_RESTARTS, restarts),
                             (layout.M_FENCE_CAUSE, 0)):
            self.set_field(slot, field, value)
        self.set_field(slot, layout.M_STATE, layout.SLOT_MEMBER)

    def clear(self, slot: int) -> None:
        """Free a slot whose member is gone from the view, recording how it went."""
        self.set_field(slot, layout.M_EXIT_INCARNATION, self.field(slot, layout.M_INCARNATION))
        self.set_field(slot, layout.M_EXIT_STATE, self.state(slot))
        self.set_field(slot, layout.M_STATE, layout.SLOT_FREE)
        self.set_field(slot, layout.M_PID, 0)

    def reset(self) -> None:
        """Free every slot (a stale domain whose members are all dead)."""
        for slot in range(layout.MAX_MEMBERS):
            self.clear(slot)
        self.sec.store64(layout.MEMBER_MASK, 0)
        self.sec.store64(layout.MASTER_SLOT, 0)

    # -- timing -------------------------------------------------------------------------

    _TIMING_WORDS = (layout.HEARTBEAT_NS, layout.SUSPECT_NS, layout.EVICT_NS,
                     layout.HOLD_LIMIT_NS, layout.PROGRESS_NS)

    def timing(self) -> Timing:
        """The domain's timing (set by its first member)."""
        return Timing.from_ns(*(self.sec.load64(w) for w in self._TIMING_WORDS))

    def set_timing(self, timing: Timing) -> None:
        for word, value in zip(self._TIMING_WORDS, timing.as_ns()):
            self.sec.store64(word, value)

    # -- detection records --------------------------------------------------------------

    def count_eviction(self, cause: EvictionCause) -> None:
        self.sec.add64(layout.EVICTIONS + 8 * (cause - 1), 1)

    def evictions(self) -> dict[str, int]:
        """Evictions in this domain since its root was made, by cause name."""
        return {c.label: self.sec.load64(layout.EVICTIONS + 8 * (c - 1)) for c in EvictionCause}

    def paused_until(self, slot: int) -> int:
        return self.field(slot, layout.M_PAUSED_UNTIL_NS)

    def pause(self, slot: int, until_ns: int) -> None:
        """Mark ``slot`` paused until the monotonic time ``until_ns`` (now: resume)."""
        self.set_field(slot, layout.M_PAUSED_UNTIL_NS, until_ns)

    # -- the view -----------------------------------------------------------------------

    def generation(self) -> int:
        return self.sec.load64(layout.GENERATION)

    def published_generation(self) -> int | None:
        """The generation of the published view, or None while one is being written (three
        loads: what a reader checks before it reads the whole view)."""
        sec = self.sec
        seq = sec.load64(layout.VIEW_SEQ)
        if seq & 1:
            return None
        generation = sec.load64(layout.GENERATION)
        return generation if sec.load64(layout.VIEW_SEQ) == seq else None

    def read_view(self, timeout: float = 5.0) -> View:
        """The published view, read consistently without the root mutex."""
        sec = self.sec
        deadline = time.monotonic() + timeout
        while True:
            seq = sec.load64(layout.VIEW_SEQ)
            if not seq & 1:
                generation = sec.load64(layout.GENERATION)
                mask = sec.load64(layout.MEMBER_MASK)
                master_slot = sec.load64(layout.MASTER_SLOT)
                members = tuple(
                    MemberInfo(s, self.field(s, layout.M_PID), self.node(s),
                               self.field(s, layout.M_INCARNATION))
                    for s in range(layout.MAX_MEMBERS) if mask >> s & 1)
                if sec.load64(layout.VIEW_SEQ) == seq:
                    master = next((m for m in members if m.slot + 1 == master_slot), None)
                    return View(generation, members, master)
            if time.monotonic() > deadline:
                raise TimeoutError("the view is being rewritten for too long (writer frozen?)")
            time.sleep(0.00005)

    def publish(self, members: tuple[MemberInfo, ...], master: MemberInfo | None) -> int:
        """Publish a new view under the root mutex; returns its generation."""
        sec = self.sec
        seq = sec.load64(layout.VIEW_SEQ)
        sec.store64(layout.VIEW_SEQ, seq | 1)  # odd: being written (also repairs a dead writer)
        mask = 0
        for m in members:
            mask |= 1 << m.slot
        generation = sec.load64(layout.GENERATION) + 1
        sec.store64(layout.MEMBER_MASK, mask)
        sec.store64(layout.MASTER_SLOT, 0 if master is None else master.slot + 1)
        sec.store64(layout.GENERATION, generation)
        sec.store64(layout.VIEW_CHANGED_NS, time.monotonic_ns())
        sec.store64(layout.VIEW_SEQ, (seq | 1) + 1)
        return generation
