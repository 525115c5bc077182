"""Typed layouts (mcs.records): offsets and alignment computed from declarations, bound views on
real sections (mutexes held by real child processes), the layout header that refuses an area made
by another declaration, random layouts (hypothesis), and the web cache and registry layouts,
which must keep every byte where it was before they were declared as records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mcs
from mcs import LockStatus
from mcs.errors import LayoutMismatchError
from mcs.layout import MAX_MEMBERS
from mcs.records import (Array, Bytes, Event, Int32, Int64, LayoutHeader, Mutex, Nested, Pad,
                         Record, Stamp, UInt32, UInt64, define)

from conftest import REPO


class Ref(Record):
    slot = UInt64()
    offset = UInt64()


class Bucket(Record):
    mutex = Mutex()
    count = Int64()
    refs = Array(Ref, 32)
    name = Bytes(88)


class Small(Record):
    flag = Bytes(1)
    word = UInt32()
    big = Int64()
    tail = Bytes(3)


class Table(Record):
    version = UInt64()
    event = Event()
    buckets = Array(Bucket, 4)


@pytest.fixture
def section():
    with mcs.Section.create(1 << 16) as sec:
        yield sec


# -- layout ---------------------------------------------------------------------------------------


def test_offsets_alignment_and_sizes_are_the_hand_computed_ones():
    assert (Ref.SIZE, Ref.ALIGN) == (16, 8)
    # mutex 0..64 | count 64 | refs 72 + 32 * 16 = 584 | name 584 + 88 = 672 -> 704 (align 64)
    assert [(f.name, f.offset, f.size) for f in Bucket.fields()] == [
        ("mutex", 0, 64), ("count", 64, 8), ("refs", 72, 512), ("name", 584, 88)]
    assert (Bucket.SIZE, Bucket.ALIGN) == (704, 64)
    assert Bucket.count.offset == 64 and Bucket.refs.offset == 72
    assert Bucket.offset_of("refs", 3, "slot") == 72 + 48
    assert Bucket.offset_of("refs", 31, "offset") == 72 + 31 * 16 + 8
    # 1-byte, then a 4-aligned word at 4, an 8-aligned one at 8, 3 bytes at 16, rounded to 24
    assert [f.offset for f in Small.fields()] == [0, 4, 8, 16]
    assert (Small.SIZE, Small.ALIGN) == (24, 8)
    # nested arrays of records: the event is 64-aligned, and so is each bucket
    assert Table.event.offset == 64 and Table.buckets.offset == 128
    assert Table.offset_of("buckets", 2, "refs", 5, "offset") == 128 + 2 * 704 + 72 + 5 * 16 + 8
    assert Table.SIZE == 128 + 4 * 704
    assert Array(Bucket, 64).SIZE == 64 * 704
    assert Array(Bucket, 64).offset_of(3, "count") == 3 * 704 + 64


def test_class_keywords_and_inheritance():
    class Header(Record, size=4096):
        magic = UInt64()

    class Wide(Record, align=32):
        a = Bytes(5)

    class Extended(Ref):
        more = Bytes(4)

    assert (Header.SIZE, Header.ALIGN) == (4096, 8)
    assert (Wide.SIZE, Wide.ALIGN) == (32, 32)
    assert [(f.name, f.offset) for f in Extended.fields()] == [
        ("slot", 0), ("offset", 8), ("more", 16)]
    assert Extended.SIZE == 24
    assert Extended.FINGERPRINT != Ref.FINGERPRINT
    with pytest.raises(ValueError, match="must be a multiple of 8 >= 16"):
        define("TooSmall", [("a", UInt64()), ("b", UInt64())], size=8)
    with pytest.raises(ValueError, match="power of two"):
        define("Odd", [("a", UInt64())], align=12)


def test_the_fingerprint_follows_names_kinds_offsets_and_version_not_class_names():
    same = define("Other", [("slot", UInt64()), ("offset", UInt64())])
    assert same.FINGERPRINT == Ref.FINGERPRINT  # a rename of the class is the same layout
    changed = [
        define("R", [("slot", UInt64()), ("offs", UInt64())]),  # a field renamed
        define("R", [("slot", UInt64()), ("offset", Int64())]),  # a kind changed
        define("R", [("offset", UInt64()), ("slot", UInt64())]),  # fields swapped
        define("R", [("slot", UInt64()), ("offset", UInt64())], size=32),  # size
        define("R", [("slot", UInt64()), ("offset", UInt64())], version=2),  # explicit version
        define("R", [("slot", UInt64()), ("pad", Pad(8)), ("offset", UInt64())]),  # an offset
    ]
    prints = {r.FINGERPRINT for r in changed} | {Ref.FINGERPRINT}
    assert len(prints) == len(changed) + 1
    # a change deep inside a nested array changes the outer fingerprint too
    inner = define("Ref", [("slot", UInt64()), ("offset", UInt32())])
    outer = define("Bucket", [("mutex", Mutex()), ("count", Int64()), ("refs", Array(inner, 32)),
                              ("name", Bytes(88))])
    assert outer.FINGERPRINT != Bucket.FINGERPRINT
    assert define("B", [(f.name, f) for f in Bucket.fields()]).FINGERPRINT == Bucket.FINGERPRINT
    assert 0 < Bucket.FINGERPRINT < 1 << 64


def test_bad_declarations_are_refused_clearly():
    with pytest.raises(TypeError, match=r"instance of the kind \(UInt64\(\)\)"):
        class A(Record):
            a = UInt64

    with pytest.raises(TypeError, match="may not be private, upper-case or one of"):
        define("B", [("at", UInt64())])
    with pytest.raises(TypeError, match="may not be private"):
        define("B", [("SIZE", UInt64())])
    with pytest.raises(TypeError, match="declared twice"):
        define("B", [("a", UInt64()), ("a", UInt64())])
    with pytest.raises(ValueError, match="positive int"):
        Bytes(0)
    with pytest.raises(ValueError, match="positive int"):
        Array(Ref, 0)
    with pytest.raises(TypeError, match="not a field kind"):
        Array(int, 3)
    with pytest.raises(TypeError, match="Record subclass"):
        Nested(Record)
    with pytest.raises(AttributeError, match="Bucket has no field 'nope'"):
        Bucket.offset_of("nope")
    with pytest.raises(IndexError, match="Bucket.refs index 32 out of range 0..31"):
        Bucket.offset_of("refs", 32)
    with pytest.raises(TypeError, match="no fields or elements"):
        Bucket.offset_of("count", 1)
    with pytest.raises(TypeError, match=r"Record.at|bind a record"):
        Bucket()


# -- bound views ---------------------------------------------------------------------------------


def test_a_bound_view_reads_and_writes_the_computed_offsets(section):
    b = Bucket.at(section, 1408)
    b.count = -3
    assert b.count == -3 and section.load64(1408 + 64) == (1 << 64) - 3
    assert b.add("count", 5) == -3 and b.count == 2
    assert b.cas("count", 2, 9) and not b.cas("count", 2, 10) and b.count == 9
    b.refs[3].slot = 77
    assert section.load64(1408 + 72 + 48) == 77 and b.refs[3].slot == 77
    assert len(b.refs) == 32 and [r.slot for r in b.refs].count(77) == 1
    b.name = b"bucket"
    assert b.name == b"bucket" + bytes(82)
    assert bytes(section.view(1408 + 584, 6)) == b"bucket"
    b.name = b"x" * 88
    assert b.name == b"x" * 88
    assert b.address("refs", 3, "slot") == 1408 + 120 and b.base == 1408
    assert b.section is section
    assert len(b.memory()) == Bucket.SIZE and len(b.memory("name")) == 88

    s = Small.at(section, 8)
    s.word = 0xFFFFFFFF
    assert s.word == 0xFFFFFFFF and bytes(section.view(12, 4)) == b"\xff" * 4
    i32 = define("I", [("v", Int32())]).at(section, 40)
    i32.v = -2  # type: ignore[attr-defined]
    assert i32.v == -2  # type: ignore[attr-defined]

    arr = Array(UInt64(), 10).at(section, 4096)
    arr[9] = 5
    assert arr[9] == 5 and section.load64(4096 + 72) == 5 and list(arr)[:2] == [0, 0]


def test_bad_values_indices_and_places_are_clear_errors_and_write_nothing(section):
    b = Bucket.at(section, 0)
    b.count = 1
    with pytest.raises(TypeError, match="Bucket.count takes an int, not str"):
        b.count = "2"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="takes an int, not bool"):
        b.count = True
    with pytest.raises(OverflowError, match="does not fit Bucket.count"):
        b.count = 1 << 63
    with pytest.raises(OverflowError, match="does not fit Ref.slot"):
        b.refs[0].slot = -1
    assert b.count == 1 and b.refs[0].slot == 0
    with pytest.raises(ValueError, match="89 bytes are too long for Bucket.name"):
        b.name = b"y" * 89
    with pytest.raises(TypeError, match="takes bytes, not str"):
        b.name = "text"  # type: ignore[assignment]
    assert b.name == bytes(88)
    with pytest.raises(IndexError, match=r"Bucket.refs index 32 out of range 0..31"):
        b.refs[32]
    with pytest.raises(IndexError, match="index -1 out of range"):
        b.refs[-1]
    with pytest.raises(TypeError, match="index must be an int, not str"):
        b.refs["1"]  # type: ignore[index]
    with pytest.raises(AttributeError, match="no attribute 'cuont'"):
        b.cuont = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="is an array: assign its elements"):
        b.refs = None  # type: ignore[assignment]
    with pytest.raises(TypeError, match="not a 64-bit word"):
        b.add("name", 1)
    with pytest.raises(ValueError, match="64-aligned offset"):
        Bucket.at(section, 8)
    with pytest.raises(IndexError, match="runs past the section"):
        Bucket.at(section, section.size - 64)
    with pytest.raises(IndexError, match=r"Array\(Bucket, 64\) \(45056 B at 32768\) runs past"):
        Array(Bucket, 64).at(section, 32768)
    with pytest.raises(AttributeError, match="padding"):
        _ = define("P", [("a", Pad(8))]).at(section, 0).a  # type: ignore[attr-defined]


def test_arrays_of_records_with_mutexes_and_events(section):
    table = Table.at(section, 0)
    table.create_sync(tag=5)  # the event and the 4 bucket mutexes
    assert table.event.value == 0
    table.event.set()
    assert Table.at(section, 0).event.value == 1
    buckets = Array(Bucket, 4).at(section, Table.buckets.offset)
    assert buckets[2].base == table.buckets[2].base == 128 + 2 * 704
    for bucket in table.buckets:
        m = Bucket.mutex.open(bucket, tag=9)
        assert m.lock(timeout=0) is LockStatus.OK
        assert m.owner.tag == 9
        m.unlock()
    fresh = Bucket.at(section, 8192)
    with pytest.raises(mcs.CorruptObjectError):
        fresh.mutex  # never created
    Bucket.mutex.create(fresh, tag=3)
    m = fresh.mutex
    assert m.lock() is LockStatus.OK
    m.unlock()


# The child declares the layout itself (as another program would), not imported from here.
HOLD = """
import sys, time, mcs
from mcs.records import Array, Bytes, Int64, Mutex, Record, UInt64

