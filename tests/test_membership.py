"""Membership with real processes: kill -9, SIGSTOP + fencing, master election, node crash,
churn, stale bootstrap, separate domains, a GIL-holding member, and `mcs status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import membership
from conftest import wait_for
from mcs import gc as mcs_gc
from mcs import layout, procfs
from mcs.bootstrap import FUTEX_OWNER_DIED, Bootstrap

FAST = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.3}

MEMBER = """
import json, sys, threading, time
import os
import membership
timing = json.loads(sys.argv[3])
if len(sys.argv) > 4:  # join a process group (0: lead a new one): a node killed at once
    os.setpgid(0, int(sys.argv[4]))
m = membership.join(sys.argv[1], node=sys.argv[2], **timing)
lock = threading.Lock()

def report(view):
    with lock:
        print(json.dumps({"gen": view.generation,
                          "slots": sorted(x.slot for x in view.members),
                          "pids": sorted(x.pid for x in view.members),
                          "master": view.master.pid if view.master else None,
                          "departed": sorted([x.pid, why] for x, why in view.departed)}),
              flush=True)

print(json.dumps({"slot": m.slot, "inc": m.incarnation, "pid": m.info.pid}), flush=True)
m.on_view_change(report)
report(m.view)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "leave":
        m.leave()
        print("left", flush=True)
        break
    if cmd[0] == "busy":   # hold the GIL in one long C call
        sum(range(int(float(cmd[1]) * 3e7)))
        print("busy done", m.view.generation, flush=True)
"""


class Node:
    """A member running in a child process; keeps the views it reported."""

    def __init__(self, spawn, domain: str, node: str, timing: dict, pgid: int | None = None) -> None:
        self.child = spawn(MEMBER, domain, node, json.dumps(timing),
                           *(() if pgid is None else (str(pgid),)))
        hello = json.loads(self.child.readline())
        self.pid, self.slot, self.incarnation = hello["pid"], hello["slot"], hello["inc"]
        self.views: list[dict] = []
        self.seen = 0

    def next_view(self, timeout: float = 10.0) -> dict:
        view = json.loads(self.child.readline(timeout))
        self.views.append(view)
        return view

    def mark(self) -> None:
        """From now on, wait_view considers only views reported after this point."""
        self.seen = len(self.views)

    def wait_view(self, predicate, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        for view in self.views[self.seen:]:
            if predicate(view):
                return view
        while True:
            view = self.next_view(max(0.01, deadline - time.monotonic()))
            if predicate(view):
                return view


def start(spawn, domain, count, timing=FAST, node=None):
    nodes = [Node(spawn, domain, node or f"n{i}", timing) for i in range(count)]
    pids = sorted(n.pid for n in nodes)
    for n in nodes:
        n.wait_view(lambda v: v["pids"] == pids)
        n.mark()
    return nodes


def has_exactly(pids):
    return lambda v: v["pids"] == sorted(pids)


def test_join_view_and_clean_leave(domain):
    with membership.join(domain, node="solo") as m:
        view = m.view
        assert view.generation >= 1
        assert [x.pid for x in view.members] == [os.getpid()]
        assert view.master == m.info
        assert m.timing == membership.Timing()
    assert not Path(f"/dev/shm/mcs.{domain}").exists()  # the last one out removed the root


def test_kill9_one_of_four_every_survivor_sees_new_generation(domain, spawn):
    nodes = start(spawn, domain, 4)
    victim, survivors = nodes[1], [nodes[0], *nodes[2:]]
    victim.child.kill()
    alive = [n.pid for n in survivors]
    views = [n.wait_view(has_exactly(alive)) for n in survivors]
    assert len({v["gen"] for v in views}) == 1, f"survivors disagree: {views}"
    assert all(v["departed"] == [[victim.pid, "dead"]] for v in views)


def test_sigstop_member_is_evicted_and_fenced(domain, spawn):
    nodes = start(spawn, domain, 3)
    victim, survivors = nodes[2], nodes[:2]
    stopped = time.monotonic()
    victim.child.signal(signal.SIGSTOP)
    views = [n.wait_view(has_exactly([s.pid for s in survivors])) for n in survivors]
    assert len({v["gen"] for v in views}) == 1
    assert time.monotonic() - stopped < 5
    assert victim.child.proc.wait(5) == -signal.SIGKILL  # really gone, through its pidfd
    assert all(v["departed"] == [[victim.pid, "fenced"]] for v in views)


def _monitor_wakeups(seconds: float) -> int:
    """How often this process's membership monitor thread woke up over ``seconds``."""
    import threading
    [monitor] = [t for t in threading.enumerate() if t.name.startswith("mcs-monitor-")]

    def switches() -> int:
        with open(f"/proc/self/task/{monitor.native_id}/status") as f:
            return next(int(line.split()[1]) for line in f
                        if line.startswith("voluntary_ctxt_switches"))

    before = switches()
    time.sleep(seconds)
    return switches() - before


