"""SharedDict: item operations and errors, ints, transactions, ephemerals, snapshots, fork
misuse, and real processes killed (kill -9) in the middle of writes and transactions."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

import mcs
from mcs.errors import (ClosedError, DictFullError, ForkedHandleError, ItemTooLargeError,
                        McsError, TransactionConflict)
from conftest import wait_for

FAST = dict(heartbeat=0.005, suspect_after=0.05, evict_after=0.3)

# A child member: joins the dict and runs `body` (code appended below), talking by lines.
CHILD = """
import os, sys, time, random
import mcs
from mcs import _dict
from mcs.errors import TransactionConflict
d = mcs.SharedDict(sys.argv[1], capacity=4096, max_key=32, max_value=512,
                   heartbeat=0.005, suspect_after=0.05, evict_after=0.3)
d.start()
print("ready", flush=True)
"""


def child(spawn, domain, body, *args):
    c = spawn(CHILD + body, domain, *args)
    c.expect("ready", timeout=30)
    return c


@pytest.fixture
def d(domain):
    with mcs.SharedDict(domain, capacity=4096, max_key=32, max_value=512, **FAST) as sd:
        yield sd


def test_item_operations(d):
    assert len(d) == 0 and "a" not in d and d.get("a") is None and d.get("a", 7) == 7
    d["a"] = b"x"
    d[b"a"] = 5  # bytes and str keys are distinct
    assert d["a"] == b"x" and d[b"a"] == 5 and len(d) == 2
    d["a"] = b"longer value"
    assert d["a"] == b"longer value"
    d["a"] = b""
    assert d["a"] == b"" and "a" in d
    del d["a"]
    assert "a" not in d and len(d) == 1
    with pytest.raises(KeyError):
        d["a"]
    with pytest.raises(KeyError):
        del d["a"]
    assert d.pop("a", "none") == "none" and d.pop(b"a") is True
    d["ü-key"] = -(1 << 63)
    assert d["ü-key"] == -(1 << 63)
    assert d.incr("n") == 1 and d.incr("n", 41) == 42 and d.incr("n", -50) == -8
    assert d["n"] == -8 and isinstance(d["n"], int)
    d["b"] = b"bytes"
    with pytest.raises(TypeError):
        d.incr("b")
    assert d["b"] == b"bytes"
    d["big"] = (1 << 63) - 1
    with pytest.raises(OverflowError):
        d.incr("big")
    assert d["big"] == (1 << 63) - 1
    with pytest.raises(TypeError):
        d[1] = b"x"
    with pytest.raises(TypeError):
        d["x"] = "str value"
    with pytest.raises(TypeError):
        d["x"] = 1.5
    assert "x" not in d
    assert sorted(d.keys()) == sorted(["ü-key", "n", "b", "big"])


def test_too_large_items_are_refused_whole(d):
    with pytest.raises(ItemTooLargeError) as err:
        d["k" * 33] = b"v"
    assert isinstance(err.value, ValueError) and isinstance(err.value, McsError)
    assert len(d) == 0
    d["k"] = b"old"
    with pytest.raises(ItemTooLargeError):
        d["k"] = b"v" * 513
    assert d["k"] == b"old"
    with pytest.raises(ItemTooLargeError):
        d["k"] = 1 << 64
    assert d["k"] == b"old"
    d["k" * 32] = b"v" * 512  # the limits themselves fit
    assert d["k" * 32] == b"v" * 512


def test_full_dict_error_and_nothing_half_written(domain):
    with mcs.SharedDict(domain, capacity=64, max_key=16, max_value=16, stripes=16,
                        **FAST) as d:
        written = []
        with pytest.raises(DictFullError):
            for i in range(10_000):
                d[f"k{i}"] = str(i).encode()
                written.append(i)
        failed = f"k{len(written)}"
        assert failed not in d
        assert len(d) == len(written) >= 64
        assert all(d[f"k{i}"] == str(i).encode() for i in written)
        # updates of existing keys still work; a delete makes room again
        d["k0"] = b"new"
        del d["k1"]
        d["k1"] = b"again"
        assert d["k0"] == b"new" and d["k1"] == b"again"


def test_transactions_are_all_or_nothing(d):
    d["a"], d["b"] = 100, 0
    with d.transaction() as tx:
        tx["a"] = tx["a"] - 30
        tx.incr("b", 30)
        assert tx["b"] == 30 and "b" in tx and tx.get("zz", 1) == 1
        tx["new"] = b"n"
        del tx["new"]
    assert (d["a"], d["b"], "new" in d) == (70, 30, False)
    with pytest.raises(RuntimeError):
        with d.transaction() as tx:
            tx["a"] = 0
            tx["c"] = b"c"
            del tx["b"]
            raise RuntimeError("abort")
    assert (d["a"], d["b"], "c" in d) == (70, 30, False)
    with pytest.raises(ClosedError):
        tx["a"] = 1  # the transaction is over
    assert d.transact(lambda tx, n: tx.incr("a", n), 5) == 75


def test_transaction_conflict_rolls_back_and_transact_retries(d):
    """Two transactions that lock the same two stripes in opposite orders never deadlock."""
    import threading
    keys = ["p", "q"]
    d["p"] = d["q"] = 0
    errors = []

    def worker(order, n):
        try:
            for _ in range(n):
                def body(tx):
                    tx.incr(order[0])
                    time.sleep(0.0005)
                    tx.incr(order[1])
                d.transact(body)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(keys, 100)),
               threading.Thread(target=worker, args=(keys[::-1], 100))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert d["p"] == d["q"] == 200
    # a single conflict shows as TransactionConflict, with the first write undone
    d["p"] = 0
    with d.transaction() as holder:
        holder["q"] = 1
        import threading as th
        out = []

        def other():
            try:
                with d.transaction(wait=0.01) as tx:
                    tx["p"] = 99
                    tx["q"] = 99  # held by `holder`
            except TransactionConflict:
                out.append("conflict")

        t = th.Thread(target=other)
        t.start()
        t.join(10)
        assert out == ["conflict"]
    assert d["p"] == 0 and d["q"] == 1


def test_snapshot_iteration_is_consistent(d, spawn, domain):
    for i in range(50):
        d[f"acct{i}"] = 100
    mover = child(spawn, domain, """
