"""Views: the numbered, agreed membership of a domain."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MemberInfo", "View"]


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
