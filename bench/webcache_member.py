"""One web cache member for ``bench/test_webcache.py``'s recovery-versus-cache-size benchmark: a
child process driven by lines on stdin, answering one JSON line each.

    python bench/webcache_member.py SPEC_JSON

SPEC: ``domain``, ``cache_size``, ``entries``, ``prefix``, ``data_size``, ``timing``. The member
joins (``McsWebCache(...).start()``), stores ``entries`` synthetic files ``/<prefix>/<i>`` (their
identity is made up: the benchmark measures the shared table and the arenas, not the disk), and
says ``{"t": "ready", "epoch", "slot", "stored", "adopted"}``. Then, on stdin:

    takeover   wait until a warm takeover of an adopted arena is done (or there was none):
               {"t": "takeover", "entries_adopted", "entries_dropped", "arenas_adopted", "ms"}
"""

from __future__ import annotations

import json
import sys
import time

from webcache.cache import McsWebCache
from webcache.paths import ResolvedFile


def synthetic(prefix: str, i: int, data_size: int) -> ResolvedFile:
    """The made-up identity of file ``i`` (the same in every process)."""
    return ResolvedFile(f"/{prefix}/{i}", data_size, 1_000_000_000 + i, 1_000_000 + i, 1, 1)


def fill(cache: McsWebCache, prefix: str, entries: int, data_size: int) -> int:
    data = bytes(range(256)) * (data_size // 256) + bytes(data_size % 256)
    return sum(cache.store(synthetic(prefix, i, data_size), data) for i in range(entries))


def main() -> None:
    spec = json.loads(sys.argv[1])
    cache = McsWebCache(spec["domain"], cache_size=spec["cache_size"],
                        max_entry=spec["data_size"], **spec["timing"]).start()
    t0 = time.monotonic()
    while cache._adopted is not None and time.monotonic() - t0 < 120:
        time.sleep(0.001)  # an adopted arena is ours once its scan is done
    stored = fill(cache, spec["prefix"], spec["entries"], spec["data_size"])
    print(json.dumps({"t": "ready", "epoch": cache.stats.epoch, "slot": cache.member.slot,
                      "stored": stored, "adopted": cache.cache_stats.entries_adopted}), flush=True)
    for line in sys.stdin:
        if line.split() == ["takeover"]:
            cs = cache.cache_stats
            print(json.dumps({"t": "takeover", "entries_adopted": cs.entries_adopted,
                              "entries_dropped": cs.entries_dropped,
                              "arenas_adopted": cs.arenas_adopted,
                              "ms": round((time.monotonic() - t0) * 1e3, 3)}), flush=True)
    cache.stop()


if __name__ == "__main__":
    main()