rng = random.Random(1)
while True:
    a, b = rng.sample(range(50), 2)
    def body(tx):
        tx.incr(f"acct{a}", -7)
        tx.incr(f"acct{b}", 7)
    d.transact(body)
""")
    for _ in range(30):
        items = d.items()
        assert sum(v for k, v in items) == 5000
        assert sorted(k for k, v in items) == sorted(d.keys()) == sorted(iter(d))
    mover.kill()
    assert sum(d.values()) == 5000


def test_handle_used_after_fork_raises(d, spawn, domain):
    c = child(spawn, domain, """
d["x"] = b"1"
pid = os.fork()
if pid == 0:
    try:
        d["x"]
        print("no error", flush=True)
    except Exception as exc:
        print(type(exc).__name__, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", d["x"].decode(), flush=True)
d.stop()
""")
    c.expect(ForkedHandleError.__name__)
    c.expect("parent 1")
    assert c.wait() == 0


def test_ephemerals_of_a_killed_process_are_removed(d, spawn, domain):
    body = """
me = sys.argv[2]
d.set(me + "-eph", b"alive", ephemeral=True)
d.set(me + "-keep", b"kept")
d.set("shared", me.encode(), ephemeral=True)
print("set", flush=True)
time.sleep(600)
"""
    a = child(spawn, domain, body, "a")
    a.expect("set")
    b = child(spawn, domain, body, "b")
    b.expect("set")
    d.set("mine", b"m", ephemeral=True)
    assert d["a-eph"] == b"alive" and d["shared"] == b"b"
    a.kill()
    assert wait_for(lambda: "a-eph" not in d, 10)
    assert d["a-keep"] == b"kept" and d["b-eph"] == b"alive" and d["mine"] == b"m"
    assert d["shared"] == b"b"  # b set it last: it is b's, not a's
    b.proc.stdin.close()
    b.kill()
    assert wait_for(lambda: "b-eph" not in d and "shared" not in d, 10)
    assert d["mine"] == b"m" and d["b-keep"] == b"kept"
    assert d.dict_stats.ephemerals_removed >= 3


def test_ephemerals_go_when_their_process_leaves(d, spawn, domain):
    c = child(spawn, domain, """
d.set("leaver", b"x", ephemeral=True)
d.stop()
print("left", flush=True)
""")
    c.expect("left")
    assert "leaver" not in d


@pytest.mark.parametrize("point", ["put.recorded", "put.half", "write.committed",
                                   "del.recorded"])
@pytest.mark.parametrize("existing", [True, False])
def test_writer_killed_mid_write_leaves_old_or_new(d, spawn, domain, point, existing):
    old, new = b"o" * 300, b"n" * 200
    if existing:
        d["k"] = old
    c = child(spawn, domain, """
_dict.arm_crash(sys.argv[2])
if sys.argv[2] == "del.recorded":
    d.pop("k")
else:
    d["k"] = b"n" * 200
print("survived", flush=True)
""", point)
    status = c.wait()
    assert status == (0 if point == "del.recorded" and not existing else -signal.SIGKILL)
    value = d.get("k")  # the stripe is ABANDONED: this read rolls the dead writer back
    if point == "write.committed":
        assert value == (None if point == "del.recorded" else new)
    elif existing:
        assert value == old
    else:
        assert value is None
    assert len(d) == (1 if value is not None else 0)
    d["k"] = b"after"  # the stripe works on
    assert d["k"] == b"after"


def test_reader_never_sees_a_half_written_value(d, spawn, domain, seed):
    writer = child(spawn, domain, """
rng = random.Random(int(sys.argv[2]))
while True:
    n = rng.randrange(0, 513)
    d[f"v{rng.randrange(8)}"] = bytes([n % 251]) * n
""", str(seed))
    rng = random.Random(seed)
    deadline = time.monotonic() + 1.0
    seen = 0
    kill_at = time.monotonic() + rng.uniform(0.2, 0.8)
    while time.monotonic() < deadline:
        if writer.proc.poll() is None and time.monotonic() > kill_at:
            writer.kill()
        for i in range(8):
            v = d.get(f"v{i}")
            if v is not None:
                assert v == bytes([len(v) % 251]) * len(v)
                seen += 1
    writer.kill()
    assert seen > 0
    for i in range(8):
        v = d.get(f"v{i}")
        assert v is None or v == bytes([len(v) % 251]) * len(v)


WORKER = """
me = sys.argv[2]
rng = random.Random(int(sys.argv[3]))
if rng.random() < 0.5:
    _dict.arm_crash(rng.choice(list(_dict.CRASH_POINTS)), rng.randrange(1, 300))
done = 0
while True:
    a, b = rng.sample(range(5), 2)
    def body(tx):
        tx.incr("counter")
        tx.incr(f"done-{me}")
        tx.incr(f"acct{a}", -3)
        tx.incr(f"acct{b}", 3)
    d.transact(body)
    done += 1
    print(done, flush=True)
"""


def test_concurrent_transactions_with_kills_apply_each_commit_once(d, spawn, domain, seed):
    rng = random.Random(seed)
    for i in range(5):
        d[f"acct{i}"] = 1000
    workers = {}
    printed = {}
    for w in range(4):
        workers[w] = child(spawn, domain, WORKER, str(w), str(rng.randrange(1 << 30)))
    deadline = time.monotonic() + 4.0
    kills = 0
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.05, 0.3))
        w = rng.randrange(4)
        workers[w].kill()
        kills += 1
        workers[w] = child(spawn, domain, WORKER, str(w), str(rng.randrange(1 << 30)))
    for c in workers.values():
        c.kill()
    # The survivors' view: every committed transaction counted exactly once, money conserved.
    done = {w: d.get(f"done-{w}", 0) for w in range(4)}
    assert d.get("counter", 0) == sum(done.values())
    assert sum(d[f"acct{i}"] for i in range(5)) == 5000
    assert kills > 0 and d["counter"] > 0


def test_data_survives_members_killed_one_by_one(d, spawn, domain):
    kids = []
    for i in range(3):
        c = child(spawn, domain, """
me = sys.argv[2]
for j in range(100):
    d[f"{me}-{j}"] = f"{me}:{j}".encode()
print("wrote", flush=True)
time.sleep(600)
""", str(i))
        c.expect("wrote")
        kids.append(c)
    for c in kids:
        c.kill()
        assert wait_for(lambda: d.dict_stats.departed >= kids.index(c) + 1, 10)
        assert all(d[f"{i}-{j}"] == f"{i}:{j}".encode() for i in range(3) for j in range(100))
    assert len(d) == 300


def test_data_survives_the_master_killed(spawn, domain):
    master = spawn(CHILD + """
for j in range(100):
    d[f"m-{j}"] = j
print("wrote", flush=True)
time.sleep(600)
""", domain)
    master.expect("ready", timeout=30)
    master.expect("wrote")
    with mcs.SharedDict(domain, capacity=4096, max_key=32, max_value=512, **FAST) as d:
        assert d["m-5"] == 5
        master.kill()
        assert wait_for(lambda: d.is_master, 10)
        assert all(d.get(f"m-{j}") == j for j in range(100))


def test_not_started_and_stopped_handles_raise(domain):
    d = mcs.SharedDict(domain, capacity=100, **FAST)
    with pytest.raises(ClosedError):
        d["a"]
    assert mcs.SharedDict is type(d)
