"""The owner's allocator for its own arena: first fit over a sorted free list, with coalescing.

It lives in the owner's private memory (it fails with the owner, like the arena itself): only
the owner allocates or frees in its arena, so no lock is needed.
"""

from __future__ import annotations

import bisect

__all__ = ["Allocator"]


class Allocator:
    """Free extents of ``[start, end)``; offsets and sizes are 8-byte aligned."""

    def __init__(self, start: int, end: int) -> None:
        if start % 8 or end < start:
            raise ValueError(f"bad arena range [{start}, {end})")
        self.start, self.end = start, end
        self._free: list[tuple[int, int]] = [(start, end - start)] if end > start else []
        self.used = 0

    @classmethod
    def around(cls, start: int, end: int,
               extents: "list[tuple[int, int]]") -> "tuple[Allocator, list[tuple[int, int]]]":
        """An allocator of ``[start, end)`` in which ``extents`` ((offset, size) pairs, e.g. the
        entries found in an adopted arena) are in use. Returns it and the extents refused
        (misaligned, out of range, or overlapping one kept)."""
        self = cls(start, end)
        self._free = []
        refused = []
        at = start
        for off, size in sorted(extents):
            if off % 8 or size <= 0 or size % 8 or off < at or off + size > end:
                refused.append((off, size))
                continue
            if off > at:
                self._free.append((at, off - at))
            self.used += size
            at = off + size
        if end > at:
            self._free.append((at, end - at))
        return self, refused

    def alloc(self, size: int) -> int | None:
        """Offset of a free extent of ``size`` bytes, or None if none fits."""
        for i, (off, length) in enumerate(self._free):
            if length >= size:
                if length == size:
                    del self._free[i]
                else:
                    self._free[i] = (off + size, length - size)
                self.used += size
                return off
        return None

    def free(self, offset: int, size: int) -> None:
        """Give back an extent returned by :meth:`alloc`; merges with its neighbours."""
        i = bisect.bisect_left(self._free, (offset, 0))
        if i > 0:
            prev_off, prev_len = self._free[i - 1]
            if prev_off + prev_len > offset:
                raise ValueError(f"double free at {offset}")
        if i < len(self._free) and offset + size > self._free[i][0]:
            raise ValueError(f"double free at {offset}")
        self.used -= size
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
            del self._free[i - 1]
            i -= 1
        if i < len(self._free) and offset + size == self._free[i][0]:
            size += self._free[i][1]
            del self._free[i]
        self._free.insert(i, (offset, size))

    @property
    def largest_free(self) -> int:
        return max((length for _, length in self._free), default=0)
