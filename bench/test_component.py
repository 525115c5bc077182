"""Benchmarks of McsComponent with the example Registry: the cost of an empty consistent block,
and the recovery time after ``kill -9`` of one member, by number of members and contribution size.

Measurements, not pass/fail on speed: the only assertions are about correctness (the block saw a
view that contains this member and no recovery happened meanwhile; after each kill every survivor
reached a new stable epoch whose view excludes the victim, the victim died of SIGKILL, and the
index holds exactly the survivors' entries, then everyone's again after the replacement joined).
Run with ``./dev bench -k component``; see bench/README.md.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import timeit
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import pytest

BENCH = Path(__file__).resolve().parent
EXAMPLES = BENCH.parent / "examples"
MEMBER_SCRIPT = BENCH / "component_member.py"

if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from conftest import new_domain as named_domain, remove_bootstrap  # noqa: E402
from registry import Registry  # noqa: E402

#: Timing of the domains: the defaults (heartbeat 0.1 s, suspect 0.5 s, evict 2 s). Crash
#: detection does not depend on it (a dead member's life mutex is reported at once); the fast
#: values of the tests (evict after 0.3 s) risk evicting a member that a loaded 2-core machine
#: did not schedule for a while (heartbeats 138 ms apart were seen here), which would end a run.
TIMING: dict[str, float] = {}

def new_domain() -> str:
    return named_domain("bc")


def percentiles(values: list[float], prefix: str, unit: str = "ms") -> dict[str, float]:
    """p50/p90/p99/max/min of ``values`` as ``{prefix}_p50_{unit}: ...`` (interpolated quantiles)."""
    if not values:
        return {}
    s = sorted(values)
    q = statistics.quantiles(s, n=100, method="inclusive") if len(s) > 1 else [s[0]] * 99
    r = lambda x: round(x, 4)  # noqa: E731
    return {f"{prefix}_p50_{unit}": r(statistics.median(s)), f"{prefix}_p90_{unit}": r(q[89]),
            f"{prefix}_p99_{unit}": r(q[98]), f"{prefix}_max_{unit}": r(s[-1]),
            f"{prefix}_min_{unit}": r(s[0])}


def histogram(values) -> dict[str, int]:
    """{"value": how many times} (JSON keys are strings)."""
    counts: dict[str, int] = {}
    for v in sorted(values):
        counts[str(v)] = counts.get(str(v), 0) + 1
    return counts


# -- 1. the cost of an empty consistent block ----------------------------------------------------

BLOCKS = 1000  # blocks (or calls) per benchmarked call


def loop_consistent(consistent: Callable, blocks: range) -> None:
    for _ in blocks:
        with consistent():
            pass


def loop_run(run: Callable, fn: Callable, blocks: range) -> None:
    for _ in blocks:
        run(fn)


def loop_with_lock(lock, blocks: range) -> None:
    for _ in blocks:
        with lock:
            pass


def loop_with_new_lock(new_lock: Callable, blocks: range) -> None:
    for _ in blocks:
        with new_lock():
            pass


def loop_call(fn: Callable, blocks: range) -> None:
    for _ in blocks:
        fn()


def noop() -> None:
    pass


def loops_for(reg: Registry | None) -> dict[str, tuple[Callable, tuple]]:
    """Every row of the group: the loop and its arguments (the component rows need ``reg``)."""
    rows: dict[str, tuple[Callable, tuple]] = {
        "threading.Lock-with": (loop_with_lock, (threading.Lock(),)),
        "threading.Lock()-new-with": (loop_with_new_lock, (threading.Lock,)),
        "function-call": (loop_call, (noop,)),
    }
    if reg is not None:
        rows["consistent-block"] = (loop_consistent, (reg.consistent,))
        rows["run(noop)"] = (loop_run, (reg.run, noop))
    return rows


@pytest.fixture
def registry_in_process() -> Iterator[Registry]:
    domain = new_domain()
    reg = None
    try:
        reg = Registry(domain, **TIMING).start()
        yield reg
    finally:
        if reg is not None:
            reg.stop()
        remove_bootstrap(domain)


def best_ns_per_block(loop: Callable, args: tuple, repeat: int = 7, number: int = 20) -> float:
    """Best-of-``repeat`` ns per block (each sample: ``number`` loops of BLOCKS blocks)."""
    timer = timeit.Timer(lambda: loop(*args, range(BLOCKS)))
    return min(timer.repeat(repeat=repeat, number=number)) / number / BLOCKS * 1e9


@pytest.mark.benchmark(group="consistent-block")
@pytest.mark.parametrize("kind", ["consistent-block", "run(noop)", "threading.Lock-with",
                                  "threading.Lock()-new-with", "function-call"])
def test_empty_consistent_block(benchmark, report, request, kind):
    """An empty ``with comp.consistent(): pass`` (one Registry in this process), against an
    empty ``with lock:``, ``with threading.Lock():`` and a plain call (target: <= 1 us)."""
    component = kind in ("consistent-block", "run(noop)")
    reg = request.getfixturevalue("registry_in_process") if component else None
    loop, args = loops_for(reg)[kind]
    if reg is not None:
        with reg.consistent() as view:  # a real block: it sees a view holding this member
            assert view is not None and view.member(reg.slot) is not None
        before = (reg.stats.recoveries, reg.stats.epoch)
    benchmark(loop, *args, range(BLOCKS))
    info: dict[str, object] = {"blocks_per_round": BLOCKS}
    if benchmark.stats is not None:  # None under --benchmark-disable
        stats = benchmark.stats.stats
        info.update(ns_per_block=stats.median * 1e9 / BLOCKS, ns_per_block_min=stats.min * 1e9 / BLOCKS)
    if reg is not None:
        # No recovery ran during the measurement: every block was a fast-path block.
        assert (reg.stats.recoveries, reg.stats.epoch) == before
        # Ratios measured side by side, now, in this process (best of 7 x 20 x BLOCKS each).
        best = {name: best_ns_per_block(lp, a) for name, (lp, a) in loops_for(reg).items()}
        info["best_ns_per_block"] = {k: round(v, 1) for k, v in best.items()}
        info["ratio_to_threading_lock_with"] = round(best[kind] / best["threading.Lock-with"], 2)
        info["ratio_to_new_lock_with"] = round(best[kind] / best["threading.Lock()-new-with"], 2)
        info["ratio_to_function_call"] = round(best[kind] / best["function-call"], 2)
        info["target_us"] = 1.0
        assert (reg.stats.recoveries, reg.stats.epoch) == before
    report(**info)


# -- 2. recovery time after kill -9 --------------------------------------------------------------

KILLS = int(os.environ.get("MCS_BENCH_KILLS", "20"))  # measured kills per configuration
WARMUP_KILLS = 1
PHASES = ("quiesce", "agree", "barrier", "master", "contribute", "stable")
QUIET_S = 0.03  # "settled" means: the same epoch everywhere, twice, this far apart


class MemberProc:
    """A ``bench/component_member.py`` child: JSON lines out, commands in."""

    def __init__(self, stderr_path: Path, timing: dict) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(MEMBER_SCRIPT), json.dumps(timing)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr)
        self.pid = self.proc.pid
        self.fd = self.proc.stdout.fileno()
        self._buf = b""
        self.eof = False
        self.replies: deque[dict] = deque()
        self.epochs: list[dict] = []  # every {"t": "epoch"} line, in order
        self.name = ""
        self.slot = -1
        self.standing_by = False

    def feed(self) -> None:
        data = os.read(self.fd, 65536)
        if not data:
            self.eof = True
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            (self.epochs if msg.get("t") == "epoch" else self.replies).append(msg)

    def send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def stderr_tail(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(20)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self._stderr.close()


class Cluster:
    """Registry members in child processes, plus one spare already started (standby)."""

    def __init__(self, tmp_path: Path, nkeys: int, timing: dict) -> None:
        self.domain = new_domain()
        self.tmp_path = tmp_path
        self.nkeys = nkeys
        self.timing = timing
        self.members: list[MemberProc] = []
        self.procs: list[MemberProc] = []
        self.standby: MemberProc | None = None
        self._names = itertools.count()

    # -- plumbing --------------------------------------------------------------------------

    def pump(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        """Read the children's output until ``until()``; fail (with their stderr) on timeout."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            live = [p for p in self.procs if not p.eof]
            if left <= 0 or not live:
                tails = "\n".join(f"--- {p.name or 'standby'} pid {p.pid} rc {p.proc.poll()}:\n"
                                  f"{p.stderr_tail()}" for p in self.procs)
                pytest.fail(f"{what}: not done in {timeout}s\n{tails}")
            ready, _, _ = select.select([p.fd for p in live], [], [], left)
            for p in live:
                if p.fd in ready:
                    p.feed()

    def reply(self, p: MemberProc, kind: str, timeout: float = 20.0) -> dict:
        self.pump(lambda: bool(p.replies) or p.eof, timeout, f"{p.name}: waiting for {kind}")
        if not p.replies:
            pytest.fail(f"{p.name} (pid {p.pid}) exited ({p.proc.wait()}): {p.stderr_tail()}")
        msg = p.replies.popleft()
        assert msg.get("t") == kind, msg
        return msg

    def ask(self, p: MemberProc, command: str, kind: str, timeout: float = 20.0) -> dict:
        p.send(command)
        return self.reply(p, kind, timeout)

    # -- members ---------------------------------------------------------------------------

    def spawn_standby(self) -> None:
        """Start the spare process now (it imports everything, then waits for 'start')."""
        if self.standby is None:
            p = MemberProc(self.tmp_path / f"member-{len(self.procs)}.stderr", self.timing)
            self.procs.append(p)
            self.standby = p

    def standby_ready(self) -> None:
        self.spawn_standby()
        p = self.standby
        assert p is not None
        if not p.standing_by:
            self.reply(p, "standby")
            p.standing_by = True

    def add_member(self) -> MemberProc:
        self.standby_ready()
        p, self.standby = self.standby, None
        p.name = f"m{next(self._names)}"
        msg = self.ask(p, f"start {self.domain} {p.name} {self.nkeys}", "ready", timeout=30)
        p.slot = msg["slot"]
        self.members.append(p)
        return p

    def sync(self) -> list[dict]:
        for p in self.members:  # ask everyone first, then collect: the answers overlap
            p.send("sync")
        return [self.reply(p, "sync") for p in self.members]

    def settle(self, timeout: float = 20.0) -> list[dict]:
        """Wait until every member is in the same stable epoch with a view of all of them, and
        still is ``QUIET_S`` later (a late view-change request would show up as a new epoch)."""
        deadline = time.monotonic() + timeout
        n = len(self.members)
        previous = None
        while True:
            syncs = self.sync()
            epochs = {s["epoch"] for s in syncs}
            ok = (len(epochs) == 1 and all(s["members"] == n for s in syncs)
                  and sum(s["master"] for s in syncs) == 1)
            if ok and previous is not None and [s["epoch"] for s in previous] == [s["epoch"] for s in syncs]:
                return syncs
            previous = syncs if ok else None
            if time.monotonic() > deadline:
                pytest.fail(f"members never settled: {syncs}")
            time.sleep(QUIET_S if ok else 0.005)

    def close(self) -> None:
        try:
            for p in self.procs:
                p.close()
        finally:
            remove_bootstrap(self.domain)


