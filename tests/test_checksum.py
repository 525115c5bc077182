"""mcs.checksum and mcs.copy_checksum: one function whatever the CPU path, a fused copy that
sums exactly what it wrote, and the corruptions the web cache relies on it to catch."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mcs
from mcs import _gsm

# Pinned value: the checksum is stored in shared memory (web cache entries). Changing the
# function must come with a new webcache layout magic; this test says when that is due.
KNOWN = {0: 0x660F3FB2A4118B80, 1: 0xDAD353807C0D4A3F, 64: 0x158410D9F727AB99,
         1025: 0x62AB928616164A2E, 65536: 0xBECDC03CB60E5C19}


def pattern(n: int) -> bytes:
    return bytes((i * 131 + 7) & 0xFF for i in range(n))


@pytest.mark.parametrize("n", sorted(KNOWN))
def test_known_values(n):
    assert mcs.checksum(pattern(n)) == KNOWN[n], hex(mcs.checksum(pattern(n)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000))
def test_every_cpu_path_gives_the_same_value(data):
    paths = _gsm._checksum_paths(data)
    assert len(set(paths.values())) == 1, paths
    assert mcs.checksum(data) == paths["scalar"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 64))
def test_copy_checksum_copies_and_sums_the_copy(data, spare):
    dst = bytearray(b"\xee" * (len(data) + spare))
    assert mcs.copy_checksum(dst, data) == mcs.checksum(data)
    assert dst[:len(data)] == data and dst[len(data):] == b"\xee" * spare


def test_copy_checksum_from_a_section_into_a_view():
    with mcs.Section.create(70000) as sec:
        src = sec.view(100, 65536)
        src[:] = random.Random(5).randbytes(65536)
        into = bytearray(65536)
        dst = memoryview(into)
        assert mcs.copy_checksum(dst, src) == mcs.checksum(bytes(src))
        assert into == bytes(src)
        dst.release()
        src.release()


def test_copy_checksum_refuses_a_small_or_readonly_destination():
    with pytest.raises(ValueError, match="destination holds 3 bytes"):
        mcs.copy_checksum(bytearray(3), b"abcd")
    with pytest.raises((TypeError, BufferError)):
        mcs.copy_checksum(b"readonly", b"abc")
    with pytest.raises(TypeError):
        mcs.checksum("not a buffer")


def test_detects_every_single_bit_flip_and_a_poisoned_range():
    data = bytearray(random.Random(9).randbytes(4096 + 13))
    base = mcs.checksum(data)
    for bit in range(len(data) * 8):
        data[bit // 8] ^= 1 << (bit % 8)
        assert mcs.checksum(data) != base, bit
        data[bit // 8] ^= 1 << (bit % 8)
    for start, length in ((0, 4096), (1000, 64), (4000, 109)):
        poisoned = bytearray(data)
        poisoned[start:start + length] = b"\xdb" * length
        assert mcs.checksum(poisoned) != base


def test_swapped_words_and_lengths_differ():
    data = bytearray(pattern(256))
    base = mcs.checksum(data)
    swapped = bytearray(data)
    swapped[0:8], swapped[8:16] = data[8:16], data[0:8]
    assert mcs.checksum(swapped) != base
    assert mcs.checksum(data + b"\0") != base
    assert mcs.checksum(bytes(64)) != mcs.checksum(bytes(128))
