"""``mcs status``: the operator's view of a domain, read from its bootstrap without joining.

The name the operator gives is resolved by :mod:`mcs.names`: an application's domain shows each
of its components (``webcache-8080`` shows ``webcache-8080.webcache``). For a component's domain
the view includes its recovery record (epochs, whether a recovery runs, each member's progress,
the master area) -- the same for any component, read from the root, whichever member is alive.
:class:`Watch` turns successive readings into what ``--watch`` shows: heartbeat rates, how long
each recovery took, and who joined and left."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mcs import layout
from mcs.bootstrap import Bootstrap
from mcs.component_record import ComponentRecord
from mcs.errors import CorruptObjectError
from mcs.names import Target, target_of

from membership.table import MemberTable, member_state
from membership.view import View

__all__ = ["domain_status", "format_status", "member_rows", "Watch"]

WATCH_EVENTS = 12  # lines of history --watch keeps


def member_rows(table: MemberTable, view: View, now_ns: int | None = None) -> list[dict[str, Any]]:
    """Every occupied member slot of a domain's table: slot, pid, node, incarnation, state
    (:func:`membership.table.member_state`: member, suspected, paused, frozen, hung, fenced,
    dead, left), whether it is in ``view``, its heartbeat's age and count, the locks its process
    holds and for how long, the age of its last progress signal, how long a pause has left, and
    how many times a supervisor restarted its program."""
    timing = table.timing()
    now = time.monotonic_ns() if now_ns is None else now_ns
    rows = []
    for rec in table.occupied():
        stamps = [s for s in (rec.progress_ns, rec.app_progress_ns) if s]
        rows.append({
            "slot": rec.slot,
            "pid": rec.pid,
            "node": rec.node,
            "incarnation": rec.incarnation,
            "state": member_state(rec, timing, now).value,
            "in_view": view.member(rec.slot) is not None,
            "heartbeat_age_ms": round((now - rec.heartbeat_ns) / 1e6, 1),
            "heartbeats": rec.heartbeat_count,
            "locks_held": rec.held,
            "locks_held_for_ms": (round(max(0, now - rec.held_since_ns) / 1e6, 1)
                                  if rec.held and rec.held_since_ns else None),
            "progress_age_ms": round((now - max(stamps)) / 1e6, 1) if stamps else None,
            "paused_for_s": (round((rec.paused_until_ns - now) / 1e9, 1)
                             if rec.paused_until_ns > now else None),
            "restarts": rec.restarts,
        })
    return rows


def _recovery(boot: Bootstrap, members: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The component record's part of the status (None: unreadable)."""
    try:
        record = ComponentRecord.read(boot.section)
    except CorruptObjectError:
        return None
    for m in members:
        m["quiesced_epoch"] = record.quiesced[m["slot"]]
        m["acked_epoch"] = record.acked[m["slot"]]
    return {
        "requested_epoch": record.requested,
        "agreed_epoch": record.agreed,
        "stable_epoch": record.stable,
        "recovering": record.requested > record.stable,
        "view_generation": record.view_generation,
        "view_slots": list(record.view_slots),
        "master_slot": record.master_slot,
        "master_area": None if not record.master_ident else {
            "ident": record.master_ident, "size": record.master_size,
            "version": record.master_version, "intact": record.master_intact},
    }


def domain_status(domain: str | Target) -> dict[str, Any]:
    """Generation, master and every occupied member slot of ``domain`` (a bootstrap domain's
    full name, or a :class:`Target` that :func:`mcs.names.resolve` found), as plain data; for
    a component's domain also its recovery record (``recovery``)."""
    target = target_of(domain) if isinstance(domain, str) else domain
    with Bootstrap.open(target.full_name, create=False, wait=0.5) as boot:
        table = MemberTable(boot)
        view = table.read_view()
        timing = table.timing()
        members = member_rows(table, view)
        status = {
            "domain": target.domain,
            "component": target.component,
            "full_name": target.full_name,
            "generation": view.generation,
            "master": None if view.master is None else {
                "slot": view.master.slot, "pid": view.master.pid, "node": view.master.node,
                "incarnation": view.master.incarnation},
            "timing_ms": {"heartbeat": timing.heartbeat * 1e3,
                          "suspect_after": timing.suspect_after * 1e3,
                          "evict_after": timing.evict_after * 1e3,
                          "hold_limit": timing.hold_limit * 1e3,
                          "progress_timeout": timing.progress_timeout * 1e3},
            "evictions": table.evictions(),
            "memory_failures": boot.section.load64(layout.MEMORY_FAILURES),
            "members": members,
            "read_at": time.time(),
        }
        if target.component is not None:
            status["recovery"] = _recovery(boot, members)
        return status


