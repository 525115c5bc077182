"""Shared state: ``mcs.SharedDict`` against the stores a Python programmer would reach for to share
a dict between processes on one host, side by side in one run, reported as ratios.

Peers (each skipped, with the reason, when it is not installed): py-lmdb on /dev/shm (its
crash-safe defaults; gets in a read transaction per operation AND in one long-lived read
transaction per round, puts in one write transaction each), Redis through redis-py on a unix
socket (a redis-server this file starts on a private socket in a temp directory, without
persistence, and stops), diskcache on /dev/shm, and ``multiprocessing.Manager().dict()``. Every
store holds the same 10 k keys of 16 bytes with 64-byte values (bench/state_baselines.py).

Groups: ``state-get``, ``state-put`` (one process), ``state-put-2proc`` (two writer processes,
disjoint keys, a fixed number of puts each: the aggregate puts/s over the union of their
intervals), ``state-transaction`` (two keys written atomically; SharedDict's plain put measured in
the same group as the reference), ``state-incr``, and ``state-recovery`` (kill -9 of a non-master
member in the middle of its writes and transactions -> this surviving master is stable again and
answers, with 1 k, 100 k and 1 M keys in the dict).

Measurements, not speed tests: nothing fails because it is slow. Each row asserts what it did
happened (values read back, the counters sum to the increments made, the transaction's two keys
both written, the victim died of SIGKILL, its ephemeral keys are gone after the recovery). Every
ratio and every target's verdict (``targets`` in the SharedDict row's ``extra_info``) is computed
from this run's numbers; bench/report.py renders them ("Shared state").
Run with ``./dev bench bench/test_state.py`` (about a minute); see bench/README.md.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import mcs
from conftest import new_domain as named_domain, remove_bootstrap

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import state_baselines as sb  # noqa: E402

ROUND_S = 0.04  # calibrated length of one benchmark round
ROUNDS = 7
MIN_OPS, MAX_OPS = 200, sb.KEYS
WRITER_OPS = 20_000  # puts per writer process per round (state-put-2proc)
WRITER_ROUNDS = 3
RECOVERY_SIZES = [1_000, 100_000, 1_000_000]
RECOVERY_KILLS = int(os.environ.get("MCS_BENCH_STATE_KILLS", "9"))
COUNTERS = 1000  # distinct keys of the incr rows

# The targets of issue 11, as (ratio name, "at_least" or "at_most", threshold).
TARGET_GET = 1.0  # get >= 1.0 x LMDB
TARGET_PUT = 1.0  # put >= 1.0 x LMDB, one process
TARGET_PUT_2PROC = 1.6  # aggregate of two writer processes >= 1.6 x LMDB's
TARGET_TX = 2.0  # a two-key transaction takes <= 2 x a put
TARGET_RECOVERY = 1.5  # kill -> stable with 1 M keys <= 1.5 x with 1 k keys

def new_domain() -> str:
    return named_domain("bs")


def has_sharedict() -> bool:
    return hasattr(mcs, "SharedDict")


NO_SHAREDICT = "mcs.SharedDict is not in this build of mcs (issue 11)"


# -- the stores, opened once for the module -------------------------------------------------------


STORES = ["sharedict", "lmdb", "redis", "diskcache", "manager"]


class Stores:
    """Every store opened once with the same 10 k keys and values (all at once, before the
    first benchmark: the leak check of each benchmark then sees the Redis server and the
    Manager's process as older than it), closed at the end."""

    def __init__(self) -> None:
        self._open: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []
        self.info: dict[str, Any] = {}
        try:
            for name in STORES:
                self._open[name] = getattr(self, f"_open_{name}")()
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> Any:
        store = self._open[name]
        if isinstance(store, str):  # the reason it could not be opened
            pytest.skip(store)
        return store

    def close(self) -> None:
        for close in reversed(self._closers):
            close()

    def _open_sharedict(self) -> Any:
        if not has_sharedict():
            return NO_SHAREDICT
        domain = new_domain()
        spec = {"domain": domain, "capacity": 4 * sb.KEYS + 4 * COUNTERS,
                "max_key": sb.KEY_BYTES, "max_value": sb.VALUE_BYTES}
        d = sb.open_sharedict(spec)
        self._closers.append(lambda: (d.stop(), remove_bootstrap(domain)))
        for i in range(sb.KEYS):
            d[sb.key(i)] = sb.value(i)
        self.info["sharedict_spec"] = spec
        return d

    def _open_lmdb(self) -> Any:
        try:
            import lmdb
        except ImportError:
            return "py-lmdb is not installed (./dev bench installs the [bench] extra)"
        path = sb.shm_tempdir("mcs-bench-lmdb-")
        env = sb.open_lmdb(path)
        self._closers.append(lambda: (env.close(), sb.shutil.rmtree(path, True)))
        with env.begin(write=True) as txn:
            for i in range(sb.KEYS):
                txn.put(sb.key(i), sb.value(i))
        self.info["lmdb"] = (f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}, "
                             "sync and metasync off (its fastest safe setting on a tmpfs), on /dev/shm")
        self.info["lmdb_path"] = path
        return env

    def _open_redis(self) -> Any:
        try:
            import redis  # noqa: F401
        except ImportError:
            return "redis-py is not installed (./dev bench installs the [bench] extra)"
        try:
            server = sb.RedisServer()
        except FileNotFoundError as exc:
            return str(exc)
        client = sb.open_redis(server.sock)
        self._closers.append(lambda: (client.close(), server.close()))
        pipe = client.pipeline(transaction=False)
        for i in range(sb.KEYS):
            pipe.set(sb.key(i), sb.value(i))
        pipe.execute()
        self.info["redis"] = f"redis-server {server.version}, unix socket, no persistence"
        self.info["redis_sock"] = server.sock
        return client

    def _open_diskcache(self) -> Any:
        try:
            import diskcache
        except ImportError:
            return "diskcache is not installed (./dev bench installs the [bench] extra)"
        path = sb.shm_tempdir("mcs-bench-diskcache-")
        cache = sb.open_diskcache(path)
        self._closers.append(lambda: (cache.close(), sb.shutil.rmtree(path, True)))
        for i in range(sb.KEYS):
            cache.set(sb.key(i), sb.value(i))
        self.info["diskcache"] = f"diskcache {diskcache.__version__}"
        self.info["diskcache_path"] = path
        return cache

    def _open_manager(self) -> Any:
        manager = multiprocessing.get_context("spawn").Manager()
        self._closers.append(manager.shutdown)
        d = manager.dict()
        d.update({sb.key(i): sb.value(i) for i in range(sb.KEYS)})
        return d, manager.Lock()


