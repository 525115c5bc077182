"""Warm takeover (webcache): the shared table outlives recoveries, a killed node's arena keeps
serving, and the node that takes its slot adopts the arena, verifying entries by checksum as they
are served. Real nodes (`mcs-webcache serve`), real kill -9, real HTTP over loopback."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import wait_for
from mcs import Section
from mcs.bootstrap import Bootstrap
from mcs.component_record import ComponentRecord, component_domain
from test_webcache import MAX_ENTRY, Cache, Load, site, wait_members  # noqa: F401 (site: a fixture)


def _owners(cache: Cache) -> dict[int, dict]:
    """pid -> that member's row of the domain-wide status (entries in its arena, counters)."""
    return {m["pid"]: m for m in cache.status()["members"]}


def _warm(cache: Cache, files: dict[str, bytes], rounds: int = 3) -> None:
    for _ in range(rounds):  # a miss fills it in one node's arena; then hits
        for name in files:
            status, _, body = cache.get(name)
            assert status == 200 and body == files[name]


PUBLISHED = 0.6  # seconds: every node has published its counters since (board interval 0.25 s)


def _totals(cache: Cache) -> dict[str, int]:
    """The domain's counters, once every node has published what it counted until now."""
    time.sleep(PUBLISHED)
    return cache.status()["domain"]["totals"]


def _victim_with_entries(cache: Cache) -> tuple[int, int, int]:
    """(pid, slot, entries) of a non-master node whose arena holds entries."""
    time.sleep(PUBLISHED)
    doc = cache.status()
    master = doc["master"]["pid"]
    rows = [m for m in doc["members"] if m["pid"] != master and m["gauges"]["entries"] > 0]
    assert rows, doc["members"]
    row = max(rows, key=lambda m: m["gauges"]["entries"])
    return row["pid"], row["slot"], row["gauges"]["entries"]


def _arena_ident(domain: str, slot: int) -> str:
    """The identifier of the arena published for member ``slot`` of ``domain``'s web cache."""
    with Bootstrap.open(component_domain(domain, "webcache"), create=False) as boot:
        return ComponentRecord.read(boot.section).contributions[slot]


def _takeover(cache: Cache, slot: int) -> dict:
    """The takeover counters of the member now in ``slot`` once its scan is done."""
    def done():
        doc = cache.status()
        row = next((m for m in doc["members"] if m["slot"] == slot), None)
        return row is not None and row["counters"]["arenas_adopted"] >= 1 and \
            row["gauges"]["entries"] > 0
    assert wait_for(done, 20, 0.05), cache.status()["members"]
    return next(m for m in cache.status()["members"] if m["slot"] == slot)


@pytest.fixture
def warmed(site, domain):
    """3 nodes (`mcs-webcache serve`) with every file of the site requested 3 times: each
    cacheable one is cached in one node's arena."""
    _, files = site
    cache = Cache(site[0], domain)
    try:
        _warm(cache, files)
        yield cache, files
    finally:
        assert cache.stop() == 0


@pytest.mark.slow
def test_a_killed_nodes_entries_keep_serving_and_its_successor_takes_them_over(warmed):
    cache, files = warmed
    cacheable = {n: d for n, d in files.items() if len(d) <= MAX_ENTRY}
    victim, slot, entries = _victim_with_entries(cache)
    before = _totals(cache)
    with Load(cache, cacheable) as load:
        load.names = list(cacheable)
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        time.sleep(1.5)
    assert load.wrong == []
    assert load.failures_on_survivors({victim}) == []
    during = _totals(cache)
    # Through the death and the restart, the disk was read only for requests that came while a
    # recovery ran (those are served from disk by design): no entry was lost.
    assert during["disk_reads"] - before["disk_reads"] == (
        during["served_during_recovery"] - before["served_during_recovery"]), (before, during)
    wait_members(cache, 3, exclude={victim})  # the launcher restarted it
    row = _takeover(cache, slot)
    assert row["pid"] != victim
    assert row["counters"]["entries_adopted"] == entries, row
    assert row["gauges"]["entries"] == entries
    # After the restart every file cached before the kill is still served from memory.
    after_restart = _totals(cache)
    _warm(cache, cacheable, rounds=2)
    assert _totals(cache)["disk_reads"] == after_restart["disk_reads"]


