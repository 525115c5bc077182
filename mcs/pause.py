"""``mcs pause`` / ``mcs resume``: a maintenance pause of one member (a debugger, a core dump,
a planned SIGSTOP) during which the others never fence it.

The pause is a deadline in the member's slot (monotonic ns), written under the domain's root
mutex: the evictions re-check it under that mutex, so a pause set before an eviction's check
always wins. The others show the member as ``paused`` (``mcs status``, ``Member.view.paused``);
locks it holds stay held (the waiters wait: they are told, not the holder evicted). The pause
ends at its deadline or at ``mcs resume``; the time it lasted does not count against the
member's heartbeat or progress, so it is judged afresh from then on."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mcs import layout
from mcs.bootstrap import Bootstrap
from mcs.errors import McsError
from mcs.locking import held
from mcs.names import Target
from mcs.types import LockStatus

from membership.table import MemberTable

__all__ = ["MAX_PAUSE", "PauseResult", "pause_member"]

MAX_PAUSE = 86400.0  # seconds: a pause longer than a day is a mistake, not maintenance


@dataclass(frozen=True)
class PauseResult:
    """What a pause or resume did to one member slot."""

    full_name: str
    slot: int
    pid: int
    incarnation: int
    seconds: float  # 0: resumed
    locks_held: int
    locks_held_for: float | None  # seconds since it holds any lock (None: holds none)

    def describe(self) -> str:
        what = (f"paused for {self.seconds:g} s" if self.seconds else "resumed")
        line = (f"{self.full_name}: pid {self.pid} (slot {self.slot}, incarnation "
                f"{self.incarnation}) {what}")
        if self.locks_held:
            line += (f"; it holds {self.locks_held} lock(s)"
                     + (f" for {self.locks_held_for:.1f} s" if self.locks_held_for else "")
                     + (": members that need them wait until it resumes" if self.seconds else ""))
        return line


def pause_member(target: Target, pid: int, seconds: float) -> PauseResult | None:
    """Pause (``seconds`` > 0) or resume (0) the member ``pid`` of ``target``'s domain; None if
    ``pid`` is not a member there."""
    if not 0 <= seconds <= MAX_PAUSE:
        raise ValueError(f"a pause lasts 0 .. {MAX_PAUSE:g} s, got {seconds}")
    with Bootstrap.open(target.full_name, create=False, wait=0.5) as boot:
        table = MemberTable(boot)
        root = boot.root_mutex()
        status = root.lock(timeout=table.timing().evict_after)
        if status is LockStatus.TIMEOUT:
            raise McsError(f"{target.full_name}: the root mutex is busy; try again")
        with held(root, status):
            slot = next((r.slot for r in table.occupied()
                         if r.pid == pid and r.state == layout.SLOT_MEMBER), None)
            if slot is None:
                return None
            now = time.monotonic_ns()
            table.pause(slot, now + int(seconds * 1e9))
            rec = table.read(slot)
    return PauseResult(target.full_name, slot, pid, rec.incarnation, seconds, rec.held,
                       (now - rec.held_since_ns) / 1e9 if rec.held and rec.held_since_ns else None)