@pytest.fixture(scope="module")
def stores() -> Iterator[Stores]:
    s = Stores()
    try:
        yield s
    finally:
        s.close()


# -- side-by-side bookkeeping ---------------------------------------------------------------------

#: group -> row -> that row's extra_info (the dict pytest-benchmark writes at the end of the run:
#: a row measured later completes the ratios of the rows measured before it)
_ROWS: dict[str, dict[str, dict[str, Any]]] = {}
MCS_ROW = {"state-get": "sharedict", "state-put": "sharedict", "state-put-2proc": "sharedict",
           "state-transaction": "sharedict-transaction", "state-incr": "sharedict"}


def _target(ratio: float | None, kind: str, threshold: float, what: str) -> dict[str, Any]:
    met = None if ratio is None else (ratio >= threshold if kind == "at_least"
                                      else ratio <= threshold)
    return {"ratio": None if ratio is None else round(ratio, 3), kind: threshold, "met": met,
            "what": what}


def _ops(group: str, row: str) -> float | None:
    return _ROWS.get(group, {}).get(row, {}).get("ops_per_s")


def cross(group: str) -> None:
    """(Re)compute the group's ratios and the SharedDict row's targets from what is measured."""
    rows = _ROWS.get(group, {})
    mine = MCS_ROW.get(group)
    m = _ops(group, mine) if mine else None
    for name, info in rows.items():
        if name == mine or m is None or not info.get("ops_per_s"):
            continue
        info["sharedict_ratio"] = round(m / info["ops_per_s"], 3)  # SharedDict ops/s / this row's
    if m is None:
        return
    info = rows[mine]
    info["ratio_vs"] = {n: round(m / e["ops_per_s"], 3) for n, e in rows.items()
                        if n != mine and e.get("ops_per_s")}
    ratio = lambda row: (m / _ops(group, row)) if _ops(group, row) else None  # noqa: E731
    targets = {}
    if group == "state-get":
        targets["get >= 1.0x LMDB (read txn per get)"] = _target(
            ratio("lmdb-txn-per-op"), "at_least", TARGET_GET, "get ops/s / LMDB's")
        targets["get >= 1.0x LMDB (one long read txn)"] = _target(
            ratio("lmdb-long-read-txn"), "at_least", TARGET_GET, "get ops/s / LMDB's")
    elif group == "state-put":
        targets["put >= 1.0x LMDB, one process"] = _target(
            ratio("lmdb"), "at_least", TARGET_PUT, "put ops/s / LMDB's")
    elif group == "state-put-2proc":
        targets["put >= 1.6x LMDB's aggregate, two writer processes"] = _target(
            ratio("lmdb"), "at_least", TARGET_PUT_2PROC, "aggregate put ops/s / LMDB's")
    elif group == "state-transaction":
        put = _ops(group, "sharedict-put")
        targets["two-key transaction <= 2x a put"] = _target(
            put / m if put else None, "at_most", TARGET_TX,
            "time of a two-key transaction / time of a put (SharedDict, same run)")
    if targets:
        info["targets"] = targets


