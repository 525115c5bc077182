"""Memory-failure injection: poison a section of a live component domain.

Models the MCS paper's memory-failure notification: the section's contents are replaced with
dummy bytes, its ``failed`` flag is set, the domain's memory-failure counter is bumped and the
members are woken. Members notice through ``detect_memory_failure()``; the owner replaces the
section (a new identifier) during the recovery that follows.
"""

from __future__ import annotations

from mcs import component_record as rec
from mcs import layout
from mcs._gsm import GlobalEvent
from mcs.bootstrap import Bootstrap, list_domains
from mcs.component_record import ComponentRecord, component_domain
from mcs.errors import DomainNotFoundError, InvalidIdentifier
from mcs.section import Section

__all__ = ["poison", "check_target"]

POISON_BYTE = 0xDB
OPEN_WAIT = 0.5  # seconds to wait for a root being initialised


def check_target(domain: str, component: str, slot: int | None) -> str:
    """Validate the names and the slot (ValueError saying what is wrong); returns the
    component's domain name."""
    name = component_domain(domain, component)
    if slot is not None and not 0 <= slot < layout.MAX_MEMBERS:
        raise ValueError(
            f"--slot {slot} is out of range: member slots are 0..{layout.MAX_MEMBERS - 1}")
    return name


def _open(domain: str, component: str, name: str) -> Bootstrap:
    try:
        return Bootstrap.open(name, create=False, wait=OPEN_WAIT)
    except DomainNotFoundError:
        running = [d[len(domain) + 1:] for d in list_domains() if d.startswith(domain + ".")]
        if running:
            raise DomainNotFoundError(
                f"domain {domain!r} has no component {component!r} (it has: "
                f"{', '.join(running)})") from None
        raise DomainNotFoundError(
            f"no component {component!r} in domain {domain!r}: the domain does not exist "
            f"or runs no component") from None


def poison(domain: str, component: str, *, slot: int | None = None) -> str:
    """Poison the master area (``slot`` None) or the contribution of member ``slot`` of
    ``component`` in ``domain``; returns the identifier of the poisoned section."""
    name = check_target(domain, component, slot)
    with _open(domain, component, name) as boot:
        record = ComponentRecord.read(boot.section)
        if slot is None:
            ident = record.master_ident
            what = "master area"
        else:
            ident = record.contributions[slot]
            what = f"contribution of slot {slot}"
        if not ident:
            raise InvalidIdentifier(f"{name}: no {what} published")
        with Section.attach(ident) as sec:
            # Counted before the bytes change: whoever reads a poisoned byte and then checks
            # detect_memory_failure() is sure to see the failure (the paper's polling model).
            sec._mark_failed()
            boot.section.add64(layout.MEMORY_FAILURES, 1)
            view = sec.view()
            view[:] = bytes([POISON_BYTE]) * len(view)
            view.release()
        GlobalEvent.open(boot.section, rec.C_RECOVERY_EVENT).set()
        return ident
