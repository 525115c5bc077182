"""The operator's view of a web cache (issue 15): the nodes share one port, and each of
``/metrics``, ``/_mcs/status`` and the page at ``/_mcs/`` describes the whole domain, whichever
node the kernel picks, from the board of counters in shared memory (webcache/board.py).

Real node processes on one loopback port, real kill -9 and restart by the launcher, a real
Prometheus text parser, and Debian's Chromium in headless mode for the page."""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mcs.names import target_of
from mcs.status import Watch, domain_status, format_status

from conftest import wait_for
from test_webcache import MAX_ENTRY, Cache, site  # noqa: F401 (site: a fixture)

# Slower than test_webcache's FAST: these tests scrape hard on a shared machine, and a node
# evicted for a late heartbeat would be a death the test did not cause.
TIMING = json.dumps({"heartbeat": 0.05, "suspect_after": 0.5, "evict_after": 2.0})

# A node name a browser or a Prometheus parser would misread if it were not escaped.
HOSTILE = '<img src=x onerror="document.title=\'owned\'">\\"node'
CACHED = ["/index.html", "/style.css", "/page.txt", "/f4096.bin", "/f100.bin"]


@pytest.fixture
def cache(site, domain):
    c = Cache(site[0], domain, extra=("--timing", TIMING))
    yield c
    assert c.stop() == 0


