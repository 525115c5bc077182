"""A token bucket shared by worker processes, exact under kill -9 of any of them (the master too):
bucket and grant counters live in one mcs.SharedDict and every take() is one transaction, so at
most BURST + RATE x (seconds since the bucket was made) tokens are ever granted.
    python examples/rate_limiter.py [WORKERS] [SECONDS]       demo: kill -9 of a worker; totals
    python examples/rate_limiter.py worker DOMAIN RATE BURST  one worker: a line per granted token
"""
import os, signal, subprocess, sys, time

import mcs

NANO = 10**9  # tokens are counted in billionths: a refill of a few ns stays an exact integer
BUCKET = dict(name="bucket", capacity=4096, max_key=32, max_value=8)  # mcs.SharedDict options


def take(d: mcs.SharedDict, rate: int, burst: int) -> bool:
    """One token, or False when the bucket is empty: one transaction (re-run on a conflict)."""
    return d.transact(_take, rate, burst, os.getpid())


def _take(tx, rate: int, burst: int, pid: int) -> bool:
    now = time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for all processes
    if tx.get("start") is None:
        tx["start"], tx["last"], tx["tokens"] = now, now, burst * NANO
    now = max(now, tx["last"])
    tokens = min(burst * NANO, tx["tokens"] + (now - tx["last"]) * rate)
    granted = tokens >= NANO
    tx["last"], tx["tokens"] = now, tokens - NANO if granted else tokens
    if granted:
        tx.incr("granted"), tx.incr(f"granted.{pid}")
    return granted


def worker(domain: str, rate: int, burst: int) -> None:
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    with mcs.SharedDict(domain, **BUCKET) as d:
        print("ready", os.getpid(), int(d.is_master), flush=True)
        while not stopping:  # a line per grant, after its commit: at most one goes unreported
            print("+", flush=True) if take(d, rate, burst) else time.sleep(0.5 / rate)


def demo(workers: int = 4, seconds: int = 2, rate: int = 1000, burst: int = 50) -> None:
    domain, cmd = f"limiter{os.getpid()}", [sys.executable, __file__, "worker"]
    procs = [subprocess.Popen(cmd + [domain, str(rate), str(burst)], stdout=subprocess.DEVNULL)
             for _ in range(workers)]
    with mcs.SharedDict(domain, **BUCKET) as d:
        time.sleep(seconds), os.kill(procs[0].pid, signal.SIGKILL), time.sleep(seconds)
        [(p.terminate(), p.wait()) for p in procs]
        budget = burst + rate * (d["last"] - d["start"]) / NANO
        print(f"granted {d['granted']} tokens, budget {budget:.0f}, a worker killed mid-way")


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        demo(*[int(a) for a in sys.argv[1:3]])
