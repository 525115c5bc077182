"""Several cache hosts behind a load balancer, and one host's cache size (issue 14), on this
machine only. Each load is one bounded run (``benchmark.pedantic(rounds=1, iterations=1)``);
every derived number goes into ``extra_info``.

``hosts-balance``
    1, 2 and 3 hosts behind HAProxy (``mcs-webcache front``), with consistent hashing on the
    URI (``balance uri``, ``hash-type consistent``) and with round-robin (each row flagged
    ``baseline``: consistent hashing is compared with round-robin over the same hosts). Each
    host is a network namespace made for the run (tests/hostlab.py: a veth pair, private
    addresses inside it only) running its own ``mcs-webcache serve`` with one node and
    ``cache_bytes_per_host`` of cache; HAProxy and the load generator run here on loopback.
    Workload: FILES files of 4-28 KiB, requested with a seeded Zipf distribution (s = ZIPF_S);
    the working set (every file as the cache stores it: entry header, path and data) is
    WORKING_SET_OVER_HOST times one host's cache. A warm-up run, then the measured run: the
    aggregate hit ratio is the hosts' hits / (hits + misses) during the measured run, from
    their ``/_mcs/status`` counters; req/s from the generator. Goal: with 3 hosts, a hit ratio
    >= 0.95 under consistent hashing, and clearly above round-robin's. Skipped (with the
    reason) where namespaces cannot be made or HAProxy is missing.

``cache-size-sweep``
    One host (one node, loopback, no front), the same workload, a cache of 1/8 to 1 times the
    working set: hit ratio and req/s against cache memory (the MCS paper's Fig. 8). The
    smallest cache is the baseline row.

The machine's 1-minute load average before and after each measured run is recorded
(``load_average_1m``): other work on the machine shows there. Every process is stopped and
checked: exit status 0, no ``/dev/shm/mcs.<domain>*`` left; the namespaces and veths are removed
and checked afterwards. All of it shares this machine's cores: req/s here weighs the work a
request costs (a hit on the fast path, a miss through aiohttp and a disk read), not the capacity
of N machines.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import import_from_tests
from test_scaling import CORES, LOADGEN, Load, make_zipf_site, run_load, zipf_expectations
from webcache import layout as L
from webcache.board import PUBLISH_INTERVAL
from webcache.front import FrontError, engine_binary


hostlab = import_from_tests("hostlab")

FILES = 600
SMALLEST, LARGEST = 4 << 10, 28 << 10
ZIPF_S = 0.9
SEED = 20261214
WORKING_SET_OVER_HOST = 3  # the working set is 3x one host's cache
MAX_ENTRY = 64 << 10
CONNECTIONS = 24
WARMUP_S = int(os.environ.get("MCS_HOSTS_WARMUP", "5"))
RUN_S = int(os.environ.get("MCS_HOSTS_RUN", "6"))
HOST_COUNTS = [1, 2, 3]
BALANCES = ["consistent", "roundrobin"]
SWEEP = [1 / 8, 1 / 4, 1 / 2, 3 / 4, 1]
# the hosts' counters read around the measured run: a miss is answered by aiohttp, and its
# keep-alive connection stays with aiohttp afterwards (docs/webcache.md, the fast path)
COUNTED = ("hits", "misses", "requests", "fast_path_served")


class Site:
    """The Zipf site and what the cache needs to hold it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ranked, self.cdf, self.sizes = make_zipf_site(root, FILES, SMALLEST, LARGEST,
                                                           ZIPF_S, SEED)
        # what each file takes in an arena: its entry (header, canonical path, data)
        self.footprint = {p: L.entry_size(len(os.fsencode(str(root.resolve() / p[1:]))), n)
                          for p, n in self.sizes.items()}
        self.working_set = sum(self.footprint.values())

    def cache_for(self, fraction: float) -> int:
        """An arena holding ``fraction`` of the working set (its header added)."""
        return L.ARENA_HEADER + math.ceil(self.working_set * fraction / 8) * 8

    def ideal(self, cache_bytes: int) -> float:
        """The hit ratio of a cache that holds the hottest files that fit (perfect LFU)."""
        return zipf_expectations(self.ranked, self.cdf, self.footprint,
                                 cache_bytes - L.ARENA_HEADER)["ideal_hit_ratio"]

    def describe(self) -> dict[str, Any]:
        return {"files": FILES, "file_set_bytes": sum(self.sizes.values()),
                "file_bytes_min": min(self.sizes.values()),
                "file_bytes_max": max(self.sizes.values()),
                "working_set_bytes": self.working_set, "zipf_s": ZIPF_S, "seed": SEED,
                "warmup_s": WARMUP_S, "run_s": RUN_S, "connections": CONNECTIONS,
                "cores": CORES, "load_generator_shares_cores": True, "loadgen": LOADGEN}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    return Site(tmp_path_factory.mktemp("hosts-site"))