def test_the_monitor_looks_less_often_until_it_suspects_someone(domain, spawn):
    timing = {"heartbeat": 0.1, "suspect_after": 0.5, "evict_after": 3.0}
    t = membership.Timing(**timing)
    assert (t.check_interval, t.relaxed_check_interval) == (0.02, 0.1)
    assert membership.Timing(**FAST).relaxed_check_interval == 0.02  # a 20 ms heartbeat: same
    assert membership.Timing(suspect_after=2.0).relaxed_check_interval == 0.02  # = evict_after
    with membership.join(domain, node="watcher", **timing) as m:
        other = Node(spawn, domain, "other", timing)
        assert wait_for(lambda: len(m.view.members) == 2, 10)
        quiet = _monitor_wakeups(1.0)  # ~10 rounds (it was 50)
        assert quiet <= 25, quiet
        other.child.signal(signal.SIGSTOP)
        assert wait_for(lambda: m._suspected, 2, 0.01)  # within suspect_after + 100 ms
        suspecting = _monitor_wakeups(1.0)  # every 20 ms again until the eviction
        assert suspecting >= 35, suspecting
        assert wait_for(lambda: len(m.view.members) == 1, 10)


def test_kill_master_elects_a_new_one_everyone_agrees(domain, spawn):
    nodes = start(spawn, domain, 3)
    master_pid = nodes[0].views[-1]["master"]
    master = next(n for n in nodes if n.pid == master_pid)
    rest = [n for n in nodes if n is not master]
    master.child.kill()
    views = [n.wait_view(has_exactly([r.pid for r in rest])) for n in rest]
    masters = {v["master"] for v in views}
    assert len(masters) == 1 and masters.pop() in {r.pid for r in rest}
    # the oldest survivor (lowest incarnation) is the deterministic choice
    assert views[0]["master"] == min(rest, key=lambda n: n.incarnation).pid


def test_master_is_stable_across_joins(domain, spawn):
    nodes = start(spawn, domain, 2)
    master = nodes[0].views[-1]["master"]
    late = Node(spawn, domain, "late", FAST)
    pids = sorted([n.pid for n in nodes] + [late.pid])
    for n in [*nodes, late]:
        assert n.wait_view(has_exactly(pids))["master"] == master


def test_whole_node_dying_at_once_is_one_change(domain, spawn):
    # "At once": one kill of the node's process group (as a cgroup kill or a lost machine):
    # its members all have SIGKILL pending when the first death is seen.
    a = start(spawn, domain, 2, node="alpha")
    b = [Node(spawn, domain, "beta", FAST, pgid=0)]
    b.append(Node(spawn, domain, "beta", FAST, pgid=b[0].pid))
    everyone = a + b
    pids = sorted(n.pid for n in everyone)
    for n in everyone:
        n.wait_view(has_exactly(pids))
        n.mark()
    before = {n.pid: n.views[-1]["gen"] for n in a}
    os.killpg(b[0].pid, signal.SIGKILL)
    for n in a:
        view = n.wait_view(lambda v: not set(v["pids"]) & {x.pid for x in b})
        assert view["pids"] == sorted(x.pid for x in a)
        seen_after = [v for v in n.views if v["gen"] > before[n.pid]]
        assert seen_after[0] == view, f"node death split in several generations: {seen_after}"
        assert sorted(view["departed"]) == sorted([x.pid, "dead"] for x in b)
    for n in b:
        n.child.wait()


