"""Memory-failure injection: poison a section of a live component domain.

Models the MCS paper's memory-failure notification: the section's contents are replaced with
dummy bytes, its ``failed`` flag is set, the domain's memory-failure counter is bumped and the
members are woken. Members notice through ``detect_memory_failure()``; the owner replaces the
section (a new identifier) during the recovery that follows.
"""

from __future__ import annotations

from mcs import layout
from mcs._gsm import GlobalEvent
from mcs.bootstrap import Bootstrap
from mcs.errors import InvalidIdentifier
from mcs.section import Section

__all__ = ["poison"]

POISON_BYTE = 0xDB


def _ident_at(boot: Bootstrap, offset: int) -> str:
    raw = bytes(boot.section.view(offset, layout.IDENT_MAX))
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def poison(domain: str, component: str, *, slot: int | None = None) -> str:
    """Poison the master area (``slot`` None) or the contribution of member ``slot`` of
    ``component`` in ``domain``; returns the identifier of the poisoned section."""
    with Bootstrap.open(f"{domain}.{component}", create=False, wait=0.5) as boot:
        if slot is None:
            ident = _ident_at(boot, layout.C_MASTER_IDENT)
            what = "master area"
        else:
            layout.member_offset(slot)  # range check
            ident = _ident_at(boot, layout.C_CONTRIB_IDENT + layout.IDENT_MAX * slot)
            what = f"contribution of slot {slot}"
        if not ident:
            raise InvalidIdentifier(f"{domain}.{component}: no {what} published")
        with Section.attach(ident) as sec:
            # Counted before the bytes change: whoever reads a poisoned byte and then checks
            # detect_memory_failure() is sure to see the failure (the paper's polling model).
            sec._mark_failed()
            boot.section.add64(layout.MEMORY_FAILURES, 1)
            view = sec.view()
            view[:] = bytes([POISON_BYTE]) * len(view)
            view.release()
        GlobalEvent.open(boot.section, layout.C_RECOVERY_EVENT).set()
        return ident
