"""mcs.procfs against the real /proc: a command name that looks like stat fields, a zombie seen
through a descriptor held since before it died, and a section's row in the SysV table."""

from __future__ import annotations

import os
import signal

import pytest

import mcs
from mcs import procfs

from conftest import wait_for

TRICKY = "x) Z 1 (y"  # 9 bytes: fits comm (15); a naive split would read state "Z", ppid 1

NAMED = f"""
import sys
with open("/proc/self/comm", "w") as f:
    f.write({TRICKY!r})
print("named", flush=True)
sys.stdin.readline()
"""


def test_stat_of_a_process_whose_name_looks_like_fields(spawn):
    child = spawn(NAMED)
    child.expect("named")
    st = procfs.read_stat(child.pid)
    assert (st.pid, st.comm, st.ppid) == (child.pid, TRICKY, os.getpid())
    assert st.state in ("S", "R") and not st.exited and not st.signal_pending(signal.SIGKILL)
    assert st.starttime > 0
    held = os.open(procfs.stat_path(child.pid), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.kill(child.pid, signal.SIGKILL)  # not reaped yet: a zombie
        assert wait_for(lambda: procfs.parse_stat(os.pread(held, 4096, 0)).exited, 10)
        assert procfs.read_stat(child.pid).state == "Z"
        child.proc.wait()
        with pytest.raises(ProcessLookupError):  # reaped: the held descriptor says so
            os.pread(held, 4096, 0)
    finally:
        os.close(held)
    with pytest.raises(FileNotFoundError):
        procfs.read_stat(child.pid)


def test_stat_of_one_thread_and_malformed_lines():
    me = procfs.read_stat("self", os.getpid())  # /proc/self/task/TID/stat
    assert me.pid == os.getpid() and me.state == "R"
    for bad in (b"", b"12 (x S 1", b"12 (x) S 1 2"):
        with pytest.raises(ValueError):
            procfs.parse_stat(bad)


def test_a_sections_row_in_the_sysv_table():
    with mcs.Section.create(1000) as sec:
        row = procfs.shm_segment(sec.shmid)
        assert row is not None
        assert (row.cpid, row.uid, row.mode, row.size) == (os.getpid(), os.geteuid(), 0o600,
                                                           1000 + 64)
        assert row.marked_removed and row.key == 0 and row.nattch >= 1
        assert row in procfs.shm_segments()
        shmid = sec.shmid
    assert procfs.shm_segment(shmid) is None  # last detach: the kernel freed it
