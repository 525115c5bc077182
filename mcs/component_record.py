"""The component record: where a recoverable component keeps its recovery protocol's state in
the root of its own domain, ``<domain>.<component>``, and the one typed reader of it.

The GSM core reserves ``[COMPONENT_AREA, ROOT_SIZE)`` of every root for this layer and
initialises one event there (``COMPONENT_EVENT``, the recovery event); the rest of the area is
laid out here, and only here: :mod:`mcs.component` writes it, ``mcs fault poison``, the web
cache's checker and the tests read it through :class:`ComponentRecord` or the identifier
accessors below. Every word is fixed-size, so nothing read from shared memory is followed
unbounded; an identifier slot is NUL-padded ASCII or all NUL (nothing published).
"""

from __future__ import annotations

from dataclasses import dataclass

from mcs import layout
from mcs._gsm import checksum
from mcs.bootstrap import DOMAIN_MAX, DOMAIN_NAME, validate_domain
from mcs.errors import CorruptObjectError, InvalidIdentifier, LayoutMismatchError
from mcs.section import Section

__all__ = ["ComponentRecord", "MasterDescriptor", "component_domain", "master_ident",
           "contribution_ident", "set_master_ident", "set_contribution_ident", "quiesced_offset",
           "acked_offset", "master_descriptor", "publish_master", "descriptor_checksum"]

WORD = 8  # every epoch, generation and mask is one 64-bit word
AREA = layout.COMPONENT_AREA

C_REQUESTED = AREA + 0  # newest requested recovery epoch
C_STABLE = AREA + 8  # newest epoch every member of its view finished
C_AGREED = AREA + 16  # epoch whose view is recorded below
C_VIEW_GEN = AREA + 24  # membership generation of that view
C_VIEW_MASK = AREA + 32  # bit i set: slot i is in that view
C_MASTER = AREA + 40  # master slot + 1 (0: none)
C_MASTER_DONE = AREA + 48  # epoch whose master phase is complete
C_RECOVERY_EVENT = layout.COMPONENT_EVENT  # set on every request and phase step
C_MASTER_IDENT = AREA + 128  # identifier of the master area, NUL-padded
IDENT_MAX = 64  # bytes of an identifier slot (the identifier itself is shorter: NUL-ended)
# The master area's descriptor, next to its identifier: what a new master checks before it
# adopts the area (the area is domain-owned and outlives the master that created it).
C_MASTER_SIZE = C_MASTER_IDENT + IDENT_MAX  # bytes of the area's user part
C_MASTER_VERSION = C_MASTER_SIZE + WORD  # the component's master_area_version
C_MASTER_LOGS = C_MASTER_VERSION + WORD  # geometry of the transaction logs in it (0: none)
C_MASTER_CHECKSUM = C_MASTER_LOGS + WORD  # checksum of (ident, size, version, logs); last store
C_QUIESCED = AREA + 256  # per slot: newest epoch it quiesced for
C_ACKED = C_QUIESCED + WORD * layout.MAX_MEMBERS  # per slot: newest epoch it contributed for
C_CONTRIB_IDENT = C_ACKED + WORD * layout.MAX_MEMBERS  # per slot: identifier of its contribution
C_END = C_CONTRIB_IDENT + IDENT_MAX * layout.MAX_MEMBERS

if not (C_MASTER_DONE + WORD <= C_RECOVERY_EVENT
        and C_RECOVERY_EVENT + layout.EVENT_SLOT_MAX <= C_MASTER_IDENT
        and C_MASTER_CHECKSUM + WORD <= C_QUIESCED
        and C_END <= layout.ROOT_SIZE):
    raise LayoutMismatchError("mcs.component_record: the component record overlaps itself or "
                              "runs past the root (a layout edit broke it)")