@pytest.fixture(scope="module")
def lab() -> Iterator[list]:
    try:
        engine_binary("haproxy")
    except FrontError as exc:
        pytest.skip(f"{exc}; or: sudo bench/install-peers.sh")
    try:
        with hostlab.namespaces(max(HOST_COUNTS)) as made:
            yield made
    except hostlab.LabUnavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")


_rows = iter(range(1_000_000))


def _domain(k: int | str) -> str:
    return f"hb{os.getpid()}-{next(_rows)}-{k}"


def placement(port: int, site: Site) -> dict[str, str]:
    """Every file requested once, the coldest first (the warm-up pass): file -> the host that
    answered it (X-Mcs-Host). After it, no file is requested for the first time."""
    where = {}
    for path in reversed(site.ranked):
        status, headers, _ = hostlab.http_get("127.0.0.1", port, path)
        assert status == 200, (path, status)
        where[path] = headers["X-Mcs-Host"]
    return where


def split_ideal(site: Site, where: dict[str, str], cache_bytes: int) -> float:
    """The hit ratio if every host held the hottest of its own files that fit in its cache
    (perfect LFU per host, for the split of the files the front made)."""
    mass, previous = {}, 0.0
    for path, c in zip(site.ranked, site.cdf):
        mass[path], previous = c - previous, c
    hit = 0.0
    for host in set(where.values()):
        room = cache_bytes - L.ARENA_HEADER
        for path in site.ranked:  # hottest first
            if where[path] == host and site.footprint[path] <= room:
                room -= site.footprint[path]
                hit += mass[path]
    return round(hit, 4)


def measure(benchmark, port: int, site: Site,
            hosts: list) -> tuple[dict[str, str], Load, dict[str, dict[str, int]]]:
    """Warm-up (the placement pass, then a Zipf run), then the measured run (the benchmark's
    timed round): where each file went, the run, each host's hits and misses during it."""
    where = placement(port, site)
    run_load(port, site.ranked, cdf=site.cdf, seed=SEED, duration=WARMUP_S,
             connections=CONNECTIONS)
    time.sleep(PUBLISH_INTERVAL + 0.1)  # every node's counters published
    before = {h.name: h.totals() for h in hosts}
    benchmark.extra_info["load_average_1m"] = [round(os.getloadavg()[0], 2)]
    load = benchmark.pedantic(run_load, args=(port, site.ranked),
                              kwargs={"cdf": site.cdf, "seed": SEED + 1, "duration": RUN_S,
                                      "connections": CONNECTIONS}, rounds=1, iterations=1)
    benchmark.extra_info["load_average_1m"].append(round(os.getloadavg()[0], 2))
    time.sleep(PUBLISH_INTERVAL + 0.1)
    after = {h.name: h.totals() for h in hosts}
    counts = {name: {k: after[name][k] - before[name][k] for k in COUNTED} for name in before}
    return where, load, counts


def stop_all(hosts: list, front=None) -> None:
    """Stop every process of the row and check that nothing is left."""
    codes = {"front": front.stop()} if front is not None else {}
    for h in hosts:
        codes[h.name] = h.stop()
    left = {h.name: h.shm_left() for h in hosts}
    for h in hosts:
        h.gc()  # after a failure: whatever a host left (nothing after a clean stop)
    assert codes.pop("front", 0) in (0, -signal.SIGTERM), codes  # HAProxy -db: SIGTERM kills
    assert all(c == 0 for c in codes.values()), codes
    assert not any(left.values()), left


def hit_ratio(counts: dict[str, int]) -> float | None:
    looked_up = counts["hits"] + counts["misses"]
    return round(counts["hits"] / looked_up, 4) if looked_up else None


def fast_path_share(counts: dict[str, int]) -> float | None:
    """The share of the requests answered on the fast path (the rest went through aiohttp)."""
    return round(counts["fast_path_served"] / counts["requests"], 4) if counts["requests"] \
        else None


def load_info(load: Load) -> dict[str, Any]:
    return {"generator": load.generator, "requests": load.requests,
            "duration_s": round(load.duration_s, 3), "req_per_s": round(load.rps, 1),
            "failed_requests": load.failed, "errors": load.errors,
            "latency_us_p50": load.latency_us.get("p50"),
            "latency_us_p99": load.latency_us.get("p99")}


