"""Sections: creation, identifiers, reclamation after kill -9, permissions, bounds, atomics."""

from __future__ import annotations

import gc
import os

import pytest
import sysv_ipc

import mcs
from mcs import procfs
from conftest import wait_for




def mapped_by_me(shmid: int) -> bool:
    with open("/proc/self/maps") as f:
        return any("SYSV" in line and line.split()[4] == str(shmid) for line in f)


def test_create_is_zeroed_private_and_owned_by_me():
    with mcs.Section.create(10_000) as sec:
        assert sec.size == 10_000
        assert bytes(sec.view()) == bytes(10_000)
        row = procfs.shm_segment(sec.shmid)
        assert row is not None, "segment not listed in /proc/sysvipc/shm"
        assert row.mode == 0o600
        assert row.uid == os.geteuid()
        assert row.size == 10_000 + 64  # header + user area
        assert sec.ident.startswith(f"sysv:{sec.shmid}:")


def test_ident_attaches_in_another_process(spawn):
    with mcs.Section.create(4096) as sec:
        child = spawn(
            """
            import sys, mcs
            s = mcs.Section.attach(sys.argv[1])
            print(bytes(s.view(0, 5)).decode(), flush=True)
            s.view(100, 3)[:] = b"abc"
            s.close()
            print("done", flush=True)
            """,
            sec.ident,
        )
        sec.view(0, 5)[:] = b"hello"
        child.expect("hello")
        child.expect("done")
        assert child.wait() == 0
        assert bytes(sec.view(100, 3)) == b"abc"


def test_section_reclaimed_when_every_holder_is_killed(spawn):
    holders = []
    creator = spawn(
        """
        import mcs, time
        s = mcs.Section.create(1 << 20)
        print(s.ident, flush=True)
        time.sleep(600)
        """
    )
    ident = creator.readline()
    shmid = int(ident.split(":")[1])
    for _ in range(2):
        holder = spawn(
            """
            import sys, mcs, time
            s = mcs.Section.attach(sys.argv[1])
            print("attached", flush=True)
            time.sleep(600)
            """,
            ident,
        )
        holder.expect("attached")
        holders.append(holder)
    assert procfs.shm_segment(shmid), "segment should exist while holders live"
    for child in [creator, *holders]:
        child.kill()
    assert wait_for(lambda: not procfs.shm_segment(shmid)), "kernel did not reclaim the segment"
    with pytest.raises(mcs.InvalidIdentifier, match="no longer exists"):
        mcs.Section.attach(ident)


def test_closing_last_local_holder_frees_segment():
    sec = mcs.Section.create(4096)
    ident, shmid = sec.ident, sec.shmid
    sec.close()
    sec.close()  # idempotent
    assert not procfs.shm_segment(shmid)
    with pytest.raises(mcs.InvalidIdentifier):
        mcs.Section.attach(ident)


def test_reused_identifier_with_other_nonce_is_refused():
    with mcs.Section.create(4096) as sec:
        wrong = f"sysv:{sec.shmid}:{(sec.nonce ^ 1):016x}"
        with pytest.raises(mcs.InvalidIdentifier, match="nonce"):
            mcs.Section.attach(wrong)
        # the right one still works
        with mcs.Section.attach(sec.ident) as again:
            assert again.size == sec.size


def test_foreign_segment_is_not_attached():
    foreign = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=4096)
    try:
        foreign.write(b"\xff" * 4096)
        with pytest.raises(mcs.InvalidIdentifier, match="another object"):
            mcs.Section.attach(f"sysv:{foreign.id}:{0:016x}")
        tiny = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, mode=0o600, size=16)
        try:
            with pytest.raises(mcs.InvalidIdentifier, match="too small"):
                mcs.Section.attach(f"sysv:{tiny.id}:{0:016x}")
        finally:
            tiny.detach()
            tiny.remove()
    finally:
        foreign.detach()
        foreign.remove()


@pytest.mark.parametrize(
    "ident",
    ["", "sysv:", "sysv:1", "sysv:1:xyz", "sysv:-1:0000000000000000", "posix:1:0000000000000000",
     "sysv:99999999999:0000000000000000", "sysv:1:00000000000000000", "sysv:1:0\x00",
     " sysv:1:0000000000000000"],
)
def test_malformed_identifiers(ident):
    with pytest.raises(mcs.InvalidIdentifier):
        mcs.Section.attach(ident)


