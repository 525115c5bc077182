"""One Registry member for ``bench/test_component.py``: a child process driven by JSON lines.

    python bench/component_member.py [TIMING_JSON]

The process imports everything first and says ``{"t": "standby"}``: the benchmark keeps one such
spare ready, so a replacement for a killed member joins without paying the interpreter start-up
on the critical path. Commands on stdin (one per line):

    start DOMAIN NAME NKEYS   join (Registry(DOMAIN).start()), register NKEYS keys NAME-i,
                              start the epoch observer; answers {"t": "ready", ...}
    sync                      {"t": "sync", epoch, members, master, slot, ...} read inside a
                              consistent block (so no recovery runs here at that moment)
    check                     {"t": "check", "count": entries} (check_invariants in a block)
    get KEY                   {"t": "get", "value": ...}

The **epoch observer** (a background thread) reports every stable epoch as soon as this member
reaches it: ``{"t": "epoch", "epoch": E, "at": time.monotonic_ns(), ...}`` with the recovery's
duration and phase breakdown (``stats.last_phases_ms``). It waits on the component's gate
condition, which the recovery thread notifies right after it has updated ``stats`` (so the
timestamp is taken within microseconds of the epoch becoming stable here, with no CPU spent
polling); the wait has a short timeout and re-reads ``stats.epoch``, so if that notification
ever went away the observer would still see the change, only later. ``OBSERVER=poll`` in the
environment makes it poll ``stats.epoch`` every 0.2 ms instead (a cross-check).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import membership  # noqa: E402,F401  (imported now: start() and recovery import them lazily)
import membership.view  # noqa: E402,F401
import mcs  # noqa: E402
from registry import Registry  # noqa: E402

_out = threading.Lock()


def say(**kw: object) -> None:
    line = json.dumps(kw) + "\n"
    with _out:
        sys.stdout.write(line)
        sys.stdout.flush()


def observe(reg: Registry, stop: threading.Event, poll: bool) -> None:
    """Report each stable epoch this member reaches (see the module docstring)."""
    gate = getattr(reg, "_gate", None)
    if not isinstance(gate, threading.Condition):
        poll = True
    last = reg.stats.epoch
    last_phases = reg.stats.last_phases_ms
    while not stop.is_set():
        st = reg.stats
        if st.epoch == last:
            if poll:
                time.sleep(0.0002)
            else:
                with gate:
                    if reg.stats.epoch == last:
                        gate.wait(0.01)
            continue
        at = time.monotonic_ns()
        epoch = st.epoch
        # stats.epoch is assigned first, then duration and phases: make sure we read the
        # phases of *this* recovery (a fresh dict), not the previous one.
        deadline = time.monotonic() + 0.05
        while st.last_phases_ms is last_phases and time.monotonic() < deadline:
            time.sleep(0)
        view = reg.view
        say(t="epoch", epoch=epoch, at=at, members=len(view.members) if view else 0,
            master=reg.is_master, duration_ms=st.last_duration_ms,
            phases=dict(st.last_phases_ms), restarts=st.restarts, recoveries=st.recoveries,
            reason=st.last_reason)
        last, last_phases = epoch, st.last_phases_ms


def main(argv: list[str]) -> int:
    timing = json.loads(argv[1]) if len(argv) > 1 else {}
    poll = os.environ.get("OBSERVER") == "poll"
    if os.environ.get("MEMBER_LOG"):  # diagnostics: mcs's log on stderr, monotonic ns stamps
        import logging

        class Stamp(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return f"{time.monotonic_ns()} {os.getpid()} {record.threadName} {super().format(record)}"

        handler = logging.StreamHandler()
        handler.setFormatter(Stamp("%(name)s %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
    say(t="standby", pid=os.getpid())
    reg: Registry | None = None
    stop = threading.Event()
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "start":
            domain, name, nkeys = cmd[1], cmd[2], int(cmd[3])
            t_join = time.monotonic_ns()
            reg = Registry(domain, **timing).start()
            for i in range(nkeys):
                reg.register(f"{name}-{i}".encode(), f"v{i}@{os.getpid()}".encode())
            threading.Thread(target=observe, args=(reg, stop, poll), daemon=True,
                             name="epoch-observer").start()
            say(t="ready", slot=reg.slot, pid=os.getpid(), epoch=reg.stats.epoch,
                join_ms=(time.monotonic_ns() - t_join) / 1e6)
        elif cmd[0] == "sync":
            assert reg is not None

            def snapshot() -> dict:
                st = reg.stats
                return dict(epoch=st.epoch, members=len(reg.view.members), master=reg.is_master,
                            slot=reg.slot, recoveries=st.recoveries, restarts=st.restarts)

            say(t="sync", **reg.run(snapshot))
        elif cmd[0] == "check":
            assert reg is not None
            say(t="check", count=reg.run(reg.check_invariants), epoch=reg.stats.epoch)
        elif cmd[0] == "get":
            assert reg is not None
            say(t="get", value=(reg.lookup(cmd[1].encode()) or b"").decode())
        elif cmd[0] == "stop":
            stop.set()
            if reg is not None:
                reg.stop()
            say(t="stopped")
            break
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except mcs.ClosedError:
        sys.exit(0)
