"""A member killed between creating a SysV segment and marking it for removal leaves the segment
behind; the survivor that publishes its death, the next joiner of a dead domain, or `mcs gc`
reclaims it. The kill is real: the fault point `section.create.unmarked` SIGKILLs the child."""

from __future__ import annotations

import os
import time

import membership
from conftest import wait_for
from mcs import gc
from mcs import procfs
from mcs.section import Section, reap_orphans

FAST = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.3}

DIES_CREATING = """
import os, sys
import membership
from mcs import faults
from mcs.section import Section
m = membership.join(sys.argv[1], node="doomed", heartbeat=0.02, suspect_after=0.1, evict_after=0.3)
print("joined", flush=True)
sys.stdin.readline()
faults.arm("section.create.unmarked", "kill")
Section.create(12345)
print("survived", flush=True)
"""


def segments_of(pid: int) -> list[tuple[int, int]]:
    """(shmid, perms) of the segments process ``pid`` created."""
    return [(r.shmid, r.perms) for r in procfs.shm_segments() if r.cpid == pid]


def orphan_of(spawn, domain: str):
    """A child member of ``domain`` that, told "go", dies by SIGKILL right after shmget."""
    child = spawn(DIES_CREATING, domain)
    child.expect("joined")
    return child


def test_a_survivor_reclaims_the_segment_of_a_member_killed_while_creating_it(domain, spawn):
    with membership.join(domain, node="survivor", **FAST) as me:
        child = orphan_of(spawn, domain)
        assert wait_for(lambda: len(me.view.members) == 2)
        child.send("go")
        assert child.wait() == -9
        assert wait_for(lambda: [x.pid for x in me.view.members] == [os.getpid()])
        assert wait_for(lambda: segments_of(child.pid) == [], 2.0), segments_of(child.pid)


def test_the_next_joiner_of_a_dead_domain_reclaims_it(domain, spawn):
    child = orphan_of(spawn, domain)
    child.send("go")
    assert child.wait() == -9
    [(shmid, perms)] = segments_of(child.pid)
    assert perms & 0o1000 == 0 and perms & 0o777 == 0o600  # left unmarked: nobody frees it
    with membership.join(domain, node="phoenix", **FAST):
        assert segments_of(child.pid) == []


def test_mcs_gc_reclaims_it_with_the_dead_domain(domain, spawn):
    child = orphan_of(spawn, domain)
    child.send("go")
    assert child.wait() == -9
    assert len(segments_of(child.pid)) == 1
    result = gc.collect_domain(domain)
    assert result is not None and result.action == "removed"
    assert segments_of(child.pid) == []


def test_reaping_spares_live_and_marked_segments_and_other_creators(domain, spawn):
    child = orphan_of(spawn, domain)
    with Section.create(100) as mine:  # marked for removal at creation: never reaped
        assert reap_orphans([(os.getpid(), 0)]) == []
        child.send("go")
        assert child.wait() == -9
        [(orphan, _)] = segments_of(child.pid)
        # a creator that started after the segment was made is a stranger with a reused pid
        assert reap_orphans([(child.pid, time.time_ns() + 3_600_000_000_000)]) == []
        assert reap_orphans([(child.pid + 1_000_000, 0)]) == []
        assert reap_orphans([(child.pid, 0)]) == [orphan]
        assert segments_of(child.pid) == []
        assert mine.load64(0) == 0  # ours untouched
    # the domain the child joined is dead: its bootstrap goes with the fixture



DIES_CREATING_WITH_A_FOREIGN_SEGMENT = """
import ctypes, os, sys
import membership
from mcs import faults
from mcs.section import Section
libc = ctypes.CDLL(None, use_errno=True)
m = membership.join(sys.argv[1], node="doomed", heartbeat=0.02, suspect_after=0.1, evict_after=0.3)
# the same process's own SysV segments, made with a plain shmget: not mcs's to reclaim
private = libc.shmget(0, 4096, 0o1000 | 0o600)  # IPC_PRIVATE
keyed = libc.shmget(0x51000000 | os.getpid() & 0xFFFF, 4096, 0o1000 | 0o2000 | 0o600)
print(private, keyed, flush=True)
sys.stdin.readline()
faults.arm("section.create.unmarked", "kill")
Section.create(12345)
print("survived", flush=True)
"""


def remove_segments(ids) -> None:
    from mcs import _gsm
    for shmid in ids:
        _gsm.shm_remove(shmid)


def foreign_and_mcs_orphans(spawn, domain: str):
    """A member that made two plain segments, then died by SIGKILL inside Section.create."""
    child = spawn(DIES_CREATING_WITH_A_FOREIGN_SEGMENT, domain)
    foreign = sorted(map(int, child.readline().split()))
    assert all(shmid >= 0 for shmid in foreign)
    return child, foreign


def test_survivors_reap_only_segments_mcs_marked_as_its_own(domain, spawn):
    with membership.join(domain, node="survivor", **FAST) as me:
        child, foreign = foreign_and_mcs_orphans(spawn, domain)
        try:
            assert wait_for(lambda: len(me.view.members) == 2)
            child.send("go")
            assert child.wait() == -9  # left two plain segments and an unmarked mcs one
            assert wait_for(lambda: [x.pid for x in me.view.members] == [os.getpid()])
            assert wait_for(lambda: sorted(s for s, _ in segments_of(child.pid)) == foreign, 2.0)
            time.sleep(0.2)  # and they stay
            assert sorted(s for s, _ in segments_of(child.pid)) == foreign
        finally:
            remove_segments(foreign)


def test_gc_reaps_only_segments_mcs_marked_as_its_own(domain, spawn):
    child, foreign = foreign_and_mcs_orphans(spawn, domain)
    try:
        child.send("go")
        assert child.wait() == -9
        assert len(segments_of(child.pid)) == 3
        result = gc.collect_domain(domain)
        assert result is not None and result.action == "removed"
        assert sorted(s for s, _ in segments_of(child.pid)) == foreign
        assert reap_orphans([(child.pid, 0)]) == []  # nor does a direct call
    finally:
        remove_segments(foreign)


def test_the_mcs_key_mark():
    from mcs.section import KEY_TAG, is_section_key, section_key
    pid = os.getpid()
    keys = {section_key(r, pid) for r in range(0, 65536, 257)}
    assert all(is_section_key(k, pid) for k in keys)
    assert all((k & 0xFFFFFFFF) >> 24 == KEY_TAG for k in keys)
    assert sum(is_section_key(k, pid + 1) for k in keys) < len(keys) // 8  # tied to the creator
    assert not is_section_key(0, pid)  # IPC_PRIVATE
    with Section.create(64) as sec:  # its key was private again once marked for removal
        row = procfs.shm_segment(sec.shmid)
        assert row is not None and row.key == 0