def test_join_and_leave_while_others_fail(domain, spawn):
    nodes = start(spawn, domain, 3)
    nodes[0].child.kill()
    newcomer = Node(spawn, domain, "new", FAST)
    nodes[1].child.send("leave")
    nodes[2].child.kill()
    newcomer2 = Node(spawn, domain, "new2", FAST)
    final = sorted([newcomer.pid, newcomer2.pid])
    v1 = newcomer.wait_view(has_exactly(final))
    v2 = newcomer2.wait_view(has_exactly(final))
    assert v1["gen"] == v2["gen"] and v1["master"] == v2["master"]
    assert v1["master"] == newcomer.pid  # the older one


def test_clean_leave_is_seen_as_leave(domain, spawn):
    nodes = start(spawn, domain, 2)
    nodes[1].child.send("leave")
    view = nodes[0].wait_view(has_exactly([nodes[0].pid]))
    assert view["departed"] == [[nodes[1].pid, "left"]]


def test_stale_bootstrap_from_crashed_domain_is_reinitialised(domain, spawn):
    nodes = start(spawn, domain, 2)
    for n in nodes:
        n.child.kill()
    assert Path(f"/dev/shm/mcs.{domain}").exists()  # a crash leaves the root behind
    with membership.join(domain, node="phoenix") as m:
        assert [x.pid for x in m.view.members] == [os.getpid()]
        assert m.view.master == m.info


def test_two_domains_never_see_each_other(domain, spawn):
    other = domain + "-b"
    try:
        a = start(spawn, domain, 2)
        b = start(spawn, other, 2)
        assert set(a[0].views[-1]["pids"]).isdisjoint(b[0].views[-1]["pids"])
        b[0].child.kill()
        b[1].wait_view(has_exactly([b[1].pid]))
        time.sleep(0.2)
        assert a[0].views[-1]["pids"] == sorted(n.pid for n in a)
        assert a[0].views[-1]["gen"] == a[1].views[-1]["gen"]
    finally:
        for path in (f"/dev/shm/mcs.{other}",):
            if os.path.exists(path):
                os.unlink(path)


@pytest.mark.slow
def test_gil_holding_member_is_not_evicted(domain, spawn):
    timing = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.5}
    nodes = start(spawn, domain, 2, timing=timing)
    gen = nodes[0].views[-1]["gen"]
    nodes[1].child.send("busy 2")  # about 2 s inside one C call holding the GIL
    assert nodes[1].child.readline(30).startswith("busy done")
    time.sleep(0.1)
    assert nodes[0].views[-1]["gen"] == gen, f"busy member was evicted: {nodes[0].views}"
    assert nodes[1].child.proc.poll() is None


def test_bad_arguments():
    with pytest.raises(ValueError):
        membership.join("bad/name")
    with pytest.raises(ValueError):
        membership.join("okname", node="")
    with pytest.raises(ValueError):
        membership.join("okname", evict_after=0.01)
    with pytest.raises(TypeError):
        membership.join("okname", heartbeet=1)


