"""Seeded randomized fault injection against the example registry.

    python examples/registry_chaos.py --failures 300 --seed 42

Keeps ``--members`` registry members running. Each round injects one fault chosen at random
(seeded): kill -9 of a member or of the master, two kills at once, SIGSTOP (evicted and
fenced), a kill at a named crash point of the recovery protocol or in the middle of a bucket
update, or a poisoned master area / contribution. After each fault it waits until every
member agrees on one epoch, one view and exactly the entries of the live members, while every
member checks the registry's invariants in consistent blocks without pause. Any violation, a
member that does not settle, or a leaked segment ends the run with status 1 and prints the
seed to replay it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "registry_worker.py")
TIMING = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.3}
KEYS = 5
CRASH_POINTS_ALL_MEMBERS = ["recovery.quiesce", "recovery.agree", "recovery.contribute",
                            "recovery.stable"]


class Violation(Exception):
    pass


class Member:
    def __init__(self, domain: str, name: str, faults: str = "") -> None:
        env = dict(os.environ)
        env.pop("MCS_FAULTS", None)
        if faults:
            env["MCS_FAULTS"] = faults
        self.name = name
        self.proc = subprocess.Popen([sys.executable, WORKER, domain, name, str(KEYS),
                                      json.dumps(TIMING)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        self.buf = b""
        self.pid = self.proc.pid

    def line(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            data = os.read(fd, 65536)
            if not data:
                return None
            self.buf += data
        raw, _, self.buf = self.buf.partition(b"\n")
        msg = json.loads(raw)
        if "violation" in msg:
            raise Violation(f"member {self.pid}: {msg['violation']}")
        return msg

    def ask(self, command: str, timeout: float = 10.0) -> dict | None:
        try:
            self.proc.stdin.write((command + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        return self.line(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            os.kill(self.pid, signal.SIGCONT)
        self.proc.wait()
        self.close()
        if self.proc.returncode == 3:
            raise Violation(f"member {self.pid} exited after an invariant violation")


def run(seed: int, failures: int, members: int, log=print) -> dict:
    rng = random.Random(seed)
    domain = f"chaos{os.getpid()}"
    live: list[Member] = []
    counter = 0
    faults_by_kind: dict[str, int] = {}
    recovery_ms: list[float] = []

    def spawn(faults: str = "") -> Member:
        nonlocal counter
        counter += 1
        m = Member(domain, f"m{counter}", faults)
        msg = m.line(30)
        if msg is None or "ready" not in msg:
            m.kill()
            if faults:
                return m  # died at its armed point during its own start: a fault all the same
            raise Violation(f"member {m.pid} failed to start")
        live.append(m)
        return m

    def reap() -> None:
        for m in list(live):
            if not m.alive():
                live.remove(m)
                m.close()
                if m.proc.returncode == 3:
                    raise Violation(f"member {m.pid} exited after an invariant violation")

    def settle(timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            reap()
            answers = [m.ask("count", 5) for m in live]
            if all(a is not None for a in answers):
                expected = KEYS * len(live) + sum(1 for m in live if getattr(m, "extra", False))
                if (all(a["count"] == expected and a["members"] == len(live) for a in answers)
                        and len({a["epoch"] for a in answers}) == 1):
                    recovery_ms.extend(a["last_ms"] for a in answers[:1])
                    return
            if time.monotonic() > deadline:
                raise Violation(f"members did not settle: {answers}")
            time.sleep(0.02)

    def slots() -> dict[int, int]:
        from mcs.component import component_domain
        from mcs.status import domain_status

        return {row["pid"]: row["slot"]
                for row in domain_status(component_domain(domain, "registry"))["members"]}

    def kind_kill() -> bool:
        rng.choice(live).kill()
        return True

    def kind_kill_master() -> bool:
        live[0].kill()  # the oldest member is the master
        return True

    def kind_double_kill() -> bool:
        victims = rng.sample(live, 2)
        for m in victims:
            os.kill(m.pid, signal.SIGKILL)
        for m in victims:
            m.kill()
        return True

    def kind_sigstop() -> bool:
        victim = rng.choice(live)
        os.kill(victim.pid, signal.SIGSTOP)
        victim.proc.wait(10)  # evicted and fenced by the others
        victim.close()
        if victim.proc.returncode != -signal.SIGKILL:
            raise Violation(f"SIGSTOPped member ended with {victim.proc.returncode}")
        return True

    def kind_crash_point() -> bool:
        # points every member passes; the master-only ones are covered by the test suite
        point = rng.choice(CRASH_POINTS_ALL_MEMBERS)
        m = spawn(f"{point}=kill@2")  # its own join passes each point once
        if m in live:
            spawn()  # the next join triggers a recovery in which it dies
        reap()
        return not m.alive()

    def kind_mid_update() -> bool:
        m = spawn("registry.insert.mid=kill")
        if m in live:
            answer = m.ask(f"set doomed-{counter} x", timeout=2)
            if answer is not None:
                m.extra = True  # the point was not reached (cannot happen; keeps counts honest)
                return False
        reap()
        return not m.alive()

    def kind_poison() -> bool:
        from mcs.poison import poison

        if rng.random() < 0.5:
            poison(domain, "registry")
        else:
            poison(domain, "registry", slot=rng.choice(list(slots().values())))
        return True

    kinds = [("kill", kind_kill, 3), ("kill-master", kind_kill_master, 2),
             ("double-kill", kind_double_kill, 1), ("sigstop", kind_sigstop, 1),
             ("crash-point", kind_crash_point, 2), ("mid-update", kind_mid_update, 2),
             ("poison", kind_poison, 1)]
    weights = [w for _, _, w in kinds]
    started = time.monotonic()
    try:
        for _ in range(members):
            spawn()
        settle()
        injected = 0
        while injected < failures:
            while len(live) < members:
                spawn()
            settle()
            name, action, _ = rng.choices(kinds, weights)[0]
            if action():
                faults_by_kind[name] = faults_by_kind.get(name, 0) + 1
                injected += 1
            settle()
            if injected % 25 == 0:
                log(f"  {injected} faults injected, {len(live)} members, "
                    f"{time.monotonic() - started:.0f}s")
    finally:
        for m in list(live):
            try:
                m.kill()
            except Violation:
                raise
        for suffix in ("", ".registry"):
            try:
                os.unlink(f"/dev/shm/mcs.{domain}{suffix}")
            except FileNotFoundError:
                pass
    return {
        "seed": seed,
        "faults": sum(faults_by_kind.values()),
        "faults_by_kind": faults_by_kind,
        "seconds": round(time.monotonic() - started, 1),
        "recovery_ms_p50": round(statistics.median(recovery_ms), 2) if recovery_ms else None,
        "recovery_ms_max": round(max(recovery_ms), 2) if recovery_ms else None,
        "violations": 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--failures", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--members", type=int, default=4)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"registry chaos: seed {seed}, {args.failures} faults, {args.members} members")
    try:
        summary = run(seed, args.failures, args.members)
    except Violation as exc:
        print(f"VIOLATION (seed {seed}; replay: python examples/registry_chaos.py --seed {seed} "
              f"--failures {args.failures} --members {args.members}): {exc}")
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
