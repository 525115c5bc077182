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

from membership.view import MemberInfo, View

__all__ = ["SlotRecord", "MemberTable"]


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

    @property
    def info(self) -> MemberInfo:
        return MemberInfo(self.slot, self.pid, self.node, self.incarnation)

    @property
    def state_name(self) -> str:
        return layout.SLOT_STATE_NAMES.get(self.state, f"corrupt({self.state})")


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

    def fill(self, slot: int, pid: int, incarnation: int, node: bytes, now_ns: int) -> None:
        """Write a joining member's fields; the state is stored last."""
        base = layout.member_offset(slot)
        self.sec.view(base + layout.M_NODE, layout.NODE_NAME_MAX)[:] = node.ljust(
            layout.NODE_NAME_MAX, b"\0")
        for field, value in ((layout.M_PID, pid), (layout.M_INCARNATION, incarnation),
                             (layout.M_HEARTBEAT_NS, now_ns), (layout.M_HEARTBEAT_COUNT, 0),
                             (layout.M_JOINED_NS, time.time_ns()), (layout.M_FENCED, 0)):
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

    def timing_ns(self) -> tuple[int, int, int]:
        return (self.sec.load64(layout.HEARTBEAT_NS), self.sec.load64(layout.SUSPECT_NS),
                self.sec.load64(layout.EVICT_NS))

    def set_timing_ns(self, heartbeat: int, suspect: int, evict: int) -> None:
        self.sec.store64(layout.HEARTBEAT_NS, heartbeat)
        self.sec.store64(layout.SUSPECT_NS, suspect)
        self.sec.store64(layout.EVICT_NS, evict)

    # -- the view -----------------------------------------------------------------------

    def generation(self) -> int:
        return self.sec.load64(layout.GENERATION)

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
