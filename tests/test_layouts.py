"""Each layer owns its shared-memory layout and a typed reader of it: the component record read
from outside (as ``mcs fault poison``, the web cache's checker and the tests read it) says what
the running components see; a foreign or corrupt record is a clear error, never garbage."""

from __future__ import annotations

import time

import pytest

import mcs
from mcs import component_record as rec
from mcs import layout
from mcs.bootstrap import Bootstrap
from mcs.component import ComponentRecord, McsComponent, component_domain
from mcs.errors import CorruptObjectError, InvalidIdentifier
from mcs.poison import poison

FAST = {"heartbeat": 0.02, "suspect_after": 0.1, "evict_after": 0.3}


class Probe(McsComponent):
    """A component with a master area and a contribution, and nothing else."""

    name = "probe"
    master_area_size = 4096
    contribution_size = 4096


def settled(comps: list[Probe], boot: Bootstrap, after: int = 0,
            timeout: float = 20.0) -> ComponentRecord:
    """The record once every component is stable at the newest requested epoch, past ``after``."""
    deadline = time.monotonic() + timeout
    while True:
        record = ComponentRecord.read(boot.section)
        if (record.requested == record.stable > after
                and all(c.stats.epoch == record.stable and c.view is not None
                        and len(c.view.members) == len(comps) for c in comps)):
            return record
        assert time.monotonic() < deadline, (record, [c.stats for c in comps])
        time.sleep(0.02)


def test_the_record_read_from_outside_is_what_the_components_see(domain):
    with Probe(domain, **FAST) as a, Probe(domain, **FAST) as b:
        with Bootstrap.open(component_domain(domain, "probe"), create=False) as boot:
            record = settled([a, b], boot)
            view = a.view
            assert b.view.generation == view.generation
            assert record.agreed == record.stable == a.stats.epoch
            assert record.view_generation == view.generation
            assert set(record.view_slots) == view.slots == {a.slot, b.slot}
            assert record.master_slot == view.master.slot
            master = a if a.is_master else b
            assert record.master_ident == master.master_area.ident == a.master_area.ident
            for c in (a, b):
                assert record.contributions[c.slot] == c.contribution.ident
                assert record.quiesced[c.slot] == record.acked[c.slot] == record.stable
            assert record.memory_failures == 0
            assert all(record.contributions[s] == "" for s in range(layout.MAX_MEMBERS)
                       if s not in view.slots)

            # A poisoned master area: the record shows the failure, then its replacement.
            poisoned = poison(domain, "probe")
            assert poisoned == record.master_ident
            after = ComponentRecord.read(boot.section)
            assert after.memory_failures == 1
            assert after.requested >= record.requested
            again = settled([a, b], boot, after=record.stable)
            assert again.master_ident != poisoned
            assert again.master_ident == (a if a.is_master else b).master_area.ident


def test_a_section_that_is_no_domain_root_is_refused():
    with mcs.Section.create(4096) as sec:
        with pytest.raises(CorruptObjectError, match="not the root of a domain"):
            ComponentRecord.read(sec)


def test_a_corrupt_record_names_the_field(domain):
    with Bootstrap.open(component_domain(domain, "probe")) as boot:
        root = boot.section
        assert ComponentRecord.read(root).master_slot is None  # a fresh root: nothing yet
        root.store64(rec.C_MASTER, layout.MAX_MEMBERS + 7)
        with pytest.raises(CorruptObjectError, match="master slot word 71"):
            ComponentRecord.read(root)
        root.store64(rec.C_MASTER, 3)
        assert ComponentRecord.read(root).master_slot == 2

        rec.set_contribution_ident(root, 5, "sysv:1:00000000000000aa")
        assert ComponentRecord.read(root).contributions[5] == "sysv:1:00000000000000aa"
        root.view(rec.C_CONTRIB_IDENT + rec.IDENT_MAX * 5, rec.IDENT_MAX)[:] = b"\xff" * 64
        with pytest.raises(CorruptObjectError, match="slot 5 contribution identifier"):
            ComponentRecord.read(root)
        with pytest.raises(InvalidIdentifier, match="garbage"):
            rec.contribution_ident(root, 5)
        with pytest.raises(IndexError):
            rec.contribution_ident(root, layout.MAX_MEMBERS)
        with pytest.raises(ValueError, match="too long"):
            rec.set_master_ident(root, "x" * rec.IDENT_MAX)


def test_one_function_names_a_component_domain():
    assert component_domain("webcache-8080", "webcache") == "webcache-8080.webcache"
    assert mcs.component_domain is component_domain
    with pytest.raises(ValueError, match="invalid component name"):
        component_domain("d", "")
    with pytest.raises(ValueError, match="at most 54"):
        component_domain("d" * 60, "webcache")


def test_the_core_layout_knows_no_component_field():
    assert not [n for n in dir(layout) if n.startswith("C_")]
    assert rec.C_RECOVERY_EVENT == layout.COMPONENT_EVENT
    assert layout.COMPONENT_AREA <= rec.C_REQUESTED and rec.C_END <= layout.ROOT_SIZE