def record(report: Callable[..., None], benchmark, group: str, row: str,
           **info: Any) -> None:
    report(row=row, **info)
    _ROWS.setdefault(group, {})[row] = benchmark.extra_info
    cross(group)


# -- one-process loops: each store's idiomatic code, bound methods in locals ---------------------


def loops(stores: Stores, group: str, row: str,
          distinct: list[bytes]) -> tuple[Callable[[list], None], Callable[[], None]]:
    """(loop over a list of keys, a check run after the benchmark) of one row; ``distinct``:
    the row's distinct keys (the counters of an incr row)."""
    impl = row.split("-")[0]
    store = stores[impl]
    val = sb.value(7)

    if group == "state-get":
        want = {k: v for k, v in ((sb.key(i), sb.value(i)) for i in (0, 1, sb.KEYS - 1))}
        if impl == "sharedict":
            def loop(keys):
                get = store.get
                for k in keys:
                    get(k)

            def check():
                for k, v in want.items():
                    assert bytes(store.get(k)) == v
        elif row == "lmdb-txn-per-op":
            def loop(keys):
                begin = store.begin
                for k in keys:
                    with begin() as txn:
                        txn.get(k)

            def check():
                with store.begin() as txn:
                    assert all(txn.get(k) == v for k, v in want.items())
        elif row == "lmdb-long-read-txn":
            def loop(keys):
                with store.begin() as txn:
                    get = txn.get
                    for k in keys:
                        get(k)

            def check():
                with store.begin() as txn:
                    assert all(txn.get(k) == v for k, v in want.items())
        elif impl == "manager":
            d, _ = store

            def loop(keys):
                get = d.get
                for k in keys:
                    get(k)

            def check():
                assert all(d.get(k) == v for k, v in want.items())
        else:  # redis, diskcache
            def loop(keys):
                get = store.get
                for k in keys:
                    get(k)

            def check():
                assert all(store.get(k) == v for k, v in want.items())
        return loop, check

    if group == "state-put" or row == "sharedict-put":
        if impl == "lmdb":
            def loop(keys):
                begin = store.begin
                for k in keys:
                    with begin(write=True) as txn:
                        txn.put(k, val)

            def read(k):
                with store.begin() as txn:
                    return txn.get(k)
        elif impl == "manager":
            d, _ = store

            def loop(keys):
                put = d.__setitem__
                for k in keys:
                    put(k, val)

            read = d.get
        else:
            put = store.__setitem__ if impl == "sharedict" else store.set

            def loop(keys):
                for k in keys:
                    put(k, val)

            read = store.get

        def check():
            assert bytes(read(distinct[0])) == val
        return loop, check

    if group == "state-transaction":
        va, vb = sb.value(11), sb.value(12)
        if impl == "sharedict":
            def loop(keys):
                transaction = store.transaction
                for a, b in zip(keys, keys[1:] + keys[:1]):
                    with transaction() as tx:
                        tx[a] = va
                        tx[b] = vb
            read = store.get
        elif impl == "lmdb":
            def loop(keys):
                begin = store.begin
                for a, b in zip(keys, keys[1:] + keys[:1]):
                    with begin(write=True) as txn:
                        txn.put(a, va)
                        txn.put(b, vb)

            def read(k):
                with store.begin() as txn:
                    return txn.get(k)
        elif impl == "redis":
            def loop(keys):
                pipeline = store.pipeline
                for a, b in zip(keys, keys[1:] + keys[:1]):
                    pipe = pipeline(transaction=True)  # MULTI ... EXEC: one round trip
                    pipe.set(a, va)
                    pipe.set(b, vb)
                    pipe.execute()
            read = store.get
        elif impl == "diskcache":
            def loop(keys):
                transact, put = store.transact, store.set
                for a, b in zip(keys, keys[1:] + keys[:1]):
                    with transact():
                        put(a, va)
                        put(b, vb)
            read = store.get
        else:  # manager: the dict has no transaction; a manager Lock around the two writes
            d, lock = store

            def loop(keys):
                put = d.__setitem__
                for a, b in zip(keys, keys[1:] + keys[:1]):
                    with lock:
                        put(a, va)
                        put(b, vb)
            read = d.get

        def check():
            # every pair (a, b) wrote b last: the last key of the list was a's partner of the
            # pair before it, so keys[0] was written as b by the last pair (value vb)
            assert bytes(read(distinct[0])) == vb
        return loop, check

    if group == "state-incr":
        made = [0]
        if impl == "sharedict":
            incr = store.incr
            read = store.get
        elif impl == "lmdb":
            def incr(k):
                with store.begin(write=True) as txn:
                    n = sb.unpack_int(txn.get(k)) + 1
                    txn.put(k, sb.pack_int(n))
                    return n

            def read(k):
                with store.begin() as txn:
                    return sb.unpack_int(txn.get(k))
        elif impl == "redis":
            incr = store.incr

            def read(k):
                return int(store.get(k) or 0)
        elif impl == "diskcache":
            incr = store.incr
            read = store.get
        else:  # manager: read-modify-write under a manager Lock
            d, lock = store

            def incr(k):
                with lock:
                    n = d.get(k, 0) + 1
                    d[k] = n
                    return n
            read = d.get

        def loop(keys):
            for k in keys:
                incr(k)
            made[0] += len(keys)

        def check():
            total = sum(int(read(k) or 0) for k in distinct)
            assert total == made[0], f"counters sum to {total}, {made[0]} increments were made"
        return loop, check
    raise AssertionError(group)


