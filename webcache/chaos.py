"""``mcs-chaos``: a bounded, seeded chaos soak of the cooperative web cache.

    mcs-chaos [--seconds 600] [--faults 200] [--seed S] [--nodes 3] [--clients 4] [--burners N]

Starts ``mcs-webcache serve`` on a generated site (loopback, a free port), keeps client threads
requesting files on keep-alive connections and comparing every body with the file on disk, and
injects faults at random (seeded): kill -9 of a node or of the master, SIGSTOP, a kill at a
named crash point of the recovery protocol, a kill during a recovery, and section poisoning.
After each fault it waits until every node is back (the launcher restarts the dead ones) and
checks the shared structures' invariants (webcache/check.py). At the end it stops the cache and
checks that no shared memory leaked. It prints a summary and exits 1 on any violation: a wrong
byte, a failed request on a connection to a node that was not killed, a broken invariant, a node
that does not come back, a leak, or a member evicted as hung or stalled (the soak never hangs a
member: such an eviction is a false positive of the hang detectors; frozen ones are the SIGSTOP
faults). ``--burners N`` keeps N busy-looping processes running meanwhile, to soak with the CPUs
saturated. Bounded by ``--seconds`` and ``--faults``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mcs import procfs

__all__ = ["main", "soak"]

TIMING = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.4}
CRASH_POINTS = ["recovery.quiesce", "recovery.agree", "recovery.contribute", "recovery.stable"]


class Violation(Exception):
    pass


def _segments(creators: set[int]) -> set[int]:
    """SysV segments created by one of the ``creators`` pids (our nodes) that still exist."""
    return {row.shmid for row in procfs.shm_segments() if row.cpid in creators}


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: the launcher reaps it soon)."""
    try:
        return procfs.read_stat(pid).exited
    except (FileNotFoundError, ProcessLookupError):
        return True


def _site(root: Path, rng: random.Random) -> dict[str, bytes]:
    files = {}
    for i, size in enumerate([0, 10, 1000, 4096, 10_000, 65536, 100_000, 300_000] * 4):
        files[f"/f{i}-{size}.bin"] = rng.randbytes(size)
    files["/index.html"] = b"<html>chaos</html>\n"
    for name, data in files.items():
        (root / name.lstrip("/")).write_bytes(data)
    return files


class _Clients:
    def __init__(self, port: int, files: dict[str, bytes], count: int, seed: int) -> None:
        self.port, self.files = port, files
        self.names = sorted(files)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.wrong: list[str] = []
        self.failures: list[tuple[int | None, float, str]] = []  # (node, time, error)
        self.threads = [threading.Thread(target=self._run, args=(seed + i,), daemon=True)
                        for i in range(count)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        conn: http.client.HTTPConnection | None = None
        node: int | None = None
        while not self.stop.is_set():
            name = rng.choice(self.names)
            try:
                if conn is None:
                    conn, node = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10), None
                conn.request("GET", name)
                resp = conn.getresponse()
                body = resp.read()
                node = int(resp.getheader("X-Mcs-Node", "0")) or node
                with self.lock:
                    if resp.status != 200 or body != self.files[name]:
                        self.wrong.append(f"{name} from node {node}: status {resp.status}, "
                                          f"{len(body)} bytes")
                    self.ok += 1
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.failures.append((node, time.monotonic(), repr(exc)))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
        if conn is not None:
            conn.close()


def _status(port: int) -> dict[str, Any] | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/_mcs/status")
        doc = json.loads(conn.getresponse().read())
        conn.close()
        return doc
    except (OSError, http.client.HTTPException, ValueError):
        return None


# What the domain's nodes served (the board's totals when the soak ends, departed nodes
# included): how many hits the native loop answered, and how many from sealed copies. A master
# area rebuilt after a poison-master fault starts a new board, so the totals cover the soak
# since the last such fault: their ratios are what they tell.
_SERVED = ("hits", "native_served", "native_sealed_hits", "disk_reads", "checksum_failures")