def test_non_string_identifier():
    with pytest.raises(mcs.InvalidIdentifier):
        mcs.Section.attach(12)  # type: ignore[arg-type]


@pytest.mark.parametrize("size, exc", [(0, ValueError), (-1, ValueError), (1 << 41, ValueError),
                                       ("10", TypeError), (1.5, TypeError), (True, TypeError)])
def test_bad_sizes(size, exc):
    with pytest.raises(exc):
        mcs.Section.create(size)


def test_bounds_and_alignment():
    with mcs.Section.create(64) as sec:
        for bad in [(-1, 1), (0, 65), (64, 1), (63, 2), (1 << 70, 1), (0, 1 << 70)]:
            with pytest.raises((ValueError, IndexError)):
                sec.view(*bad)
        assert len(sec.view(64, 0)) == 0
        assert len(sec.view(10)) == 54
        for off in (-8, 64, 60, 1 << 70):
            with pytest.raises((ValueError, IndexError)):
                sec.load64(off)
        with pytest.raises(ValueError, match="aligned"):
            sec.store64(4, 1)
        with pytest.raises(IndexError):
            mcs.GlobalMutex.create(sec, 8)  # 8 + 64 > 64
        with pytest.raises(IndexError):
            mcs.GlobalEvent.create(sec, 56)  # 56 + 16 > 64
    with mcs.Section.create(256) as big:
        with pytest.raises(ValueError, match="aligned"):
            mcs.GlobalMutex.create(big, 4)
        with pytest.raises(ValueError, match="aligned"):
            mcs.GlobalEvent.create(big, 12)
        with pytest.raises(TypeError):
            big.load64("0")


def test_use_after_close_raises():
    sec = mcs.Section.create(128)
    mutex = mcs.GlobalMutex.create(sec, 0)
    event = mcs.GlobalEvent.create(sec, 64)
    sec.close()
    for call in (lambda: sec.view(), lambda: sec.load64(0), lambda: sec.store64(0, 1),
                 lambda: sec.cas64(0, 0, 1), lambda: sec.add64(0, 1), lambda: sec.nonce,
                 lambda: sec.ident, mutex.lock, lambda: event.set(), lambda: event.value,
                 lambda: mcs.GlobalMutex.open(sec, 0)):
        with pytest.raises(mcs.ClosedError):
            call()
    assert sec.closed
    assert "closed" in repr(sec)


def test_views_outlive_close_and_then_release_the_mapping():
    sec = mcs.Section.create(4096)
    shmid = sec.shmid
    view = sec.view(0, 16)
    sec.close()
    view[:4] = b"live"  # still mapped: no crash
    assert bytes(view[:4]) == b"live"
    assert mapped_by_me(shmid)
    view.release()
    del view
    gc.collect()
    assert not mapped_by_me(shmid)
    assert not procfs.shm_segment(shmid)


def test_atomics():
    with mcs.Section.create(64) as sec:
        assert sec.load64(8) == 0
        sec.store64(8, 2**64 - 1)
        assert sec.load64(8) == 2**64 - 1
        assert sec.add64(8, 1) == 2**64 - 1  # wraps
        assert sec.load64(8) == 0
        assert sec.add64(8, -1) == 0
        assert sec.load64(8) == 2**64 - 1
        assert sec.cas64(8, 5, 6) is False
        assert sec.cas64(8, 2**64 - 1, 6) is True
        assert sec.load64(8) == 6
        with pytest.raises(OverflowError):
            sec.store64(8, 2**64)
        with pytest.raises(OverflowError):
            sec.add64(8, 2**64)
        with pytest.raises(OverflowError):
            sec.store64(8, -1)


def test_add64_from_many_processes_is_exact(spawn):
    procs, per = 4, 20_000
    with mcs.Section.create(64) as sec:
        children = [
            spawn(
                """
                import sys, mcs
                s = mcs.Section.attach(sys.argv[1])
                add = s.add64
                for _ in range(int(sys.argv[2])):
                    add(0, 1)
                print("ok", flush=True)
                """,
                sec.ident,
                str(per),
            )
            for _ in range(procs)
        ]
        for child in children:
            child.expect("ok", timeout=60)
            assert child.wait() == 0
        assert sec.load64(0) == procs * per


def test_monotonic_ns_is_monotonic():
    a = mcs.monotonic_ns()
    b = mcs.monotonic_ns()
    assert 0 < a <= b