def mcs_cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mcs")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def test_mcs_status_shows_a_live_domain(domain, spawn):
    nodes = start(spawn, domain, 3)
    result = mcs_cli("status", "--domain", domain, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["generation"] == nodes[0].views[-1]["gen"]
    assert status["master"]["pid"] == nodes[0].views[-1]["master"]
    members = {m["pid"]: m for m in status["members"]}
    assert set(members) == {n.pid for n in nodes}
    for n in nodes:
        row = members[n.pid]
        assert row["slot"] == n.slot and row["incarnation"] == n.incarnation
        assert row["state"] == "member" and row["in_view"]
        assert 0 <= row["heartbeat_age_ms"] < 1000
    text = mcs_cli("status", "--domain", domain)
    assert text.returncode == 0
    for n in nodes:
        assert str(n.pid) in text.stdout
    missing = mcs_cli("status", "--domain", domain + "-nope")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    bad = mcs_cli("status", "--domain", "../etc")
    assert bad.returncode == 2 and "invalid domain name" in bad.stderr


def test_deaths_of_one_node_are_waited_for_together():
    # A node's members get ONE grace period to show they are dying too, not one each.
    from membership.member import _dying_soon

    procs = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    try:
        for p in procs[:2]:
            p.kill()  # zombies until reaped: dying
        start = time.monotonic()
        dying = _dying_soon([p.pid for p in procs], 0.2)
        waited = time.monotonic() - start
        assert dying == {procs[0].pid, procs[1].pid}
        assert 0.2 <= waited < 0.4  # one grace for all three, not 3 x 0.2
        start = time.monotonic()
        assert _dying_soon([p.pid for p in procs[:2]], 5.0) == {procs[0].pid, procs[1].pid}
        assert time.monotonic() - start < 1.0  # all dying: no wait at all
        start = time.monotonic()
        assert _dying_soon([procs[2].pid], 5.0) == set()
        assert time.monotonic() - start < 1.0  # none dying: no cause, no grace
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_callbacks_run_once_per_generation_in_order(domain, spawn):
    # Callbacks come from two threads (the watcher that saw a death, the monitor): each
    # generation must still be reported once, and in increasing order.
    nodes = start(spawn, domain, 5)
    survivors = nodes[:2]
    for victim in nodes[2:]:
        victim.child.kill()
        time.sleep(0.002)  # deaths close together: callbacks of several generations overlap
    alive = [n.pid for n in survivors]
    for n in survivors:
        n.wait_view(has_exactly(alive))
        gens = [v["gen"] for v in n.views]
        assert gens == sorted(set(gens)), f"generations repeated or out of order: {gens}"


def _mark_holder_exited(boot, slot: int) -> None:
    """Store in ``slot``'s life mutex what the kernel stores when the holder thread exits
    (owner-died, no thread id, the waiters bit kept), although that thread still runs."""
    off = layout.member_offset(slot, layout.M_LIFE_MUTEX)
    while True:
        old = boot.section.load64(off)
        word = old & 0xFFFFFFFF
        new = (old & ~0xFFFFFFFF) | FUTEX_OWNER_DIED | (word & 0x80000000)
        if boot.section.cas64(off, old, new):
            return


def test_a_running_member_whose_life_mutex_reads_abandoned_never_splits_the_domain(
        domain, spawn):
    """The kernel marks a life mutex abandoned only when its holder thread exits. Should a
    running member's ever read abandoned (a stray store, a kernel bug), no joiner re-initialises
    the member table and no gc retires the root beside it (a second domain), and the member
    itself stops acting as one (fenced), saying why."""
    lone = Node(spawn, domain, "lone", FAST)
    with Bootstrap.open(domain, create=False) as boot:
        _mark_holder_exited(boot, lone.slot)
        assert boot.probe_slot(lone.slot) == "dead"  # the probe consumes the abandonment...
        assert boot.probe_slot(lone.slot) == "free"
        assert boot.live_slots() == [lone.slot]  # ...but the process still runs the domain
        result = mcs_gc.collect_domain(domain)
        assert result.action is mcs_gc.GcAction.KEPT, result
    assert Path(f"/dev/shm/mcs.{domain}").exists()
    with membership.join(domain, node="joiner", **FAST) as m:
        # no re-initialisation: the generation goes on, and the lone member is counted out
        # (its life mutex is free to any watcher) rather than forming a domain of its own
        view = m.view
        assert view.generation > 1, view
        assert wait_for(lambda: [x.pid for x in m.view.members] == [os.getpid()], 5)
    lone.child.kill()
    assert "lost its life mutex" in lone.child.stderr()


def test_the_pid_of_a_process_started_after_the_join_is_not_that_member(domain, spawn):
    """A slot's recorded pid counts as the member's only for a process that started before the
    member joined and maps this root: a reused pid never keeps a dead domain alive."""
    node = Node(spawn, domain, "n", FAST)
    with Bootstrap.open(domain, create=False) as boot:
        assert boot.runs_domain(node.slot)
        joined = layout.member_offset(node.slot, layout.M_JOINED_NS)
        real = boot.section.load64(joined)
        boot.section.store64(joined, real - 10 * 10**9)  # as if it joined 10 s before it started
        try:
            assert not boot.runs_domain(node.slot)
        finally:
            boot.section.store64(joined, real)
        assert boot.runs_domain(node.slot)
        node.child.kill()
        assert wait_for(lambda: not boot.runs_domain(node.slot), 5)


# A process that takes a member's life mutex and stops itself while holding it: what a
# survivor's watcher does when its process is stopped just after it took a dead member's life
# mutex (seen in tests/test_membership_fds.py, about 1 run in 30, before watchers looked at the
# word). Not a member itself: nothing evicts it.
LIFE_TAKER = """
import os, signal, sys
from mcs import layout
from mcs.bootstrap import Bootstrap
from mcs.types import LockStatus
boot = Bootstrap.open(sys.argv[1], create=len(sys.argv) > 3)
slots = range(layout.MAX_MEMBERS) if sys.argv[2] == "all" else [int(sys.argv[2])]
mutexes = [boot.life_mutex(slot) for slot in slots]
print("waiting", flush=True)
statuses = [mutex.lock() for mutex in mutexes]
print(",".join(sorted({status.name for status in statuses})), flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
for mutex, status in zip(mutexes, statuses):
    if status is LockStatus.ABANDONED:
        mutex.mark_consistent()
    mutex.unlock()
print("released", flush=True)
"""

SLOW = {"heartbeat": 0.05, "suspect_after": 5.0, "evict_after": 10.0}  # deaths by mutex only


def _stopped(pid: int) -> bool:
    return procfs.read_stat(pid).stopped


def test_a_death_is_seen_while_a_stopped_process_holds_the_dead_members_life_mutex(
        domain, spawn):
    survivor, victim = start(spawn, domain, 2, timing=SLOW)
    taker = spawn(LIFE_TAKER, domain, str(victim.slot))
    taker.expect("waiting")
    survivor.child.signal(signal.SIGSTOP)  # so that the taker, not its watcher, gets the mutex
    victim.child.kill()
    taker.expect("ABANDONED")
    assert wait_for(lambda: _stopped(taker.pid), 5)
    survivor.child.signal(signal.SIGCONT)
    # evict_after is 10 s: only the life mutex's word can tell the survivor in time
    view = survivor.wait_view(has_exactly([survivor.pid]), timeout=3.0)
    assert view["departed"] == [[victim.pid, "dead"]]
    taker.signal(signal.SIGCONT)
    taker.expect("released")


def test_a_join_skips_a_free_slot_whose_life_mutex_another_process_holds(domain, spawn):
    taker = spawn(LIFE_TAKER, domain, "0", "create")
    taker.expect("waiting")
    taker.expect("OK")
    assert wait_for(lambda: _stopped(taker.pid), 5)
    joiner = Node(spawn, domain, "j", FAST)  # before: blocked for good, holding the root mutex
    assert joiner.slot == 1
    joiner.wait_view(has_exactly([joiner.pid]))
    taker.signal(signal.SIGCONT)
    taker.expect("released")


JOIN_ONCE = """
import sys, time
import membership
from mcs.errors import McsError
started = time.monotonic()
try:
    membership.join(sys.argv[1], node="j")
except McsError as exc:
    print(f"{type(exc).__name__} after {time.monotonic() - started:.1f} s: {exc}", flush=True)
"""


def test_a_join_where_every_free_slots_life_mutex_stays_held_fails_clearly(domain, spawn):
    taker = spawn(LIFE_TAKER, domain, "all", "create")
    taker.expect("waiting")
    taker.expect("OK")
    assert wait_for(lambda: _stopped(taker.pid), 5)
    line = spawn(JOIN_ONCE, domain).readline(timeout=30)  # before: blocked for good
    assert line.startswith("McsError after ") and "every free slot" in line, line
    taker.signal(signal.SIGCONT)
    taker.expect("released")
