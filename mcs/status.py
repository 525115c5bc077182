"""``mcs status``: the operator's view of a domain, read from its bootstrap without joining.

The name the operator gives is resolved by :mod:`mcs.names`: an application's domain shows each
of its components (``webcache-8080`` shows ``webcache-8080.webcache``)."""

from __future__ import annotations

import time
from typing import Any

from mcs import layout
from mcs.bootstrap import Bootstrap
from mcs.names import Target, target_of

from membership.table import MemberTable

__all__ = ["domain_status", "format_status"]


def domain_status(domain: str | Target) -> dict[str, Any]:
    """Generation, master and every occupied member slot of ``domain`` (a bootstrap domain's
    full name, or a :class:`Target` that :func:`mcs.names.resolve` found), as plain data."""
    target = target_of(domain) if isinstance(domain, str) else domain
    with Bootstrap.open(target.full_name, create=False, wait=0.5) as boot:
        table = MemberTable(boot)
        view = table.read_view()
        heartbeat, suspect, evict = table.timing_ns()
        now = time.monotonic_ns()
        members = []
        for rec in table.occupied():
            age_ns = now - rec.heartbeat_ns
            state = rec.state_name
            if state == "member" and age_ns > evict:
                state = "frozen"
            elif state == "member" and age_ns > suspect:
                state = "suspected"
            members.append({
                "slot": rec.slot,
                "pid": rec.pid,
                "node": rec.node,
                "incarnation": rec.incarnation,
                "state": state,
                "in_view": view.member(rec.slot) is not None,
                "heartbeat_age_ms": round(age_ns / 1e6, 1),
                "heartbeats": rec.heartbeat_count,
            })
        return {
            "domain": target.domain,
            "component": target.component,
            "full_name": target.full_name,
            "generation": view.generation,
            "master": None if view.master is None else {
                "slot": view.master.slot, "pid": view.master.pid, "node": view.master.node,
                "incarnation": view.master.incarnation},
            "timing_ms": {"heartbeat": heartbeat / 1e6, "suspect_after": suspect / 1e6,
                          "evict_after": evict / 1e6},
            "memory_failures": boot.section.load64(layout.MEMORY_FAILURES),
            "members": members,
        }


def format_status(status: dict[str, Any]) -> str:
    """A human-readable table of :func:`domain_status`."""
    master = status["master"]
    name = f"domain {status['domain']}"
    if status["component"] is not None:
        name += f"  component {status['component']} ({status['full_name']})"
    lines = [
        f"{name}  generation {status['generation']}  master "
        + (f"slot {master['slot']} (pid {master['pid']}, {master['node']})" if master else "none"),
        "slot  pid      node                      incarnation  state      heartbeat age",
    ]
    for m in status["members"]:
        lines.append(f"{m['slot']:<5} {m['pid']:<8} {m['node'][:25]:<25} {m['incarnation']:<12} "
                     f"{m['state']:<10} {m['heartbeat_age_ms']:.1f} ms")
    if not status["members"]:
        lines.append("(no members)")
    return "\n".join(lines)
