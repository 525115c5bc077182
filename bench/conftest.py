"""Shared fixtures for the benchmark suites: leak checks and a compact summary of the results.

Every benchmark leaves no SysV segment created by this process and no child process (running
or zombie) behind. The numbers each benchmark derives (ns per lock+unlock pair, abandonment
latency percentiles, copy bandwidth) go into ``benchmark.extra_info`` (hence into the JSON
file) and are also printed in one table at the end of the run.
"""

from __future__ import annotations

import gc
import importlib.util
import itertools
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import mcs
from mcs import procfs

REPO = Path(__file__).resolve().parent.parent


def import_from_tests(name: str) -> Any:
    """A helper module of tests/ (the lab or component a test and a benchmark share), loaded
    by path: bench/ does not put tests/ on sys.path."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

_SUMMARY = pytest.StashKey[dict]()


def pytest_configure(config: pytest.Config) -> None:
    # Benchmark what users install: the source tree must not shadow site-packages.
    if Path(mcs.__file__).resolve().is_relative_to(REPO / "mcs") and not os.environ.get(
        "MCS_TEST_SOURCE"
    ):
        raise pytest.UsageError(
            f"mcs was imported from the source tree ({mcs.__file__}); run the benchmarks with "
            "'./dev bench' (installed package) or set MCS_TEST_SOURCE=1 for an editable install")
    config.stash[_SUMMARY] = {}


# -- leak checks ------------------------------------------------------------------------------


def own_sysv_segments() -> set[int]:
    """Ids of the SysV segments created by this process.

    Filtering on the creator pid (not just the uid) keeps the check exact while other test
    runs on the same machine create and free their own segments.
    """
    me = os.getpid()
    return {row.shmid for row in procfs.shm_segments() if row.cpid == me}


def own_children() -> set[int]:
    """Pids of this process's children, zombies (not yet reaped) included."""
    me = os.getpid()
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = procfs.read_stat(entry).ppid
        except OSError:
            continue
        if ppid == me:
            children.add(int(entry))
    return children


_domains = itertools.count()


def new_domain(prefix: str) -> str:
    """A domain name of this run: ``<prefix><pid>-<n>``."""
    return f"{prefix}{os.getpid()}-{next(_domains)}"


def remove_bootstrap(domain: str) -> None:
    """Unlink the domain's bootstrap objects (/dev/shm/mcs.<domain>[.<component>]) if present."""
    for name in os.listdir("/dev/shm"):
        if name == f"mcs.{domain}" or name.startswith(f"mcs.{domain}."):
            try:
                os.unlink(f"/dev/shm/{name}")
            except FileNotFoundError:
                pass


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every benchmark leaves no SysV segment, no child process and no extra thread behind."""
    segments, children = own_sysv_segments(), own_children()
    threads = threading.active_count()
    yield
    gc.collect()
    wait_for(lambda: own_sysv_segments() <= segments, 5.0)
    leaked_segments = own_sysv_segments() - segments
    leaked_children = own_children() - children
    assert not leaked_segments, f"leaked SysV segments {sorted(leaked_segments)}"
    assert not leaked_children, f"left child processes behind: {sorted(leaked_children)}"
    assert threading.active_count() <= threads, "left threads behind"


# -- summary ----------------------------------------------------------------------------------


@pytest.fixture
def report(request: pytest.FixtureRequest, benchmark) -> Callable[..., None]:
    """``report(**info)``: put derived numbers in ``benchmark.extra_info`` and the run summary."""
    summary = request.config.stash[_SUMMARY]

    def record(**info: Any) -> None:
        benchmark.extra_info.update(info)
        entry = summary.setdefault(request.node.name, {"group": benchmark.group})
        entry.update(info)

    return record


MUTEX_RATIO_TARGET = 0.7  # GlobalMutex at most 0.7 x threading.Lock per lock+unlock pair


def _ratio(summary: dict) -> dict:
    """GlobalMutex / threading.Lock per-pair time (the target is <= MUTEX_RATIO_TARGET)."""
    mutex = summary.get("test_lock_unlock[GlobalMutex]", {})
    thread = summary.get("test_lock_unlock[threading.Lock]", {})
    out = {}
    for key in ("ns_per_pair", "ns_per_pair_min"):
        if mutex.get(key) and thread.get(key):
            out[f"GlobalMutex/threading.Lock ({key})"] = round(mutex[key] / thread[key], 3)
    return out


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    summary = config.stash.get(_SUMMARY, {})
    ratios = _ratio(summary)
    output_json["mcs_summary"] = {"results": summary, "ratios": ratios,
                                  "targets": {k: {"at_most": MUTEX_RATIO_TARGET} for k in ratios}}


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    summary = config.stash.get(_SUMMARY, {})
    if not summary:
        return
    tr = terminalreporter
    tr.write_sep("=", "mcs benchmark summary (derived numbers, also in the JSON extra_info)")
    for name, info in summary.items():
        group = info.get("group")
        if group == "lock-unlock" and "ns_per_pair" in info:
            tr.write_line(f"  [{group}] {name}: {info['ns_per_pair']:.1f} ns/pair (median), "
                          f"{info['ns_per_pair_min']:.1f} ns/pair (min)")
        elif group == "abandonment" and "latency_us_median" in info:
            tr.write_line(
                f"  [{group}] {name}: kill -9 -> ABANDONED in {info['latency_us_median']:.1f} us "
                f"median, p90 {info['latency_us_p90']:.1f}, p99 {info['latency_us_p99']:.1f}, "
                f"max {info['latency_us_max']:.1f} us over {info['rounds']} rounds; "
                f"multiprocessing.Lock released after its holder was killed: "
                f"{info.get('contrast_multiprocessing_lock_released')}")
        elif group == "copy" and "gb_per_s" in info:
            tr.write_line(f"  [{group}] {name}: {info['gb_per_s']:.2f} GB/s (median)")
    for label, value in _ratio(summary).items():
        tr.write_line(f"  {label}: {value} (target <= {MUTEX_RATIO_TARGET})")