SHUFFLED = sb.shuffled_keys()


def keys_for(group: str, row: str) -> list[bytes]:
    """The distinct keys of a row, in the order its loop visits them: the 10 k present keys in
    a seeded random order, or (incr) COUNTERS fresh counters of this row's own."""
    if group == "state-incr":
        return [b"c%-7s%08d" % (row.encode()[:7], i) for i in range(COUNTERS)]
    return SHUFFLED


def calibrate(loop: Callable[[list], None], keys: list[bytes]) -> int:
    """How many operations make a round of about ROUND_S (MIN_OPS..MAX_OPS)."""
    sample = keys[:MIN_OPS]
    t0 = time.perf_counter()
    loop(sample)
    per_op = max((time.perf_counter() - t0) / len(sample), 1e-9)
    return max(MIN_OPS, min(MAX_OPS, int(ROUND_S / per_op)))


def cycled(keys: list[bytes], n: int) -> list[bytes]:
    return (keys * (n // len(keys) + 1))[:n]


def run_row(benchmark, report, stores: Stores, group: str, row: str, **extra: Any) -> None:
    distinct = keys_for(group, row)
    loop, check = loops(stores, group, row, distinct)
    n = calibrate(loop, distinct)
    benchmark.pedantic(loop, args=(cycled(distinct, n),), rounds=ROUNDS, warmup_rounds=1,
                       iterations=1)
    check()
    info: dict[str, Any] = {"ops_per_round": n, "key_bytes": sb.KEY_BYTES,
                            "value_bytes": sb.VALUE_BYTES, "keys": sb.KEYS, **extra}
    if benchmark.stats is not None:  # None under --benchmark-disable
        st = benchmark.stats.stats
        info.update(ops_per_s=round(n / st.median, 1), ops_per_s_best=round(n / st.min, 1),
                    us_per_op=round(st.median / n * 1e6, 3))
    record(report, benchmark, group, row, **info)


def store_info(stores: Stores, row: str) -> dict[str, Any]:
    impl = row.split("-")[0]
    return {"store": stores.info.get(impl, impl)} if impl in stores.info else {}


GET_ROWS = ["sharedict", "lmdb-txn-per-op", "lmdb-long-read-txn", "redis", "diskcache", "manager"]
PUT_ROWS = ["sharedict", "lmdb", "redis", "diskcache", "manager"]
TX_ROWS = ["sharedict-transaction", "sharedict-put", "lmdb", "redis", "diskcache", "manager"]
INCR_ROWS = ["sharedict", "lmdb", "redis", "diskcache", "manager"]


@pytest.mark.benchmark(group="state-get")
@pytest.mark.parametrize("row", GET_ROWS)
def test_get(benchmark, report, stores, row):
    """Reads of present keys in a seeded random order (the same for every store)."""
    run_row(benchmark, report, stores, "state-get", row, **store_info(stores, row))


@pytest.mark.benchmark(group="state-put")
@pytest.mark.parametrize("row", PUT_ROWS)
def test_put(benchmark, report, stores, row):
    """Overwrites of present keys, one process (LMDB: one write transaction per put)."""
    run_row(benchmark, report, stores, "state-put", row, **store_info(stores, row))


@pytest.mark.benchmark(group="state-transaction")
@pytest.mark.parametrize("row", TX_ROWS)
def test_two_key_transaction(benchmark, report, stores, row):
    """Two keys written atomically (SharedDict ``transaction()``, one LMDB write txn, Redis
    MULTI/EXEC, diskcache ``transact()``, a Manager Lock); ops/s = transactions/s.
    ``sharedict-put`` is one plain put, the reference of the "≤ 2× a put" target."""
    run_row(benchmark, report, stores, "state-transaction", row, **store_info(stores, row))


@pytest.mark.benchmark(group="state-incr")
@pytest.mark.parametrize("row", INCR_ROWS)
def test_incr(benchmark, report, stores, row):
    """Atomic increments over 1000 counters (LMDB: read-modify-write in one write txn; the
    Manager: under a manager Lock). The counters are checked to sum to the increments made."""
    run_row(benchmark, report, stores, "state-incr", row, **store_info(stores, row))


# -- two writer processes -------------------------------------------------------------------------


class Child:
    """A bench/state_baselines.py child: lines in, lines out."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "state_baselines.py"), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self._buf = b""

    def readline(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            data = os.read(fd, 65536) if ready else b""
            if not data:
                self.kill()
                raise AssertionError(f"child {self.pid} said nothing (exit {self.proc.poll()}): "
                                     f"{self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.close()

    def close(self, timeout: float = 20.0) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            s.close()
        return rc


PUT2_ROWS = ["sharedict", "lmdb"]


@pytest.mark.benchmark(group="state-put-2proc")
@pytest.mark.parametrize("row", PUT2_ROWS)
def test_put_two_writer_processes(benchmark, report, stores, row):
    """Two writer processes, disjoint keys, WRITER_OPS puts each per round: aggregate puts/s =
    all puts / (last end - first start), CLOCK_MONOTONIC in both children."""
    store = stores[row]  # skips when the store is missing; the parent holds it open
    writers = 2
    if row == "sharedict":
        spec = {**stores.info["sharedict_spec"], "writers": writers}
    else:
        spec = {"path": stores.info["lmdb_path"], "writers": writers}
    children = [Child("writer", row, json.dumps(spec), str(w)) for w in range(writers)]
    rates: list[float] = []
    try:
        for c in children:
            assert c.readline() == "ready"

        def round_() -> None:
            for c in children:
                c.send(f"go {WRITER_OPS}")
            spans = []
            for c in children:
                word, t0, t1 = c.readline().split()
                assert word == "done"
                spans.append((int(t0), int(t1)))
            wall = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
            rates.append(writers * WRITER_OPS / (wall / 1e9))

        benchmark.pedantic(round_, rounds=WRITER_ROUNDS, warmup_rounds=1, iterations=1)
        for c in children:
            c.send("quit")
        assert [c.close() for c in children] == [0] * writers
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.kill()
    # every writer's last value is there (worker w writes value(w) on its keys)
    if row == "sharedict":
        assert bytes(store.get(sb.writer_keys(1, writers)[0])) == sb.value(1)
    else:
        with store.begin() as txn:
            assert txn.get(sb.writer_keys(1, writers)[0]) == sb.value(1)
    measured = rates[1:] or rates  # the first was the warm-up round (none when disabled)
    info: dict[str, Any] = {"writers": writers, "puts_per_writer_per_round": WRITER_OPS,
                            "ops_per_s": round(statistics.median(measured), 1),
                            "ops_per_s_best": round(max(measured), 1),
                            "key_bytes": sb.KEY_BYTES, "value_bytes": sb.VALUE_BYTES,
                            "keys": sb.KEYS, **store_info(stores, row)}
    one = _ops("state-put", row)
    if one:
        info["scaling_vs_one_process"] = round(info["ops_per_s"] / one, 3)
    record(report, benchmark, "state-put-2proc", row, **info)


# -- recovery: kill -9 of a non-master member -> stable ------------------------------------------


@pytest.fixture
def big_dict(request) -> Iterator[tuple[Any, dict[str, Any]]]:
    if not has_sharedict():
        pytest.skip(NO_SHAREDICT)
    n = request.param
    domain = new_domain()
    spec = {"domain": domain, "capacity": n + n // 4 + 1024, "max_key": sb.KEY_BYTES,
            "max_value": 8, "keys": n, "ephemeral": 8}
    d = sb.open_sharedict(spec)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            d[sb.key(i)] = i
        spec["fill_s"] = round(time.perf_counter() - t0, 3)
        assert len(d) == n
        yield d, spec
    finally:
        d.stop()
        remove_bootstrap(domain)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.0005) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@pytest.mark.benchmark(group="state-recovery")
@pytest.mark.parametrize("big_dict", RECOVERY_SIZES, indirect=True,
                         ids=[f"{n:,}-keys".replace(",", "_") for n in RECOVERY_SIZES])
def test_recovery_after_kill(benchmark, report, big_dict):
    """This process (the master) holds the dict with N keys; a member process joins, sets 8
    ephemeral keys and writes and runs transactions on random keys; kill -9 of that member ->
    this survivor stable again (a newer epoch, a put and a get answered). Recorded: the time from
    the kill to that answer, and the component's own ``stats.last_duration_ms``."""
    d, spec = big_dict
    assert getattr(d, "is_master", True), "this process joined first: it should be the master"
    kill_ms: list[float] = []
    comp_ms: list[float] = []
    victims: list[Child] = []

    def setup():
        victim = Child("member", json.dumps(spec))
        victims.append(victim)
        word, epoch = victim.readline().split()
        assert word == "ready"
        assert wait_until(lambda: d.stats.epoch >= int(epoch), 30), "no common epoch"
        time.sleep(0.05)  # in the middle of its writes and transactions
        return (victim, d.stats.epoch), {}

    def kill(victim: Child, epoch: int) -> None:
        t0 = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        assert wait_until(lambda: d.stats.epoch > epoch, 30), "no recovery after the kill"
        d[sb.key(0)] = 0
        assert d.get(sb.key(1)) is not None
        kill_ms.append((time.perf_counter() - t0) * 1e3)
        comp_ms.append(d.stats.last_duration_ms)
        assert victim.close() == -signal.SIGKILL
        assert b"e%d-0" % victim.pid not in d, "the victim's ephemeral keys outlived it"

    try:
        benchmark.pedantic(kill, setup=setup, rounds=RECOVERY_KILLS, warmup_rounds=1,
                           iterations=1)
    finally:
        for v in victims:
            if v.proc.poll() is None:
                v.kill()
    assert len(d) >= spec["keys"]
    measured_kill, measured_comp = kill_ms[1:] or kill_ms, comp_ms[1:] or comp_ms
    info: dict[str, Any] = {
        "dict_keys": spec["keys"], "capacity": spec["capacity"], "value_bytes": spec["max_value"],
        "fill_s": spec["fill_s"], "kills": len(measured_kill),
        "kill_to_stable_ms": round(statistics.median(measured_kill), 3),
        "kill_to_stable_ms_max": round(max(measured_kill), 3),
        "last_duration_ms": round(statistics.median(measured_comp), 3),
        "last_duration_ms_max": round(max(measured_comp), 3),
        "last_reason": str(getattr(d.stats, "last_reason", "")),
        "baseline": spec["keys"] == RECOVERY_SIZES[0]}
    record_recovery(report, benchmark, info)


def record_recovery(report: Callable[..., None], benchmark, info: dict[str, Any]) -> None:
    rows = _ROWS.setdefault("state-recovery", {})
    rows[str(info["dict_keys"])] = benchmark.extra_info
    report(row=f"{info['dict_keys']:,} keys", **info)
    small = rows.get(str(RECOVERY_SIZES[0]))
    if small is None:
        return
    for e in rows.values():
        for key in ("kill_to_stable_ms", "last_duration_ms"):
            if small.get(key):
                e[f"{key}_vs_{RECOVERY_SIZES[0]}"] = round(e[key] / small[key], 3)
    big = rows.get(str(RECOVERY_SIZES[-1]))
    if big is not None and big is not small:
        big["targets"] = {
            "recovery with 1 M keys <= 1.5x with 1 k (kill -> stable)": _target(
                big.get(f"kill_to_stable_ms_vs_{RECOVERY_SIZES[0]}"), "at_most", TARGET_RECOVERY,
                "kill -> stable time / the same with 1 k keys"),
            "recovery with 1 M keys <= 1.5x with 1 k (stats.last_duration_ms)": _target(
                big.get(f"last_duration_ms_vs_{RECOVERY_SIZES[0]}"), "at_most", TARGET_RECOVERY,
                "the component's recovery duration / the same with 1 k keys")}


# -- the run's summary on the terminal -----------------------------------------------------------


class _Summary:
    """A plugin registered by this module: its rows in the terminal summary of the run."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        tr = terminalreporter
        if not _ROWS:
            return
        tr.write_sep("-", "shared state (bench/test_state.py): ops/s, SharedDict ÷ each row")
        for group, rows in _ROWS.items():
            for name, e in rows.items():
                if group == "state-recovery":
                    tr.write_line(f"  [{group}] {name} keys: kill -> stable "
                                  f"{e.get('kill_to_stable_ms')} ms, stats.last_duration_ms "
                                  f"{e.get('last_duration_ms')} ms")
                else:
                    tr.write_line(f"  [{group}] {name}: {e.get('ops_per_s')} ops/s"
                                  + (f", SharedDict x{e['sharedict_ratio']}"
                                     if "sharedict_ratio" in e else ""))
                for t, v in (e.get("targets") or {}).items():
                    word = {True: "met", False: "MISSED", None: "not measured"}[v["met"]]
                    tr.write_line(f"      target {t}: ratio {v['ratio']} -> {word}")


_SUMMARY = _Summary()


@pytest.fixture(scope="module", autouse=True)
def state_summary(request) -> None:
    if not request.config.pluginmanager.is_registered(_SUMMARY):
        request.config.pluginmanager.register(_SUMMARY, "mcs-state-summary")
