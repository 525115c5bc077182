"""Global events: futex wake across processes, timeouts, many waiters."""

from __future__ import annotations

import time

import pytest

import mcs

WAITER = """
import sys, mcs
s = mcs.Section.attach(sys.argv[1])
e = mcs.GlobalEvent.open(s, 0)
seen = e.value
print("waiting", flush=True)
print("woken" if e.wait(seen, timeout=30) else "timeout", e.value, flush=True)
"""


@pytest.fixture
def section():
    with mcs.Section.create(4096) as sec:
        yield sec


def test_value_set_and_immediate_wait(section):
    e = mcs.GlobalEvent.create(section, 0)
    assert e.value == 0
    e.set()
    assert e.value == 1
    assert e.wait(0) is True  # already moved on
    assert e.wait(1, timeout=0) is False


def test_wait_times_out(section):
    e = mcs.GlobalEvent.create(section, 0)
    start = time.monotonic()
    assert e.wait(e.value, timeout=0.2) is False
    assert 0.15 <= time.monotonic() - start < 5


def test_set_wakes_waiters_in_other_processes(section, spawn):
    e = mcs.GlobalEvent.create(section, 0)
    children = [spawn(WAITER, section.ident) for _ in range(3)]
    for child in children:
        child.expect("waiting")
    time.sleep(0.05)
    e.set()
    for child in children:
        assert child.readline() == "woken 1"
        assert child.wait() == 0


def test_waiter_in_other_process_times_out(section, spawn):
    mcs.GlobalEvent.create(section, 0)
    child = spawn(
        """
        import sys, mcs
        s = mcs.Section.attach(sys.argv[1])
        e = mcs.GlobalEvent.open(s, 0)
        print(e.wait(e.value, timeout=0.1), flush=True)
        """,
        section.ident,
    )
    child.expect("False")


def test_wraparound_and_bad_seen(section):
    e = mcs.GlobalEvent.create(section, 0)
    with pytest.raises(OverflowError):
        e.wait(-1, timeout=0)
    with pytest.raises(OverflowError):
        e.wait(2**32, timeout=0)