@pytest.mark.benchmark(group="hosts-balance")
@pytest.mark.parametrize("hosts", HOST_COUNTS, ids=[f"{n}-hosts" for n in HOST_COUNTS])
@pytest.mark.parametrize("balance", BALANCES)
def test_hosts_behind_haproxy(benchmark, report, site, lab, tmp_path, balance, hosts):
    cache = site.cache_for(1 / WORKING_SET_OVER_HOST)
    started: list = []
    front = None
    try:
        for k, ns in enumerate(lab[:hosts], 1):
            started.append(hostlab.Host(ns, site.root, tmp_path, name=f"h{k}",
                                        domain=_domain(k), cache_size=str(cache),
                                        max_entry=str(MAX_ENTRY)))
        front = hostlab.Front(started, tmp_path, balance=balance)
        for h in started:
            front.wait_status(h.name, "UP", 20)
        where, load, counts = measure(benchmark, front.port, site, started)
        stats = front.stats()
    finally:
        stop_all(started, front)
    assert load.failed == 0, load.errors
    total = {k: sum(c[k] for c in counts.values()) for k in COUNTED}
    looked_up = total["hits"] + total["misses"]
    consistent = balance == "consistent"
    data = cache - L.ARENA_HEADER

    def host_row(name: str, c: dict[str, int]) -> dict[str, Any]:
        row = {**c, "hit_ratio": hit_ratio(c), "fast_path_share": fast_path_share(c),
               "share_of_lookups": round((c["hits"] + c["misses"]) / looked_up, 4)
               if looked_up else None,
               "front_retries": int(stats[name]["wretr"]),
               "front_redispatches": int(stats[name]["wredis"])}
        if consistent:  # the files it owns (round-robin: every host sees every file)
            mine = [p for p, h in where.items() if h == name]
            row.update(files=len(mine), share_of_working_set=round(
                sum(site.footprint[p] for p in mine) / site.working_set, 4))
        return row

    info = {
        "balance": balance, "hosts": hosts, "baseline": not consistent,
        "front": "haproxy (mcs-webcache front)", "nodes_per_host": 1,
        "cache_bytes_per_host": cache, "cache_bytes_total": hosts * cache,
        "working_set_over_host_cache": round(site.working_set / data, 3),
        **site.describe(),
        "ideal_hit_ratio_one_host": site.ideal(cache),
        "ideal_hit_ratio_all_hosts": site.ideal(L.ARENA_HEADER + hosts * data),
        # consistent: each host the hottest of its own files; round-robin: of all of them
        "ideal_hit_ratio_this_split": split_ideal(site, where, cache) if consistent
        else site.ideal(cache),
        **load_info(load),
        **total, "hit_ratio": hit_ratio(total), "fast_path_share": fast_path_share(total),
        "per_host": {name: host_row(name, c) for name, c in counts.items()},
    }
    report(**info)
    print(f"\n[hosts-balance] {balance}, {hosts} host(s): hit ratio {info['hit_ratio']} "
          f"(ideal for this split {info['ideal_hit_ratio_this_split']}), "
          f"{info['req_per_s']} req/s, fast path {info['fast_path_share']}, "
          f"per host {info['per_host']}")


@pytest.mark.benchmark(group="cache-size-sweep")
@pytest.mark.parametrize("fraction", SWEEP, ids=[f"{f:g}x" for f in SWEEP])
def test_cache_size_sweep(benchmark, report, site, tmp_path, fraction):
    cache = max(site.cache_for(fraction), 1 << 20)
    host = None
    try:
        host = hostlab.Host(None, site.root, tmp_path, name="sweep", port=0,
                            domain=_domain("sweep"), cache_size=str(cache),
                            max_entry=str(MAX_ENTRY))
        _, load, counts = measure(benchmark, host.port, site, [host])
    finally:
        if host is not None:
            stop_all([host])
    assert load.failed == 0, load.errors
    info = {
        "fraction_of_working_set": round((cache - L.ARENA_HEADER) / site.working_set, 4),
        "baseline": fraction == SWEEP[0], "cache_bytes": cache, "nodes": 1, "front": "none",
        **site.describe(), "ideal_hit_ratio": site.ideal(cache), **load_info(load),
        **counts["sweep"], "hit_ratio": hit_ratio(counts["sweep"]),
        "fast_path_share": fast_path_share(counts["sweep"]),
    }
    report(**info)
    print(f"\n[cache-size-sweep] {fraction:g}x the working set ({cache:,} B): hit ratio "
          f"{info['hit_ratio']} (ideal {info['ideal_hit_ratio']}), {info['req_per_s']} req/s, "
          f"fast path {info['fast_path_share']}")
