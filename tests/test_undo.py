"""The undo log: before-images restored exactly after kill -9 at every step, committed work kept,
a roller killed mid-rollback redone, a slot's next incarnation never touched by an old owner."""

from __future__ import annotations

import threading

import pytest

import mcs
from mcs import LockStatus
from mcs.errors import LockUsageError, LogFullError
from mcs.types import LogState, RollbackOutcome
from mcs.undo import LOG_HEADER, Lanes, LogRegion, UndoLog, decode_owner, owner_tag

LOG_OFF = 0
LOG_SIZE = 4096
DATA = 8192  # the bytes the transactions change live here
SECTION = 16384

# A child: attach, begin a transaction on the log at LOG_OFF, and stop (print the step's name
# and sleep) at the step named in argv[3], to be killed there.
WRITER = """
import sys, time
import mcs
from mcs.undo import UndoLog
sec = mcs.Section.attach(sys.argv[1])
owner = int(sys.argv[2])
stop_at = sys.argv[3]
log = UndoLog.open(sec, 0, 4096)
mutex = mcs.GlobalMutex.open(sec, 6144, tag=owner)

def step(name):
    if name == stop_at:
        print(name, flush=True)
        time.sleep(600)

log.begin(owner)
step("begun")
mutex.lock()
step("locked")
log.record(8192, 100)
step("recorded")
sec.view(8192, 50)[:] = b"N" * 50   # half of the change
step("half")
log.record(8192 + 40, 260)           # overlaps the first record: newest first matters
sec.view(8192, 300)[:] = b"M" * 300
step("written")
log.commit()
step("committed")
mutex.unlock()
log.finish()
step("finished")
"""

STEPS_ACTIVE = ["begun", "locked", "recorded", "half", "written"]


@pytest.fixture
def section():
    with mcs.Section.create(SECTION) as sec:
        yield sec


def _before(sec) -> bytes:
    pattern = bytes(range(256)) * 2
    sec.view(DATA, 512)[:] = pattern
    return pattern


def _child(spawn, sec, owner, stop_at):
    child = spawn(WRITER, sec.ident, str(owner), stop_at)
    child.expect(stop_at)
    child.kill()
    return child


@pytest.mark.parametrize("stop_at", STEPS_ACTIVE)
def test_dead_writer_is_rolled_back_to_the_exact_before_bytes(section, spawn, stop_at):
    log = UndoLog.create(section, LOG_OFF, LOG_SIZE)
    mcs.GlobalMutex.create(section, 6144)
    before = _before(section)
    owner = owner_tag(3, 1, 77)
    _child(spawn, section, owner, stop_at)
    assert log.state is LogState.ACTIVE and log.owner == owner
    assert log.rollback_dead(owner) is RollbackOutcome.ROLLED_BACK
    assert bytes(section.view(DATA, 512)) == before
    assert log.state is LogState.IDLE and log.used == 0
    assert log.rollback_dead(owner) is RollbackOutcome.NOTHING  # twice is harmless
    assert bytes(section.view(DATA, 512)) == before


@pytest.mark.parametrize("stop_at", ["committed", "finished"])
def test_committed_log_is_never_rolled_back(section, spawn, stop_at):
    log = UndoLog.create(section, LOG_OFF, LOG_SIZE)
    mcs.GlobalMutex.create(section, 6144)
    before = _before(section)
    owner = owner_tag(2, 0, 5)
    _child(spawn, section, owner, stop_at)
    after = b"M" * 300 + before[300:]
    expected = RollbackOutcome.WAS_COMMITTED if stop_at == "committed" else RollbackOutcome.NOTHING
    assert log.rollback_dead(owner) is expected
    assert bytes(section.view(DATA, 512)) == after
    assert log.state is LogState.IDLE


def test_abandoned_mutex_names_the_log_to_roll_back(section, spawn):
    """The ABANDONED path: the tag a dead transaction left in its mutex is its owner tag."""
    region = LogRegion(section, 0, LOG_SIZE, lanes=1, members=1).create()
    mutex = mcs.GlobalMutex.create(section, 6144)
    before = _before(section)
    owner = owner_tag(0, 0, 9)
    _child(spawn, section, owner, "half")
    assert mutex.lock() is LockStatus.ABANDONED
    tag = mutex.previous_owner.tag
    assert tag == owner and decode_owner(tag) == (0, 0, 9)
    slot, lane, inc = decode_owner(tag)
    assert region.log_for(slot, lane).rollback_dead(tag) is RollbackOutcome.ROLLED_BACK
    mutex.mark_consistent()
    mutex.unlock()
    assert bytes(section.view(DATA, 512)) == before


ROLLER = """
import sys, time
import mcs
sec = mcs.Section.attach(sys.argv[1])
m = mcs.GlobalMutex.open(sec, 0, tag=1)   # the log's own mutex
m.lock()
sec.view(8192, 120)[:] = b"R" * 120       # half of a rollback
print("rolling", flush=True)
time.sleep(600)
"""


def test_roller_killed_mid_rollback_is_redone(section, spawn):
    log = UndoLog.create(section, LOG_OFF, LOG_SIZE)
    mcs.GlobalMutex.create(section, 6144)
    before = _before(section)
    owner = owner_tag(1, 2, 3)
    _child(spawn, section, owner, "written")
    roller = spawn(ROLLER, section.ident)
    roller.expect("rolling")
    roller.kill()
    assert log.state is LogState.ACTIVE
    assert log.rollback_dead(owner) is RollbackOutcome.ROLLED_BACK
    assert bytes(section.view(DATA, 512)) == before
    # the log's mutex was repaired: the next rollback locks it normally
    assert log.rollback_dead(owner) is RollbackOutcome.NOTHING