@pytest.fixture
def cluster_factory(tmp_path) -> Iterator[Callable[..., Cluster]]:
    clusters: list[Cluster] = []

    def make(nkeys: int, timing: dict = TIMING) -> Cluster:
        c = Cluster(tmp_path, nkeys, timing)
        clusters.append(c)
        return c

    try:
        yield make
    finally:
        for c in clusters:
            c.close()


def kill_and_measure(c: Cluster, victim_kind: str, rng: random.Random) -> dict:
    """One kill: returns latency (max over survivors), per-survivor samples, and checks."""
    syncs = c.settle()
    n = len(c.members)
    before = syncs[0]["epoch"]
    by_member = dict(zip(c.members, syncs))
    if victim_kind == "master":
        victim = next(p for p in c.members if by_member[p]["master"])
    else:
        victim = rng.choice([p for p in c.members if not by_member[p]["master"]])
    survivors = [p for p in c.members if p is not victim]
    marks = {p: len(p.epochs) for p in survivors}

    def first_new(p: MemberProc) -> dict | None:
        return next((e for e in p.epochs[marks[p]:] if e["epoch"] > before), None)

    t0 = time.monotonic_ns()
    os.kill(victim.pid, signal.SIGKILL)
    c.pump(lambda: all(first_new(p) is not None for p in survivors), 20.0,
           f"survivors reaching a stable epoch after {before}")
    assert victim.proc.wait(20) == -signal.SIGKILL
    c.members.remove(victim)
    samples = [first_new(p) for p in survivors]
    for s in samples:
        # The first stable epoch after the kill already excludes the victim.
        assert s["members"] == n - 1, (s, n)
    assert sum(s["master"] for s in samples) == 1, samples
    latencies = [(s["at"] - t0) / 1e6 for s in samples]
    # The survivors' index holds exactly their own entries now.
    after = c.settle()
    checked = c.ask(survivors[rng.randrange(len(survivors))], "check", "check")
    assert checked["count"] == (n - 1) * c.nkeys, checked
    return {
        "latency_ms": max(latencies),
        "per_survivor_ms": latencies,
        "detect_ms": [(s["at"] - s["duration_ms"] * 1e6 - t0) / 1e6 for s in samples],
        "duration_ms": [s["duration_ms"] for s in samples],
        "phases": [s["phases"] for s in samples],
        "restarts": sum(s["restarts"] - by_member[p]["restarts"] for p, s in zip(survivors, samples)),
        # Epoch numbers used up by this one failure (1 if every member asked for the same one)
        # and recoveries that became stable (1 unless another full recovery followed).
        "epochs_used": after[0]["epoch"] - before,
        "stable_recoveries": len({e["epoch"] for p in survivors for e in p.epochs[marks[p]:]
                                  if before < e["epoch"] <= after[0]["epoch"]}),
        "new_master": victim_kind == "master",
    }


