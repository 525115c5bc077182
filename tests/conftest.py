"""Shared fixtures: real child processes, unique domains, and a leak check around every test."""

from __future__ import annotations

import gc
import itertools
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import settings

import mcs
from mcs import procfs

REPO = Path(__file__).resolve().parent.parent

# Randomized tests: a test that draws its own randomness takes the ``seed`` fixture (printed, and
# replayed with MCS_TEST_SEED=<seed>). Hypothesis tests keep hypothesis's own mechanism: with
# print_blob a failure prints the ``@reproduce_failure(...)`` decorator that replays it exactly.
SEED_ENV = "MCS_TEST_SEED"
settings.register_profile("mcs", print_blob=True)
settings.load_profile("mcs")


def pytest_configure(config: pytest.Config) -> None:
    # The suite tests what users install: the source tree must not shadow site-packages.
    if Path(mcs.__file__).resolve().is_relative_to(REPO / "mcs") and not os.environ.get(
        "MCS_TEST_SOURCE"
    ):
        raise pytest.UsageError(
            f"mcs was imported from the source tree ({mcs.__file__}); run the suite with "
            "'./dev test' (installed package) or set MCS_TEST_SOURCE=1 for an editable install")


def pytest_collection_finish(session: pytest.Session) -> None:
    # The leak check collects garbage after every test (a section left to the collector is
    # detached only then). A full collection walks every object: with aiohttp, hypothesis and
    # the test modules imported that is ~60 ms a test, half the fast loop. Freezing what import
    # and collection made moves it out of the collector's sight (it is never garbage of a
    # test), so each collection walks only what the tests made since: same verdicts, < 1 ms.
    gc.collect()
    gc.freeze()


@pytest.fixture
def seed() -> int:
    """The seed of a randomized test: MCS_TEST_SEED when set (to replay a failure), else a
    fresh one. Printed: pytest shows a failed test's captured output, so the seed is in the
    report; replay with ``MCS_TEST_SEED=<seed> ./dev test tests/<file>::<test>``."""
    given = os.environ.get(SEED_ENV)
    if given is not None:
        try:
            value = int(given)
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV}={given!r} is not an integer") from None
    else:
        value = random.SystemRandom().randrange(1 << 32)
    print(f"random seed {value} (replay: {SEED_ENV}={value})")
    return value


# -- leak checks ------------------------------------------------------------------------------


def sysv_segments() -> dict[int, int]:
    """Id -> creator pid of the SysV segments owned by this user."""
    uid = os.geteuid()
    return {r.shmid: r.cpid for r in procfs.shm_segments() if r.uid == uid}


def _parent(pid: int) -> int:
    try:
        return procfs.read_stat(pid).ppid
    except OSError:
        return 0


def created_by_us(creator: int) -> bool:
    """Whether a segment's creator is this process, a descendant of it, or dead (a dead creator
    cannot be placed; counting it keeps the check strict). A live process outside our tree (a
    running cache, another checkout's tests) is foreign: its segments are never ours to count."""
    me, pid = os.getpid(), creator
    for _ in range(64):
        if pid == me:
            return True
        parent = _parent(pid)
        if parent == 0:
            return not os.path.exists(f"/proc/{creator}") or pid == creator
        pid = parent
    return False


def new_segments(before: dict[int, int]) -> set[int]:
    """Segments that appeared since ``before`` and that this test's process tree created."""
    return {sid for sid, cpid in sysv_segments().items()
            if sid not in before and created_by_us(cpid)}


def describe_segments(ids: set[int]) -> str:
    """Creator, last user and attach count of each segment in ``ids`` (for a leak report)."""
    out = []
    for r in procfs.shm_segments():
        if r.shmid in ids:
            alive = [pid for pid in (r.cpid, r.lpid) if os.path.exists(f"/proc/{pid}")]
            out.append(f"{r.shmid}: size {r.size} creator {r.cpid} last {r.lpid} attached "
                       f"{r.nattch} marked-removed {r.marked_removed} alive {alive}")
    return "; ".join(out)


def mcs_shm_objects() -> set[str]:
    """The bootstrap objects of this test run: every domain the tests make carries our pid
    (so a concurrent run, or a live cache on this host, is not taken for a leak)."""
    me = str(os.getpid())
    return {n for n in os.listdir("/dev/shm") if n.startswith("mcs.") and me in n}


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie its new parent has not reaped yet."""
    try:
        return procfs.read_stat(pid).exited
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test leaves no SysV segment and no /dev/shm/mcs.* object behind."""
    segments, objects = sysv_segments(), mcs_shm_objects()
    yield
    gc.collect()
    ok = wait_for(lambda: not new_segments(segments) and mcs_shm_objects() <= objects, 5.0)
    if not ok:
        leaked_seg = new_segments(segments)
        leaked_obj = mcs_shm_objects() - objects
        pytest.fail(f"leaked shared memory: segments {sorted(leaked_seg)} "
                    f"({describe_segments(leaked_seg)}), objects {sorted(leaked_obj)}")


# -- domains ----------------------------------------------------------------------------------

_counter = itertools.count()


@pytest.fixture
def domain() -> Iterator[str]:
    """A fresh domain name; its bootstrap object is removed after the test."""
    name = f"t{os.getpid()}-{next(_counter)}"
    yield name
    for obj in mcs_shm_objects():
        if obj == f"mcs.{name}" or obj.startswith(f"mcs.{name}."):
            try:
                os.unlink(f"/dev/shm/{obj}")
            except FileNotFoundError:
                pass


# -- child processes --------------------------------------------------------------------------


class Child:
    """A real Python child process running ``code``; it talks back by printing lines."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", textwrap.dedent(code), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self._buf = b""

    def readline(self, timeout: float = 10.0) -> str:
        """The next line the child printed (without newline); fails the test on timeout/EOF."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.kill()
                pytest.fail(f"child {self.pid} printed nothing in {timeout:.1f}s; "
                            f"stderr: {self.stderr()}")
            data = os.read(fd, 65536)
            if not data:
                pytest.fail(f"child {self.pid} exited ({self.proc.wait()}); stderr: {self.stderr()}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, text: str, timeout: float = 10.0) -> None:
        line = self.readline(timeout)
        assert line == text, f"child said {line!r}, expected {text!r}; stderr: {self.stderr()}"

    def send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> int:
        """SIGKILL and reap; returns the exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            os.kill(self.pid, signal.SIGCONT)
        return self.wait()

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"child {self.pid} did not exit within {timeout}s")

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except OSError:
                pass


@pytest.fixture
def spawn() -> Iterator:
    """``spawn(code, *args)`` starts a Child; every child is killed and reaped after the test."""
    children: list[Child] = []

    def start(code: str, *args: str) -> Child:
        child = Child(code, *args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()
