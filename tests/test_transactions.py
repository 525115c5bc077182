"""Crash-atomic transactions and the domain-owned master area, with real processes and kill -9.

A bank of 16 accounts lives in the master area; workers move money in transactions (and every
few transfers audit all accounts in one) while members, the master included, are killed at
random and at crash points inside log, commit and rollback. The total never changes, every
committed transfer is counted exactly once, and the data outlives every original member."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import threading
import time

import pytest

import mcs
from mcs import component_record as rec
from mcs.types import MasterAreaOutcome

FAST = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.3}

# The component, shared by the test process and the workers (exec'd in both).
BANK = r'''
import mcs
from mcs import GlobalMutex
from mcs.component import McsComponent, transaction

ACCOUNTS = 16
START = 1000
TOTAL = ACCOUNTS * START
MAGIC = 0xBA4C
MUTEX = 64  # one robust mutex per account, at 64 * i + 64
BALANCES = 64 + 64 * ACCOUNTS
COUNTERS = BALANCES + 8 * ACCOUNTS  # per worker id: transfers it committed


class Bank(McsComponent):
    name = "bank"
    master_area_size = COUNTERS + 8 * 64
    transaction_lock_wait = 0.01

    def init_local(self):
        self.fresh_seen = []

    def on_master(self, view):
        self.fresh_seen.append(self.master_area_fresh)
        area = self.master_area
        if self.master_area_fresh:
            for i in range(ACCOUNTS):
                GlobalMutex.create(area, MUTEX * (i + 1))
                area.store64(BALANCES + 8 * i, START)
            area.store64(0, MAGIC)

    def balance(self, i):
        return self.master_area.load64(BALANCES + 8 * i)

    def mutex(self, i):
        return MUTEX * (i + 1)

    @transaction
    def transfer(self, a, b, amount, wid, reverse=False, fail=False):
        tx = self.tx
        first, second = (max(a, b), min(a, b)) if reverse else (min(a, b), max(a, b))
        tx.lock(self.mutex(first))
        tx.lock(self.mutex(second))
        if self.balance(a) < amount:
            amount = 0
        tx.add64(BALANCES + 8 * a, -amount)
        tx.add64(BALANCES + 8 * b, amount)
        tx.add64(COUNTERS + 8 * wid, 1)
        if fail:
            raise ValueError("cancelled after writing")
        return amount

    @transaction
    def audit(self):
        tx = self.tx
        for i in range(ACCOUNTS):
            tx.lock(self.mutex(i))
        total = sum(self.balance(i) for i in range(ACCOUNTS))
        counters = [self.master_area.load64(COUNTERS + 8 * w) for w in range(64)]
        return total, counters
'''

WORKER = BANK + r'''
import json, os, random, struct, sys, threading

def main():
    domain, wid, countfile, timing, seed = (sys.argv[1], int(sys.argv[2]), sys.argv[3],
                                            json.loads(sys.argv[4]), int(sys.argv[5]))
    rng = random.Random(seed)
    bank = Bank(domain, **timing).start()
    fd = os.open(countfile, os.O_RDWR | os.O_CREAT, 0o600)
    out = threading.Lock()

    def say(**kw):
        with out:
            print(json.dumps(kw), flush=True)

    say(ready=bank.slot, pid=os.getpid(), master=bank.is_master,
        outcome=bank.stats.master_area.name)
    stop = threading.Event()
    done = [0]

    def work():
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 16 == 0:
                    total, _ = bank.audit()
                    if total != TOTAL:
                        say(violation=f"total {total} != {TOTAL}")
                        os._exit(3)
                    continue
                a, b = rng.sample(range(ACCOUNTS), 2)
                fail = rng.random() < 0.05
                try:
                    bank.transfer(a, b, rng.randrange(1, 200), wid,
                                  reverse=rng.random() < 0.2, fail=fail)
                except ValueError:
                    continue  # rolled back: not counted
                done[0] += 1
                os.pwrite(fd, struct.pack("<Q", done[0]), 0)
            except mcs.ClosedError:
                return

    t = threading.Thread(target=work, daemon=True)
    t.start()
    for line in sys.stdin:
        cmd = line.split()
        if cmd == ["audit"]:
            total, counters = bank.audit()
            st = bank.stats
            say(total=total, counters=counters, done=done[0], outcome=st.master_area.name,
                master=bank.is_master, rolled=st.tx_rolled_back, repaired=st.tx_repaired,
                aborts=st.tx_aborts, conflicts=st.tx_conflicts)
        elif cmd == ["stop"]:
            stop.set()
            t.join()
            total, counters = bank.audit()
            say(stopped=done[0], counter=counters[wid], total=total)
            bank.stop()
            return

main()
'''

ns: dict = {}
exec(compile(BANK, "<bank>", "exec"), ns)
Bank = ns["Bank"]
TOTAL, COUNTERS, BALANCES = ns["TOTAL"], ns["COUNTERS"], ns["BALANCES"]


class Worker:
    def __init__(self, spawn, domain, wid, tmp_path, faults="", seed=0):
        code = WORKER
        if faults:
            code = f"import os; os.environ['MCS_FAULTS'] = {faults!r}\n" + code
        self.wid = wid
        self.countfile = str(tmp_path / f"count{wid}")
        self.child = spawn(code, domain, str(wid), self.countfile, json.dumps(FAST), str(seed))

    def msg(self, timeout=30):
        m = json.loads(self.child.readline(timeout))
        assert "violation" not in m, m
        return m

    def ready(self):
        m = self.msg()
        assert "ready" in m, m
        return m

    def ask(self, cmd):
        self.child.send(cmd)
        return self.msg()

    def seen(self):
        """Transfers this worker saw commit (what it wrote after each commit)."""
        try:
            with open(self.countfile, "rb") as f:
                raw = f.read(8)
        except FileNotFoundError:
            return 0
        return struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0


def check_counters(counters, dead, stopped):
    """Exactly once: a dead worker's shared counter is what it saw commit, or one more (the
    transfer in flight when it died committed, unseen); a stopped one's is exactly it."""
    for w in dead:
        seen = w.seen()
        assert counters[w.wid] in (seen, seen + 1), (w.wid, counters[w.wid], seen)
    for w, n in stopped:
        assert counters[w.wid] == n, (w.wid, counters[w.wid], n)