class ExtraNode:
    """One more node joined to a running cache, outside the launcher (any name we like)."""

    def __init__(self, cache: Cache, node: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "webcache.node", "--domain", cache.domain,
             "--root", str(cache.root), "--port", str(cache.port), "--cache-size", "8388608",
             "--max-entry", str(MAX_ENTRY), "--node", node, "--timing", TIMING],
            stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("{"), (line, self.proc.poll())
        self.pid = json.loads(line)["pid"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            assert self.proc.wait(30) == 0
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()


@pytest.fixture
def hostile_node(cache):
    node = ExtraNode(cache, HOSTILE)
    yield node
    node.stop()


def scrape(cache: Cache) -> dict[tuple[str, frozenset], float]:
    """One /metrics through the shared port (a new connection: any node may answer), parsed
    by prometheus_client's text parser: {(sample name, labels): value}, and the families'
    types under ("#type", name)."""
    status, headers, body = cache.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
        samples[("#type", family.name)] = family.type
    return samples


def retrying(fn, *args):
    """``fn(*args)``, again after a connection error: while a node dies, the connections
    queued on its listening socket are reset (the next one reaches a live node)."""
    for attempt in range(50):
        try:
            return fn(*args)
        except (OSError, http.client.HTTPException):
            if attempt == 49:
                raise
            time.sleep(0.05)


def members_of(samples: dict) -> dict[int, dict[str, str]]:
    """pid -> labels of mcs_webcache_member_info."""
    return {int(dict(labels)["pid"]): dict(labels) for (name, labels) in samples
            if name == "mcs_webcache_member_info"}


def series_of(samples: dict, name: str) -> set[tuple[str, str, str]]:
    return {(d["node"], d["slot"], d["incarnation"]) for d in
            (dict(labels) for (n, labels) in samples if n == name)}


def load(cache: Cache, n: int, rng: random.Random) -> None:
    for _ in range(n):  # a new connection each time: spread over the nodes by the kernel
        status, _, _ = cache.get(rng.choice(CACHED))
        assert status == 200


def counters(samples: dict) -> dict[tuple[str, frozenset], float]:
    """The samples of counter families only."""
    kinds = {k[1]: v for k, v in samples.items() if k[0] == "#type"}
    return {k: v for k, v in samples.items() if k[0] != "#type"
            and kinds.get(k[0].removesuffix("_total")) == "counter"}


def test_board_reads_are_consistent_or_flagged_torn():
    """The board on real shared memory: a slot read while its seqlock is odd (an owner that
    died mid-write) is still read, flagged torn; the domain totals add carried and counters."""
    import mcs
    from webcache import board as B, layout as L

    with mcs.Section.create(L.MASTER_AREA_SIZE) as area:
        assert not B.board_ok(area)
        B.init_board(area)
        assert B.board_ok(area) and B.read_board(area) == []
        for slot, (inc, hits, carried, seq) in {0: (7, 5, 100, 2), 3: (9, 11, 0, 5)}.items():
            rec = L.NodeBoard.at(area, L.BOARD_OFFSET + L.Board.offset_of("nodes", slot))
            rec.incarnation, rec.pid, rec.seq = inc, 1000 + slot, seq
            rec.counters[B.COUNTERS.index("hits")] = hits
            rec.carried[B.COUNTERS.index("hits")] = carried
            rec.node = b"n%d" % slot
        snaps = B.read_board(area)
        assert [(s.slot, s.incarnation, s.node, s.torn) for s in snaps] == [
            (0, 7, "n0", False), (3, 9, "n3", True)]
        assert snaps[0].counters["hits"] == 5 and snaps[1].counters["hits"] == 11
        assert B.domain_totals(snaps)["hits"] == 116


def test_ten_scrapes_through_the_shared_port_each_describe_every_member(cache, hostile_node):
    rng = random.Random(15)
    expected = set(cache.pids) | {hostile_node.pid}
    assert wait_for(lambda: set(members_of(scrape(cache))) == expected, 20, 0.1)
    key = ("mcs_webcache_domain_requests_total", frozenset())
    start = scrape(cache)[key]
    load(cache, 60, rng)
    # The 60 requests, spread over the nodes by the kernel, all reach one node's answer (the
    # others' counters lag by at most a publication interval).
    assert wait_for(lambda: scrape(cache)[key] >= start + 60, 10, 0.05)
    answered = set()
    for _ in range(10):
        samples = scrape(cache)
        members = members_of(samples)
        assert set(members) == expected  # every member, whichever node answered
        assert {m["node"] for m in members.values()} >= {HOSTILE}  # escaped and parsed back
        want = {(m["node"], m["slot"], m["incarnation"]) for m in members.values()}
        for family in ("mcs_webcache_requests_total", "mcs_webcache_hits_total",
                       "mcs_webcache_misses_total", "mcs_webcache_node_bytes",
                       "mcs_webcache_heartbeat_age_seconds", "mcs_webcache_locks_held",
                       "mcs_webcache_progress_age_seconds", "mcs_webcache_member_restarts"):
            assert series_of(samples, family) == want, family
        for family in ("mcs_webcache_domain_requests_total", "mcs_webcache_domain_hits_total",
                       "mcs_webcache_generation", "mcs_webcache_members", "mcs_webcache_entries"):
            assert (family, frozenset()) in samples, family
        assert samples[("mcs_webcache_members", frozenset())] == len(expected)
        assert {dict(k[1])["cause"] for k in samples
                if k[0] == "mcs_webcache_domain_member_evictions_total"} == {
            "frozen", "stopped", "hung", "stalled"}
        assert sum(1 for k in samples if k[0] == "mcs_webcache_master") == 1
        # Per member the parts add up to the domain's total (no member has departed).
        per_member = sum(v for (n, _), v in samples.items() if n == "mcs_webcache_hits_total")
        assert per_member == samples[("mcs_webcache_domain_hits_total", frozenset())]
        answered.add(cache.status()["pid"])
    assert answered <= expected


def test_counters_never_go_backwards_across_kill9_and_restart(cache):
    rng = random.Random(9)
    pids = set(cache.pids)
    assert wait_for(lambda: set(members_of(scrape(cache))) == pids, 20, 0.1)
    load(cache, 90, rng)

    def requests_by_pid(samples):
        members = members_of(samples)
        out = {}
        for pid, m in members.items():
            labels = frozenset({"node": m["node"], "slot": m["slot"],
                                "incarnation": m["incarnation"]}.items())
            out[pid] = samples.get(("mcs_webcache_requests_total", labels), 0)
        return out

    # Every node has published what it served (they publish every quarter of a second).
    assert wait_for(lambda: all(requests_by_pid(scrape(cache)).values()), 10, 0.1)
    history = [scrape(cache) for _ in range(3)]
    counts = requests_by_pid(history[-1])
    victim = max(counts, key=counts.__getitem__)  # the node that counted most
    victim_labels = members_of(history[-1])[victim]
    before_kill = history[-1][("mcs_webcache_domain_requests_total", frozenset())]
    os.kill(victim, signal.SIGKILL)

    def restarted():
        history.append(retrying(scrape, cache))
        retrying(load, cache, 3, rng)
        members = members_of(history[-1])
        return (len(members) == 3 and victim not in members
                and all(m["state"] == "member" for m in members.values())
                and not retrying(cache.status)["recovering"])

    assert wait_for(restarted, 60, 0.05), members_of(history[-1])
    load(cache, 30, rng)
    history += [scrape(cache) for _ in range(5)]

    newcomer = (set(members_of(history[-1])) - pids).pop()
    new_labels = members_of(history[-1])[newcomer]
    assert new_labels["node"] == victim_labels["node"]  # the launcher restarted the same node...
    assert new_labels["incarnation"] != victim_labels["incarnation"]  # ...as a new incarnation
    old = ("mcs_webcache_requests_total", frozenset(
        (k, victim_labels[k]) for k in ("node", "slot", "incarnation")))
    assert old not in history[-1]  # the old incarnation's series has ended

    # Within every series, in scrape order, no counter ever went down.
    last: dict = {}
    for i, samples in enumerate(history):
        for key, value in counters(samples).items():
            assert value >= last.get(key, 0), (f"scrape {i}: {key} went from {last[key]} "
                                               f"to {value}")
            last[key] = value
    # The domain's totals kept what the dead node had counted.
    after = history[-1][("mcs_webcache_domain_requests_total", frozenset())]
    assert after >= before_kill + 30
    doc = cache.status()
    assert doc["domain"]["totals"]["requests"] >= after
    assert doc["domain"]["recoveries"] and doc["domain"]["last_recovery"]["phases_ms"].keys() == {
        "quiesce", "agree", "barrier", "master", "contribute", "stable"}
    assert doc["domain"]["recoveries"][0]["epoch"] == doc["domain"]["last_recovery"]["epoch"]


def test_status_document_is_the_whole_domain_from_any_node(cache):
    rng = random.Random(3)
    load(cache, 30, rng)
    assert wait_for(lambda: all(m["published"] for m in cache.status()["members"]), 10, 0.05)
    doc = cache.status()
    assert sorted(m["pid"] for m in doc["members"]) == sorted(cache.pids)
    for m in doc["members"]:
        for key in ("slot", "pid", "node", "incarnation", "state", "heartbeat_age_ms",
                    "counters", "gauges", "hit_ratio", "last_recovery_phases_ms", "master",
                    "locks_held", "progress_age_ms", "restarts"):
            assert key in m, key
        assert m["state"] == "member" and m["heartbeat_age_ms"] >= 0
        assert m["progress_age_ms"] is not None  # the node's event loop gives its progress
    assert sum(m["master"] for m in doc["members"]) == 1
    # what every node served, within a publication interval
    assert wait_for(lambda: cache.status()["domain"]["totals"]["requests"] >= 30, 10, 0.05)
    assert doc["domain"]["cache"]["capacity_bytes"] == 3 * 8 * 1024 * 1024
    assert doc["domain"]["board_created"] <= time.time()
    assert doc["domain"]["member_evictions"] == {"frozen": 0, "stopped": 0, "hung": 0,
                                                 "stalled": 0}


def test_mcs_status_watch_shows_a_death_and_a_restart(cache):
    """The component-independent view: the record of the cache's component, and what --watch
    keeps between readings (read from the bootstrap, not from the web cache)."""
    target = target_of(f"{cache.domain}.webcache")
    watch = Watch()
    first = domain_status(target)
    watch.update(first)
    assert first["recovery"]["stable_epoch"] >= 1 and not first["recovery"]["recovering"]
    assert all(m["acked_epoch"] >= 1 for m in first["members"])
    victim = cache.pids[0]
    os.kill(victim, signal.SIGKILL)

    def back():
        s = retrying(domain_status, target)
        watch.update(s)
        pids = {m["pid"] for m in s["members"] if m["state"] == "member"}
        return len(pids) == 3 and victim not in pids and not s["recovery"]["recovering"]

    assert wait_for(back, 60, 0.1)
    time.sleep(0.2)
    last = domain_status(target)
    watch.update(last)
    text = format_status(last, watch)
    events = "\n".join(watch.events[target.full_name])
    assert f"pid {victim}" in events and "left" in events and "joined" in events
    assert "recovery: epoch" in text and "beats/s" in text
    assert last["recovery"]["stable_epoch"] > first["recovery"]["stable_epoch"]


# -- the page, in a real browser ---------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless browser: Debian's chromium is not installed "
    "(./dev test installs it when run as root with apt-get; or apt-get install chromium)")


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its script has polled a few times (virtual time: the timers of
    the page run as fast as the fetches allow)."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
         "--virtual-time-budget=4000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def page_pids(dom: str) -> set[int]:
    import re
    return {int(p) for p in re.findall(r'<tr data-pid="(\d+)"', dom)}


