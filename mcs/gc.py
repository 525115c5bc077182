"""``mcs gc``: remove the bootstrap objects of domains that have no live member.

A bootstrap object is the one mcs object the kernel does not reclaim after a crash. A domain is
live while any process holds one of its life mutexes (a frozen process counts as live); such a
domain is never touched. gc only ever examines names with ``lstat``: what it does not own -- a
symlink, directory, FIFO or other non-regular file named ``mcs.*``, or another user's object --
is reported as *skipped* and never followed, opened or removed. Objects of ours that are not a
valid root (bad magic, wrong size...) are reported as *kept*. With the dead domains' roots go
the sections their members left unmarked (only those carrying the mcs key: see
:mod:`mcs.section`), and the hidden name a removal interrupted by a crash left behind.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass

from mcs import shmname
from mcs.bootstrap import PREFIX, Bootstrap, iter_objects
from mcs.locking import held
from mcs.names import target_of
from mcs.errors import BootstrapError, UninitialisedError
from mcs.types import LockStatus

__all__ = ["GcAction", "GcResult", "collect", "collect_domain"]

HALF_INITIALISED_GRACE = 10.0  # seconds before a never-initialised object counts as dead
RETIRED_GRACE = 10.0  # seconds before a hidden name left between rename and unlink is removed


class GcAction(enum.StrEnum):
    """What gc did with one name."""

    REMOVED = "removed"
    WOULD_REMOVE = "would remove"  # --dry-run
    KEPT = "kept"  # ours, but live or not a valid root
    SKIPPED = "skipped"  # not ours: another user's object or not a regular file


@dataclass(frozen=True)
class GcResult:
    """What gc did with one bootstrap name."""

    domain: str  # the bootstrap domain (its full name: ``webcache-8080.webcache``)
    action: GcAction
    reason: str

    def as_dict(self) -> dict[str, str | None]:
        """As ``mcs status --json`` names it: the application's domain, the component, the
        full name; then the action and its reason."""
        target = target_of(self.domain)
        return {"domain": target.domain, "component": target.component,
                "full_name": self.domain, "action": str(self.action), "reason": self.reason}


def collect(*, dry_run: bool = False, lock_timeout: float = 2.0) -> list[GcResult]:
    """Examine every bootstrap name on this host; remove the roots of dead domains."""
    results = [_collect_one(entry, dry_run, lock_timeout) for entry in iter_objects()]
    if not dry_run:
        _remove_interrupted_removals()
    return results


def collect_domain(domain: str, *, dry_run: bool = False,
                   lock_timeout: float = 2.0) -> GcResult | None:
    """gc for one domain; None if it has no bootstrap name."""
    entry = shmname.examine(PREFIX + domain)
    if entry is None:
        return None
    return _collect_one(entry, dry_run, lock_timeout)


def _collect_one(entry: shmname.Entry, dry_run: bool, lock_timeout: float) -> GcResult:
    domain = entry.name[len(PREFIX):]
    removing = GcAction.WOULD_REMOVE if dry_run else GcAction.REMOVED
    if entry.kind is not shmname.Kind.REGULAR:
        return GcResult(domain, GcAction.SKIPPED,
                        f"{entry.describe()}: not an mcs object, left alone")
    if not entry.ours:
        return GcResult(domain, GcAction.SKIPPED,
                        f"{entry.describe()}: another user's, left alone")
    try:
        boot = Bootstrap.open(domain, create=False, wait=0.2)
    except UninitialisedError:
        if time.time() - entry.st.st_mtime <= HALF_INITIALISED_GRACE:
            return GcResult(domain, GcAction.KEPT, "not initialised yet (created less than "
                            f"{HALF_INITIALISED_GRACE:.0f} s ago: its creator may be at work)")
        if not dry_run:
            shmname.remove_if_same(entry.name, entry.st.st_ino)
        return GcResult(domain, removing, "never initialised (creator died)")
    except BootstrapError as exc:
        return GcResult(domain, GcAction.KEPT, str(exc))
    with boot:
        mutex = boot.root_mutex()
        status = mutex.lock(timeout=lock_timeout)
        if status is LockStatus.TIMEOUT:
            return GcResult(domain, GcAction.KEPT,
                            "root mutex busy (a live member is changing the view)")
        with held(mutex, status):
            if boot.removed:
                return GcResult(domain, GcAction.KEPT, "already retired by another process")
            live = boot.live_slots()
            if live:
                return GcResult(domain, GcAction.KEPT, f"live: {len(live)} member(s)")
            if not dry_run:
                boot.reap_dead_members_segments()
                boot.retire()
            return GcResult(domain, removing, "no live member")


def _remove_interrupted_removals() -> None:
    """Unlink our hidden ``.mcs-retired.*`` names older than a grace period: a process killed
    between the rename and the unlink of a removal (:func:`mcs.shmname.remove_if_same`)."""
    try:
        names = os.listdir(shmname.shm_dir())
    except OSError:
        return
    for name in names:
        if not name.startswith(shmname.RETIRED_PREFIX):
            continue
        entry = shmname.examine(name)
        if entry is not None and entry.ours and (
                time.time() - entry.st.st_ctime > RETIRED_GRACE):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass
