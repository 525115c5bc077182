"""``mcs gc``: remove the bootstrap objects of domains that have no live member.

A bootstrap object is the one mcs object the kernel does not reclaim after a crash. A domain is
live while any process holds one of its life mutexes (a frozen process counts as live); such a
domain is never touched. Foreign objects (bad magic, other owner) are reported and kept.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import posix_ipc

from mcs.bootstrap import PREFIX, SHM_DIR, Bootstrap, iter_objects
from mcs.errors import BootstrapError
from mcs.types import LockStatus

__all__ = ["GcResult", "collect", "collect_domain"]

HALF_INITIALISED_GRACE = 10.0  # seconds before a never-initialised object counts as dead


@dataclass(frozen=True)
class GcResult:
    """What gc did with one bootstrap object."""

    domain: str
    action: str  # "removed", "kept" or "would remove"
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def collect(*, dry_run: bool = False, lock_timeout: float = 2.0) -> list[GcResult]:
    """Examine every bootstrap object on this host; remove those of dead domains."""
    results = []
    for domain, st in iter_objects():
        results.append(_collect_one(domain, st, dry_run, lock_timeout))
    return results


def collect_domain(domain: str, *, dry_run: bool = False,
                   lock_timeout: float = 2.0) -> GcResult | None:
    """gc for one domain; None if it has no bootstrap object."""
    try:
        st = os.stat(os.path.join(SHM_DIR, PREFIX + domain))
    except FileNotFoundError:
        return None
    return _collect_one(domain, st, dry_run, lock_timeout)


def _collect_one(domain: str, st: os.stat_result, dry_run: bool, lock_timeout: float) -> GcResult:
    removing = "would remove" if dry_run else "removed"
    try:
        boot = Bootstrap.open(domain, create=False, wait=0.2)
    except BootstrapError as exc:
        if "never initialised" in str(exc) and time.time() - st.st_mtime > HALF_INITIALISED_GRACE:
            if not dry_run:
                _unlink_if_same(domain, st.st_ino)
            return GcResult(domain, removing, "never initialised (creator died)")
        return GcResult(domain, "kept", str(exc))
    with boot:
        mutex = boot.root_mutex()
        status = mutex.lock(timeout=lock_timeout)
        if status is LockStatus.TIMEOUT:
            return GcResult(domain, "kept", "root mutex busy (a live member is changing the view)")
        try:
            if status is LockStatus.ABANDONED:
                mutex.mark_consistent()
            if boot.removed:
                return GcResult(domain, "kept", "already retired by another process")
            live = boot.live_slots()
            if live:
                return GcResult(domain, "kept", f"live: {len(live)} member(s)")
            if not dry_run:
                boot.reap_dead_members_segments()
                boot.retire()
            return GcResult(domain, removing, "no live member")
        finally:
            mutex.unlock()


def _unlink_if_same(domain: str, inode: int) -> None:
    try:
        if os.stat(os.path.join(SHM_DIR, PREFIX + domain)).st_ino == inode:
            posix_ipc.unlink_shared_memory("/" + PREFIX + domain)
    except (FileNotFoundError, posix_ipc.ExistentialError):
        pass