@needs_browser
def test_status_page_in_a_headless_browser(cache, hostile_node, tmp_path):
    url = f"http://127.0.0.1:{cache.port}/_mcs/"
    expected = set(cache.pids) | {hostile_node.pid}
    assert wait_for(lambda: {m["pid"] for m in cache.status()["members"]} == expected, 20, 0.1)
    dom = dump_dom(url, tmp_path / "profile1")
    assert 'data-polls="0"' not in dom, dom[-3000:]  # the script polled
    assert page_pids(dom) == expected
    # The hostile name is shown as text, never parsed as markup.
    assert "&lt;img src=x onerror=" in dom and "<img" not in dom
    assert "<title>mcs web cache</title>" in dom

    victim = cache.pids[1]
    os.kill(victim, signal.SIGKILL)

    def restarted():
        rows = retrying(cache.status)["members"]
        return (len(rows) == len(expected) and victim not in {m["pid"] for m in rows}
                and all(m["state"] == "member" for m in rows))
    assert wait_for(restarted, 60, 0.1)
    newcomer = ({m["pid"] for m in cache.status()["members"]} - expected).pop()
    dom = dump_dom(url, tmp_path / "profile2")
    shown = page_pids(dom)
    assert victim not in shown and newcomer in shown
    assert shown == expected - {victim} | {newcomer}
