"""Layered failure detection beyond death and freezing, with real processes: a live member that
sleeps holding a lock (hung), a member whose interpreter makes no progress (stalled), a stopped
lock holder fenced before ``evict_after``, a maintenance pause that survives SIGSTOP, and what
``mcs status`` shows of each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_for
from mcs import McsComponent, Recovering
from holder import IMPORT, Holder

BASE = {"heartbeat": 0.02, "suspect_after": 0.1}

# The child runs the Holder component and obeys commands.
CHILD = IMPORT + '''
import json, os, sys, time
from mcs import Recovering
if len(sys.argv) > 3:
    os.environ["MCS_RESTARTS"] = sys.argv[3]
comp = Holder(sys.argv[1], **json.loads(sys.argv[2])).start()
say = lambda **kw: print(json.dumps(kw), flush=True)
say(pid=os.getpid(), slot=comp.member.slot)
held = None
for line in sys.stdin:
    cmd, *arg = line.split()
    if cmd == "hold":  # take the mutex in a block and keep it
        block = comp.consistent()
        block.__enter__()
        held = comp.lock(comp.mutex())
        held.__enter__()
        say(taken=time.monotonic())
    elif cmd == "sleep":  # a live member, stuck in a sleep while it holds the mutex
        time.sleep(float(arg[0]))
        say(slept=True)
    elif cmd == "holdfor":  # slow, not hung: hold it a while, then let go
        with comp.consistent():
            with comp.lock(comp.mutex()):
                say(taken=time.monotonic())
                time.sleep(float(arg[0]))
        say(released=True)
    elif cmd == "release":
        held.__exit__(None, None, None)
        block.__exit__(None, None, None)
        say(released=True)
    elif cmd == "spin":  # the interpreter stuck in one C call that keeps the GIL
        say(spinning=time.monotonic())
        sum(range(int(float(arg[0]) * 3e7)))
        say(spun=True)
    elif cmd == "work":  # one block: proves the member still takes part
        with comp.consistent():
            with comp.lock(comp.mutex()):
                pass
        say(worked=comp.member.view.generation)
'''

def mcs_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "mcs", *args], capture_output=True,
                          text=True, timeout=60)


def start_child(spawn, domain: str, timing: dict, restarts: int | None = None,
                beside: McsComponent | None = None):
    """A child running the Holder (and, with ``beside``, once that member's view has both)."""
    child = spawn(CHILD, domain, json.dumps(timing), *(() if restarts is None else (str(restarts),)))
    hello = json.loads(child.readline(30))
    if beside is not None:
        assert wait_for(lambda: len(beside.view.members) == 2)
    return child, hello


def ask(child, command: str, timeout: float = 30.0) -> dict:
    child.send(command)
    return json.loads(child.readline(timeout))


def lock_through_recovery(comp: McsComponent, deadline: float) -> tuple[float, int]:
    """Lock the mutex in blocks until it works: (when the first attempt gave way, recoveries)."""
    gave_way = 0.0
    while True:
        try:
            with comp.consistent():
                with comp.lock(comp.mutex()):
                    return gave_way, comp.stats.recoveries
        except Recovering:
            gave_way = gave_way or time.monotonic()
        assert time.monotonic() < deadline, "never got the mutex"


def status(domain: str) -> dict:
    out = mcs_cli("status", "--domain", domain, "--component", "holder", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def row(domain: str, pid: int) -> dict:
    return next(m for m in status(domain)["members"] if m["pid"] == pid)


def test_a_live_member_sleeping_with_a_lock_held_is_evicted_as_hung(domain, spawn):
    timing = {**BASE, "evict_after": 2.0, "hold_limit": 1.0}
    with Holder(domain, **timing) as waiter:
        child, hello = start_child(spawn, domain, timing, beside=waiter)
        # Slow is not hung: a hold shorter than hold_limit is simply waited for.
        ask(child, "holdfor 0.5")
        gave_way, _ = lock_through_recovery(waiter, time.monotonic() + 10)
        assert gave_way == 0.0  # no eviction, no recovery: the lock came when it was released
        assert json.loads(child.readline()) == {"released": True}
        # Hung: asleep (heartbeat beating) holding it past hold_limit while we wait.
        recoveries = waiter.stats.recoveries
        taken = ask(child, "hold")["taken"]
        child.send("sleep 60")
        gave_way, after = lock_through_recovery(waiter, time.monotonic() + 30)
        assert child.proc.wait(5) == -signal.SIGKILL  # fenced through its pidfd
        assert gave_way - taken <= timing["hold_limit"] + 0.1, gave_way - taken
        assert after > recoveries  # the waiter went on through a recovery
        assert wait_for(lambda: hello["pid"] not in {m.pid for m in waiter.view.members})
        assert dict(waiter.member.stats.evictions)["hung"] == 1
        st = status(domain)
        assert st["evictions"] == {"frozen": 0, "stopped": 0, "hung": 1, "stalled": 0}


DICT_HOLDER = """
import json, os, sys, time
from mcs import SharedDict
d = SharedDict(sys.argv[1], capacity=1000, **json.loads(sys.argv[2])).start()
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.readline()
with d.transaction() as tx:
    tx["k"] = 1
    print(json.dumps({"holding": time.monotonic()}), flush=True)
    time.sleep(60)
"""


def test_a_shared_dict_writer_behind_a_hung_transaction_goes_on(domain, spawn):
    # The native stripe locker waits in slices and consults the same hold watch.
    from mcs import SharedDict

    timing = {**BASE, "evict_after": 2.0, "hold_limit": 1.0}
    with SharedDict(domain, capacity=1000, **timing) as d:
        child = spawn(DICT_HOLDER, domain, json.dumps(timing))
        pid = json.loads(child.readline(30))["pid"]
        child.send("go")
        holding = json.loads(child.readline(30))["holding"]
        d["k"] = 2  # blocks behind the sleeping transaction until its holder is evicted
        done = time.monotonic()
        assert child.proc.wait(5) == -signal.SIGKILL
        assert done - holding <= timing["hold_limit"] + 0.1, done - holding
        assert d["k"] == 2  # the dead transaction was rolled back, the write went through
        assert wait_for(lambda: pid not in {m.pid for m in d.member.view.members})
        assert dict(d.member.stats.evictions)["hung"] == 1


def test_a_member_whose_interpreter_makes_no_progress_is_evicted(domain, spawn):
    timing = {**BASE, "evict_after": 2.0, "progress_timeout": 1.0}
    with Holder(domain, **timing) as watcher:
        child, hello = start_child(spawn, domain, timing, beside=watcher)
        departed: list[float] = []
        watcher.member.on_view_change(
            lambda v: departed.extend(time.monotonic() for m, why in v.departed
                                      if m.pid == hello["pid"] and why == "fenced"))
        spinning = ask(child, "spin 60")["spinning"]  # heartbeat goes on: native, no GIL
        assert child.proc.wait(10) == -signal.SIGKILL
        assert wait_for(lambda: departed)
        assert departed[0] - spinning <= timing["progress_timeout"] + 0.1, departed[0] - spinning
        assert dict(watcher.member.stats.evictions) == {
            "frozen": 0, "stopped": 0, "hung": 0, "stalled": 1}


def test_a_stopped_lock_holder_is_fenced_before_evict_after(domain, spawn):
    timing = {**BASE, "evict_after": 6.0, "hold_limit": 30.0}
    with Holder(domain, **timing) as waiter:
        child, _ = start_child(spawn, domain, timing, beside=waiter)
        ask(child, "hold")
        child.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        lock_through_recovery(waiter, time.monotonic() + 30)
        stall = time.monotonic() - stopped
        assert child.proc.wait(5) == -signal.SIGKILL
        # 3 heartbeats late and state T: fenced long before the 6 s of evict_after
        assert stall < timing["evict_after"] / 2, stall
        assert dict(waiter.member.stats.evictions)["stopped"] == 1


def test_a_paused_member_survives_sigstop_and_rejoins_work(domain, spawn):
    timing = {**BASE, "evict_after": 0.5, "hold_limit": 30.0}
    with Holder(domain, **timing) as other:
        child, hello = start_child(spawn, domain, timing, beside=other)
        pid = hello["pid"]
        generation = other.view.generation
        ask(child, "hold")
        out = mcs_cli("pause", "--domain", domain, "--pid", str(pid), "--for", "60")
        assert out.returncode == 0, out.stderr
        assert f"pid {pid}" in out.stdout and "paused for 60 s" in out.stdout
        assert "holds 1 lock(s)" in out.stdout, out.stdout  # its locks are reported
        child.signal(signal.SIGSTOP)
        try:
            assert wait_for(lambda: hello["slot"] in other.member.view.paused)
            m = row(domain, pid)
            assert m["state"] == "paused" and m["locks_held"] == 1 and m["paused_for_s"] > 40
            # A waiter is told, the holder is not evicted.
            with other.consistent():
                with pytest.raises(TimeoutError):
                    with other.lock(other.mutex(), timeout=1.0):
                        pass
            time.sleep(10)  # 20 x evict_after
            assert other.view.generation == generation  # still a member, nobody fenced
            assert row(domain, pid)["state"] == "paused"
        finally:
            child.signal(signal.SIGCONT)
        out = mcs_cli("resume", "--domain", domain, "--pid", str(pid))
        assert out.returncode == 0 and "resumed" in out.stdout, out.stderr
        assert ask(child, "release") == {"released": True}
        assert ask(child, "work") == {"worked": generation}  # back at work, same generation
        assert wait_for(lambda: hello["slot"] not in other.member.view.paused)
        assert row(domain, pid)["state"] == "member"
        assert dict(other.member.stats.evictions) == {
            "frozen": 0, "stopped": 0, "hung": 0, "stalled": 0}
        # Without a pause, the same stop is a freeze: evicted after evict_after.
        child.signal(signal.SIGSTOP)
        assert child.proc.wait(10) == -signal.SIGKILL


def test_status_shows_locks_progress_and_restarts(domain, spawn):
    timing = {**BASE, "evict_after": 2.0}
    with Holder(domain, **timing):
        child, hello = start_child(spawn, domain, timing, restarts=3)
        ask(child, "hold")
        assert wait_for(lambda: row(domain, hello["pid"])["locks_held"] == 1)
        m = row(domain, hello["pid"])
        assert m["state"] == "member" and m["restarts"] == 3
        assert m["locks_held_for_ms"] is not None and m["locks_held_for_ms"] >= 0
        assert m["progress_age_ms"] is not None and m["progress_age_ms"] < 5000
        assert ask(child, "release") == {"released": True}
        assert wait_for(lambda: row(domain, hello["pid"])["locks_held"] == 0)
        text = mcs_cli("status", "--domain", domain, "--component", "holder")
        assert "locks (held for)" in text.stdout and "restarts" in text.stdout


def test_pause_and_resume_refuse_bad_input(domain):
    with Holder(domain, **BASE, evict_after=2.0):
        stranger = mcs_cli("pause", "--domain", domain, "--pid", "1")
        assert stranger.returncode == 1 and "is not a member" in stranger.stderr
        for args in (("--for", "0"), ("--for", "1e9"), ("--pid", "-4")):
            bad = mcs_cli("pause", "--domain", domain, "--pid", str(os.getpid()), *args)
            assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
        missing = mcs_cli("pause", "--domain", "no-such-domain-x", "--pid", "1")
        assert missing.returncode == 1 and "does not exist" in missing.stderr
