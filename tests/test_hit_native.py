"""webcache._hit on real sections: the native chain walk and checked copy find what the layout
says, and turn every corrupt ref, offset or length into a reason or a named outcome, never a stray
read; and they refuse to load against a Python layout they disagree with."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mcs
from mcs.errors import LayoutMismatchError
from mcs import layout as mcs_layout
from webcache import _hit
from webcache import layout as L

HEAD = L.bucket_offset(7) + L.B_HEAD
SLOTS = mcs_layout.MAX_MEMBERS


def put_entry(arena: mcs.Section, off: int, path: bytes, data: bytes, nxt: int = 0,
              h: int = 1234) -> None:
    arena.store64(off + L.E_NEXT, nxt)
    arena.store64(off + L.E_HASH, h)
    for field, value in ((L.E_SIZE, len(data)), (L.E_MTIME, 11), (L.E_INODE, 22), (L.E_DEV, 33),
                         (L.E_CTIME, 44), (L.E_PATH_LEN, len(path)), (L.E_SUM, mcs.checksum(data))):
        arena.store64(off + field, value)
    arena.view(off + L.ENTRY_HEADER, len(path))[:] = path
    doff = L.data_offset(off, len(path))
    arena.view(doff, len(data))[:] = data


@pytest.fixture
def sections():
    master = mcs.Section.create(L.TABLE_SIZE)
    arena = mcs.Section.create(1 << 16)
    yield master, arena
    master.close()
    arena.close()


def test_walk_finds_the_entry_and_its_predecessor(sections):
    master, arena = sections
    first, second = L.ARENA_HEADER, L.ARENA_HEADER + 4096
    put_entry(arena, second, b"/b", b"bb")
    put_entry(arena, first, b"/a", b"aa", nxt=L.make_ref(3, second))
    master.store64(HEAD, L.make_ref(3, first))
    of = {3: arena}.__getitem__
    assert _hit.walk(master, of, HEAD, 1234, b"/a", SLOTS, 8) == (L.make_ref(3, first), 0, 3, arena)
    assert _hit.walk(master, of, HEAD, 1234, b"/b", SLOTS, 8) == (
        L.make_ref(3, second), L.make_ref(3, first), 3, arena)
    assert _hit.walk(master, of, HEAD, 1234, b"/c", SLOTS, 8) is None
    assert _hit.walk(master, of, HEAD, 999, b"/a", SLOTS, 8) is None  # other hash


@pytest.mark.parametrize("ref, reason", [
    (L.make_ref(SLOTS, L.ARENA_HEADER), "ref to slot"),
    (L.ARENA_HEADER, "ref to slot -1"),
    (L.make_ref(0, 8), "out of range"),
    (L.make_ref(0, L.ARENA_HEADER + 4), "out of range"),
    (L.make_ref(0, (1 << 16) - 8), "out of range"),
    (L.make_ref(0, (1 << 40)), "out of range"),
])
def test_walk_reports_corrupt_refs(sections, ref, reason):
    master, arena = sections
    master.store64(HEAD, ref)
    found = _hit.walk(master, {0: arena}.__getitem__, HEAD, 1234, b"/a", SLOTS, 8)
    assert isinstance(found, str) and reason in found


def test_walk_stops_on_a_cycle_and_checks_the_head_offset(sections):
    master, arena = sections
    ref = L.make_ref(0, L.ARENA_HEADER)
    put_entry(arena, L.ARENA_HEADER, b"/x", b"x", nxt=ref)  # points at itself
    master.store64(HEAD, ref)
    assert "cycle" in _hit.walk(master, {0: arena}.__getitem__, HEAD, 1234, b"/a", SLOTS, 8)
    with pytest.raises(IndexError):
        _hit.walk(master, {0: arena}.__getitem__, L.TABLE_SIZE, 1, b"/a", SLOTS, 8)


def test_walk_does_not_match_a_path_longer_than_the_section(sections):
    master, arena = sections
    off = (1 << 16) - L.ENTRY_HEADER - 8
    put_entry(arena, off, b"", b"")
    arena.store64(off + L.E_PATH_LEN, 1 << 20)  # corrupt length
    master.store64(HEAD, L.make_ref(0, off))
    assert _hit.walk(master, {0: arena}.__getitem__, HEAD, 1234, b"/a", SLOTS, 8) is None


def test_copy_out_into_a_buffer_or_bytes_and_every_refusal(sections):
    _, arena = sections
    off = L.ARENA_HEADER
    data = bytes(range(256)) * 10
    put_entry(arena, off, b"/f", data)
    args = (arena, off, 2, len(data), 11, 22, 33, 44)
    into = bytearray(4096)
    assert _hit.copy_out(*args, into) is True and into[:len(data)] == data
    assert arena.load64(off + L.E_ACCESS) > 0
    assert _hit.copy_out(*args, None) == data
    assert _hit.copy_out(*args, bytearray(10)) == data  # too small: a new bytes
    stale, out_of_range = _hit.CopyOutcome.STALE, _hit.CopyOutcome.OUT_OF_RANGE
    assert _hit.copy_out(arena, off, 2, len(data), 12, 22, 33, 44, into) is stale
    assert _hit.copy_out(arena, off, 2, len(data) + 1, 11, 22, 33, 44, into) is stale
    assert _hit.copy_out(arena, off, 2, len(data), 11, 22, 33, 45, into) is stale  # ctime
    assert _hit.copy_out(arena, off + 4, 2, len(data), 11, 22, 33, 44, into) is out_of_range
    assert _hit.copy_out(arena, 1 << 20, 2, len(data), 11, 22, 33, 44, into) is out_of_range
    assert _hit.copy_out(arena, off, 1 << 20, len(data), 11, 22, 33, 44, into) is out_of_range
    arena.view(L.data_offset(off, 2) + 100, 1)[:] = b"\xdb"  # poisoned after it was summed
    assert _hit.copy_out(*args, into) is _hit.CopyOutcome.CORRUPT
    assert _hit.CopyOutcome.CORRUPT.name == "CORRUPT"  # outcomes have names, not bare ints
    with pytest.raises((TypeError, BufferError)):
        _hit.copy_out(*args, b"read-only")


def test_the_native_layout_is_checked_against_the_python_one():
    _hit.check_layout(L)  # the layout it was built with
    wrong = type(L)("fake_layout")
    wrong.__dict__.update({k: getattr(L, k) for k in _hit.LAYOUT})
    wrong.E_SUM = L.E_SUM + 8
    del wrong.E_CTIME
    with pytest.raises(LayoutMismatchError, match=r"E_SUM is 56 here but 64 in fake_layout.*"
                                                  r"E_CTIME is 96 here but missing"):
        _hit.check_layout(wrong)


def test_a_layout_disagreement_fails_the_import_even_under_python_O(tmp_path):
    """A real check, not an ``assert`` (which -O strips): the installed web cache with its
    layout.py edited on the Python side only refuses to load, saying what disagrees."""
    import webcache

    copy = tmp_path / "webcache"
    shutil.copytree(Path(webcache.__file__).parent, copy)
    layout_py = copy / "layout.py"
    # the declaration of the entry header with two fields swapped: the checksum moves to 48
    dev, checksum = "    dev = UInt64()\n", "    checksum = UInt64()  # of the data (mcs.checksum)\n"
    edited = layout_py.read_text().replace(dev + checksum, checksum + dev)
    assert edited != layout_py.read_text()
    layout_py.write_text(edited)
    out = subprocess.run([sys.executable, "-P", "-O", "-c", "import webcache"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode != 0
    assert "LayoutMismatchError: webcache._hit was built for another web cache layout" in out.stderr
    assert "E_SUM is 56 here but 48 in webcache.layout" in out.stderr
