"""HTTP scaling and capacity of the cooperative web cache (issue 6), with real node processes.

Two groups, each run once per configuration (``benchmark.pedantic(rounds=1, iterations=1)``: a
load test is one bounded run, not a micro-timing), every derived number in ``extra_info``:

``webcache-scaling``
    Throughput of cache hits (64 files of 4 KiB, all cached after a warm-up) with 1, 2 and 4
    ``mcs-webcache`` nodes, and the same for the shared-nothing baseline (a private dict per node,
    no shared memory, no locks: the ceiling of what the HTTP stack alone can do). The **load
    generator runs on the same machine and shares its cores** (``wrk -t1``, or the fallback
    generator below); rows with more nodes than cores are labelled as such. ``scaling_factor`` is
    req/s over the 1-node req/s of the same series in the same run; ``cpu_scaling_factor`` divides
    out the CPU the nodes actually got (N x requests per node-CPU-second, relative to 1 node): it
    shows whether the cache itself scales (no lock contention, no shared hot spot) on a machine
    with too few cores to show it in wall-clock throughput.

``cache-comparison``
    The same 3 nodes and the same per-node memory, three caches: the shared mcs cache, a private
    in-process LRU per node (``bench/shared_nothing.py``, the baseline) and one Redis server with
    ``maxmemory`` = the total budget and ``allkeys-lru`` (skipped if ``redis-server`` is missing).
    Workload: 300 files of 16-48 KiB (9.4 MiB: 2.3x one node's 4 MiB, 0.78x the 12 MiB total),
    requested with a seeded Zipf distribution (s = 0.9; rank -> file is a seeded shuffle). After a
    warm-up, the measured run reports hit ratio, files and bytes read from disk, and req/s.

Bytes read from disk: the baselines count them exactly. ``mcs-webcache`` counts disk reads but
not bytes, so for it the bytes are derived from the nodes' ``/proc/PID/io`` ``rchar`` over the
measured run: the bytes ``read()``/``readv()``/``pread()`` returned. The asyncio event loop reads
sockets with ``recv()``, which ``rchar`` does not count, so under asyncio ``rchar`` is exactly the
file bytes read; under uvloop (libuv reads sockets with ``read()``) the request bytes are
subtracted (every generated request has the same length; at most one request per connection is
in flight when the generator stops: the recorded error bound). The shared-nothing row records
both figures (``disk_bytes`` counted, ``disk_bytes_rchar`` derived) to validate the derivation in
every run. "Disk" means a ``read()`` of the file: the files sit in the page cache, so these are
system calls and copies, not device I/O. Known gap: since the native hit loop, a node also sends
hot bodies of 16 KiB or more from its sealed copies with ``sendfile``, which ``rchar`` counts
too, so the derived figure of ``mcs-shared`` holds those bytes (5.7 GiB in a run of 2026-12-03,
with 0 file reads): it needs a counter of the bytes sent from sealed copies before it can be
published again (docs/benchmarks.md keeps the comparison of a run before the loop).

Every load is bounded in time, loopback only; every process is stopped and checked: exit status
0, no ``/dev/shm/mcs.*`` object and no SysV segment of a node left behind.

Load generator: ``wrk`` when installed (``apt-get install wrk``), with a generated Lua script
(seeded per thread); otherwise this file run as a script is a small multi-process keep-alive
raw-socket generator (``MCS_BENCH_LOADGEN=python`` forces it).
"""

from __future__ import annotations

import bisect
import http.client
import importlib.util
import json
import os
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mcs import procfs

HERE = Path(__file__).resolve().parent
CORES = os.cpu_count() or 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK = shutil.which("wrk")
LOADGEN = os.environ.get("MCS_BENCH_LOADGEN") or ("wrk" if WRK else "python")
# the nodes use uvloop when it is installed (webcache.node), and libuv reads sockets with read()
SOCKET_READS_IN_RCHAR = importlib.util.find_spec("uvloop") is not None

# -- scaling configuration --------------------------------------------------------------------
SCALE_NODES = [1, 2, 4]
SCALE_FILES, SCALE_SIZE = 64, 4096
SCALE_CONNECTIONS = 32
SCALE_WARMUP_S, SCALE_RUN_S = 1, 3