def test_next_incarnation_of_the_slot_is_other_owner(section, spawn):
    log = UndoLog.create(section, LOG_OFF, LOG_SIZE)
    mcs.GlobalMutex.create(section, 6144)
    before = _before(section)
    old, new = owner_tag(4, 0, 10), owner_tag(4, 0, 11)
    _child(spawn, section, old, "written")
    # The slot's next incarnation begins on its log: the dead one's work is undone first.
    log.begin(new)
    assert bytes(section.view(DATA, 512)) == before
    log.record(DATA, 8)
    section.view(DATA, 8)[:] = b"newinc!!"
    # The recovery of the old incarnation comes late: it must not touch the new one's log.
    assert log.rollback_dead(old) is RollbackOutcome.OTHER_OWNER
    assert log.state is LogState.ACTIVE and log.owner == new
    assert bytes(section.view(DATA, 8)) == b"newinc!!"
    log.commit()
    log.finish()


def test_abort_applies_own_records_newest_first(section):
    log = UndoLog.create(section, LOG_OFF, LOG_SIZE)
    before = _before(section)
    txid = log.begin(owner_tag(0, 0, 1))
    assert txid == 1
    log.record(DATA, 16)
    section.view(DATA, 16)[:] = b"a" * 16
    log.record(DATA, 16)  # the same bytes again: the first image must win
    section.view(DATA, 16)[:] = b"b" * 16
    log.abort()
    assert bytes(section.view(DATA, 512)) == before
    assert log.state is LogState.IDLE
    assert log.begin(owner_tag(0, 0, 1)) == 2
    log.commit()
    log.finish()


def test_full_log_and_bounds(section):
    log = UndoLog.create(section, LOG_OFF, LOG_HEADER + 256)
    owner = owner_tag(0, 0, 1)
    with pytest.raises(LockUsageError):
        log.record(DATA, 8)  # no transaction
    log.begin(owner)
    with pytest.raises(LockUsageError):
        log.begin(owner)  # still active
    log.record(DATA, 200)
    used = log.used
    assert used == 16 + 200
    with pytest.raises(LogFullError):
        log.record(DATA, 64)
    assert log.used == used  # a failed record leaves the log as it was
    with pytest.raises(ValueError):
        log.record(SECTION - 4, 8)
    with pytest.raises(ValueError):
        log.record(-1, 8)
    log.abort()
    with pytest.raises(ValueError):
        UndoLog.create(section, 8, 1024)  # not 64-aligned
    with pytest.raises(ValueError):
        UndoLog.create(section, SECTION - 128, 1024)  # outside


def test_open_checks_the_log(section):
    with pytest.raises(mcs.CorruptObjectError):
        UndoLog.open(section, 4096, 1024)  # nothing there
    UndoLog.create(section, 4096, 1024)
    with pytest.raises(mcs.CorruptObjectError):
        UndoLog.open(section, 4096, 2048)  # another size
    assert UndoLog.open(section, 4096, 1024).capacity == 1024 - LOG_HEADER


def test_log_region_and_rollback_member(section):
    region = LogRegion(section, 0, 512, lanes=2, members=4)
    assert region.size == 4 * 2 * 512
    assert region.offset_of(3, 1) == (3 * 2 + 1) * 512
    region.create().open()
    before = _before(section)
    for lane in range(2):
        log = region.log_for(2, lane)
        log.begin(owner_tag(2, lane, 7))
        log.record(DATA + lane * 64, 64)
        section.view(DATA + lane * 64, 64)[:] = b"x" * 64
    # one lane committed, the other not
    region.log_for(2, 1).commit()
    outcomes = region.rollback_member(2, 7)
    assert outcomes == [RollbackOutcome.ROLLED_BACK, RollbackOutcome.WAS_COMMITTED]
    assert bytes(section.view(DATA, 64)) == before[:64]
    assert bytes(section.view(DATA + 64, 64)) == b"x" * 64
    assert region.rollback_member(2, 7) == [RollbackOutcome.NOTHING] * 2
    with pytest.raises(IndexError):
        region.offset_of(4, 0)
    region.close()


def test_owner_tags_round_trip():
    tag = owner_tag(63, 7, (1 << 50) + 12345)
    assert decode_owner(tag) == (63, 7, ((1 << 50) + 12345) & ((1 << 48) - 1))
    with pytest.raises(ValueError):
        owner_tag(256, 0, 1)


def test_lanes_are_exclusive_and_block_when_busy():
    lanes = Lanes(2)
    a, b = lanes.acquire(), lanes.acquire()
    assert {a, b} == {0, 1} and lanes.busy == 2
    with pytest.raises(TimeoutError):
        lanes.acquire(timeout=0.01)
    got = []
    t = threading.Thread(target=lambda: got.append(lanes.acquire()))
    t.start()
    lanes.release(a)
    t.join(5)
    assert got == [a]
    with pytest.raises(ValueError):
        lanes.release(7)
    lanes.release(b)
    lanes.release(a)
    with lanes.take(timeout=0) as lane:
        assert lane == 0 and lanes.busy == 1
    assert lanes.busy == 0
