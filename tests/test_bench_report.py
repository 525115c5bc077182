"""The benchmark report's sentences follow its data: a synthetic pytest-benchmark JSON (the shape
bench/test_scaling.py and bench/conftest.py write) turned into docs the way the published run
is, with the numbers changed to flip each verdict. bench/report.py is imported by path (bench/
is not a package, and not collected by ./dev test)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPORT = Path(__file__).resolve().parent.parent / "bench" / "report.py"


@pytest.fixture(scope="module")
def report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _row(group: str, name: str, info: dict[str, Any]) -> dict[str, Any]:
    return {"group": group, "name": name, "fullname": f"bench/x.py::{name}", "params": None,
            "param": None, "extra_info": info, "stats": {"median": 1.0}}


def _scaling(impl: str, nodes: int, rps: float, cpu_per_req: float) -> dict[str, Any]:
    return {"impl": impl, "nodes": nodes, "oversubscribed": nodes > 2, "baseline": nodes == 1,
            "cores": 2, "load_generator_shares_cores": True, "loadgen": "wrk",
            "generator": "wrk -t1 -c32 -d3s", "files": 64, "file_bytes": 4096,
            "req_per_s": rps, "hit_ratio": 1.0, "failed_requests": 0, "recoveries": 0,
            "node_cores_used": 1.5, "generator_cores_used": 0.3,
            "req_per_node_cpu_s": cpu_per_req, "latency_us_p99": 1000.0}


def _variant(name: str, rps: float, hit: float, distinct: int, entries: int,
             disk: int) -> dict[str, Any]:
    info = {"variant": name, "baseline": name == "shared-nothing-lru", "nodes": 3,
            "cache_bytes_per_node": 4 << 20, "cache_bytes_total": 12 << 20, "files": 300,
            "file_set_bytes": 10_000_000, "file_bytes_min": 16 << 10, "file_bytes_max": 48 << 10,
            "warmup_s": 3, "zipf_s": 0.9, "seed": 20260611, "generator": "wrk -t1 -c24 -d4s",
            "ideal_hit_ratio_one_node": 0.8, "ideal_hit_ratio_all_nodes": 1.0,
            "req_per_s": rps, "hit_ratio": hit, "cached_entries": entries,
            "cached_distinct_files": distinct, "duplication_factor": entries / distinct,
            "disk_bytes": disk, "disk_bytes_method": "counted",
            "disk_reads_per_1000_requests": 100.0, "disk_bytes_per_request": 10.0,
            "latency_us_p99": 5000.0, "failed_requests": 0}
    if name == "mcs-shared":
        info.update(fast_path=True, recoveries=0, supervisor_warnings=[],
                    logged_request_errors=0, disk_bytes_method="rchar")
    if name == "shared-nothing-lru":
        info.update(disk_bytes_rchar=disk, disk_bytes_rchar_error_bound=0,
                    disk_bytes_rchar_validated=True)
    return info


def run_doc(*, mcs_rps: float = 28232.0, two_nodes_rps: float = 38000.0,
            mutex_ratio: float = 0.579) -> dict[str, Any]:
    """A run shaped like the published one (the numbers of docs/benchmarks.md by default)."""
    rows = [_row("webcache-scaling", f"scale[{impl}-{n}]", _scaling(impl, n, rps, cpu))
            for impl, n, rps, cpu in [("mcs-shared", 1, 26269.0, 26300.0),
                                      ("mcs-shared", 2, two_nodes_rps, 24000.0),
                                      ("shared-nothing-lru", 1, 9652.0, 9660.0),
                                      ("shared-nothing-lru", 2, 14935.0, 8600.0)]]
    by_impl: dict[str, dict[int, dict]] = {}
    for r in rows:  # the derived numbers bench/test_scaling.py adds against the 1-node row
        e = r["extra_info"]
        by_impl.setdefault(e["impl"], {})[e["nodes"]] = e
    for series in by_impl.values():
        for n, e in series.items():
            e["scaling_factor"] = e["req_per_s"] / series[1]["req_per_s"]
            e["cpu_scaling_factor"] = n * e["req_per_node_cpu_s"] / series[1]["req_per_node_cpu_s"]
    rows += [_row("cache-comparison", f"cmp[{v['variant']}]", v) for v in (
        _variant("shared-nothing-lru", 12703.0, 0.744, 216, 366, 440_000_000),
        _variant("mcs-shared", mcs_rps, 1.0, 300, 300, 0))]
    rps = {"mcs": {"4KiB": 27328.0}, "memory": {"4KiB": 16667.0}, "nginx": {"4KiB": None}}
    rows.append(_row("webcache-hits", "hits[1]", {
        "processes": 1, "pinning": "none", "load_generator": "wrk", "duration_s": 5,
        "connections": 32, "event_loop": "asyncio", "nginx": "nginx unavailable", "rps": rps,
        "ratios": {"mcs/memory": {"4KiB": 1.64}, "mcs/nginx": {"4KiB": None}},
        "targets_met": {"4KiB": {"hits>=1.0x memory": mcs_rps > 12703.0}}}))
    ratios = {"GlobalMutex/threading.Lock (ns_per_pair)": mutex_ratio}
    return {"machine_info": {"cpu": {"count": 2}}, "commit_info": {}, "datetime": "2026-01-01",
            "version": "5.1.0", "benchmarks": rows,
            "mcs_summary": {"results": {}, "ratios": ratios,
                            "targets": {k: {"at_most": 0.7} for k in ratios}}}


def build(report: ModuleType, tmp_path: Path, doc: dict[str, Any]) -> str:
    src = tmp_path / "latest.json"
    src.write_text(json.dumps(doc))
    return report.build([src], tmp_path / "out" / "benchmarks.md", tmp_path / "img", plots=False)


# (numbers of the run, sentences the page must say, sentences it must not): each verdict flips
# with the numbers. The published page said x2.22 next to a fixed sentence that mcs loses on
# this machine ("not on this machine's page cache"); the word now comes from the numbers.
VERDICTS = [
    ({"mcs_rps": 28232.0}, ["×2.22 the baseline: **faster**",
                            "Targets: 4KiB: hits>=1.0x memory met"],
     ["not on this machine's page cache", "**slower**"]),
    ({"mcs_rps": 9000.0}, ["×0.71 the baseline: **slower**",
                           "the hit-ratio gain pays off when a miss is expensive",
                           "Targets: 4KiB: hits>=1.0x memory **missed**"], ["**faster**"]),
    ({"mcs_rps": 12800.0}, ["×1.01 the baseline: **about as fast**"], ["**faster**"]),
    ({"two_nodes_rps": 38000.0, "mutex_ratio": 0.9},  # x1.45 from 1 to 2 nodes
     ["1.8× target **missed**", "(target ≤ 0.7: missed)"], ["target **met** (the MCS"]),
    ({"two_nodes_rps": 50000.0, "mutex_ratio": 0.579},  # x1.90
     ["1.8× target **met**", "(target ≤ 0.7: met)"], ["target **missed**"]),
]


@pytest.mark.parametrize("numbers, said, not_said", VERDICTS)
def test_result_sentences_follow_the_numbers(report, tmp_path, numbers, said, not_said):
    text = build(report, tmp_path, run_doc(**numbers))
    for sentence in said:
        assert sentence in text
    for sentence in not_said:
        assert sentence not in text


def test_workload_descriptions_come_from_the_run(report, tmp_path):
    doc = run_doc()
    text = build(report, tmp_path, doc)
    assert "Not run: `nginx` (nginx unavailable)." in text
    assert "(64 files of 4.0 KiB, every request of the mcs series a hit) with 1 and 2 node" in text
    assert "over 300 files of 16.0 KiB–48.0 KiB (9.5 MiB: larger than one node's cache, " \
           "smaller than all of them together), a 3 s warm-up first" in text
    other = copy.deepcopy(doc)
    for b in other["benchmarks"]:
        e = b["extra_info"]
        if b["group"] == "webcache-scaling":
            e.update(files=17, file_bytes=8192)
        else:
            e.update(file_set_bytes=20 << 20, file_bytes_min=1024, file_bytes_max=2048)
    text = build(report, tmp_path, other)
    assert "(17 files of 8.0 KiB," in text
    assert "of 1.0 KiB–2.0 KiB (20.0 MiB: larger than one node's cache, larger than all" in text


def test_hits_tables_carry_latency_and_cpu_per_request_when_recorded(report, tmp_path):
    doc = run_doc()
    text = build(report, tmp_path, doc)
    assert "CPU µs/request" not in text  # a run from before they were recorded
    hits = next(b for b in doc["benchmarks"] if b["group"] == "webcache-hits")["extra_info"]
    hits["rps"]["nginx-tuned"] = {"4KiB": 20000.0}
    hits["p99_ms"] = {"mcs": {"4KiB": 1.25}, "memory": {"4KiB": 9.5}, "nginx": {"4KiB": None},
                      "nginx-tuned": {"4KiB": 2.5}}
    hits["cpu_us_per_request"] = {"mcs": {"4KiB": 10.4}, "memory": {"4KiB": 80.0},
                                  "nginx": {"4KiB": None}, "nginx-tuned": {"4KiB": 15.9}}
    text = build(report, tmp_path, doc)
    assert "| p99 ms, 4KiB | CPU µs/request, 4KiB |" in text
    assert "| nginx-tuned | 20,000 | — | 2.50 | 15.90 |" in text
    assert "| mcs | 27,328 | — | 1.25 | 10.40 |" in text
    assert "nginx with `open_file_cache`" in text


@pytest.mark.parametrize("busy, bound", [(0.99, True), (0.9, False)])
def test_hits_tables_say_when_wrk_was_the_bound_and_carry_the_paced_latency(report, tmp_path,
                                                                            busy, bound):
    doc = run_doc()
    hits = next(b for b in doc["benchmarks"] if b["group"] == "webcache-hits")["extra_info"]
    hits["load_generator_busy"] = {"mcs": {"4KiB": busy}, "memory": {"4KiB": 0.2},
                                   "nginx": {"4KiB": None}}
    hits["paced_p99_ms"] = {"mcs": {"4KiB": 0.46}, "memory": {"4KiB": None},
                            "nginx": {"4KiB": 0.55}}
    hits["paced_rps"] = {"mcs": {"4KiB": 22575.0}, "memory": {"4KiB": None},
                         "nginx": {"4KiB": 23001.0}}
    hits["pace_ms"] = 1
    text = build(report, tmp_path, doc)
    assert f"| {busy * 100:.0f}% |" in text and "| 20% |" in text
    assert ("It was 95% busy or more with mcs at 4KiB" in text) is bound
    assert ("No server kept it 95% busy or more." in text) is not bound
    assert "each of the 32 connections waits 1 ms before each request" in text
    assert "| mcs | 22,575 | 0.460 |" in text and "| nginx | 23,001 | 0.550 |" in text
    assert "| memory | — |" not in text.split("each of the 32 connections")[1]  # not paced


def test_the_hits_intro_says_how_mcs_ran_when_its_memfd_row_is_there(report, tmp_path):
    doc = run_doc()
    said = "`mcs` is `mcs-webcache serve` with `--sealed-dir` on the run's work directory"
    assert said not in build(report, tmp_path, doc)  # a run from before --sealed-dir
    hits = next(b for b in doc["benchmarks"] if b["group"] == "webcache-hits")["extra_info"]
    hits["rps"]["mcs-memfd"] = {"4KiB": 25000.0}
    text = build(report, tmp_path, doc)
    assert said in text and "in sealed memfds instead of `--sealed-dir`'s page cache" in text


def test_a_ratio_that_two_decimals_would_round_to_one_keeps_three(report):
    assert report.fmt_ratio(0.996) == "×0.996"
    assert report.fmt_ratio(1.004) == "×1.00"
    assert report.fmt_ratio(0.994) == "×0.99"
    assert report.fmt_ratio(1.36) == "×1.36"


def test_the_raw_json_is_kept_with_the_report_and_renders_it_again(report, tmp_path):
    doc = run_doc()
    text = build(report, tmp_path, doc)
    kept = tmp_path / "out" / "benchmarks.json"
    assert json.loads(kept.read_text()) == doc
    assert "from [`benchmarks.json`](benchmarks.json), the raw pytest-benchmark JSON" in text
    again = report.build([kept], tmp_path / "out" / "benchmarks.md", tmp_path / "img",
                         plots=False)

    def body(t: str) -> list[str]:
        return t.split("## The machine", 1)[1].splitlines()

    assert body(again) == body(text)  # the same page from the kept data alone
    assert json.loads(kept.read_text()) == doc


def test_the_kept_json_leaves_out_per_round_samples_only(report, tmp_path):
    doc = run_doc()
    with_samples = copy.deepcopy(doc)
    for b in with_samples["benchmarks"]:
        b.setdefault("stats", {})["data"] = [0.001] * 1000
    text = build(report, tmp_path, with_samples)
    kept = json.loads((tmp_path / "out" / "benchmarks.json").read_text())
    assert all("data" not in b.get("stats", {}) for b in kept["benchmarks"])
    assert [b["extra_info"] for b in kept["benchmarks"]] == \
        [b["extra_info"] for b in doc["benchmarks"]]
    assert "## The machine" in text


@pytest.mark.parametrize("value, base, word", [(110, 100, "more"), (90, 100, "less"),
                                               (101, 100, "same"), (0, 0, "same"),
                                               (None, 100, "not comparable")])
def test_compared_words(report, value, base, word):
    assert report.compared(value, base, "more", "less", "same") == word


# -- the "Shared state" section (bench/test_state.py) ---------------------------------------------


def _state_row(group: str, row: str, ops: float, **extra: Any) -> dict[str, Any]:
    info = {"row": row, "ops_per_s": ops, "us_per_op": 1e6 / ops, "key_bytes": 16,
            "value_bytes": 64, "keys": 10_000, **extra}
    return _row(group, f"test_{group}[{row}]", info)


def _target(ratio: float, kind: str, threshold: float, flag: bool) -> dict[str, Any]:
    # ``flag`` is what the benchmark recorded; the report must recompute it from the ratio
    return {"ratio": ratio, kind: threshold, "met": flag, "what": "ratio"}


def state_doc(*, get: float = 900_000.0, lmdb_get: float = 450_000.0, tx: float = 400_000.0,
              put: float = 600_000.0, big_ms: float = 12.0, with_mcs: bool = True,
              lying_flags: bool = False) -> dict[str, Any]:
    """A run of bench/test_state.py: SharedDict against LMDB and Redis; the recorded ``met``
    flags are wrong on purpose when ``lying_flags``."""
    rows = []
    if with_mcs:
        r = get / lmdb_get
        rows.append(_state_row("state-get", "sharedict", get, targets={
            "get >= 1.0x LMDB (read txn per get)": _target(
                r, "at_least", 1.0, (r >= 1.0) != lying_flags)}))
    rows += [_state_row("state-get", "lmdb-txn-per-op", lmdb_get),
             _state_row("state-get", "redis", 11_000.0)]
    if with_mcs:
        r = put / tx
        rows += [_state_row("state-transaction", "sharedict-transaction", tx, targets={
            "two-key transaction <= 2x a put": _target(r, "at_most", 2.0,
                                                       (r <= 2.0) != lying_flags)}),
                 _state_row("state-transaction", "sharedict-put", put)]
    rows.append(_state_row("state-transaction", "lmdb", 80_000.0))
    if with_mcs:
        small, big = 10.0, big_ms
        rows += [_row("state-recovery", "rec[1_000-keys]", {
                     "row": "1,000 keys", "dict_keys": 1000, "kill_to_stable_ms": small,
                     "last_duration_ms": 5.0, "kills": 5, "baseline": True}),
                 _row("state-recovery", "rec[1_000_000-keys]", {
                     "row": "1,000,000 keys", "dict_keys": 1_000_000, "kill_to_stable_ms": big,
                     "last_duration_ms": 6.0, "kills": 5, "baseline": False, "targets": {
                         "recovery with 1 M keys <= 1.5x with 1 k": _target(
                             big / small, "at_most", 1.5, (big / small <= 1.5) != lying_flags)}})]
    doc = run_doc()
    doc["benchmarks"] += rows
    return doc


STATE_VERDICTS = [
    ({}, ["×2.00 lmdb-txn-per-op: **faster**",
          "get >= 1.0x LMDB (read txn per get): ×2.00 (ratio) — met",
          "two-key transaction <= 2x a put: ×1.50 (ratio) — met",
          "recovery with 1 M keys <= 1.5x with 1 k: ×1.20 (ratio) — met",
          "took ×1.20 the time it took with 1,000: **longer**"], ["**missed**"]),
    ({"get": 300_000.0, "tx": 200_000.0, "big_ms": 30.0},
     ["×0.67 lmdb-txn-per-op: **slower**",
      "get >= 1.0x LMDB (read txn per get): ×0.67 (ratio) — **missed**",
      "two-key transaction <= 2x a put: ×3.00 (ratio) — **missed**",
      "recovery with 1 M keys <= 1.5x with 1 k: ×3.00 (ratio) — **missed**"], ["— met"]),
    ({"get": 455_000.0, "big_ms": 10.1}, ["×1.01 lmdb-txn-per-op: **about as fast**",
                                          "**about as long**"],
     ["lmdb-txn-per-op: **faster**", "**longer**"]),
    # the verdict is the report's own, from the ratio: a wrong recorded flag changes nothing
    ({"lying_flags": True}, ["get >= 1.0x LMDB (read txn per get): ×2.00 (ratio) — met"],
     ["**missed**"]),
]


@pytest.mark.parametrize("numbers, said, not_said", STATE_VERDICTS)
def test_shared_state_sentences_follow_the_numbers(report, tmp_path, numbers, said, not_said):
    text = build(report, tmp_path, state_doc(**numbers))
    state = text.split("## Shared state", 1)[1]
    for sentence in said:
        assert sentence in state
    for sentence in not_said:
        assert sentence not in state


def test_shared_state_section_tables_and_the_rest_of_the_report(report, tmp_path):
    text = build(report, tmp_path, state_doc())
    assert "- [Shared state](#shared-state): state-get (3 rows)" in text
    state = text.split("## Shared state", 1)[1]
    assert "every store holding the same 10,000 keys of 16 bytes with 64-byte values" in state
    assert "| lmdb-txn-per-op | py-lmdb, one read transaction per get | 450,000 |" in state
    assert "| redis | Redis through redis-py, unix socket | 11,000 | 90.91 | ×81.82 |" in state
    assert "Redis, MULTI/EXEC" not in state  # no Redis row in the transaction group
    assert "| lmdb | py-lmdb, both puts in one write transaction | 80,000 |" in state
    assert "| 1,000,000 | 12.00 | ×1.20 | 6.00 | ×1.20 |" in state
    # the state groups are in their section only, and the other sections are still there
    assert "## state-get" not in text
    assert "## webcache-scaling" in text and "## cache-comparison" in text


def test_shared_state_without_sharedict_says_so(report, tmp_path):
    text = build(report, tmp_path, state_doc(with_mcs=False))
    state = text.split("## Shared state", 1)[1]
    assert state.count("SharedDict did not run in this group: no ratio.") == 2
    assert "Targets:" not in state


def recovery_size_doc(big_ms: float, misses: int) -> dict[str, Any]:
    """A run with the webcache-recovery-size group (bench/test_webcache.py)."""
    doc = run_doc()
    for n, ms in ((1_000, 1.0), (100_000, 1.1), (1_000_000, big_ms)):
        doc["benchmarks"].append(_row("webcache-recovery-size", f"size[{n}]", {
            "entries": n, "kills": 3, "kill_to_stable_ms": 4.0 * ms, "last_duration_ms": ms,
            "restart_misses": misses if n == 1_000_000 else 0, "restart_lookups": 20_000,
            "entries_adopted": 4_000, "takeover_scan_ms": 900.0}))
    return doc


@pytest.mark.parametrize("big_ms, misses, said, not_said", [
    (1.2, 0, ["| 1,000,000 | 4.80 | ×1.20 | 1.20 | ×1.20 | 0 of 20,000 |", "**longer**",
              "≤ ×1.5 the smallest: ×1.20 — met", "≤ 20 ms with 1,000,000: 1.20 ms — met",
              "= 0: 0 — met"], ["**missed**"]),
    (25.0, 7, ["≤ ×1.5 the smallest: ×25.00 — **missed**", "1,000,000: 25.00 ms — **missed**",
               "= 0: 7 — **missed**"], ["— met"]),
    (1.02, 0, ["**about as long**"], ["**longer**"]),
])
def test_recovery_size_sentences_follow_the_numbers(report, tmp_path, big_ms, misses, said,
                                                     not_said):
    text = build(report, tmp_path, recovery_size_doc(big_ms, misses))
    section = text.split("## webcache-recovery-size", 1)[1]
    for sentence in said:
        assert sentence in section
    for sentence in not_said:
        assert sentence not in section


def stall_doc(watched: float) -> dict[str, Any]:
    """A run with the stall-behind-holder and supervise-restart groups."""
    doc = run_doc()
    for row, stall in (("hung-watch-off", 8.0), ("hung-hold_limit-5s-default", watched),
                       ("hung-hold_limit-1s", 1.0), ("frozen-watch-off", 2.0),
                       ("frozen-watch-on-default", 0.3)):
        doc["benchmarks"].append(_row("stall-behind-holder", f"test_stall[{row}]", {
            "stall_s_median": stall, "rounds": 2, "holder_sleep_s": 8.0,
            "evictions": {"hung": 2} if "hung-h" in row else {}}))
    doc["benchmarks"].append(_row("supervise-restart", "test_restart", {
        "restart_ms_p50": 190.0, "restart_ms_min": 160.0, "restart_ms_max": 240.0, "rounds": 9,
        "backoff_min_s": 0.05, "restart_definition": "kill -> READY=1"}))
    return doc


@pytest.mark.parametrize("watched, said", [
    (5.0, "Hung holder with `hold_limit` 5 s (the default): 5.00 s instead of 8.00 s (**shorter**)"),
    (8.1, "Hung holder with `hold_limit` 5 s (the default): 8.10 s instead of 8.00 s (about the same)"),
    (12.0, "Hung holder with `hold_limit` 5 s (the default): 12.00 s instead of 8.00 s (longer)"),
])
def test_stall_sentences_follow_the_numbers(report, tmp_path, watched, said):
    text = build(report, tmp_path, stall_doc(watched))
    section = text.split("## stall-behind-holder", 1)[1]
    assert said in section
    assert "frozen holder (SIGSTOP) with stopped holder fenced (the default): 0.300 s instead of " \
           "2.00 s (**shorter**)" in section
    restart = text.split("## supervise-restart", 1)[1]
    assert "serves again 190.0 ms after the kill (p50), of which 50.00 ms is the back-off" in restart

# -- several hosts and the cache-size sweep (bench/test_hosts.py) ----------------------------------

_ZIPF = {"files": 600, "file_set_bytes": 9_800_000, "file_bytes_min": 4096,
         "file_bytes_max": 28672, "working_set_bytes": 10_200_000, "zipf_s": 0.9,
         "seed": 20261214, "warmup_s": 4, "run_s": 5, "connections": 24, "cores": 2,
         "load_generator_shares_cores": True, "loadgen": "wrk"}


def hosts_doc(*, con3: float = 0.97, rr3: float = 0.68, con_rps: float = 2500.0,
              rr_rps: float = 1800.0, sweep_rps_big: float = 2400.0,
              sweep_big_hits: float = 0.94, share_of_hits: float = 0.25) -> dict[str, Any]:
    """A run with the hosts-balance and cache-size-sweep groups."""
    doc = run_doc()
    hit = {("consistent", 1): 0.67, ("consistent", 2): 0.88, ("consistent", 3): con3,
           ("roundrobin", 1): 0.67, ("roundrobin", 2): 0.68, ("roundrobin", 3): rr3}
    for (balance, n), ratio in hit.items():
        doc["benchmarks"].append(_row("hosts-balance", f"hosts[{balance}-{n}-hosts]", {
            "balance": balance, "hosts": n, "baseline": balance == "roundrobin",
            "nodes_per_host": 1, "cache_bytes_per_host": 3_400_000,
            "working_set_over_host_cache": 3.0, **_ZIPF, "hit_ratio": ratio,
            "ideal_hit_ratio_this_split": min(1.0, 0.79 + 0.1 * (n - 1)),
            "req_per_s": (con_rps if balance == "consistent" else rr_rps) * n / 3,
            "latency_us_p99": 9000.0, "load_average_1m": [2.5, 3.25 + n],
            "per_host": {f"h{k}": {"hit_ratio": ratio, "share_of_working_set": 1 / n}
                         for k in range(1, n + 1)}}))
    for fraction, ratio, rps in ((0.125, 0.44, 1250.0), (0.5, 0.78, 2000.0),
                                 (1.0, sweep_big_hits, sweep_rps_big)):
        doc["benchmarks"].append(_row("cache-size-sweep", f"sweep[{fraction:g}x]", {
            "fraction_of_working_set": fraction, "baseline": fraction == 0.125,
            "cache_bytes": int(10_200_000 * fraction), "nodes": 1, **_ZIPF,
            "hit_ratio": ratio, "ideal_hit_ratio": min(1.0, ratio + 0.1), "req_per_s": rps,
            "misses": 0 if ratio == 1.0 else 500, "fast_path_share": ratio * share_of_hits,
            "latency_us_p99": 8000.0}))
    return doc


@pytest.mark.parametrize("numbers, said, not_said", [
    ({}, ["With 3 hosts, consistent hashing hit **0.970** of the requests and round-robin "
          "0.680: the goal (≥ 0.95 under consistent hashing, and above round-robin by at least "
          "0.05) is met.",
          "From 1 to 3 hosts the hit ratio under consistent hashing rose (0.670 → 0.970;",
          "From 1 to 3 hosts the hit ratio under round-robin stayed about the same "
          "(0.670 → 0.680;",
          "consistent hashing served 2,500 req/s, more than round-robin's 1,800 (×1.39)",
          "The two rows with one host are the same configuration measured twice (one host has "
          "no choice to make): their req/s differ by ×1.39, a yardstick",
          "the working set is 3.00× one host's cache",
          "The machine's 1-minute load average around the measured runs was 2.50–6.25, on 2 "
          "cores: req/s here also moves",
          "| consistent hashing | 3 | 0.970 | 0.990 | 2,500 | ×1.39 | — | 9,000 | h1 0.970 (33 %), "],
     ["**missed**"]),
    ({"con3": 0.93}, ["is **missed**."], ["is met."]),
    ({"con3": 0.97, "rr3": 0.95}, ["is **missed**."], ["is met."]),
    ({"con_rps": 1500.0}, ["1,500 req/s, fewer than round-robin's 1,800 (×0.83)"],
     ["more than round-robin"]),
])
def test_hosts_sentences_follow_the_numbers(report, tmp_path, numbers, said, not_said):
    text = build(report, tmp_path, hosts_doc(**numbers))
    section = text.split("## hosts-balance", 1)[1].split("\n## ", 1)[0]
    for sentence in said:
        assert sentence in section
    for sentence in not_said:
        assert sentence not in section


@pytest.mark.parametrize("big_rps, said", [
    (2400.0, ["the hit ratio rose (0.440 → 0.940) and req/s rose (1,250 → 2,400, ×1.92); the "
              "most req/s came with 9.7 MiB (1.00× the working set)."]),
    (1000.0, ["req/s fell (1,250 → 1,000, ×0.80); the most req/s came with 4.9 MiB "
              "(0.500× the working set)."]),
])
def test_cache_size_sweep_sentences_follow_the_numbers(report, tmp_path, big_rps, said):
    text = build(report, tmp_path, hosts_doc(sweep_rps_big=big_rps))
    section = text.split("## cache-size-sweep", 1)[1].split("\n## ", 1)[0]
    assert "| 1.2 MiB | 0.125 | 0.440 | 0.540 | 1,250 | ×1.00 | 0.110 | 8,000 |" in section
    for sentence in said:
        assert sentence in section
    assert "Without any miss" not in section  # every row had misses


@pytest.mark.parametrize("big_rps, word", [(16000.0, "16,000 req/s, more than the best row "
                                                      "with misses (×8.00)"),
                                            (2000.0, "2,000 req/s, about as many as the best row "
                                                     "with misses (×1.00)")])
def test_what_a_miss_costs_the_fast_path_follows_the_numbers(report, tmp_path, big_rps, word):
    text = build(report, tmp_path, hosts_doc(sweep_rps_big=big_rps, sweep_big_hits=1.0))
    section = text.split("## cache-size-sweep", 1)[1].split("\n## ", 1)[0]
    assert (f"Without any miss (9.7 MiB of cache) the fast path answered 0.250 of the requests "
            f"and the host served {word}: 2,000 req/s with 4.9 MiB, a hit ratio of 0.780 and "
            "0.195 of the requests on the fast path. Hits too went through aiohttp there") \
        in section


def test_groups_taken_from_a_kept_report_keep_their_source(report, tmp_path):
    """Re-publishing some groups over a kept report: the other groups still name the run they
    came from, not the kept file."""
    kept = run_doc()
    kept["mcs_report_sources"] = {"webcache-scaling": ".benchmarks/full-run.json",
                                  "cache-comparison": ".benchmarks/full-run.json",
                                  "webcache-hits": ".benchmarks/full-run.json"}
    old = tmp_path / "kept.json"
    old.write_text(json.dumps(kept))
    new = tmp_path / "hosts.json"
    doc = hosts_doc()
    doc["benchmarks"] = [b for b in doc["benchmarks"]
                         if b["group"] in ("hosts-balance", "cache-size-sweep")]
    new.write_text(json.dumps(doc))
    out = tmp_path / "out" / "benchmarks.md"
    text = report.build([old, new], out, tmp_path / "img", plots=False)
    assert "- [webcache-scaling](#webcache-scaling) (4 rows, `.benchmarks/full-run.json`)" in text
    assert f"- [hosts-balance](#hosts-balance) (6 rows, `{new}`)" in text
    sources = json.loads(out.with_suffix(".json").read_text())["mcs_report_sources"]
    assert sources["cache-comparison"] == ".benchmarks/full-run.json"
    assert sources["cache-size-sweep"] == str(new)


def test_a_page_merged_from_several_runs_says_when_and_at_which_commit_each_was_measured(
        report, tmp_path):
    first, second = run_doc(), hosts_doc()
    first["datetime"], first["commit_info"] = "2026-12-03T05:19:00+00:00", {"id": "744b5ba" * 6}
    second["datetime"] = "2026-12-03T09:46:30+00:00"
    second["commit_info"] = {"id": "12aa4de" * 6, "dirty": True}
    second["benchmarks"] = [b for b in second["benchmarks"] if b["group"] == "hosts-balance"]
    paths = []
    for name, doc in (("full.json", first), ("hosts.json", second)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(doc))
    out = tmp_path / "out" / "benchmarks.md"
    text = report.build(paths, out, tmp_path / "img", plots=False)
    runs = [f"| `{paths[0]}` | 2026-12-03 05:19 UTC, commit 744b5ba744b5 | "
            "webcache-scaling, cache-comparison, webcache-hits |",
            f"| `{paths[1]}` | 2026-12-03 09:46 UTC, commit 12aa4de12aa4 (dirty tree) | "
            "hosts-balance |"]
    for row in runs:
        assert row in text
    assert "benchmark run (from the JSON of the last run)" in text
    # Re-rendered from the kept JSON alone: the same runs, dates and commits.
    again = report.build([out.with_suffix(".json")], tmp_path / "again" / "benchmarks.md",
                         tmp_path / "img", plots=False)
    for row in runs:
        assert row in again
    # One run: no such table.
    single = build(report, tmp_path, run_doc())
    assert "| run | measured | groups |" not in single


def test_the_sweep_says_when_hits_stayed_on_the_fast_path(report, tmp_path):
    # The native hit loop takes a connection back after its miss: hits stay on the fast path.
    text = build(report, tmp_path, hosts_doc(sweep_rps_big=16000.0, sweep_big_hits=1.0,
                                             share_of_hits=0.99))
    section = text.split("## cache-size-sweep", 1)[1].split("\n## ", 1)[0]
    assert ("a hit ratio of 0.780 and 0.772 of the requests on the fast path. Every hit but "
            "0.0078 of the requests was on the fast path") in section
    assert "Hits too went through aiohttp" not in section
