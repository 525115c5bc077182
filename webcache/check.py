"""Invariants of a live cache's shared structures, checked from outside (chaos runs, tests).

Walks every bucket of the master table under its mutex and checks each chain: references in
range, entries with the entry magic and the *linked* state, in the bucket of their path hash,
no cycle, each path once in the domain, and the checksum of every entry's data. Returns the list of
problems (empty: all invariants hold). Run it only while no recovery is in progress: the master
may re-create a bucket mutex during one.
"""

from __future__ import annotations

import os

from mcs import layout as mcs_layout
from mcs import GlobalMutex, checksum
from mcs.bootstrap import Bootstrap
from mcs.component import ComponentRecord, component_domain
from mcs.errors import InvalidIdentifier, McsError
from mcs.section import Section
from mcs.types import LockStatus

from webcache import layout as L
from webcache.cache import McsWebCache, path_hash

__all__ = ["check_domain"]

OPEN_WAIT = 0.5  # seconds to wait for a root being initialised
BUCKET_LOCK_TIMEOUT = 2.0  # a bucket mutex held longer is reported, not waited for


def check_domain(domain: str, *, verify_data: bool = True) -> list[str]:
    """Problems found in the shared structures of web cache domain ``domain``."""
    problems: list[str] = []
    sections: dict[int, Section] = {}
    with Bootstrap.open(component_domain(domain, McsWebCache.name), create=False,
                        wait=OPEN_WAIT) as boot:
        try:
            record = ComponentRecord.read(boot.section)
        except McsError as exc:
            return [f"component record: {exc}"]
        try:
            area = Section.attach(record.master_ident)
        except InvalidIdentifier as exc:
            return [f"master area: {exc}"]
        try:
            if area.load64(L.T_MAGIC) != L.TABLE_MAGIC:
                return ["master table: bad magic"]
            seen: dict[bytes, int] = {}
            for bucket in range(L.BUCKETS):
                boff = L.bucket_offset(bucket)
                mutex = GlobalMutex.open(area, boff + L.B_MUTEX)
                status = mutex.lock(timeout=BUCKET_LOCK_TIMEOUT)
                if status is LockStatus.ABANDONED:
                    # A holder died: every update of a chain is one store, so it is whole (the
                    # cache repairs it the same way, webcache.cache._consistent).
                    mutex.mark_consistent()
                elif status is not LockStatus.OK:
                    problems.append(f"bucket {bucket}: mutex {status.name}")
                    continue
                try:
                    _check_chain(record, area, bucket, sections, seen, problems, verify_data)
                finally:
                    mutex.unlock()
        except McsError as exc:
            problems.append(f"master table: {exc}")
        finally:
            area.close()
            for sec in sections.values():
                sec.close()
    return problems


def _check_chain(record: ComponentRecord, area: Section, bucket: int, sections: dict[int, Section],
                 seen: dict[bytes, int], problems: list[str], verify_data: bool) -> None:
    ref = area.load64(L.bucket_offset(bucket) + L.B_HEAD)
    steps = 0
    while ref:
        slot, off = L.split_ref(ref)
        where = f"bucket {bucket} ref slot {slot} offset {off}"
        if not 0 <= slot < mcs_layout.MAX_MEMBERS:
            problems.append(f"{where}: slot out of range")
            return
        sec = sections.get(slot)
        if sec is None:
            try:
                sec = Section.attach(record.contributions[slot])
            except InvalidIdentifier as exc:
                problems.append(f"{where}: arena unavailable ({exc})")
                return
            sections[slot] = sec
        if off < L.ARENA_HEADER or off + L.ENTRY_HEADER > sec.size:
            problems.append(f"{where}: offset out of range")
            return
        if sec.load64(off + L.E_MAGIC) != L.ENTRY_MAGIC:
            problems.append(f"{where}: no entry magic")
            return
        if sec.load64(off + L.E_STATE) != L.STATE_LINKED:
            problems.append(f"{where}: linked entry in state {sec.load64(off + L.E_STATE)}")
        plen = sec.load64(off + L.E_PATH_LEN)
        size = sec.load64(off + L.E_SIZE)
        if plen > L.PATH_MAX or L.data_offset(off, plen) + size > sec.size:
            problems.append(f"{where}: path or data out of range")
            return
        path = bytes(sec.view(off + L.ENTRY_HEADER, plen))
        h = sec.load64(off + L.E_HASH)
        if h != path_hash(os.fsdecode(path)) or h % L.BUCKETS != bucket:
            problems.append(f"{where}: hash does not match path {path!r} or bucket")
        if path in seen:
            problems.append(f"{where}: {path!r} cached twice")
        seen[path] = slot
        if verify_data:
            doff = L.data_offset(off, plen)
            if checksum(sec.view(doff, size)) != sec.load64(off + L.E_SUM):
                problems.append(f"{where}: data checksum mismatch for {path!r}")
        ref = sec.load64(off + L.E_NEXT)
        steps += 1
        if steps > L.MAX_CHAIN:
            problems.append(f"bucket {bucket}: chain cycle")
            return