def component_domain(domain: str, component: str) -> str:
    """The domain of ``component`` in ``domain``: ``<domain>.<component>``, validated; a
    ValueError says which part is wrong, and how long ``domain`` may be for this component.
    The one place that spells a component's domain name."""
    validate_domain(domain)
    if not isinstance(component, str) or not DOMAIN_NAME.fullmatch(component):
        raise ValueError(f"invalid component name {component!r}: use characters from "
                         "[A-Za-z0-9_.-], starting with a letter or digit")
    name = f"{domain}.{component}"
    if len(name) > DOMAIN_MAX:
        raise ValueError(
            f"domain name {domain!r} is too long for component {component!r}: {name!r} has "
            f"{len(name)} characters, at most {DOMAIN_MAX} are allowed, so the domain name may "
            f"have at most {DOMAIN_MAX - len(component) - 1}")
    return name


# -- identifier slots ------------------------------------------------------------------------

def _contrib_offset(slot: int) -> int:
    if not 0 <= slot < layout.MAX_MEMBERS:
        raise IndexError(f"member slot {slot} out of range 0..{layout.MAX_MEMBERS - 1}")
    return C_CONTRIB_IDENT + IDENT_MAX * slot


def _decode(raw: bytes) -> str | None:
    """The identifier in an identifier slot ("" when none), or None if the slot is not one."""
    text, nul, rest = raw.partition(b"\0")
    if not nul or rest.strip(b"\0") or not text.isascii() or not text.decode().isprintable():
        return None
    return text.decode("ascii")


def _ident_at(root: Section, offset: int, what: str) -> str:
    raw = bytes(root.view(offset, IDENT_MAX))
    ident = _decode(raw)
    if ident is None:
        raise InvalidIdentifier(f"the {what} identifier slot holds garbage: {raw[:24]!r}...")
    return ident


def master_ident(root: Section) -> str:
    """Identifier of the master area ("" before the first master phase);
    :class:`InvalidIdentifier` if the slot holds garbage."""
    return _ident_at(root, C_MASTER_IDENT, "master area")


def contribution_ident(root: Section, slot: int) -> str:
    """Identifier of member ``slot``'s contribution ("" if it never contributed)."""
    return _ident_at(root, _contrib_offset(slot), f"slot {slot} contribution")


def _encode(ident: str) -> bytes:
    raw = ident.encode("ascii")
    if len(raw) >= IDENT_MAX:
        raise ValueError(f"identifier too long ({len(raw)} bytes, at most {IDENT_MAX - 1}): "
                         f"{ident!r}")
    return raw.ljust(IDENT_MAX, b"\0")


def set_master_ident(root: Section, ident: str) -> None:
    """Publish the master area's identifier."""
    root.view(C_MASTER_IDENT, IDENT_MAX)[:] = _encode(ident)


def set_contribution_ident(root: Section, slot: int, ident: str) -> None:
    """Publish member ``slot``'s contribution identifier."""
    root.view(_contrib_offset(slot), IDENT_MAX)[:] = _encode(ident)


def descriptor_checksum(ident: str, size: int, version: int, logs: int) -> int:
    """Checksum of a master area's descriptor words; never 0 (0 marks "nothing published")."""
    raw = _encode(ident) + b"".join(v.to_bytes(WORD, "little") for v in (size, version, logs))
    return checksum(raw) or 1


@dataclass(frozen=True)
class MasterDescriptor:
    """The published master area: identifier, user size, layout version, log geometry, and
    whether the checksum stored with them matches (False: a torn or garbage descriptor)."""

    ident: str  # "" when nothing was ever published
    size: int
    version: int
    logs: int
    intact: bool


def master_descriptor(root: Section) -> MasterDescriptor:
    """Read the master area's descriptor; an identifier slot holding garbage reads as an
    empty identifier that is not intact."""
    load = root.load64
    size, version, logs, stored = (load(C_MASTER_SIZE), load(C_MASTER_VERSION),
                                   load(C_MASTER_LOGS), load(C_MASTER_CHECKSUM))
    try:
        ident = master_ident(root)
    except InvalidIdentifier:
        return MasterDescriptor("", size, version, logs, False)
    intact = bool(ident) and stored == descriptor_checksum(ident, size, version, logs)
    return MasterDescriptor(ident, size, version, logs, intact)


