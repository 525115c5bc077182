"""Failure-detection timing of a domain, with defaults safe on a loaded 2-core machine."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Timing"]


@dataclass(frozen=True)
class Timing:
    """Heartbeat and eviction timing, in seconds.

    Crash detection does not depend on these: a dead member's life mutex is reported within a
    millisecond. They only bound how long a *frozen* member (SIGSTOP, a stopped VM) keeps its
    place: it is suspected after ``suspect_after`` and evicted and fenced after ``evict_after``.
    The heartbeat is written by a native thread that needs no GIL, so only a stopped process
    misses beats; the 2 s default leaves 20 missed beats of margin for a CPU-starved scheduler
    (no false eviction was seen in 60 s with both cores saturated, see docs/membership.md).
    """

    heartbeat: float = 0.1
    suspect_after: float = 0.5
    evict_after: float = 2.0

    def __post_init__(self) -> None:
        for name in ("heartbeat", "suspect_after", "evict_after"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 0.001 <= self.heartbeat <= 10:
            raise ValueError(f"heartbeat must be within 1 ms .. 10 s, got {self.heartbeat}")
        if not self.heartbeat * 2 <= self.suspect_after <= self.evict_after <= 3600:
            raise ValueError(
                "need 2*heartbeat <= suspect_after <= evict_after <= 3600 s, got "
                f"heartbeat={self.heartbeat}, suspect_after={self.suspect_after}, "
                f"evict_after={self.evict_after}")

    @property
    def check_interval(self) -> float:
        """How often a member looks at the others' heartbeats (bounds eviction lateness)."""
        return min(self.heartbeat, 0.02)

    @property
    def suspect_after_ns(self) -> int:
        return int(self.suspect_after * 1e9)

    @property
    def evict_after_ns(self) -> int:
        return int(self.evict_after * 1e9)

    def as_ns(self) -> tuple[int, int, int]:
        return int(self.heartbeat * 1e9), self.suspect_after_ns, self.evict_after_ns

    @classmethod
    def from_ns(cls, heartbeat: int, suspect: int, evict: int) -> "Timing":
        return cls(heartbeat / 1e9, suspect / 1e9, evict / 1e9)