def _served(port: int) -> dict[str, int]:
    doc = _status(port)
    totals = ((doc or {}).get("domain") or {}).get("totals") or {}
    return {k: int(totals.get(k, 0)) for k in _SERVED}


def _start_burners(n: int, stack: contextlib.ExitStack) -> None:
    """``n`` processes that spin on a CPU until the soak ends (killed on the way out)."""
    for _ in range(n):
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        stack.callback(burner.wait)
        stack.callback(burner.kill)


def _evictions(domain: str) -> dict[str, int]:
    """The cache domain's eviction counters by cause (empty if it cannot be read)."""
    from mcs.component_record import component_domain
    from mcs.status import domain_status

    try:
        return dict(domain_status(component_domain(domain, "webcache"))["evictions"])
    except Exception:  # the soak's verdict does not depend on reading it
        return {}


def soak(seconds: float, faults: int, seed: int, nodes: int = 3, clients: int = 4,
         log=print, burners: int = 0, evict_after: float | None = None,
         sealed_dir: bool = False) -> dict[str, Any]:
    """Run the soak; returns the summary (``violations`` lists what went wrong).
    ``sealed_dir``: the nodes keep their sealed copies as unnamed files in a directory of the
    soak's (``--sealed-dir``), which must hold no name at the end."""
    from mcs.poison import poison
    from webcache.cache import McsWebCache
    from webcache.check import check_domain

    rng = random.Random(seed)
    timing = TIMING if evict_after is None else {
        "heartbeat": 0.1, "suspect_after": min(0.5, evict_after), "evict_after": evict_after}
    violations: list[str] = []
    evictions: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    recovery_ms: list[float] = []
    killed: set[int] = set()
    node_pids: set[int] = set()  # every node process seen: the creators of our segments
    with tempfile.TemporaryDirectory(prefix="mcs-chaos-") as tmp, \
            contextlib.ExitStack() as stack:
        root = Path(tmp, "site")
        root.mkdir()
        files = _site(root, rng)
        fault_file = Path(tmp, "faults")
        domain = f"chaos-{os.getpid()}"
        env = dict(os.environ, MCS_FAULTS_FILE=str(fault_file))
        exe = str(Path(sys.executable).with_name("mcs-webcache"))
        nodes_log_file = open(Path(tmp, "nodes.log"), "w")
        stack.callback(nodes_log_file.close)
        _start_burners(burners, stack)
        copies = Path(tmp, "sealed")
        copies.mkdir()
        launcher = subprocess.Popen(
            [exe, "serve", "--root", str(root), "--nodes", str(nodes), "--port", "0",
             "--domain", domain, "--cache-size", "16M", "--max-entry", "256K",
             "--timing", json.dumps(timing)] + (["--sealed-dir", str(copies)] if sealed_dir
                                                 else []),
            stdout=subprocess.PIPE, stderr=nodes_log_file, text=True,
            env=env)
        launcher_log: list[str] = []
        info = None
        for line in launcher.stdout:
            if line.startswith("{"):
                info = json.loads(line)
                break
        if info is None:
            launcher.wait()
            launcher.stdout.close()
            raise Violation("the cache did not start")
        drain = threading.Thread(target=lambda: launcher_log.extend(launcher.stdout), daemon=True)
        drain.start()
        port = int(info["url"].rsplit(":", 1)[1].strip("/"))
        load = _Clients(port, files, clients, seed)
        started = time.monotonic()

        node_pids.update(info["pids"])

        def members() -> dict[str, Any] | None:
            doc = _status(port)
            if doc is not None:
                node_pids.update(m["pid"] for m in doc["members"])
            if doc is None or doc["recovering"] or len(doc["members"]) != nodes:
                return None
            return doc

        def settle(timeout: float = 30.0) -> dict[str, Any]:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                docs = [members() for _ in range(nodes * 2)]
                if all(docs) and len({d["generation"] for d in docs}) == 1 and \
                        not {m["pid"] for m in docs[0]["members"]} & killed:
                    time.sleep(0.1)
                    if (again := members()) and again["generation"] == docs[0]["generation"]:
                        return again
                time.sleep(0.05)
            nodes_log = Path(tmp, "nodes.log").read_text().splitlines()
            raise Violation(f"nodes did not all come back within {timeout:.0f}s; last status "
                            f"{_status(port)}; launcher: {launcher_log[-5:]}; "
                            f"nodes: {nodes_log[-15:]}")

        def inject() -> str:
            doc = settle()
            pids = [m["pid"] for m in doc["members"]]
            master = doc["master"]["pid"]
            kind = rng.choice(["kill", "kill", "kill-master", "sigstop", "crash-point",
                               "kill-during-recovery", "poison-arena", "poison-master"])
            if kind == "kill":
                victim = rng.choice([p for p in pids if p != master] or pids)
                killed.add(victim)
                os.kill(victim, signal.SIGKILL)
            elif kind == "kill-master":
                killed.add(master)
                os.kill(master, signal.SIGKILL)
            elif kind == "sigstop":
                victim = rng.choice(pids)
                killed.add(victim)
                os.kill(victim, signal.SIGSTOP)
            elif kind == "crash-point":
                # The replacement of a killed node starts with a crash point armed (read from
                # the fault file at start); the recovery after the next kill reaches it again.
                fault_file.write_text(f"{rng.choice(CRASH_POINTS)}=kill@2")
                victim = rng.choice([p for p in pids if p != master] or pids)
                killed.add(victim)
                os.kill(victim, signal.SIGKILL)
                replacement = None
                deadline = time.monotonic() + 15
                while replacement is None and time.monotonic() < deadline:
                    d = _status(port)
                    new = [m["pid"] for m in (d or {}).get("members", [])
                           if m["pid"] not in pids and m["pid"] not in killed]
                    replacement = new[0] if new else None
                    time.sleep(0.02)
                fault_file.unlink(missing_ok=True)
                if replacement is not None:
                    other = rng.choice([p for p in pids if p != victim])
                    killed.add(other)
                    os.kill(other, signal.SIGKILL)
                    deadline = time.monotonic() + 5
                    while not _gone(replacement) and time.monotonic() < deadline:
                        time.sleep(0.01)
                    if not _gone(replacement):
                        kind = "kill"  # its point was spent during its own start: a plain kill
                    else:
                        killed.add(replacement)
            elif kind == "kill-during-recovery":
                a, b = rng.sample(pids, 2)
                killed.update((a, b))
                os.kill(a, signal.SIGKILL)
                time.sleep(rng.uniform(0.0005, 0.005))
                os.kill(b, signal.SIGKILL)
            elif kind == "poison-arena":
                poison(domain, McsWebCache.name, slot=rng.choice(doc["members"])["slot"])
            else:
                poison(domain, McsWebCache.name)
            return kind

        load.start()
        injected = 0
        try:
            while injected < faults and time.monotonic() - started < seconds:
                kind = inject()
                injected += 1
                by_kind[kind] = by_kind.get(kind, 0) + 1
                doc = settle()
                recovery_ms.append(doc["last_recovery_ms"])
                problems = check_domain(domain)
                if problems:
                    violations.extend(f"invariant after {kind}: {p}" for p in problems[:5])
                    break
                if injected % 20 == 0:
                    log(f"  {injected} faults, {load.ok} requests, "
                        f"{time.monotonic() - started:.0f}s")
                time.sleep(rng.uniform(0.05, 0.3))
        except Violation as exc:
            violations.append(str(exc))
        finally:
            load.finish()
            evictions = _evictions(domain)
            served = _served(port)
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(60)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
                violations.append("the launcher did not stop")
            drain.join(10)
            launcher.stdout.close()
            named = os.listdir(copies)
            if named:
                violations.append(f"sealed copies with a name: {named[:5]}")
    survivors_failed = [f for f in load.failures if f[0] is not None and f[0] not in killed]
    unattributed = [f for f in load.failures if f[0] is None]
    if survivors_failed:
        violations.append(f"{len(survivors_failed)} failed request(s) on survivors: "
                          f"{survivors_failed[:3]}")
    if load.wrong:
        violations.append(f"{len(load.wrong)} wrong response(s): {load.wrong[:3]}")
    false_hangs = {k: n for k, n in evictions.items() if k in ("hung", "stalled") and n}
    if false_hangs:
        violations.append(f"members evicted as hung although none was: {false_hangs}")
    time.sleep(0.2)
    leaked_shm = {n for n in os.listdir("/dev/shm") if n.startswith(f"mcs.{domain}")}
    leaked_seg = _segments(node_pids)
    if leaked_shm or leaked_seg:
        violations.append(f"leaked shared memory: {sorted(leaked_shm)} segments {sorted(leaked_seg)}")
    ms = sorted(recovery_ms)
    return {
        "seed": seed,
        "seconds": round(time.monotonic() - started, 1),
        "faults": sum(by_kind.values()),
        "faults_by_kind": by_kind,
        "requests_ok": load.ok,
        "failed_on_survivors": len(survivors_failed),
        "failed_on_killed_nodes": len(load.failures) - len(survivors_failed) - len(unattributed),
        "failed_unattributed_new_connections": len(unattributed),
        "wrong_bytes": len(load.wrong),
        "recovery_ms_p50": round(statistics.median(ms), 2) if ms else None,
        "recovery_ms_p99": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2) if ms else None,
        "recovery_ms_max": round(ms[-1], 2) if ms else None,
        "evictions": evictions,
        "served": served,
        "burners": burners,
        "sealed_copies": "files (--sealed-dir)" if sealed_dir else "memfds",
        "timing": timing,
        "leaks": sorted(leaked_shm) + sorted(map(str, leaked_seg)),
        "violations": violations,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mcs-chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="time bound (default 600)")
    parser.add_argument("--faults", type=int, default=200, help="fault bound (default 200)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--evict-after", type=float, default=None,
                        help="evict frozen nodes after this long, with the default 100 ms "
                             "heartbeat (default: the soak's fast timing, 20 ms / 400 ms)")
    parser.add_argument("--burners", type=int, default=0,
                        help="busy-looping processes to saturate the CPUs meanwhile (default 0)")
    parser.add_argument("--sealed-dir", action="store_true",
                        help="the nodes keep sealed copies as unnamed files in a directory "
                             "(mcs-webcache serve --sealed-dir) instead of memfds")
    args = parser.parse_args(argv)
    if (args.nodes < 2 or args.clients < 1 or args.seconds <= 0 or args.faults < 1
            or not 0 <= args.burners <= 64
            or args.evict_after is not None and not 0.2 <= args.evict_after <= 60):
        parser.error("need --nodes >= 2, --clients >= 1, positive --seconds and --faults, "
                     "--burners 0..64, --evict-after 0.2..60")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"mcs-chaos: seed {seed}, up to {args.faults} faults in {args.seconds:.0f}s, "
          f"{args.nodes} nodes, {args.clients} clients, {args.burners} burners", flush=True)
    try:
        summary = soak(args.seconds, args.faults, seed, args.nodes, args.clients,
                       burners=args.burners, evict_after=args.evict_after,
                       sealed_dir=args.sealed_dir)
    except Violation as exc:
        summary = {"seed": seed, "violations": [str(exc)]}
    except KeyboardInterrupt:  # the nodes were stopped and checked on the way out
        print(f"mcs-chaos: interrupted (seed {seed})", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    if summary["violations"]:
        print(f"mcs-chaos: VIOLATIONS (replay with --seed {seed})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