class Ref(Record):
    slot = UInt64()
    offset = UInt64()

class Bucket(Record):
    mutex = Mutex()
    count = Int64()
    refs = Array(Ref, 32)
    name = Bytes(88)

s = mcs.Section.attach(sys.argv[1])
b = Array(Bucket, 4).at(s, 0)[int(sys.argv[2])]
m = Bucket.mutex.open(b, tag=Bucket.FINGERPRINT & 0xFFFF)
print(m.lock().name, flush=True)
b.add("count", 1)  # a half-update the holder never finishes
time.sleep(600)
"""


def test_a_mutex_of_a_record_held_by_a_killed_child(section, spawn):
    buckets = Array(Bucket, 4).at(section, 0)
    for b in buckets:
        b.create_sync()
    child = spawn(HOLD, section.ident, "2")
    child.expect("OK")
    assert buckets[2].mutex.lock(timeout=0.05) is LockStatus.TIMEOUT
    assert buckets[1].mutex.lock(timeout=0) is LockStatus.OK  # another bucket: free
    buckets[1].mutex.unlock()
    child.kill()
    m = buckets[2].mutex
    assert m.lock() is LockStatus.ABANDONED
    # the child declared the same layout itself: same fingerprint, same field offsets
    assert m.previous_owner == mcs.MutexOwner(child.pid, Bucket.FINGERPRINT & 0xFFFF)
    assert buckets[2].count == 1 and buckets[1].count == 0
    m.mark_consistent()
    m.unlock()


# -- layout header -------------------------------------------------------------------------------


def test_the_layout_header_refuses_an_area_of_another_layout(section):
    header = LayoutHeader(b"BUCKETS!", Array(Bucket, 4))
    with pytest.raises(LayoutMismatchError, match="at offset 0 is not initialised"):
        header.check(section)
    header.write(section)
    header.check(section)
    assert section.load64(Stamp.magic.offset) == int.from_bytes(b"BUCKETS!", "little")
    with pytest.raises(LayoutMismatchError,
                       match=r"is not a b'REGISTRY' area \(magic b'BUCKETS!'\)"):
        LayoutHeader(b"REGISTRY", Array(Bucket, 4)).check(section)
    other = define("Bucket", [("mutex", Mutex()), ("count", Int64()), ("refs", Array(Ref, 31)),
                              ("name", Bytes(88))])
    with pytest.raises(LayoutMismatchError, match=r"made by another layout of Array\(Bucket, 4\)"):
        LayoutHeader(b"BUCKETS!", Array(other, 4)).check(section)
    LayoutHeader(b"BUCKETS!", Array(other, 4)).write(section)  # re-stamped: now that one's
    with pytest.raises(LayoutMismatchError, match="fingerprint"):
        header.check(section)
    with pytest.raises(ValueError, match="8 bytes"):
        LayoutHeader(b"short", Bucket)
    with pytest.raises(TypeError, match="Ref has no 64-bit field 'magic'"):
        LayoutHeader(b"BUCKETS!", Bucket, header=Ref)


def test_a_layout_header_in_a_header_record_of_its_own(section):
    class Header(Record, size=64):
        magic = UInt64()
        count = UInt64()
        fingerprint = UInt64()

    class Area(Record):
        header = Nested(Header)
        buckets = Array(Bucket, 2)

    stamp = LayoutHeader(b"AREA0001", Area, header=Header)
    area = Area.at(section, 4096)
    area.header.count = 2
    stamp.write(section, 4096)
    stamp.check(section, 4096)
    assert section.load64(4096 + 16) == Area.FINGERPRINT and area.header.count == 2
    assert area.buckets[1].base == 4096 + 64 + 704


# -- random layouts ------------------------------------------------------------------------------

_scalars = st.sampled_from([UInt64, Int64, UInt32, Int32]).map(lambda k: k())
_leaf = st.one_of(_scalars, st.integers(1, 40).map(Bytes), st.just(Mutex()), st.just(Event()),
                  st.integers(1, 40).map(Pad))


def _records(depth: int) -> st.SearchStrategy[type[Record]]:
    kinds = _leaf if depth == 0 else st.one_of(
        _leaf, _records(depth - 1),
        st.tuples(st.one_of(_scalars, _records(depth - 1)), st.integers(1, 5)).map(
            lambda t: Array(t[0], t[1])))
    return st.lists(kinds, min_size=1, max_size=6).map(
        lambda ks: define("R", [(f"f{i}", k) for i, k in enumerate(ks)]))


def _spans(kind, base: int):
    """Every leaf field as (start, end, align), nested records and arrays unfolded."""
    if isinstance(kind, Nested):
        for f in kind.record.fields():
            yield from _spans(f, base + f.offset)
    elif isinstance(kind, Array):
        for i in range(kind.n):
            yield from _spans(kind.kind, base + i * kind.stride)
    else:
        yield base, base + kind.size, kind.align


@settings(max_examples=200, deadline=None)
@given(_records(2))
def test_random_layouts_never_overlap_and_respect_alignment(record):
    spans = sorted(_spans(Nested(record), 0))
    for (start, end, align), (nxt, _, _) in zip(spans, spans[1:]):
        assert end <= nxt, f"overlap in {record.LAYOUT}"
    for start, end, align in spans:
        assert start % align == 0 and end <= record.SIZE
        assert record.ALIGN % align == 0
    assert record.SIZE % record.ALIGN == 0 and record.SIZE >= spans[-1][1]
    assert define("Copy", [(f.name, f) for f in record.fields()]).FINGERPRINT == record.FINGERPRINT


# -- the converted layouts keep every byte where it was -----------------------------------------


def test_the_web_cache_layout_keeps_its_offsets():
    from webcache import _hit
    from webcache import layout as L

    assert (L.T_MAGIC, L.T_BUCKETS, L.T_TABLE_ID, L.T_FILL_EVENT, L.TABLE_HEADER) == (
        0, 8, 16, 64, 128)
    assert (L.B_MUTEX, L.B_HEAD, L.B_LEASE_HASH, L.B_LEASE_OWNER, L.B_LEASE_EXPIRY) == (
        0, 64, 72, 80, 88)
    assert L.BUCKET_SIZE == 128 and L.TABLE_SIZE == 128 + 4096 * 128
    assert (L.A_MAGIC, L.A_ENTRIES, L.A_BYTES, L.A_ID, L.ARENA_HEADER) == (0, 8, 16, 24, 4096)
    assert [L.E_NEXT, L.E_STATE, L.E_HASH, L.E_SIZE, L.E_MTIME, L.E_INODE, L.E_DEV, L.E_SUM,
            L.E_ACCESS, L.E_PATH_LEN, L.E_ALLOC, L.E_MAGIC, L.E_CTIME] == list(range(0, 104, 8))
    assert L.E_PINS == 128 and L.ENTRY_HEADER == 128 + 8 * MAX_MEMBERS == 640
    assert [L.bucket_offset(b) for b in (0, 1, 4095)] == [128, 256, 128 + 4095 * 128]
    _hit.check_layout(L)  # the native side agrees
    # The web cache marks its areas with versioned magics (MCSWC..5, entries ..4), not with
    # fingerprints: a change of a declaration must come with new magics, so each magic pins its
    # layout here.
    now = {L.TABLE_MAGIC: L.Table.FINGERPRINT, L.ARENA_MAGIC: L.ArenaHeader.FINGERPRINT,
           L.ENTRY_MAGIC: L.EntryHeader.FINGERPRINT}
    for magic, fingerprint in now.items():
        assert PINNED.get(magic) == fingerprint, (
            f"the layout marked {magic.to_bytes(8, 'little')!r} changed: give it a new magic "
            f"in webcache/layout.py and pin {fingerprint:#x} for it here")


PINNED = {int.from_bytes(b"MCSWCTB5", "little"): 0x149fc7e8f8202467,
          int.from_bytes(b"MCSWCAR5", "little"): 0x85eed11c3c3c2644,
          int.from_bytes(b"MCSWCEN4", "little"): 0x49e6138d4c85eb2d}


def test_the_registry_layout_keeps_its_offsets():
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import registry as R
    finally:
        sys.path.remove(str(REPO / "examples"))
    # the bucket: mutex 64 | count 8 | pad 8 | refs 32 * 24 = 768 -> 848, rounded up to 896
    assert (R.Bucket.offset_of("count"), R.Bucket.offset_of("refs"), R.Bucket.SIZE) == (64, 80, 896)
    assert R.Bucket.offset_of("refs", 1, "hash") == 80 + 24 + 16
    assert [R.bucket_offset(b) for b in (0, 3)] == [64, 64 + 3 * 896]
    assert R.Registry.master_area_size == 64 + 64 * 896
    # the entry: hash 8 | key length 4 | value length 4 | key 88 | value 88
    assert [f.offset for f in R.Entry.fields()] == [0, 8, 12, 16, 104] and R.ENTRY == 192
    assert R.Registry.contribution_size == 256 * 192
    # the area header: magic 0 | bucket count 8 | layout fingerprint 16 (new, in spare bytes)
    assert [f.offset for f in R.AreaHeader.fields()] == [0, 8, 16]


def test_no_hand_placed_offsets_remain_in_the_converted_layouts():
    """The layouts of webcache/layout.py and examples/registry*.py are declared, not placed:
    no ``NAME = <number>`` offset assignments and no struct packing at literal offsets."""
    import re

    examples = sorted((REPO / "examples").glob("registry*.py"))
    for path in [REPO / "webcache" / "layout.py", *examples]:
        text = path.read_text()
        assert "struct.pack" not in text and "struct.unpack" not in text, path
        assert not re.search(r"\b(load64|store64|view)\(\s*(off\s*\+\s*)?\d", text), path
        assert not re.search(r"^[A-Z_]*(OFFSET|_SIZE|HEADER)\s*=\s*\d", text, re.M), path
        assert not re.search(r"^[A-Z]_\w*(, [A-Z]_\w*)*\s*=\s*\d", text, re.M), path  # E_X = 8


def test_webcache_bucket_offset_is_the_declared_one():
    """The table's bucket offset is plain arithmetic on the hot path: it must be exactly what
    the declaration says, for every bucket."""
    from webcache import layout as L
    assert all(L.bucket_offset(b) == L.Table.offset_of("buckets", b) for b in range(L.BUCKETS))
    assert L.Table.offset_of("buckets", 7) == L.Table.offset_of("buckets", 7)  # remembered