# -- the bank under kill -9 ------------------------------------------------------------------

CRASH_POINTS = ["tx.logged", "tx.committed", "tx.released", "tx.rollback"]


@pytest.mark.slow
def test_bank_survives_kills_at_random_and_at_crash_points(domain, spawn, tmp_path, seed):
    rng = random.Random(seed)
    wids = iter(range(64))
    live = []
    for _ in range(4):
        w = Worker(spawn, domain, next(wids), tmp_path, seed=rng.randrange(1 << 30))
        w.ready()
        live.append(w)
    originals = list(live)
    dead = []
    for round_ in range(10):
        time.sleep(rng.uniform(0.2, 0.5))
        if round_ % 2 == 0:
            # kill -9 the oldest member: that is the master (the oldest member leads)
            victim = live.pop(0)
            assert victim.child.kill() == -signal.SIGKILL
        else:
            # a worker that dies by itself at a crash point inside log/commit/rollback
            point = CRASH_POINTS[(round_ // 2) % len(CRASH_POINTS)]
            victim = Worker(spawn, domain, next(wids), tmp_path,
                            faults=f"{point}=kill@{rng.randrange(2, 40)}",
                            seed=rng.randrange(1 << 30))
            victim.ready()
            if point == "tx.rollback":  # reached only when a transaction rolls back
                victim.child.send("audit")
            status = victim.child.wait(60)
            assert status == -signal.SIGKILL, (point, status, victim.child.stderr())
        dead.append(victim)
        fresh = Worker(spawn, domain, next(wids), tmp_path, seed=rng.randrange(1 << 30))
        fresh.ready()
        live.append(fresh)
    assert not any(w in live for w in originals)  # every original member, the master included
    report = live[0].ask("audit")
    assert report["total"] == TOTAL, report
    stopped = []
    for w in live[:-1]:
        m = w.ask("stop")
        assert m["total"] == TOTAL and m["counter"] == m["stopped"], m
        stopped.append((w, m["stopped"]))
        assert w.child.wait() == 0
    last = live[-1]
    final = last.ask("audit")
    assert final["total"] == TOTAL
    assert final["outcome"] == "ADOPTED", final  # the master it became adopted the area
    check_counters(final["counters"], dead, stopped)
    assert sum(final["counters"]) > 0
    m = last.ask("stop")
    assert m["counter"] == m["stopped"] and m["total"] == TOTAL
    assert last.child.wait() == 0


def test_data_survives_every_original_member_killed_one_by_one(domain, spawn, tmp_path):
    first = [Worker(spawn, domain, i, tmp_path, seed=i) for i in range(3)]
    first[0].ready()
    for w in first[1:]:
        w.ready()
    wid = 3
    live = list(first)
    dead = []
    for victim in first:  # the oldest first: each kill is the master's
        time.sleep(0.2)
        joined = Worker(spawn, domain, wid, tmp_path, seed=wid)
        wid += 1
        joined.ready()
        live.append(joined)
        live.remove(victim)
        assert victim.child.kill() == -signal.SIGKILL
        dead.append(victim)
    report = live[0].ask("audit")
    assert report["total"] == TOTAL
    assert sum(report["counters"][w.wid] for w in dead) > 0  # their work is still there
    check_counters(report["counters"], dead, [])
    masters = [w.ask("audit") for w in live]
    assert sum(m["master"] for m in masters) == 1
    assert [m["outcome"] for m in masters if m["master"]] == ["ADOPTED"]


# -- adoption --------------------------------------------------------------------------------

def test_master_area_created_then_adopted_by_the_next_master(domain):
    a = Bank(domain, **FAST).start()
    try:
        assert a.stats.master_area is MasterAreaOutcome.CREATED and a.fresh_seen == [True]
        b = Bank(domain, **FAST).start()
        try:
            assert a.run_transaction(lambda tx: b.slot) == b.slot
            assert b.transfer(0, 1, 100, 7) == 100
            assert a.fresh_seen[-1] is False  # the join's master phase kept the area
            record = rec.ComponentRecord.read(a._root)
            assert record.master_intact and record.master_version == 1
            assert record.master_size == Bank.master_area_size
        finally:
            pass
    finally:
        a.stop()  # the master leaves: b becomes master and adopts
    try:
        b.run(lambda: None)
        assert b.is_master
        assert b.stats.master_area is MasterAreaOutcome.ADOPTED and b.fresh_seen == [False]
        assert (b.balance(0), b.balance(1)) == (900, 1100)
        assert b.audit()[0] == TOTAL and b.audit()[1][7] == 1
    finally:
        b.stop()


def test_poisoned_area_is_rebuilt_and_says_so(domain):
    from mcs.poison import poison

    with Bank(domain, **FAST) as a, Bank(domain, **FAST) as b:
        b.transfer(0, 1, 100, 3)
        poison(domain, "bank")
        deadline = time.monotonic() + 10
        while len(a.stats.master_area_history) < 2:
            assert time.monotonic() < deadline, a.stats
            a.run(lambda: None)
            time.sleep(0.01)
        assert [o for _, o in a.stats.master_area_history] == [
            MasterAreaOutcome.CREATED, MasterAreaOutcome.REBUILT_AFTER_POISON]
        assert a.fresh_seen.count(True) == 2  # on_master was told to initialise, twice
        total, counters = b.audit()
        assert total == TOTAL and counters[3] == 0  # rebuilt: the transfer is lost, and said so


def test_torn_descriptor_is_rebuilt_as_invalid(domain):
    a = Bank(domain, **FAST).start()
    b = Bank(domain, **FAST).start()
    try:
        b.transfer(2, 3, 5, 1)
        a._root.store64(rec.C_MASTER_VERSION, 99)  # the checksum no longer matches
        assert not rec.master_descriptor(a._root).intact
    finally:
        a.stop()
    try:
        b.run(lambda: None)
        assert b.stats.master_area is MasterAreaOutcome.REBUILT_INVALID
        assert b.fresh_seen == [True] and b.audit()[1][1] == 0
        assert rec.master_descriptor(b._root).intact  # republished
    finally:
        b.stop()


def test_other_layout_version_is_not_adopted(domain):
    class BankV2(Bank):
        master_area_version = 2

    a = Bank(domain, **FAST).start()
    b = BankV2(domain, **FAST).start()
    try:
        a.stop()
        b.run(lambda: None)
        assert b.stats.master_area is MasterAreaOutcome.REBUILT_INVALID
        assert rec.ComponentRecord.read(b._root).master_version == 2
    finally:
        a.stop()
        b.stop()


# -- exactly once, rollback, conflicts ---------------------------------------------------------

def test_committed_transaction_is_not_rerun_after_a_recovery_request(domain):
    with Bank(domain, **FAST) as bank:
        calls = []

        def body(tx):
            calls.append(1)
            tx.add64(BALANCES, 1)
            bank.request_recovery("during the transaction")  # nothing in it waits: it commits
            return len(calls)

        before = bank.balance(0)
        assert bank.run_transaction(body) == 1
        assert calls == [1] and bank.balance(0) == before + 1
        # ...whereas a plain block that finished is run again (at least once)
        plain = []

        def block():
            plain.append(1)
            if len(plain) == 1:
                bank.request_recovery("during the plain block")
        bank.run(block)
        assert len(plain) == 2


def test_interrupted_transaction_is_rolled_back_then_retried(domain):
    with Bank(domain, **FAST) as bank:
        calls = []

        def body(tx):
            calls.append(1)
            tx.lock(bank.mutex(0))
            tx.add64(BALANCES, 10)
            if len(calls) == 1:
                bank.request_recovery("interrupt")
                tx.lock(bank.mutex(1))  # sees the request: Recovering, rolled back
            return bank.balance(0)

        before = bank.balance(0)
        assert bank.run_transaction(body) == before + 10
        assert len(calls) == 2 and bank.balance(0) == before + 10
        assert bank.stats.tx_aborts == 1


def test_exception_rolls_back_and_propagates(domain):
    with Bank(domain, **FAST) as bank:
        before = [bank.balance(i) for i in range(4)]
        with pytest.raises(ValueError):
            bank.transfer(0, 1, 50, 0, fail=True)
        with pytest.raises(ValueError):
            with bank.transaction() as tx:
                tx.write(BALANCES + 16, b"\xff" * 16)
                raise ValueError("no")
        assert [bank.balance(i) for i in range(4)] == before
        with pytest.raises(mcs.errors.NoTransactionError):
            bank.tx
        with bank.transaction() as tx:  # nested blocks join the outer transaction
            tx.store64(BALANCES, before[0] - 1)
            with bank.transaction() as inner:
                assert inner is tx
                inner.store64(BALANCES + 8, before[1] + 1)
        assert bank.audit()[0] == TOTAL


def test_opposite_lock_orders_conflict_and_both_commit(domain):
    with Bank(domain, **FAST) as bank:
        e1, e2 = threading.Event(), threading.Event()
        results = []

        def t1(tx):
            tx.lock(bank.mutex(0))
            e1.set()
            e2.wait(5)
            tx.lock(bank.mutex(1))
            tx.add64(BALANCES, -1)
            tx.add64(BALANCES + 8, 1)

        def t2(tx):
            e1.wait(5)
            tx.lock(bank.mutex(1))
            e2.set()
            tx.lock(bank.mutex(0))
            tx.add64(BALANCES + 8, -1)
            tx.add64(BALANCES, 1)

        threads = [threading.Thread(target=lambda f=f: results.append(bank.run_transaction(f)))
                   for f in (t1, t2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(results) == 2 and bank.stats.tx_conflicts >= 1
        assert bank.audit()[0] == TOTAL


def test_abandoned_mutex_is_repaired_from_the_dead_owners_log(domain, spawn, tmp_path):
    with Bank(domain, **FAST) as bank:
        before = [bank.balance(i) for i in range(16)]
        # The victim dies in its first transfer, after logging its second write (the first is
        # done): a half-transfer, under two mutexes it holds
        victim = Worker(spawn, domain, 9, tmp_path, faults="tx.logged=kill@2", seed=1)
        victim.ready()
        assert victim.child.wait(30) == -signal.SIGKILL
        total, counters = bank.audit()  # locks every account: ABANDONED ones are repaired
        assert total == TOTAL and counters[9] == victim.seen()
        st = bank.stats
        assert st.tx_repaired + st.tx_rolled_back >= 1, st
        assert victim.seen() == 0 and counters[9] == 0
        assert [bank.balance(i) for i in range(16)] == before  # its half-transfer is undone


# -- the lock-free block protocol ----------------------------------------------------------------

def test_no_block_is_open_while_a_recovery_runs(domain):
    """Threads enter and leave blocks without a lock while recoveries come and go: the
    recovery's hooks must never see a block of this process open."""
    seen_open = []

    class Probe(Bank):
        name = "probe"

        def on_master(self, view):
            seen_open.append(self._active_blocks())
            super().on_master(view)

        def build_shared_state(self, view):
            seen_open.append(self._active_blocks())

    with Probe(domain, **FAST) as probe:
        stop = threading.Event()
        inside = [0]

        def worker():
            while not stop.is_set():
                try:
                    with probe.consistent():
                        inside[0] += 1
                        with probe.consistent():  # nested
                            pass
                except mcs.Recovering:
                    pass

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for i in range(20):
            probe.request_recovery(f"probe {i}")
            probe.run(lambda: None)
        stop.set()
        for t in threads:
            t.join()
        assert probe.stats.recoveries >= 10 and inside[0] > 0
        assert probe._active_blocks() == 0
        assert seen_open and not any(seen_open), seen_open
