"""Failure-detection timing of a domain, with defaults safe on a loaded 2-core machine."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Timing"]


@dataclass(frozen=True)
class Timing:
    """Failure-detection timing, in seconds (docs/membership.md, "Layered detection").

    Crash detection does not depend on these: a dead member's life mutex is reported within a
    millisecond. ``heartbeat``, ``suspect_after`` and ``evict_after`` bound how long a *frozen*
    member (SIGSTOP, a stopped VM) keeps its place: it is suspected after ``suspect_after`` and
    evicted and fenced after ``evict_after`` (sooner when others wait on a lock it holds and
    procfs shows it stopped). The heartbeat is written by a native thread that needs no GIL, so
    only a stopped process misses beats; the 2 s default leaves 20 missed beats of margin for a
    CPU-starved scheduler (no false eviction was seen in 60 s with both cores saturated).

    A member that is alive and beating but *hung* is evicted when it holds a global mutex longer
    than ``hold_limit`` while another member waits for it, or when a progress signal it gives
    (its recovery thread's loop, :meth:`Member.progress`) is older than ``progress_timeout``.
    """

    heartbeat: float = 0.1
    suspect_after: float = 0.5
    evict_after: float = 2.0
    hold_limit: float = 5.0
    progress_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("heartbeat", "suspect_after", "evict_after", "hold_limit",
                     "progress_timeout"):
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
        for name in ("hold_limit", "progress_timeout"):
            if not 2 * self.heartbeat <= getattr(self, name) <= 86400:
                raise ValueError(f"need 2*heartbeat <= {name} <= 86400 s, got "
                                 f"{name}={getattr(self, name)}, heartbeat={self.heartbeat}")

    @property
    def check_interval(self) -> float:
        """How often a member looks at the others' heartbeats (bounds eviction lateness)."""
        return min(self.heartbeat, 0.02)

    @property
    def relaxed_check_interval(self) -> float:
        """How often a member looks while it suspects no one and has no view to handle: every
        heartbeat, at most a quarter of ``suspect_after`` and of the time from suspicion to
        eviction (100 ms at the defaults, 20 ms at a 20 ms heartbeat). A member that goes silent
        is suspected within ``suspect_after`` + this; from then on the others look every
        ``check_interval``, so its eviction is as punctual as with ``check_interval`` alone,
        and a process that serves (a pinned web cache node) is woken 5 times less often."""
        return max(self.check_interval, min(self.heartbeat, self.suspect_after / 4,
                                            (self.evict_after - self.suspect_after) / 4))

    @property
    def suspect_after_ns(self) -> int:
        return int(self.suspect_after * 1e9)

    @property
    def evict_after_ns(self) -> int:
        return int(self.evict_after * 1e9)

    @property
    def hold_limit_ns(self) -> int:
        return int(self.hold_limit * 1e9)

    @property
    def progress_timeout_ns(self) -> int:
        return int(self.progress_timeout * 1e9)

    @property
    def progress_every(self) -> float:
        """How often a progress signal should be given (a quarter of the timeout, at most 1 s)."""
        return min(1.0, self.progress_timeout / 4)

    def as_ns(self) -> tuple[int, int, int, int, int]:
        return (int(self.heartbeat * 1e9), self.suspect_after_ns, self.evict_after_ns,
                self.hold_limit_ns, self.progress_timeout_ns)

    @classmethod
    def from_ns(cls, heartbeat: int, suspect: int, evict: int, hold: int = 0,
                progress: int = 0) -> "Timing":
        """From the domain's words (0 for a word a domain made by an older version lacks)."""
        default = cls()
        return cls(heartbeat / 1e9, suspect / 1e9, evict / 1e9,
                   hold / 1e9 if hold else default.hold_limit,
                   progress / 1e9 if progress else default.progress_timeout)
