"""Named crash points for tests and chaos runs.

``faults.point("name")`` is placed at every step of the recovery protocol and of critical
sections. Disabled (the default) it costs one function call and a dict test. Enabled, through
:func:`arm` or the ``MCS_FAULTS`` environment variable, it kills, stops or raises at the named
point::

    MCS_FAULTS="registry.insert.mid=kill"          # SIGKILL this process there, first time
    MCS_FAULTS="recovery.master=kill@3"            # ... the third time it is reached
    MCS_FAULTS="recovery.contribute=stop,x=raise"  # SIGSTOP / raise FaultInjected
    MCS_FAULTS_FILE=/path/to/spec                  # the same syntax, read from a file at start
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

from mcs.errors import McsError

__all__ = ["FaultInjected", "point", "arm", "disarm", "armed", "hits", "POINTS"]

ACTIONS = ("kill", "stop", "raise", "sleep")

POINTS = (
    "recovery.quiesce",  # local workers have left their blocks
    "recovery.agree",  # the view of the epoch is agreed
    "recovery.master",  # the master, before resetting the master area
    "recovery.master.done",  # the master, after on_master, before publishing it
    "recovery.contribute",  # after build_shared_state, before acknowledging
    "recovery.stable",  # after the epoch became stable
    "tx.logged",  # a transaction's write: the before-image is logged, the data not yet written
    "tx.committed",  # the commit store is done, the locks are still held
    "tx.released",  # the locks are released, the log not yet reset
    "tx.rollback",  # a transaction is about to be rolled back
)


class FaultInjected(McsError):
    """Raised at an armed fault point whose action is ``raise``."""


@dataclass
class _Fault:
    action: str
    after: int = 1  # fire on the n-th hit
    seconds: float = 0.0
    hits: int = 0


_armed: dict[str, _Fault] = {}
_hits: dict[str, int] = {}
_lock = threading.Lock()


def point(name: str) -> None:
    """A named crash point: does nothing unless ``name`` is armed."""
    if _armed:
        _fire(name)


def _fire(name: str) -> None:
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        fault = _armed.get(name)
        if fault is None:
            return
        fault.hits += 1
        if fault.hits != fault.after:
            return
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault.action == "sleep":
        time.sleep(fault.seconds)
    else:
        raise FaultInjected(f"fault injected at {name}")


def arm(name: str, action: str = "kill", *, after: int = 1, seconds: float = 0.0) -> None:
    """Fire ``action`` ("kill", "stop", "raise", "sleep") on the ``after``-th hit of ``name``."""
    if action not in ACTIONS:
        raise ValueError(f"unknown fault action {action!r}; use one of {ACTIONS}")
    if after < 1:
        raise ValueError("after must be >= 1")
    with _lock:
        _armed[name] = _Fault(action, after, seconds)


def disarm(name: str | None = None) -> None:
    """Disarm one point, or all of them."""
    with _lock:
        if name is None:
            _armed.clear()
        else:
            _armed.pop(name, None)


def armed() -> dict[str, str]:
    return {name: f.action for name, f in _armed.items()}


def hits() -> dict[str, int]:
    """How often each point was reached while some fault was armed."""
    return dict(_hits)


def parse(spec: str) -> list[tuple[str, str, int, float]]:
    """Parse ``name=action[@n][,...]`` (action ``sleep:SECONDS`` too); ValueError when bad."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, rest = item.partition("=")
        if not sep or not name:
            raise ValueError(f"bad fault spec {item!r}: expected name=action[@n]")
        action, _, count = rest.partition("@")
        seconds = 0.0
        if action.startswith("sleep:"):
            action, seconds = "sleep", float(action[6:])
        out.append((name, action, int(count) if count else 1, seconds))
    return out


def _from_environment() -> None:
    """Arm from ``MCS_FAULTS`` and from the file named by ``MCS_FAULTS_FILE`` (read once, at
    start: a chaos driver writes it before a process is (re)started)."""
    spec = os.environ.get("MCS_FAULTS", "")
    path = os.environ.get("MCS_FAULTS_FILE")
    if path:
        try:
            with open(path) as f:
                spec = ",".join(filter(None, (spec, f.read().strip())))
        except FileNotFoundError:
            pass
    for name, action, after, seconds in parse(spec):
        arm(name, action, after=after, seconds=seconds)


_from_environment()
