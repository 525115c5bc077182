"""Microbenchmarks of the GSM core: lock+unlock cost, abandonment latency, copy bandwidth.

Measurements, not pass/fail on speed: the only assertions are about correctness (the lock was
really taken and released, the waiter really got ABANDONED from the right process, the copy
holds the right bytes). Run with ``./dev bench``; see bench/README.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import multiprocessing
import os
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import posix_ipc
import pytest
import sysv_ipc

import mcs
from mcs import LockStatus, procfs

# -- 1. uncontended lock+unlock ---------------------------------------------------------------

PAIRS = 1000  # lock+unlock pairs per benchmarked call


def pair_loop(acquire: Callable, release: Callable, pairs: range) -> None:
    """The one loop shape every lock is measured with: bound methods in locals, no checks."""
    for _ in pairs:
        acquire()
        release()


@dataclass
class LockUnderTest:
    acquire: Callable
    release: Callable
    is_free: Callable[[], bool] | None  # probed by another thread / file description


def _probe_in_thread(fn: Callable[[], bool]) -> bool:
    """Run ``fn`` in a fresh thread (a lock held by this thread looks held from there)."""
    out: list[bool] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@contextlib.contextmanager
def global_mutex(tmp_path) -> Iterator[LockUnderTest]:
    with mcs.Section.create(4096) as section:
        m = mcs.GlobalMutex.create(section, 0, tag=1)

        def free() -> bool:
            status = m.lock(timeout=0)
            if status is LockStatus.OK:
                m.unlock()
                return True
            assert status is LockStatus.TIMEOUT
            return False

        yield LockUnderTest(m.lock, m.unlock, lambda: _probe_in_thread(free))


@contextlib.contextmanager
def threading_lock(tmp_path) -> Iterator[LockUnderTest]:
    lock = threading.Lock()
    yield LockUnderTest(lock.acquire, lock.release, lambda: not lock.locked())


@contextlib.contextmanager
def multiprocessing_lock(tmp_path) -> Iterator[LockUnderTest]:
    lock = multiprocessing.get_context("fork").Lock()

    def free() -> bool:
        if lock.acquire(False):
            lock.release()
            return True
        return False

    yield LockUnderTest(lock.acquire, lock.release, lambda: _probe_in_thread(free))


@contextlib.contextmanager
def posix_semaphore(tmp_path) -> Iterator[LockUnderTest]:
    sem = posix_ipc.Semaphore(None, posix_ipc.O_CREX, mode=0o600, initial_value=1)
    sem.unlink()  # stays usable through this handle, nothing left in /dev/shm
    try:
        yield LockUnderTest(sem.acquire, sem.release, lambda: sem.value == 1)
    finally:
        sem.close()


@contextlib.contextmanager
def sysv_semaphore_undo(tmp_path) -> Iterator[LockUnderTest]:
    sem = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, mode=0o600, initial_value=1)
    try:
        sem.undo = True  # SEM_UNDO: the kernel gives the unit back if the holder dies
        yield LockUnderTest(sem.acquire, sem.release, lambda: sem.value == 1)
    finally:
        sem.remove()


@contextlib.contextmanager
def flock_file(tmp_path) -> Iterator[LockUnderTest]:
    path = tmp_path / "flock"
    path.touch()
    fd = os.open(path, os.O_RDWR)
    probe_fd = os.open(path, os.O_RDWR)  # another open file description: a different owner

    def free() -> bool:
        try:
            fcntl.flock(probe_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(probe_fd, fcntl.LOCK_UN)
        return True

    try:
        yield LockUnderTest(functools.partial(fcntl.flock, fd, fcntl.LOCK_EX),
                            functools.partial(fcntl.flock, fd, fcntl.LOCK_UN), free)
    finally:
        os.close(probe_fd)
        os.close(fd)


@contextlib.contextmanager
def noop_baseline(tmp_path) -> Iterator[LockUnderTest]:
    """Two no-op C method calls: the loop + call overhead every row above includes."""
    empty: list = []
    yield LockUnderTest(empty.clear, empty.clear, None)


LOCKS = {
    "GlobalMutex": global_mutex,
    "threading.Lock": threading_lock,
    "multiprocessing.Lock": multiprocessing_lock,
    "posix_ipc.Semaphore": posix_semaphore,
    "sysv_ipc.Semaphore-undo": sysv_semaphore_undo,
    "fcntl.flock": flock_file,
    "noop-baseline": noop_baseline,
}


@pytest.mark.benchmark(group="lock-unlock")
@pytest.mark.parametrize("kind", list(LOCKS))
def test_lock_unlock(benchmark, report, tmp_path, kind):
    with LOCKS[kind](tmp_path) as lut:
        if lut.is_free is not None:
            # The pair really takes and gives back the lock, as seen by another owner.
            assert lut.is_free()
            lut.acquire()
            assert not lut.is_free(), f"{kind}: acquire() did not take the lock"
            lut.release()
            assert lut.is_free(), f"{kind}: release() did not give the lock back"
        benchmark(pair_loop, lut.acquire, lut.release, range(PAIRS))
        if lut.is_free is not None:
            assert lut.is_free(), f"{kind}: left held after the benchmark"
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        report(pairs_per_round=PAIRS,
               ns_per_pair=stats.median * 1e9 / PAIRS,
               ns_per_pair_min=stats.min * 1e9 / PAIRS)


# -- 2. abandonment latency -------------------------------------------------------------------

ABANDON_ROUNDS = 30
ABANDON_WARMUP = 2
MUTEX_OFFSET = 64
FUTEX_WAITERS = 0x80000000

HOLDER = """
import os, sys, time, mcs
section = mcs.Section.attach(sys.argv[1])
m = mcs.GlobalMutex.open(section, int(sys.argv[2]), tag=int(sys.argv[3]))
status = m.lock()
sys.stdout.write(f"{status.name} {os.getpid()}\\n")
sys.stdout.flush()
time.sleep(600)
"""


@dataclass
class Round:
    """One abandonment: a holder process, a blocked waiter thread, the two timestamps."""

    proc: subprocess.Popen
    tag: int
    thread: threading.Thread | None = None
    tid: int = 0
    started: threading.Event = field(default_factory=threading.Event)
    t0: int = 0
    t1: int = 0
    status: object = None
    previous: object = None
    error: BaseException | None = None
    finished: bool = False


def _address_of(section: mcs.Section, offset: int) -> int:
    view = section.view(offset, 8)
    try:
        anchor = ctypes.c_char.from_buffer(view)
        try:
            return ctypes.addressof(anchor)
        finally:
            del anchor
    finally:
        view.release()


def _blocked_on(tid: int, address: int) -> bool:
    """Is thread ``tid`` of this process inside a futex syscall on ``address``?"""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:  # /proc/<tid>/syscall not readable here: fall back to the thread state
        return procfs.read_stat("self", tid).state == "S"
    return len(fields) > 1 and fields[0] != "running" and int(fields[1], 16) == address


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.0005)


class AbandonmentRig:
    """Runs the rounds: setup (holder + blocked waiter), the timed kill, and the reaping."""

    def __init__(self, section: mcs.Section) -> None:
        self.section = section
        self.mutex = mcs.GlobalMutex.create(section, MUTEX_OFFSET)
        self.address = _address_of(section, MUTEX_OFFSET)
        self.rounds: list[Round] = []

    def _waiter(self, rnd: Round) -> None:
        m = self.mutex
        rnd.tid = threading.get_native_id()
        rnd.started.set()
        try:
            status = m.lock()  # blocks until the holder is killed
            rnd.t1 = mcs.monotonic_ns()
            rnd.status, rnd.previous = status, m.previous_owner
            if status is LockStatus.ABANDONED:
                m.mark_consistent()  # nothing to repair here
            if status in (LockStatus.OK, LockStatus.ABANDONED):
                m.unlock()  # same thread that locked
        except BaseException as exc:  # reported by finish()
            rnd.error = exc

    def setup(self):
        tag = len(self.rounds) + 1
        proc = subprocess.Popen(
            # -I: the child imports the installed mcs, never the source tree in the cwd
            [sys.executable, "-I", "-c", HOLDER, self.section.ident, str(MUTEX_OFFSET), str(tag)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        rnd = Round(proc, tag)
        self.rounds.append(rnd)
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "holder printed nothing in 20 s"
        assert proc.stdout.readline().split() == ["OK", str(proc.pid)]
        assert self.mutex.lock(timeout=0) is LockStatus.TIMEOUT  # the holder has it
        rnd.thread = threading.Thread(target=self._waiter, args=(rnd,), daemon=True)
        rnd.thread.start()
        assert rnd.started.wait(10)
        # Really blocked: the FUTEX_WAITERS bit is set in the mutex word and the waiter thread
        # sits in a futex syscall on that very word.
        _wait_until(lambda: self.section.load64(MUTEX_OFFSET) & FUTEX_WAITERS
                    and _blocked_on(rnd.tid, self.address), 10, "the waiter is blocked")
        return (rnd,), {}

    @staticmethod
    def kill_and_wait(rnd: Round) -> None:
        """The timed part: SIGKILL the holder, return once the waiter has the mutex."""
        rnd.t0 = mcs.monotonic_ns()
        os.kill(rnd.proc.pid, signal.SIGKILL)
        rnd.thread.join(10)

    def finish(self, rnd: Round) -> None:
        """Reap the holder and check what the waiter got (idempotent)."""
        if rnd.finished:
            return
        rnd.finished = True
        if rnd.proc.poll() is None:
            rnd.proc.kill()
        rnd.proc.wait(10)
        rnd.proc.stdout.close()
        if rnd.thread is not None:
            rnd.thread.join(10)
            assert not rnd.thread.is_alive(), "waiter still blocked 10 s after the kill"
        assert rnd.error is None, f"waiter failed: {rnd.error!r}"
        assert rnd.proc.returncode == -signal.SIGKILL
        assert rnd.status is LockStatus.ABANDONED, f"waiter got {rnd.status!r}"
        assert rnd.previous == mcs.MutexOwner(rnd.proc.pid, rnd.tag)
        assert rnd.t1 > rnd.t0 > 0

    def teardown(self, rnd: Round) -> None:
        self.finish(rnd)

    def close(self) -> None:
        """Kill and reap whatever a failure left running."""
        for rnd in self.rounds:
            if rnd.proc.poll() is None:
                rnd.proc.kill()
            rnd.proc.wait()
            if not rnd.proc.stdout.closed:
                rnd.proc.stdout.close()
            if rnd.thread is not None:
                rnd.thread.join(10)


def _hold_mp_lock(lock, conn) -> None:  # runs in a forked child
    lock.acquire()
    conn.send("locked")
    time.sleep(600)


def multiprocessing_lock_after_holder_killed(timeout: float = 0.2) -> dict:
    """Contrast: a multiprocessing.Lock whose holder is killed is never released."""
    ctx = multiprocessing.get_context("fork")
    lock = ctx.Lock()
    reader, writer = ctx.Pipe(duplex=False)
    with warnings.catch_warnings():
        # Python >= 3.12 warns about fork() with threads (pytest's faulthandler watchdog);
        # the child only takes the lock, writes to a pipe and sleeps.
        warnings.simplefilter("ignore", DeprecationWarning)
        proc = ctx.Process(target=_hold_mp_lock, args=(lock, writer), daemon=True)
        proc.start()
    try:
        assert reader.poll(20) and reader.recv() == "locked"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        start = time.monotonic()
        released = lock.acquire(timeout=timeout)
        waited = time.monotonic() - start
        if released:
            lock.release()
        return {"contrast_multiprocessing_lock_released": released,
                "contrast_multiprocessing_lock_waited_s": round(waited, 3)}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        proc.close()
        reader.close()
        writer.close()


def _percentile(sorted_values: list[float], p: float) -> float:
    """Linear-interpolated percentile (0..100) of already sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    k = (len(sorted_values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


@pytest.mark.benchmark(group="abandonment")
def test_abandonment_kill9_to_abandoned(benchmark, report):
    """kill -9 of a holder -> a blocked waiter gets ABANDONED. Timed: kill + waiter's return."""
    with mcs.Section.create(4096) as section:
        rig = AbandonmentRig(section)
        try:
            benchmark.pedantic(rig.kill_and_wait, setup=rig.setup, teardown=rig.teardown,
                               rounds=ABANDON_ROUNDS, warmup_rounds=ABANDON_WARMUP)
            for rnd in rig.rounds:
                rig.finish(rnd)  # teardown is skipped under --benchmark-disable
        finally:
            rig.close()
        assert rig.mutex.lock(timeout=0) is LockStatus.OK  # repaired: back to normal
        rig.mutex.unlock()
    measured = rig.rounds[ABANDON_WARMUP:] or rig.rounds
    lat = sorted((r.t1 - r.t0) / 1000 for r in measured)
    info = {
        "rounds": len(lat),
        "latency_us_median": statistics.median(lat),
        "latency_us_p90": _percentile(lat, 90),
        "latency_us_p99": _percentile(lat, 99),
        "latency_us_max": lat[-1],
        "latency_us_min": lat[0],
        "latency_definition": "t1 - t0: t0 = monotonic_ns() just before os.kill(holder, SIGKILL) "
                              "in the killer, t1 = monotonic_ns() when lock() returned ABANDONED "
                              "in the blocked waiter thread",
    }
    info.update(multiprocessing_lock_after_holder_killed())
    assert info["contrast_multiprocessing_lock_released"] is False
    report(**info)


# -- 3. copy bandwidth ------------------------------------------------------------------------

COPY_SIZES = {"64KiB": 64 << 10, "16MiB": 16 << 20}


def _pattern(n: int) -> bytearray:
    block = bytes(range(256)) * 16  # 4 KiB, not all zeros
    return bytearray((block * (n // len(block) + 1))[:n])


@pytest.mark.benchmark(group="copy")
@pytest.mark.parametrize("size", list(COPY_SIZES))
@pytest.mark.parametrize("how", ["bytes(section.view)", "section.view.tobytes()",
                                 "bytes(bytearray)", "memoryview(bytearray).tobytes()"])
def test_copy(benchmark, report, how, size):
    n = COPY_SIZES[size]
    data = _pattern(n)
    with mcs.Section.create(n) as section:
        view = section.view(0, n)
        view[:] = data  # also faults every page in before timing
        try:
            if how == "bytes(section.view)":
                result = benchmark(bytes, view)
            elif how == "section.view.tobytes()":
                result = benchmark(view.tobytes)
            elif how == "bytes(bytearray)":
                result = benchmark(bytes, data)
            else:
                with memoryview(data) as mv:
                    result = benchmark(mv.tobytes)
        finally:
            view.release()
    assert type(result) is bytes and result == data
    if benchmark.stats is not None:
        report(bytes_per_round=n, gb_per_s=n / benchmark.stats.stats.median / 1e9,
               gb_per_s_best=n / benchmark.stats.stats.min / 1e9)
