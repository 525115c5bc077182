"""Hung members and supervision (issue 12), measured with real processes.

* ``stall-behind-holder``: how long another member is stalled behind a holder of the mutex it
  needs when that holder is **hung** (alive, heartbeat beating, asleep with the mutex) or
  **frozen** (SIGSTOP). Rows with the hold watch off are what a waiter saw before it existed:
  behind a hung holder, the holder's whole sleep (14.5 s in the issue's run; 8 s here); behind
  a frozen one, ``evict_after``. With it on (the defaults: ``hold_limit`` 5 s, and a stopped
  holder fenced once 3 heartbeats late), and with ``hold_limit`` 1 s.
* ``supervise-restart``: ``mcs supervise`` runs 2 members of a component program; one is
  killed with SIGKILL; time until its replacement says READY=1 (joined, first recovery done:
  serving), as the supervisor reports it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import new_domain, remove_bootstrap, import_from_tests
from mcs import McsComponent, Recovering
from mcs._gsm import set_hold_watch

holder = import_from_tests("holder")
IMPORT, Holder = holder.IMPORT, holder.Holder

HOLDER = IMPORT + '''
import json, sys, time
comp = Holder(sys.argv[1], **json.loads(sys.argv[2])).start()
block = comp.consistent()
block.__enter__()
held = comp.lock(comp.mutex())
held.__enter__()
print(json.dumps({"taken": time.monotonic()}), flush=True)
time.sleep(float(sys.argv[3]))
held.__exit__(None, None, None)
block.__exit__(None, None, None)
comp.stop()
'''

SERVICE = IMPORT + '''
import signal, sys, threading
comp = Holder(sys.argv[1]).start()   # says READY=1 to the supervisor once consistent
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
done.wait()
comp.stop()
'''

HUNG_SLEEP = 8.0  # the hung holder's sleep: what a waiter waits without the hold watch
STALL_ROUNDS = 2
RESTART_ROUNDS = 9

# (row, holder state, timing, hold watch on)
SCENARIOS = {
    "hung-watch-off": ("hung", {}, False),
    "hung-hold_limit-5s-default": ("hung", {}, True),
    "hung-hold_limit-1s": ("hung", {"hold_limit": 1.0}, True),
    "frozen-watch-off": ("frozen", {}, False),
    "frozen-watch-on-default": ("frozen", {}, True),
}


class StallRig:
    """One holder process per round; this process is the waiter."""

    def __init__(self, domain: str, state: str, timing: dict) -> None:
        self.domain, self.state, self.timing = domain, state, timing
        self.proc: subprocess.Popen | None = None
        self.stalls: list[float] = []

    def setup(self, comp: McsComponent):
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", HOLDER, self.domain, json.dumps(self.timing),
             str(HUNG_SLEEP)], stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, "the holder did not start"
        json.loads(self.proc.stdout.readline())
        if self.state == "frozen":
            os.kill(self.proc.pid, signal.SIGSTOP)
        return (comp,), {}

    def wait(self, comp: McsComponent) -> None:
        start = time.monotonic()
        while True:
            try:
                with comp.consistent():
                    with comp.lock(comp.mutex()):
                        break
            except Recovering:
                pass
        self.stalls.append(time.monotonic() - start)
        self.reap()

    def reap(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.wait()
            self.proc.stdout.close()
            self.proc = None


@pytest.mark.benchmark(group="stall-behind-holder")
@pytest.mark.parametrize("row", list(SCENARIOS))
def test_stall_behind_a_hung_or_frozen_holder(benchmark, report, row):
    state, timing, watch_on = SCENARIOS[row]
    domain = new_domain("stall")
    rig = StallRig(domain, state, timing)
    comp = Holder(domain, **timing).start()
    import membership.member as member_module
    try:
        if not watch_on:
            set_hold_watch(None)
        benchmark.pedantic(rig.wait, setup=lambda: rig.setup(comp), rounds=STALL_ROUNDS,
                           warmup_rounds=0)
    finally:
        set_hold_watch(member_module._hold_watch)
        rig.reap()
        evictions = dict(comp.member.stats.evictions)
        comp.stop()
        remove_bootstrap(f"{domain}.holder")
    report(stall_s_median=statistics.median(rig.stalls), stall_s_max=max(rig.stalls),
           rounds=len(rig.stalls), holder=state, hold_watch=watch_on,
           hold_limit_s=timing.get("hold_limit", 5.0), evict_after_s=2.0,
           holder_sleep_s=HUNG_SLEEP, evictions=evictions,
           stall_definition="from the moment the holder holds the mutex (and, frozen, is "
                            "SIGSTOPped) until the waiter holds it, through the recovery")


class Supervised:
    """``mcs supervise -n 2`` over SERVICE; reads its log lines."""

    def __init__(self, domain: str) -> None:
        exe = str(Path(sys.executable).with_name("mcs"))
        self.proc = subprocess.Popen(
            [exe, "supervise", "-n", "2", "--backoff", "0.05:0.5", "--restart-intensity", "50/10",
             "--", sys.executable, "-P", "-c", SERVICE, domain],
            stderr=subprocess.PIPE, text=True)
        self.pids: dict[int, int] = {}
        self.ready_at: dict[int, float] = {}
        self.wait_ready(lambda: len(self.pids) == 2)

    def wait_ready(self, done, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            ready, _, _ = select.select([self.proc.stderr], [], [], deadline - time.monotonic())
            assert ready, "the supervisor said nothing"
            line = self.proc.stderr.readline()
            assert line, "the supervisor exited"
            words = line.split()
            # "mcs supervise: slot S pid P ready[: STATUS]"
            if len(words) >= 7 and words[2] == "slot" and words[6].startswith("ready"):
                slot, pid = int(words[3]), int(words[5])
                self.pids[slot] = pid
                self.ready_at[slot] = time.monotonic()

    def restart(self, slot: int = 0) -> float:
        old = self.pids[slot]
        time.sleep(0.6)  # a run longer than the back-off's max: the next crash waits 0.05 s
        start = time.monotonic()
        os.kill(old, signal.SIGKILL)
        self.wait_ready(lambda: self.pids[slot] != old)
        return self.ready_at[slot] - start

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stderr.close()


@pytest.mark.benchmark(group="supervise-restart")
def test_kill_to_restarted_member_serving(benchmark, report):
    domain = new_domain("restart")
    sup = Supervised(domain)
    times: list[float] = []
    try:
        benchmark.pedantic(lambda: times.append(sup.restart()), rounds=RESTART_ROUNDS,
                           warmup_rounds=0)
    finally:
        sup.stop()
        remove_bootstrap(f"{domain}.holder")
    ms = sorted(t * 1e3 for t in times)
    report(restart_ms_p50=statistics.median(ms), restart_ms_max=ms[-1], restart_ms_min=ms[0],
           rounds=len(ms), backoff_min_s=0.05,
           restart_definition="SIGKILL of a member -> the supervisor sees its replacement's "
                              "READY=1 (joined, first recovery done)")
