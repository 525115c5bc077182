"""The workload and the peers of ``bench/test_state.py``: the same keys and values for every
store, how to open each store on /dev/shm, a Redis server of the benchmark's own on a private unix
socket, and the child processes of the multi-process rows.

Run as a script it is one of those children (the parent talks to it over stdin/stdout, one line
at a time):

``writer IMPL SPEC WORKER``
    opens the store ``IMPL`` (``sharedict``, ``lmdb``, ``redis`` or ``diskcache``) described by
    the JSON ``SPEC``, prints ``ready``, then for every ``go N`` line does N puts on its own keys
    (``WORKER`` of ``SPEC["writers"]``: disjoint key sets) and prints ``done T0 T1`` (CLOCK_MONOTONIC
    ns: the same clock in every process, so the parent computes the aggregate over the union of
    the intervals); ``quit`` closes the store and exits.
``member SPEC``
    joins the SharedDict of ``SPEC`` as one more member, sets ``SPEC["ephemeral"]`` ephemeral
    keys, prints ``ready EPOCH``, then writes and runs two-key transactions on random keys until
    it is killed (the victim of the recovery benchmark: a kill lands in the middle of its work).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEY_BYTES = 16
VALUE_BYTES = 64
KEYS = 10_000  # keys in every store (the get benchmark reads them all, in a seeded random order)
SEED = 20260611
SHM = Path("/dev/shm")


def key(i: int) -> bytes:
    """Key ``i``: exactly KEY_BYTES bytes."""
    return b"k%015d" % i


def value(i: int) -> bytes:
    """A VALUE_BYTES-byte value that names its key (so a read can be checked)."""
    return (b"v%015d" % i).ljust(VALUE_BYTES, b".")


def shuffled_keys(n: int = KEYS, seed: int = SEED) -> list[bytes]:
    keys = [key(i) for i in range(n)]
    random.Random(seed).shuffle(keys)
    return keys


def writer_keys(worker: int, writers: int, n: int = KEYS) -> list[bytes]:
    """The keys of one writer process: disjoint from every other writer's."""
    return [key(i) for i in range(worker, n, writers)]


# -- opening the stores ---------------------------------------------------------------------------

LMDB_MAP_SIZE = 256 << 20


def open_lmdb(path: str):
    """py-lmdb at its fastest safe setting for a tmpfs directory: ``sync`` and ``metasync`` off
    (on /dev/shm a flush has nowhere durable to go; SharedDict does not outlive the machine
    either), so its commit costs what LMDB's write path costs, not an msync."""
    import lmdb

    return lmdb.open(path, map_size=LMDB_MAP_SIZE, max_readers=64, sync=False, metasync=False)


def open_diskcache(path: str):
    import diskcache

    return diskcache.Cache(path)


def open_redis(sock: str):
    import redis

    return redis.Redis(unix_socket_path=sock)


def open_sharedict(spec: dict[str, Any]):
    import mcs

    return mcs.SharedDict(spec["domain"], name=spec.get("name", "dict"),
                          capacity=spec["capacity"], max_key=spec["max_key"],
                          max_value=spec["max_value"]).start()


def shm_tempdir(prefix: str) -> str:
    """A private directory on /dev/shm (tmpfs: what the issue's LMDB and diskcache numbers used)."""
    return tempfile.mkdtemp(prefix=prefix, dir=SHM if SHM.is_dir() else None)


class RedisServer:
    """A redis-server of our own: no TCP port, a unix socket in a private temp directory, no
    persistence. :meth:`close` stops it and removes the directory."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (bench/install-peers.sh, or "
                                    "apt-get install redis-server)")
        self.dir = tempfile.mkdtemp(prefix="mcs-bench-redis-")
        self.sock = os.path.join(self.dir, "redis.sock")
        self.proc = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.sock)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.01)
        self.version = open_redis(self.sock).info("server").get("redis_version", "?")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the children ---------------------------------------------------------------------------------


def _putter(impl: str, spec: dict[str, Any]):
    """(put(k, v), close()) for one writer process."""
    if impl == "sharedict":
        d = open_sharedict(spec)
        return d.__setitem__, d.stop
    if impl == "lmdb":
        env = open_lmdb(spec["path"])
        begin = env.begin

        def put(k: bytes, v: bytes) -> None:
            with begin(write=True) as txn:
                txn.put(k, v)

        return put, env.close
    if impl == "redis":
        r = open_redis(spec["path"])
        return r.set, r.close
    if impl == "diskcache":
        c = open_diskcache(spec["path"])
        return c.set, c.close
    raise ValueError(f"unknown store {impl!r}")


def writer(impl: str, spec: dict[str, Any], worker: int) -> None:
    keys = writer_keys(worker, spec["writers"])
    val = value(worker)
    put, close = _putter(impl, spec)
    say("ready")
    try:
        for line in sys.stdin:
            cmd = line.split()
            if cmd[0] == "quit":
                break
            n = int(cmd[1])
            ks = (keys * (n // len(keys) + 1))[:n]
            t0 = time.monotonic_ns()
            for k in ks:
                put(k, val)
            t1 = time.monotonic_ns()
            say(f"done {t0} {t1}")
    finally:
        close()


def member(spec: dict[str, Any]) -> None:
    d = open_sharedict(spec)
    pid = os.getpid()
    for i in range(spec.get("ephemeral", 0)):
        d.set(b"e%d-%d" % (pid, i), i, ephemeral=True)
    say(f"ready {d.stats.epoch}")
    rng = random.Random(pid)
    n = spec["keys"]
    i = 0
    while True:  # until SIGKILL
        i += 1
        a, b = key(rng.randrange(n)), key(rng.randrange(n))
        if i % 4:
            d[a] = i
        else:
            with d.transaction() as tx:
                tx[a] = i
                tx[b] = i


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def pack_int(n: int) -> bytes:
    return struct.pack("<q", n)


def unpack_int(b: bytes | None) -> int:
    return 0 if b is None else struct.unpack("<q", b)[0]


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if argv[0] == "writer":
        writer(argv[1], json.loads(argv[2]), int(argv[3]))
    elif argv[0] == "member":
        member(json.loads(argv[1]))
    else:
        raise SystemExit(f"usage: {Path(__file__).name} writer IMPL SPEC WORKER | member SPEC")


if __name__ == "__main__":
    main(sys.argv[1:])