# -- comparison configuration -----------------------------------------------------------------
CMP_NODES = 3
CMP_FILES = 300
CMP_MIN, CMP_MAX = 16 << 10, 48 << 10
CMP_CACHE = 4 << 20  # per node
CMP_ZIPF_S = 0.9
CMP_SEED = 20260611
CMP_CONNECTIONS = 24
CMP_WARMUP_S, CMP_RUN_S = 3, 4

_SCALING: dict[tuple[str, int], dict[str, Any]] = {}  # (impl, nodes) -> result (scaling factors)


# -- sites ---------------------------------------------------------------------------------------


def make_scaling_site(root: Path) -> list[str]:
    rng = random.Random(4096)
    paths = []
    for i in range(SCALE_FILES):
        name = f"s{i:02d}.bin"
        (root / name).write_bytes(rng.randbytes(SCALE_SIZE))
        paths.append("/" + name)
    return paths


def make_zipf_site(root: Path, files: int = CMP_FILES, smallest: int = CMP_MIN,
                   largest: int = CMP_MAX, s: float = CMP_ZIPF_S,
                   seed: int = CMP_SEED) -> tuple[list[str], list[float], dict[str, int]]:
    """``files`` files of ``smallest``-``largest`` bytes (300 of 16-48 KiB by default); returns
    (paths by popularity rank, Zipf CDF of exponent ``s``, sizes). bench/test_hosts.py too."""
    rng = random.Random(seed)
    sizes = {}
    width = max(3, len(str(files - 1)))
    for i in range(files):
        name = f"/z{i:0{width}d}.bin"  # same length for every path: equal request sizes
        size = rng.randrange(smallest, largest + 1)
        (root / name[1:]).write_bytes(rng.randbytes(size))
        sizes[name] = size
    ranked = sorted(sizes)
    rng.shuffle(ranked)  # popularity is independent of size
    weights = [1 / (r ** s) for r in range(1, files + 1)]
    total, acc, cdf = sum(weights), 0.0, []
    for w in weights:
        acc += w
        cdf.append(acc / total)
    cdf[-1] = 1.0
    return ranked, cdf, sizes


def zipf_expectations(ranked: list[str], cdf: list[float], sizes: dict[str, int],
                      budget: int) -> dict[str, float]:
    """Ideal hit ratio of a cache of ``budget`` bytes that holds the hottest files (what a
    perfect LFU would keep): a yardstick for the measured ratios."""
    used, mass = 0, 0.0
    for path, c in zip(ranked, cdf):
        if used + sizes[path] > budget:
            break
        used += sizes[path]
        mass = c
    return {"ideal_hit_ratio": round(mass, 4)}


# -- load generation ---------------------------------------------------------------------------


@dataclass
class Load:
    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_us: dict[str, float]
    generator: str
    generator_cpu_s: float
    request_bytes: int  # bytes of one request as sent (all requests have the same length)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def _request_bytes(path: str, port: int) -> int:
    return len(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())


