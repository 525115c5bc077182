"""Global mutexes: robust abandonment after kill -9, not-recoverable state, exclusion, misuse."""

from __future__ import annotations

import signal
import threading
import time

import pytest

import mcs
from mcs import LockStatus

HOLD_AND_SLEEP = """
import sys, time, mcs
s = mcs.Section.attach(sys.argv[1])
m = mcs.GlobalMutex.open(s, 0, tag=int(sys.argv[2]))
print(m.lock().name, flush=True)
time.sleep(600)
"""


@pytest.fixture
def section():
    with mcs.Section.create(4096) as sec:
        yield sec


def test_lock_unlock_and_status_values(section):
    m = mcs.GlobalMutex.create(section, 0, tag=42)
    assert m.lock() is LockStatus.OK
    assert m.owner.tag == 42 and m.owner.pid > 0
    m.unlock()
    assert m.owner == (0, 0)
    assert m.previous_owner is None
    with m as status:
        assert status is LockStatus.OK
    assert m.lock(timeout=0) is LockStatus.OK
    m.unlock()


def test_holder_killed_waiter_gets_abandoned_with_previous_owner(section, spawn):
    m = mcs.GlobalMutex.create(section, 0)
    child = spawn(HOLD_AND_SLEEP, section.ident, "77")
    child.expect("OK")
    assert m.lock(timeout=0.05) is LockStatus.TIMEOUT
    result = {}

    def waiter():
        result["status"] = m.lock()  # blocks until the holder dies
        result["owner"] = m.previous_owner
        m.mark_consistent()
        m.unlock()

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    assert t.is_alive(), "waiter should be blocked"
    child.kill()
    t.join(5)
    assert not t.is_alive()
    assert result["status"] is LockStatus.ABANDONED
    assert result["owner"] == mcs.MutexOwner(child.pid, 77)
    assert m.lock() is LockStatus.OK  # repaired: back to normal
    m.unlock()


def test_not_marking_consistent_makes_it_unrecoverable_everywhere(section, spawn):
    m = mcs.GlobalMutex.create(section, 0)
    child = spawn(HOLD_AND_SLEEP, section.ident, "1")
    child.expect("OK")
    child.kill()
    assert m.lock() is LockStatus.ABANDONED
    m.unlock()  # released without mark_consistent()
    for _ in range(2):
        with pytest.raises(mcs.NotRecoverableError):
            m.lock()
    other = spawn(
        """
        import sys, mcs
        s = mcs.Section.attach(sys.argv[1])
        try:
            mcs.GlobalMutex.open(s, 0).lock()
        except mcs.NotRecoverableError:
            print("not recoverable", flush=True)
        """,
        section.ident,
    )
    other.expect("not recoverable")
    # re-creating the mutex is the way out
    m2 = mcs.GlobalMutex.create(section, 0)
    assert m2.lock() is LockStatus.OK
    m2.unlock()


def test_exclusion_across_processes_gives_exact_total(section, spawn):
    mcs.GlobalMutex.create(section, 0)
    procs, per = 4, 3000
    code = """
    import sys, mcs
    s = mcs.Section.attach(sys.argv[1])
    m = mcs.GlobalMutex.open(s, 0)
    counter = s.view(64, 8)
    for _ in range(int(sys.argv[2])):
        assert m.lock() is mcs.LockStatus.OK
        value = int.from_bytes(counter, "little")   # a non-atomic read-modify-write
        counter[:] = (value + 1).to_bytes(8, "little")
        m.unlock()
    print("done", flush=True)
    """
    children = [spawn(code, section.ident, str(per)) for _ in range(procs)]
    for child in children:
        child.expect("done", timeout=120)
        assert child.wait() == 0
    assert int.from_bytes(section.view(64, 8), "little") == procs * per


def test_lock_timeout_uses_the_deadline(section, spawn):
    m = mcs.GlobalMutex.create(section, 0)
    child = spawn(HOLD_AND_SLEEP, section.ident, "0")
    child.expect("OK")
    start = time.monotonic()
    assert m.lock(timeout=0.25) is LockStatus.TIMEOUT
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 5
    assert m.lock(timeout=0) is LockStatus.TIMEOUT
    assert m.lock(timeout=-1) is LockStatus.TIMEOUT
    with pytest.raises(ValueError):
        m.lock(timeout=float("nan"))
    with pytest.raises(TypeError):
        m.lock(timeout="1")


def test_misuse_raises_and_never_corrupts(section):
    m = mcs.GlobalMutex.create(section, 0)
    with pytest.raises(mcs.LockUsageError):
        m.unlock()  # not held
    with pytest.raises(mcs.LockUsageError):
        m.mark_consistent()  # not abandoned
    assert m.lock() is LockStatus.OK
    with pytest.raises(mcs.LockUsageError):
        m.lock()  # already held by this thread
    errors = []

    def other_thread():
        try:
            m.unlock()
        except mcs.LockUsageError as exc:
            errors.append(exc)
        errors.append(m.lock(timeout=0))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert isinstance(errors[0], mcs.LockUsageError)
    assert errors[1] is LockStatus.TIMEOUT  # still held by the main thread
    m.unlock()


def test_open_on_something_that_is_not_a_mutex(section):
    section.view(0, 64)[:] = b"\xab" * 64
    with pytest.raises(mcs.CorruptObjectError):
        mcs.GlobalMutex.open(section, 0)
    with pytest.raises(mcs.CorruptObjectError):
        mcs.GlobalEvent.open(section, 0)


def test_thread_exiting_while_holding_is_reported_as_abandoned(section):
    """The pitfall from DESIGN: robust mutexes belong to threads, not processes."""
    m = mcs.GlobalMutex.create(section, 0, tag=5)
    t = threading.Thread(target=m.lock)
    t.start()
    t.join()
    assert m.lock() is LockStatus.ABANDONED
    assert m.previous_owner.tag == 5
    m.mark_consistent()
    m.unlock()


def test_blocked_lock_runs_signal_handlers(section, spawn):
    m = mcs.GlobalMutex.create(section, 0)
    child = spawn(HOLD_AND_SLEEP, section.ident, "0")
    child.expect("OK")

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            m.lock()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    child.kill()
    assert m.lock() is LockStatus.ABANDONED  # the interrupted wait did not take the mutex
    m.mark_consistent()
    m.unlock()


def test_close_while_held_keeps_mapping_until_unlock():
    sec = mcs.Section.create(4096)
    m = mcs.GlobalMutex.create(sec, 0)
    assert m.lock() is LockStatus.OK
    sec.close()
    with pytest.raises(mcs.ClosedError):
        m.lock()
    m.unlock()  # still possible: the mapping stays while the mutex is held
    with pytest.raises(mcs.ClosedError):
        m.unlock()


def test_closed_handle(section):
    m = mcs.GlobalMutex.create(section, 0)
    m.close()
    m.close()
    with pytest.raises(mcs.ClosedError):
        m.lock()