def replace_member(c: Cluster, rng: random.Random) -> dict:
    """Start the spare as a replacement, wait until everyone agrees, check the index."""
    before = c.sync()[0]["epoch"]
    p = c.add_member()
    syncs = c.settle()
    c.spawn_standby()  # the next spare starts now; it is ready before the next kill
    checked = c.ask(c.members[rng.randrange(len(c.members))], "check", "check")
    assert checked["count"] == len(c.members) * c.nkeys, checked
    c.standby_ready()
    return {"join_epochs": syncs[0]["epoch"] - before, "joined": p.name}


CONFIGS = [(m, k, v) for v in ("member", "master") for k in (5, 200) for m in (2, 3, 4)]


@pytest.mark.benchmark(group="component-recovery")
@pytest.mark.parametrize("members,keys,victim", CONFIGS,
                         ids=[f"{m}members-{k}keys-kill-{v}" for m, k, v in CONFIGS])
def test_recovery_after_kill9(benchmark, report, cluster_factory, members, keys, victim):
    """kill -9 one member (a non-master one, or the master) of ``members`` Registry processes
    with ``keys`` entries each; time from just before os.kill to the moment every survivor
    has reached a new stable epoch (target: p50 <= 10 ms with 4 members)."""
    rng = random.Random(f"{members}-{keys}-{victim}")
    c = cluster_factory(keys)
    for _ in range(members):
        c.add_member()
    c.settle()
    c.spawn_standby()
    c.standby_ready()
    results: list[dict] = []
    joins: list[dict] = []
    failure: list[BaseException] = []

    def kills() -> None:
        try:
            for i in range(WARMUP_KILLS + KILLS):
                r = kill_and_measure(c, victim, rng)
                if i >= WARMUP_KILLS:
                    results.append(r)
                joins.append(replace_member(c, rng))
        except BaseException as exc:  # re-raised below: a benchmark that raises leaves no
            failure.append(exc)       # round, and pytest-benchmark cannot write its JSON then

    benchmark.pedantic(kills, rounds=1, iterations=1)
    if failure:
        raise failure[0]
    assert len(results) == KILLS

    latency = [r["latency_ms"] for r in results]
    per_survivor = [x for r in results for x in r["per_survivor_ms"]]
    info: dict[str, object] = {"members": members, "keys_per_member": keys, "victim": victim,
                               "kills": KILLS, "warmup_kills": WARMUP_KILLS,
                               "timing": TIMING or "defaults", "target_p50_ms": 10.0}
    info.update(percentiles(latency, "recovery"))
    info.update(percentiles(per_survivor, "per_survivor"))
    info.update(percentiles([x for r in results for x in r["detect_ms"]], "detect"))
    info.update(percentiles([x for r in results for x in r["duration_ms"]], "duration"))
    info["phases_ms"] = {
        ph: percentiles([p.get(ph, 0.0) for r in results for p in r["phases"]], ph)
        for ph in PHASES}
    info["recovery_ms_all"] = [round(x, 3) for x in latency]
    info["restarts_during_measured_recoveries"] = sum(r["restarts"] for r in results)
    info["kills_with_restarts"] = sum(1 for r in results if r["restarts"])
    # The same latency split by whether a survivor restarted its recovery (a superseded epoch).
    info.update(percentiles([r["latency_ms"] for r in results if not r["restarts"]], "recovery_no_restart"))
    info.update(percentiles([r["latency_ms"] for r in results if r["restarts"]], "recovery_with_restart"))
    info["epochs_used_per_kill"] = histogram(r["epochs_used"] for r in results)
    info["stable_recoveries_per_kill"] = histogram(r["stable_recoveries"] for r in results)
    info["epochs_used_per_join"] = histogram(j["join_epochs"] for j in joins)
    report(**info)