def publish_master(root: Section, ident: str, size: int, version: int, logs: int) -> None:
    """Publish a master area: the checksum is cleared first and stored last, so a master that
    dies half-way leaves a descriptor that no successor adopts."""
    root.store64(C_MASTER_CHECKSUM, 0)
    set_master_ident(root, ident)
    root.store64(C_MASTER_SIZE, size)
    root.store64(C_MASTER_VERSION, version)
    root.store64(C_MASTER_LOGS, logs)
    root.store64(C_MASTER_CHECKSUM, descriptor_checksum(ident, size, version, logs))


def quiesced_offset(slot: int) -> int:
    """Word of member ``slot`` in the QUIESCED table."""
    return C_QUIESCED + WORD * slot


def acked_offset(slot: int) -> int:
    """Word of member ``slot`` in the ACKED table."""
    return C_ACKED + WORD * slot


# -- the typed reader --------------------------------------------------------------------------

@dataclass(frozen=True)
class ComponentRecord:
    """A component's record as read from its domain's root, word by word (not atomically: read
    it while no recovery runs for a consistent picture). Epochs count recoveries; a member slot
    indexes the per-slot tuples."""

    requested: int  # newest requested recovery epoch
    agreed: int  # epoch whose view is recorded (view_generation, view_mask, master_slot)
    stable: int  # newest epoch every member of its view finished
    master_done: int  # epoch whose master phase is complete
    view_generation: int  # membership generation of the agreed view
    view_mask: int  # bit i set: slot i is in the agreed view
    master_slot: int | None  # master of the agreed view (None: none yet)
    master_ident: str  # identifier of the master area ("": none published)
    master_size: int  # its user size as published
    master_version: int  # its layout version (the component's master_area_version)
    master_logs: int  # geometry of the transaction logs in it (0: none)
    master_intact: bool  # the descriptor's checksum matches (a new master may adopt it)
    quiesced: tuple[int, ...]  # per slot: newest epoch it quiesced for
    acked: tuple[int, ...]  # per slot: newest epoch it contributed for
    contributions: tuple[str, ...]  # per slot: identifier of its contribution ("": none)
    memory_failures: int  # the domain's memory-failure counter

    @property
    def view_slots(self) -> tuple[int, ...]:
        """Slots of the agreed view, ascending."""
        return tuple(s for s in range(layout.MAX_MEMBERS) if self.view_mask >> s & 1)

    @classmethod
    def read(cls, root: Section) -> "ComponentRecord":
        """Read the record from ``root``, the root section of a component's domain (a
        :class:`mcs.Bootstrap`'s ``section``). :class:`CorruptObjectError`, naming the field,
        for a section that is no domain root or a record that cannot be one."""
        if root.size != layout.ROOT_SIZE:
            raise CorruptObjectError(
                f"not the root of a domain: a section of {root.size} bytes (a root has "
                f"{layout.ROOT_SIZE})")
        load = root.load64
        master = load(C_MASTER)
        if master > layout.MAX_MEMBERS:
            raise CorruptObjectError(
                f"component record: master slot word {master} is not a slot + 1 "
                f"(0..{layout.MAX_MEMBERS})")

        def ident(offset: int, what: str) -> str:
            try:
                return _ident_at(root, offset, what)
            except InvalidIdentifier as exc:
                raise CorruptObjectError(f"component record: {exc}") from None

        slots = range(layout.MAX_MEMBERS)
        return cls(
            requested=load(C_REQUESTED),
            agreed=load(C_AGREED),
            stable=load(C_STABLE),
            master_done=load(C_MASTER_DONE),
            view_generation=load(C_VIEW_GEN),
            view_mask=load(C_VIEW_MASK),
            master_slot=master - 1 if master else None,
            master_ident=ident(C_MASTER_IDENT, "master area"),
            master_size=load(C_MASTER_SIZE),
            master_version=load(C_MASTER_VERSION),
            master_logs=load(C_MASTER_LOGS),
            master_intact=master_descriptor(root).intact,
            quiesced=tuple(load(quiesced_offset(s)) for s in slots),
            acked=tuple(load(acked_offset(s)) for s in slots),
            contributions=tuple(ident(_contrib_offset(s), f"slot {s} contribution")
                                for s in slots),
            memory_failures=load(layout.MEMORY_FAILURES),
        )
