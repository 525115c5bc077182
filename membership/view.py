"""Views: the numbered, agreed membership of a domain."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["EvictionCause", "MemberInfo", "MemberState", "View"]


class EvictionCause(enum.IntEnum):
    """Why a member was evicted and fenced (stored in its slot; counted per domain)."""

    FROZEN = 1
    """Its heartbeat was silent for ``evict_after`` (SIGSTOP, a stopped VM)."""
    STOPPED = 2
    """Others waited on a lock it held, its heartbeat had stopped and procfs showed it stopped."""
    HUNG = 3
    """Alive and beating, it held a lock longer than ``hold_limit`` while another member waited."""
    STALLED = 4
    """Alive and beating, its progress signal was older than ``progress_timeout``."""

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def state(self) -> "MemberState":
        """How ``mcs status`` names a member fenced for this cause."""
        return MemberState.FROZEN if self in (EvictionCause.FROZEN, EvictionCause.STOPPED) \
            else MemberState.HUNG


class MemberState(enum.Enum):
    """What a member looks like to the others (``mcs status``, :meth:`Member.states`)."""

    MEMBER = "member"
    SUSPECTED = "suspected"  # heartbeat older than suspect_after, or progress late: reported only
    PAUSED = "paused"  # under a maintenance pause: never fenced while it lasts
    FROZEN = "frozen"  # heartbeat older than evict_after (about to be evicted), or fenced so
    HUNG = "hung"  # fenced for holding a lock too long or for making no progress
    FENCED = "fenced"
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True, order=True)
class MemberInfo:
    """One member as the view names it."""

    slot: int
    pid: int
    node: str
    incarnation: int


@dataclass(frozen=True)
class View:
    """Generation ``generation`` of the membership: its members (by slot) and its master."""

    generation: int
    members: tuple[MemberInfo, ...]
    master: MemberInfo | None
    departed: tuple[tuple[MemberInfo, str], ...] = ()
    """Members of the previous view seen by this member that are gone, with how they went:
    "left" (clean leave), "dead" (crash seen through its life mutex), "fenced" (evicted)."""
    paused: frozenset[int] = frozenset()
    """Slots under a maintenance pause as this member last looked (not part of the agreement:
    a pause changes no generation)."""

    def member(self, slot: int) -> MemberInfo | None:
        """The member in ``slot``, or None if that slot is not in this view."""
        for m in self.members:
            if m.slot == slot:
                return m
        return None

    @property
    def slots(self) -> frozenset[int]:
        return frozenset(m.slot for m in self.members)


def choose_master(members: tuple[MemberInfo, ...], current: MemberInfo | None) -> MemberInfo | None:
    """Deterministic and stable: keep the current master while it is a member (no flapping on
    joins); otherwise the oldest member (lowest incarnation)."""
    if not members:
        return None
    if current is not None and current in members:
        return current
    return min(members, key=lambda m: m.incarnation)