@pytest.mark.slow
def test_a_corrupted_entry_of_an_adopted_arena_is_read_again_never_served(warmed, domain):
    cache, files = warmed
    victim, slot, _ = _victim_with_entries(cache)
    os.kill(victim, signal.SIGKILL)
    wait_members(cache, 3, exclude={victim})
    _takeover(cache, slot)
    # Flip one byte of a cached file's data in the adopted arena (silently: no memory failure
    # is reported, so only the entry's checksum can tell).
    with Section.attach(_arena_ident(domain, slot)) as arena:
        view = arena.view()
        image = bytes(view)
        at, name, data = next(((image.find(data), name, data) for name, data in files.items()
                               if len(data) >= 64 and image.find(data) > 0), (-1, "", b""))
        assert at > 0, "no cached file found in the adopted arena"
        view[at + len(data) // 2] ^= 0xFF
        view.release()
    before = _totals(cache)
    for _ in range(6):  # whichever node answers: never the corrupt byte
        status, _, body = cache.get(name)
        assert status == 200 and body == data
    after = _totals(cache)
    assert after["checksum_failures"] == before["checksum_failures"] + 1
    assert after["entries_reread"] == before["entries_reread"] + 1
    assert after["disk_reads"] >= before["disk_reads"] + 1


@pytest.mark.slow
def test_a_poisoned_arena_is_not_adopted(warmed, domain):
    cache, files = warmed
    victim, slot, _ = _victim_with_entries(cache)
    # attached here too, so the arena outlives its owner whatever the others do
    with Section.attach(_arena_ident(domain, slot)) as arena:
        os.kill(victim, signal.SIGKILL)
        arena._mark_failed()
        view = arena.view()
        view[:] = b"\xa5" * len(view)
        view.release()
        wait_members(cache, 3, exclude={victim})
        for name, data in files.items():
            status, _, body = cache.get(name)
            assert status == 200 and body == data
        row = next(m for m in cache.status()["members"] if m["slot"] == slot)
        assert row["counters"]["arenas_adopted"] == 0


FILLER = """
import asyncio, json, os, sys, time
from webcache.cache import McsWebCache
from webcache.paths import ResolvedFile
timing = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.4}
cache = McsWebCache(sys.argv[1], cache_size=1 << 20, max_entry=4096, **timing).start()
print(json.dumps({"slot": cache.member.slot, "inc": cache.member.incarnation}), flush=True)
if sys.argv[2] == "fill":  # take the fill lease of the file (for 10 min), then read forever
    import webcache.cache
    webcache.cache.LEASE_NS = 600 * 10**9  # so only its death can free it
    f = ResolvedFile.from_stat(sys.argv[3], os.stat(sys.argv[3]))
    def read():
        print("reading", flush=True)
        time.sleep(600)
    asyncio.run(cache.fill(f, read))
sys.stdin.read()
"""


def test_a_dead_fillers_lease_is_not_waited_for_when_its_slot_is_taken_again(domain, spawn,
                                                                          tmp_path):
    """A fill lease names its filler by incarnation: once the filler is dead, a miss on that
    file reads and caches it at once, even though a new member already holds the dead one's
    slot (a lease naming the slot would keep it waiting: it would give up and read the file
    without caching it)."""
    import asyncio

    from webcache.cache import McsWebCache
    from webcache.paths import ResolvedFile

    page = tmp_path / "page.html"
    page.write_bytes(b"<p>hello</p>" * 10)
    os.utime(page, ns=(time.time_ns() - 10**9,) * 2)
    time.sleep(0.05)  # its ctime settles (SETTLE_NS)
    timing = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.4}
    cache = McsWebCache(domain, cache_size=1 << 20, max_entry=4096, **timing).start()
    try:
        filler = spawn(FILLER, domain, "fill", str(page))
        first = json.loads(filler.readline())
        assert filler.readline() == "reading"  # it holds the lease now
        filler.kill()
        successor = spawn(FILLER, domain, "idle")
        again = json.loads(successor.readline())
        assert again["slot"] == first["slot"] and again["inc"] != first["inc"]
        assert wait_for(lambda: len(cache.view.members) == 2 and not cache.recovering, 10)
        f = ResolvedFile.from_stat(str(page), os.stat(page))
        data = asyncio.run(cache.fill(f, page.read_bytes))
        assert data == page.read_bytes()
        hit = cache.lookup(f)
        assert hit is not None, "not cached: the miss waited out the dead filler's lease"
        hit.release()
    finally:
        cache.stop()