def format_status(status: dict[str, Any], watch: "Watch | None" = None) -> str:
    """A human-readable table of :func:`domain_status` (with ``watch``: rates and history)."""
    master = status["master"]
    name = f"domain {status['domain']}"
    if status["component"] is not None:
        name += f"  component {status['component']} ({status['full_name']})"
    lines = [
        f"{name}  generation {status['generation']}  master "
        + (f"slot {master['slot']} (pid {master['pid']}, {master['node']})" if master else "none"),
    ]
    rec = status.get("recovery")
    if rec is not None:
        area = rec["master_area"]
        lines.append(
            f"recovery: epoch {rec['stable_epoch']} stable"
            + (f", RECOVERING to epoch {rec['requested_epoch']}" if rec["recovering"] else "")
            + "  master area " + (f"{area['size']} B v{area['version']}"
                                  + ("" if area["intact"] else " (descriptor torn)")
                                  if area else "none"))
    rates = watch.rates(status) if watch is not None else {}
    head = ("slot  pid      node                      incarnation  state      heartbeat age"
            "  locks (held for)  progress  restarts")
    if rec is not None:
        head += "  acked epoch"
    if watch is not None:
        head += "  beats/s"
    lines.append(head)
    for m in status["members"]:
        held = (f"{m['locks_held']} ({m['locks_held_for_ms'] / 1e3:.1f} s)"
                if m["locks_held"] and m["locks_held_for_ms"] is not None else "0")
        progress = "-" if m["progress_age_ms"] is None else f"{m['progress_age_ms']:.0f} ms"
        state = m["state"] + (f" {m['paused_for_s']:.0f}s" if m["paused_for_s"] else "")
        row = (f"{m['slot']:<5} {m['pid']:<8} {m['node'][:25]:<25} {m['incarnation']:<12} "
               f"{state:<10} {m['heartbeat_age_ms']:>10.1f} ms  {held:>16}  {progress:>8}  "
               f"{m['restarts']:>8}")
        if rec is not None:
            row += f"  {m.get('acked_epoch', 0):>11}"
        if watch is not None:
            rate = rates.get((m["slot"], m["incarnation"]))
            row += f"  {'-' if rate is None else f'{rate:.1f}':>7}"
        lines.append(row)
    if not status["members"]:
        lines.append("(no members)")
    evicted = {cause: n for cause, n in status.get("evictions", {}).items() if n}
    if evicted:
        lines.append("evictions: " + ", ".join(f"{n} {cause}" for cause, n in evicted.items()))
    if watch is not None and watch.events.get(status["full_name"]):
        lines.append("recent:")
        lines += [f"  {line}" for line in watch.events[status["full_name"]]]
    return "\n".join(lines)


@dataclass
class Watch:
    """What ``mcs status --watch`` remembers between readings of each domain: the previous
    reading (heartbeat rates per member), and a short history of views and recoveries
    (joins, departures, generations, each recovery's duration as seen at this period)."""

    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, list[str]] = field(default_factory=dict)
    _recovering_since: dict[str, float] = field(default_factory=dict)

    def update(self, status: dict[str, Any]) -> None:
        """Take a new reading of one domain."""
        key = status["full_name"]
        before = self.current.get(key)
        if before is not None:
            self.previous[key] = before
        self.current[key] = status
        if before is None:
            return
        now = status["read_at"]
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        notes = []
        old = {(m["slot"], m["incarnation"]): m for m in before["members"]}
        new = {(m["slot"], m["incarnation"]): m for m in status["members"]}
        for k in sorted(old.keys() - new.keys()):
            notes.append(f"slot {k[0]} left (pid {old[k]['pid']}, {old[k]['node']})")
        for k in sorted(new.keys() - old.keys()):
            notes.append(f"slot {k[0]} joined (pid {new[k]['pid']}, {new[k]['node']}, "
                         f"incarnation {k[1]})")
        if status["generation"] != before["generation"]:
            notes.append(f"generation {before['generation']} -> {status['generation']}")
        rec, was = status.get("recovery"), before.get("recovery")
        if rec is not None:
            if rec["recovering"] and key not in self._recovering_since:
                self._recovering_since[key] = before["read_at"] if was and not was[
                    "recovering"] else now
            if not rec["recovering"] and key in self._recovering_since:
                took = now - self._recovering_since.pop(key)
                notes.append(f"recovery to epoch {rec['stable_epoch']} done "
                             f"(within {took * 1000:.0f} ms)")
            elif was is not None and rec["stable_epoch"] > was["stable_epoch"]:
                notes.append(f"recovery to epoch {rec['stable_epoch']} done "
                             "(between two readings)")
        if notes:
            history = self.events.setdefault(key, [])
            history += [f"{stamp}  {n}" for n in notes]
            del history[:-WATCH_EVENTS]

    def rates(self, status: dict[str, Any]) -> dict[tuple[int, int], float]:
        """Heartbeats per second of each member since the previous reading."""
        before = self.previous.get(status["full_name"])
        if before is None or status["read_at"] <= before["read_at"]:
            return {}
        dt = status["read_at"] - before["read_at"]
        old = {(m["slot"], m["incarnation"]): m["heartbeats"] for m in before["members"]}
        return {(m["slot"], m["incarnation"]): (m["heartbeats"] - old[(m["slot"],
                                                                       m["incarnation"])]) / dt
                for m in status["members"] if (m["slot"], m["incarnation"]) in old}