def _lua_script(paths: list[str], cdf: list[float] | None, seed: int) -> str:
    quoted = ",".join(json.dumps(p) for p in paths)
    lines = [f"local paths = {{{quoted}}}", f"local n = {len(paths)}"]
    if cdf is not None:
        lines.append("local cdf = {" + ",".join(repr(c) for c in cdf) + "}")
    lines.append(f"local seed = {seed}")
    lines.append("""
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end
function init(args)
  math.randomseed(seed + 7919 * tid)
  pos = (tid * 17) % n
end""")
    if cdf is not None:
        lines.append("""
function request()
  local u = math.random()
  local lo, hi = 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then lo = mid + 1 else hi = mid end
  end
  return wrk.format("GET", paths[lo])
end""")
    else:
        lines.append("""
function request()
  pos = pos % n + 1
  return wrk.format("GET", paths[pos])
end""")
    lines.append("""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('MCSJSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, '
    .. '"read": %d, "write": %d, "status": %d, "timeout": %d}, "latency_us": {"p50": %d, '
    .. '"p90": %d, "p99": %d, "max": %d}}\\n', summary.requests, summary.duration, e.connect,
    e.read, e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end""")
    return "\n".join(lines) + "\n"


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_load(port: int, paths: list[str], *, cdf: list[float] | None, seed: int,
             duration: int, connections: int, threads: int = 1) -> Load:
    """One bounded load run against 127.0.0.1:port: Zipf over ``paths`` (when ``cdf``) or a
    round-robin cycle, ``connections`` keep-alive connections for ``duration`` seconds."""
    url = f"http://127.0.0.1:{port}/"
    cpu0 = _children_cpu()
    if LOADGEN == "wrk":
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
            fh.write(_lua_script(paths, cdf, seed))
            script = fh.name
        try:
            out = subprocess.run(
                [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
                 "-s", script, url], capture_output=True, text=True, timeout=duration + 30)
        finally:
            os.unlink(script)
        generator = f"wrk -t{threads} -c{connections} -d{duration}s (Lua request(), "\
                    f"{'seeded Zipf' if cdf else 'round-robin'})"
        match = re.search(r"^MCSJSON (.*)$", out.stdout, re.M)
        assert out.returncode == 0 and match, f"wrk failed: {out.stdout}\n{out.stderr}"
        doc = json.loads(match.group(1))
        duration_s = doc["duration_us"] / 1e6
    else:
        spec = {"port": port, "paths": paths, "cdf": cdf, "duration": duration,
                "connections": max(1, connections // threads)}
        procs = []
        for t in range(threads):
            procs.append(subprocess.Popen(
                [sys.executable, "-P", str(Path(__file__)), "--loadgen",
                 json.dumps({**spec, "seed": seed + 7919 * (t + 1)})],
                stdout=subprocess.PIPE, text=True))
        docs = []
        for p in procs:
            stdout, _ = p.communicate(timeout=duration + 30)
            assert p.returncode == 0, f"load generator failed: {stdout}"
            docs.append(json.loads(stdout.strip().splitlines()[-1]))
        doc = {"requests": sum(d["requests"] for d in docs),
               "errors": {k: sum(d["errors"][k] for d in docs) for k in docs[0]["errors"]},
               "latency_us": {k: max(d["latency_us"][k] for d in docs)
                              for k in docs[0]["latency_us"]}}
        duration_s = max(d["duration_s"] for d in docs)
        generator = f"python raw-socket keep-alive x{threads} processes, "\
                    f"{connections} connections, {duration}s"
    return Load(requests=doc["requests"], duration_s=duration_s, errors=doc["errors"],
                latency_us={k: float(v) for k, v in doc["latency_us"].items()},
                generator=generator, generator_cpu_s=_children_cpu() - cpu0,
                request_bytes=_request_bytes(paths[0], port))


def _loadgen_main(spec: dict[str, Any]) -> None:
    """The fallback generator: one process, N keep-alive connections, one request in flight
    per connection, responses parsed by Content-Length; prints one JSON line."""
    rng = random.Random(spec["seed"])
    paths, cdf = spec["paths"], spec["cdf"]
    pos = [rng.randrange(len(paths))]

    def pick() -> str:
        if cdf is not None:
            return paths[min(bisect.bisect_left(cdf, rng.random()), len(paths) - 1)]
        pos[0] = (pos[0] + 1) % len(paths)
        return paths[pos[0]]

    host = f"127.0.0.1:{spec['port']}"
    sel = selectors.DefaultSelector()
    errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    latencies: list[int] = []
    done = 0

    def open_conn() -> None:
        try:
            s = socket.create_connection(("127.0.0.1", spec["port"]), timeout=5)
        except OSError:
            errors["connect"] += 1
            return
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        st = {"buf": bytearray(), "need": None, "status": 0, "t": 0}
        sel.register(s, selectors.EVENT_READ, st)
        send(s, st)

    def send(s: socket.socket, st: dict) -> None:
        st["t"] = time.monotonic_ns()
        s.send(f"GET {pick()} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())

    start = time.monotonic()
    end = start + spec["duration"]
    for _ in range(spec["connections"]):
        open_conn()
    while time.monotonic() < end:
        for key, _ in sel.select(0.05):
            s, st = key.fileobj, key.data
            try:
                data = s.recv(1 << 18)
            except OSError:
                data = b""
            if not data:
                errors["read"] += 1
                sel.unregister(s)
                s.close()
                open_conn()
                continue
            buf = st["buf"]
            buf += data
            while True:
                if st["need"] is None:
                    head_end = buf.find(b"\r\n\r\n")
                    if head_end < 0:
                        break
                    head = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
                    st["status"] = int(head[0].split()[1])
                    length = 0
                    for h in head[1:]:
                        k, _, v = h.partition(":")
                        if k.strip().lower() == "content-length":
                            length = int(v)
                    st["need"] = head_end + 4 + length
                if len(buf) < st["need"]:
                    break
                del buf[:st["need"]]
                st["need"] = None
                latencies.append(time.monotonic_ns() - st["t"])
                done += 1
                if st["status"] >= 400:
                    errors["status"] += 1
                send(s, st)
    duration_s = time.monotonic() - start
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1e3 if latencies \
            else 0.0

    print(json.dumps({"requests": done, "duration_s": duration_s, "errors": errors,
                      "latency_us": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99),
                                     "max": pct(1.0)}}), flush=True)


# -- servers -----------------------------------------------------------------------------------


class Servers:
    """A supervisor that prints one JSON line (``url``, ``pids``) when serving and stops every
    node on SIGTERM: ``mcs-webcache serve`` or ``bench/shared_nothing.py``."""

    def __init__(self, cmd: list[str], domain: str | None = None) -> None:
        self.domain = domain
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.err: list[str] = []
        self.out: list[str] = []
        self.err_drain = threading.Thread(target=self._drain_err, daemon=True)
        self.err_drain.start()
        deadline = time.monotonic() + 90
        info = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                info = json.loads(line)
                break
        if info is None:
            code = self.stop()
            pytest.fail(f"{cmd[:3]} did not start (exit {code}): {''.join(self.err)[-2000:]}")
        self.port = int(info["url"].rstrip("/").rsplit(":", 1)[1])
        self.pids: list[int] = list(info["pids"])
        self.out_drain = threading.Thread(target=self._drain_out, daemon=True)
        self.out_drain.start()

    def _drain_out(self) -> None:
        for line in self.proc.stdout:
            self.out.append(line)

    def _drain_err(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        for t in ("out_drain", "err_drain"):
            if hasattr(self, t):
                getattr(self, t).join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code

    def get(self, path: str) -> tuple[int, bytes]:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def per_node(self, path: str, *, attempts: int = 3000) -> dict[int, dict]:
        """The JSON document at ``path`` from every node: SO_REUSEPORT picks the node per
        connection, so ask over new connections until every pid has answered."""
        docs: dict[int, dict] = {}
        for _ in range(attempts):
            status, body = self.get(path)
            assert status == 200, (path, status, body[:200])
            doc = json.loads(body)
            docs[doc["pid"]] = doc
            if set(self.pids) <= set(docs):
                return docs
        pytest.fail(f"only {sorted(docs)} of {self.pids} answered {path}")

    def cpu_s(self) -> float:
        return sum(_proc_cpu(pid) for pid in self.pids)

    def rchar(self) -> int:
        return sum(_proc_rchar(pid) for pid in self.pids)


def _proc_cpu(pid: int) -> float:
    stat = procfs.read_stat(pid)
    return (stat.utime + stat.stime) / CLK_TCK


def _proc_rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no rchar for {pid}")


def _sysv_segments_of(pids: list[int]) -> list[int]:
    return [row.shmid for row in procfs.shm_segments() if row.cpid in pids]


def mcs_cluster(root: Path, nodes: int, domain: str, cache_size: int, max_entry: int,
                fast_path: bool = True) -> Servers:
    exe = str(Path(sys.executable).with_name("mcs-webcache"))
    return Servers([exe, "serve", "--root", str(root), "--nodes", str(nodes), "--port", "0",
                    "--domain", domain, "--cache-size", str(cache_size),
                    "--max-entry", str(max_entry)] + ([] if fast_path else ["--no-fast-path"]),
                   domain=domain)


def baseline_cluster(root: Path, nodes: int, cache_size: int, max_entry: int,
                     backend: str = "lru", redis_port: int = 0) -> Servers:
    return Servers([sys.executable, "-P", str(HERE / "shared_nothing.py"), "--root", str(root),
                    "--nodes", str(nodes), "--port", "0", "--cache-size", str(cache_size),
                    "--max-entry", str(max_entry), "--backend", backend,
                    "--redis-port", str(redis_port)])


def stop_and_check(servers: Servers) -> None:
    code = servers.stop()
    assert code == 0, f"supervisor exit status {code}: {''.join(servers.err)[-2000:]}"
    for pid in servers.pids:
        assert not os.path.exists(f"/proc/{pid}"), f"node {pid} still running"
    assert not _sysv_segments_of(servers.pids), "a node left a SysV segment behind"
    if servers.domain:
        assert not os.path.exists(f"/dev/shm/mcs.{servers.domain}"), "bootstrap object left"


def _warnings(servers: Servers) -> list[str]:
    """Warnings the nodes logged (suspicions, restarts): a loaded machine must not cause any."""
    return [line.strip()[:200] for line in servers.err + servers.out
            if re.search(r"suspect|evict|fenc|restart|exited", line, re.I)][:20]


def _tracebacks(servers: Servers) -> int:
    """'Error handling request' tracebacks the nodes logged (e.g. a client gone mid-response)."""
    return sum(1 for line in servers.err if "Error handling request" in line)


def _domain(tag: str) -> str:
    return f"bench-{tag}-{os.getpid()}"


def _machine() -> dict[str, Any]:
    return {"cores": CORES, "load_generator_shares_cores": True, "loadgen": LOADGEN,
            "event_loop": "uvloop" if SOCKET_READS_IN_RCHAR else "asyncio"}


# -- 1. scaling ----------------------------------------------------------------------------------


# mcs-shared-aiohttp: the same mcs nodes with the hit fast path off, every request through the
# aiohttp application as in the shared-nothing nodes: the like-for-like comparison of caches.
SCALE_IMPLS = ["mcs-shared", "mcs-shared-aiohttp", "shared-nothing-lru"]


@pytest.mark.benchmark(group="webcache-scaling")
@pytest.mark.parametrize("nodes", SCALE_NODES, ids=[f"{n}-nodes" for n in SCALE_NODES])
@pytest.mark.parametrize("impl", SCALE_IMPLS)
def test_hit_throughput_scaling(benchmark, report, tmp_path, impl, nodes):
    root = tmp_path / "site"
    root.mkdir()
    paths = make_scaling_site(root)
    is_mcs = impl.startswith("mcs-shared")
    if is_mcs:
        servers = mcs_cluster(root, nodes, _domain(f"scale{nodes}"), 16 << 20, 1 << 20,
                              fast_path=impl == "mcs-shared")
        status_path = "/_mcs/status"
    else:
        servers = baseline_cluster(root, nodes, 16 << 20, 1 << 20, "lru")
        status_path = "/_stats"
    try:
        for _ in range(1 if is_mcs else 4 * nodes):
            for p in paths:  # fill: mcs caches each file once for the whole domain
                status, body = servers.get(p)
                assert status == 200 and len(body) == SCALE_SIZE
        run_load(servers.port, paths, cdf=None, seed=1, duration=SCALE_WARMUP_S,
                 connections=SCALE_CONNECTIONS)
        before = servers.per_node(status_path)
        cpu0, t0 = servers.cpu_s(), time.monotonic()

        def measured() -> Load:
            return run_load(servers.port, paths, cdf=None, seed=2, duration=SCALE_RUN_S,
                            connections=SCALE_CONNECTIONS)

        load = benchmark.pedantic(measured, rounds=1, iterations=1)
        node_cpu = servers.cpu_s() - cpu0
        wall = time.monotonic() - t0
        after = servers.per_node(status_path)
        hits = {pid: after[pid]["hits"] - before[pid]["hits"] for pid in servers.pids}
        misses = sum(after[pid]["misses"] - before[pid]["misses"] for pid in servers.pids)
        if is_mcs:
            entries = after[servers.pids[0]]["cache"]["entries"]
            assert entries == SCALE_FILES  # each file cached exactly once in the domain
            recoveries = max(after[p]["recoveries"] - before[p]["recoveries"]
                             for p in servers.pids)
    finally:
        stop_and_check(servers)

    assert load.failed == 0, load.errors
    assert load.requests > 0
    oversubscribed = nodes > CORES
    info: dict[str, Any] = {
        "impl": impl,
        "nodes": nodes,
        "label": f"{impl}, {nodes} node{'s' if nodes > 1 else ''}"
                 + (" (more nodes than cores)" if oversubscribed else ""),
        "oversubscribed": oversubscribed,
        "baseline": nodes == 1,  # of its own series; the mcs/shared-nothing ratio is derived
        **_machine(),
        "generator": load.generator,
        "files": SCALE_FILES, "file_bytes": SCALE_SIZE, "warmup_s": SCALE_WARMUP_S,
        "requests": load.requests, "duration_s": round(load.duration_s, 3),
        "req_per_s": round(load.rps, 1),
        "failed_requests": load.failed,
        "latency_us_p50": load.latency_us["p50"], "latency_us_p99": load.latency_us["p99"],
        "hit_ratio": round(sum(hits.values()) / max(1, sum(hits.values()) + misses), 5),
        "requests_per_node": sorted(hits.values(), reverse=True),
        "node_cpu_s": round(node_cpu, 3),
        "generator_cpu_s": round(load.generator_cpu_s, 3),
        "node_cores_used": round(node_cpu / wall, 3),
        "generator_cores_used": round(load.generator_cpu_s / wall, 3),
        "req_per_node_cpu_s": round(load.requests / node_cpu, 1) if node_cpu else None,
    }
    if is_mcs:
        info.update(recoveries=recoveries, supervisor_warnings=_warnings(servers),
                    logged_request_errors=_tracebacks(servers))
    _SCALING[(impl, nodes)] = info
    one = _SCALING.get((impl, 1))
    if one is not None:
        info["scaling_factor"] = round(info["req_per_s"] / one["req_per_s"], 3)
        info["scaling_efficiency"] = round(info["scaling_factor"] / nodes, 3)
        if info["req_per_node_cpu_s"] and one["req_per_node_cpu_s"]:
            info["cpu_scaling_factor"] = round(
                nodes * info["req_per_node_cpu_s"] / one["req_per_node_cpu_s"], 3)
    if not is_mcs:
        for name in ("mcs-shared", "mcs-shared-aiohttp"):
            other = _SCALING.get((name, nodes))
            if other is not None:
                key = "mcs_over_shared_nothing" + ("" if name == "mcs-shared" else "_aiohttp")
                info[key] = round(other["req_per_s"] / info["req_per_s"], 3)
    report(**info)


# -- 2. shared cache vs shared-nothing vs Redis -------------------------------------------------

VARIANTS = ["shared-nothing-lru", "mcs-shared", "redis"]


@pytest.fixture(scope="module")
def zipf_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("zipf-site")
    ranked, cdf, sizes = make_zipf_site(root)
    return root, ranked, cdf, sizes


def _start_variant(variant: str, root: Path, redis) -> Servers:
    if variant == "mcs-shared":
        return mcs_cluster(root, CMP_NODES, _domain("cmp"), CMP_CACHE, 1 << 20)
    if variant == "shared-nothing-lru":
        return baseline_cluster(root, CMP_NODES, CMP_CACHE, 1 << 20, "lru")
    return baseline_cluster(root, CMP_NODES, CMP_CACHE, 1 << 20, "redis", redis.port)


def _counters(variant: str, servers: Servers) -> dict[int, dict]:
    if variant == "mcs-shared":
        return servers.per_node("/_mcs/status")
    return servers.per_node("/_stats?paths=1")


@pytest.mark.benchmark(group="cache-comparison")
@pytest.mark.parametrize("variant", VARIANTS)
def test_shared_vs_shared_nothing(benchmark, report, zipf_site, variant):
    root, ranked, cdf, sizes = zipf_site
    redis = None
    if variant == "redis":
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        sys.path.insert(0, str(HERE))
        try:
            from shared_nothing import RedisServer
        finally:
            sys.path.remove(str(HERE))
        redis = RedisServer(CMP_NODES * CMP_CACHE)
    try:
        servers = _start_variant(variant, root, redis)
        try:
            run_load(servers.port, ranked, cdf=cdf, seed=CMP_SEED, duration=CMP_WARMUP_S,
                     connections=CMP_CONNECTIONS)
            before = _counters(variant, servers)
            redis_before = redis.info() if redis else None
            cpu0, t0, rchar0 = servers.cpu_s(), time.monotonic(), servers.rchar()

            def measured() -> Load:
                return run_load(servers.port, ranked, cdf=cdf, seed=CMP_SEED + 1,
                                duration=CMP_RUN_S, connections=CMP_CONNECTIONS)

            load = benchmark.pedantic(measured, rounds=1, iterations=1)
            rchar = servers.rchar() - rchar0
            node_cpu, wall = servers.cpu_s() - cpu0, time.monotonic() - t0
            after = _counters(variant, servers)
            redis_after = redis.info() if redis else None
        finally:
            stop_and_check(servers)
    finally:
        if redis is not None:
            redis.close()

    assert load.failed == 0, load.errors
    pids = servers.pids

    def delta(key: str) -> int:
        return sum(after[p][key] - before[p][key] for p in pids)

    hits, misses, disk_reads = delta("hits"), delta("misses"), delta("disk_reads")
    # under uvloop rchar also counts the request bytes read from the sockets: every completed
    # request, plus at most one in flight per connection when the generator stopped
    socket_bytes = load.requests * load.request_bytes if SOCKET_READS_IN_RCHAR else 0
    error_bound = CMP_CONNECTIONS * load.request_bytes if SOCKET_READS_IN_RCHAR else 0
    disk_bytes_rchar = rchar - socket_bytes
    info: dict[str, Any] = {
        "variant": variant,
        "baseline": variant == "shared-nothing-lru",
        **_machine(),
        "generator": load.generator,
        "nodes": CMP_NODES,
        "cache_bytes_per_node": CMP_CACHE,
        "cache_bytes_total": CMP_NODES * CMP_CACHE,
        "files": CMP_FILES,
        "file_set_bytes": sum(sizes.values()),
        "file_bytes_min": min(sizes.values()), "file_bytes_max": max(sizes.values()),
        "warmup_s": CMP_WARMUP_S,
        "zipf_s": CMP_ZIPF_S,
        "seed": CMP_SEED,
        **{f"{k}_one_node": v for k, v in
           zipf_expectations(ranked, cdf, sizes, CMP_CACHE).items()},
        **{f"{k}_all_nodes": v for k, v in
           zipf_expectations(ranked, cdf, sizes, CMP_NODES * CMP_CACHE).items()},
        "requests": load.requests,
        "duration_s": round(load.duration_s, 3),
        "req_per_s": round(load.rps, 1),
        "failed_requests": load.failed,
        "latency_us_p50": load.latency_us["p50"], "latency_us_p99": load.latency_us["p99"],
        "hits": hits, "misses": misses,
        "hit_ratio": round(hits / max(1, hits + misses), 5),
        "disk_reads": disk_reads,
        "node_cpu_s": round(node_cpu, 3),
        "generator_cpu_s": round(load.generator_cpu_s, 3),
        "node_cores_used": round(node_cpu / wall, 3),
    }
    if variant != "redis":  # (redis replies are socket reads too: counted bytes only)
        info.update(disk_bytes_rchar=disk_bytes_rchar, disk_bytes_rchar_error_bound=error_bound)
    if variant == "mcs-shared":
        doc = after[pids[0]]["cache"]
        info.update(recoveries=max(after[p]["recoveries"] - before[p]["recoveries"] for p in pids),
                    fast_path=True, supervisor_warnings=_warnings(servers),
                    logged_request_errors=_tracebacks(servers))
        info.update(disk_bytes=disk_bytes_rchar, disk_bytes_method="rchar",
                    cached_entries=doc["entries"], cached_distinct_files=doc["entries"],
                    cached_bytes=doc["bytes"], evictions=delta("evictions"),
                    coalesced_misses=delta("coalesced_misses"))
    else:
        info.update(disk_bytes=delta("disk_bytes"), disk_bytes_method="counted")
        if variant == "shared-nothing-lru":
            info["disk_bytes_rchar_validated"] = \
                abs(info["disk_bytes"] - disk_bytes_rchar) <= error_bound
            cached = [set(after[p]["paths"]) for p in pids]
            info.update(cached_entries=sum(len(c) for c in cached),
                        cached_distinct_files=len(set().union(*cached)),
                        cached_bytes=sum(after[p]["bytes"] for p in pids),
                        evictions=delta("evictions"))
        else:
            info.update(
                cached_entries=int(redis_after.get("db0", "keys=0").split(",")[0].split("=")[1]),
                redis_used_memory=int(redis_after["used_memory"]),
                redis_maxmemory=int(redis_after["maxmemory"]),
                evictions=int(redis_after["evicted_keys"]) - int(redis_before["evicted_keys"]),
                redis_keyspace_hits=int(redis_after["keyspace_hits"])
                - int(redis_before["keyspace_hits"]))
            info["cached_distinct_files"] = info["cached_entries"]
    info["duplication_factor"] = round(
        info["cached_entries"] / max(1, info["cached_distinct_files"]), 3)
    info["disk_bytes_per_request"] = round(info["disk_bytes"] / max(1, load.requests), 1)
    info["disk_reads_per_1000_requests"] = round(1000 * disk_reads / max(1, load.requests), 2)
    report(**info)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
    _loadgen_main(json.loads(sys.argv[2]))
