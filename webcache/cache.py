"""McsWebCache: ONE cache of static files shared by every node of a domain.

Each node contributes an equal arena (its contribution); the master contributes the master table
(hash buckets with robust mutexes, see webcache/layout.py). An entry lives contiguously in its
owner's arena; a file is cached once in the whole domain; only the owner allocates or evicts in
its arena. Readers pin an entry (one counter per member slot, so a dead reader's pins are
cleared by recovery) while they copy its bytes out.

A hit: lock bucket → walk chain → pin → unlock → revalidate against the file's stat (size,
mtime, inode, device, ctime) → copy the
data out (into the caller's reused buffer), summing the words written in the same pass → unpin →
compare that sum with the entry's checksum → send the copy. The walk and the checked copy are
native (``webcache/_hit.pyx``); locking, pinning and recovery stay here. (Verifying shared memory and then sending from it let one poisoned byte through in a
10-minute chaos soak: the poisoning landed between the check and the send.) Never a stale byte (a changed file is
unlinked and re-read), never a corrupt one (a checksum mismatch is unlinked, counted, served from
disk). Misses for one path on several nodes at once are coalesced with a lease in the bucket, so
one node reads the disk and a dead filler blocks nobody (its lease expires or its slot leaves
the view).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from enum import Enum
from hashlib import blake2b
from typing import Any, Callable

from mcs import faults, layout as mcs_layout
from mcs import GlobalEvent, GlobalMutex, copy_checksum
from mcs.component import McsComponent
from mcs.errors import ClosedError, CorruptObjectError, McsError, NotRecoverableError, Recovering
from mcs.section import Section

from webcache import _hit, board, layout as L
from webcache.arena import Allocator
from webcache.paths import ResolvedFile

__all__ = ["McsWebCache", "CacheStats", "Hit", "Lease", "UNAVAILABLE"]

log = logging.getLogger("mcs.webcache")

LEASE_NS = 2_000_000_000  # a filler that has not finished in 2 s loses its lease
# A waiter gives up on someone else's fill (and reads the disk itself) this long after the
# lease would have expired: one more second covers a lease taken just before we started.
WAIT_BEYOND_LEASE_S = 1.0
# How often a waiting miss looks at the bucket again: 2 ms is well under a disk read of a
# cached-size file, and a few hundred wake-ups a second per waiter at most.
COALESCE_POLL = 0.002
SETTLE_NS = 20_000_000  # a file changed more recently than this is served, not cached (fill)
MIN_ARENA_DATA = 4096  # an arena smaller than its header, one entry header and a page is useless
DEFAULT_CACHE_SIZE = 64 << 20  # bytes of arena per node
DEFAULT_MAX_ENTRY = 1 << 20  # larger files are streamed from disk, never cached
# Memoized (encoded path, hash) pairs; cleared when full. 16384 paths are a few MiB at most and
# cover the hot set of any site a node of this size caches.
KEYS_MAX = 16384

# What a cache operation can meet while a recovery rebuilds the shared state (or the cache is
# closing, or a mutex was left unrecoverable): the request is then served from disk and the
# operation is dropped, never retried against a table being rebuilt.
UNAVAILABLE: tuple[type[McsError], ...] = (Recovering, ClosedError, CorruptObjectError,
                                           NotRecoverableError)


class Lease(Enum):
    """What a miss does about the fill lease of its path (:meth:`McsWebCache._take_lease`)."""

    MINE = "mine"  # we hold the lease: this node reads the file and caches it
    WAIT = "wait"  # another live member is reading it: poll until it is cached
    CACHED = "cached"  # someone cached it meanwhile: read it once more (the next request hits)
    DISK = "disk"  # no lease possible (recovery): read from disk, cache nothing


def path_hash(path: str) -> int:
    """A stable 64-bit hash of a path (the same in every process)."""
    return int.from_bytes(blake2b(os.fsencode(path), digest_size=8).digest(), "little")


@dataclass
class CacheStats:
    """Counters of this node (see /_mcs/status and /metrics)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    coalesced: int = 0
    checksum_failures: int = 0
    stale: int = 0
    disk_reads: int = 0
    served_during_recovery: int = 0


@dataclass
class _Local:
    """The owner's private record of one of its entries (enough to rebuild the chain link)."""

    offset: int
    alloc: int
    path_hash: int
    path: str


class Hit:
    """A verified cache hit: ``data`` holds the file's bytes, copied out of shared memory and
    checked against the entry's checksum as summed from the copy itself (so a memory failure
    during the send cannot reach a client). ``release()`` gives back the view into a caller's buffer."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data

    def release(self) -> None:
        """Release ``data`` when it is a view into the caller's buffer. Idempotent."""
        if isinstance(self.data, memoryview):
            self.data.release()




class McsWebCache(McsComponent):
    """The cooperative cache component. ``cache_size`` bytes of arena per node; files larger
    than ``max_entry`` are never cached."""

    name = "webcache"
    # The table, then the board of every member's counters (webcache/board.py). Version 2: the
    # board was added (a master of version 1 left an area without it; it is rebuilt).
    master_area_size = L.MASTER_AREA_SIZE
    master_area_version = 2
    # No transactions: the table is reset by every master phase (on_master), so no undo logs
    # (a log region would cost every recovery a look at 64 x lanes logs for nothing).
    transaction_lanes = 0

    def __init__(self, domain: str, *, cache_size: int = DEFAULT_CACHE_SIZE,
                 max_entry: int = DEFAULT_MAX_ENTRY, node: str | None = None,
                 **options: Any) -> None:
        smallest = L.ARENA_HEADER + L.ENTRY_HEADER + MIN_ARENA_DATA
        if cache_size < smallest:
            raise ValueError(f"cache_size {cache_size} is too small (at least {smallest} bytes)")
        if not 0 <= max_entry <= cache_size - L.ARENA_HEADER - L.ENTRY_HEADER - L.PATH_MAX:
            raise ValueError(f"max_entry {max_entry} must fit in the arena ({cache_size} bytes)")
        self.contribution_size = cache_size
        self.max_entry = max_entry
        super().__init__(domain, node=node, **options)

    # -- hooks ----------------------------------------------------------------------------

    def init_local(self) -> None:
        self.cache_stats = CacheStats()
        self._entries: dict[int, _Local] = {}  # offset -> entry
        self._keys: dict[str, tuple[bytes, int]] = {}  # path -> (encoded, hash)
        self._alloc = Allocator(L.ARENA_HEADER, self.contribution_size)
        self._mutexes: list[GlobalMutex] = []
        self._filling: set[int] = set()  # path hashes this node is reading for the cache
        self._mutex_area: Section | None = None

    def on_new_contribution(self, section: Section) -> None:
        # a new arena (first start, or the old one was poisoned): everything cached is gone
        self._entries.clear()
        self._alloc = Allocator(L.ARENA_HEADER, self.contribution_size)
        section.store64(L.A_MAGIC, L.ARENA_MAGIC)

    def on_master(self, view: Any) -> None:
        area = self.master_area
        area.view(0, L.TABLE_HEADER)[:] = bytes(L.TABLE_HEADER)
        for b in range(L.BUCKETS):
            off = L.bucket_offset(b)
            area.view(off, L.BUCKET_SIZE)[:] = bytes(L.BUCKET_SIZE)
            GlobalMutex.create(area, off + L.B_MUTEX)
        GlobalEvent.create(area, L.T_FILL_EVENT)
        area.store64(L.T_BUCKETS, L.BUCKETS)
        area.store64(L.T_MAGIC, L.TABLE_MAGIC)
        # The board survives a change of master (the counters of the whole domain's life);
        # only a fresh master area gets a new one.
        if self.master_area_fresh or not board.board_ok(area):
            board.init_board(area)

    def build_shared_state(self, view: Any) -> None:
        area = self.master_area
        if area.load64(L.T_MAGIC) != L.TABLE_MAGIC or area.load64(L.T_BUCKETS) != L.BUCKETS:
            raise McsError("master table not initialised")
        self._bind()
        arena = self.contribution
        live_slots = {m.slot for m in view.members}
        me = self.member.slot
        for off, ent in list(self._entries.items()):
            ok = (arena.load64(off + L.E_MAGIC) == L.ENTRY_MAGIC
                  and arena.load64(off + L.E_HASH) == ent.path_hash
                  and arena.load64(off + L.E_STATE) == L.STATE_LINKED)
            for s in range(mcs_layout.MAX_MEMBERS):  # pins of departed members are void
                if s not in live_slots:
                    arena.store64(off + L.E_PINS + 8 * s, 0)
            if not ok:
                if not self._pinned(off):
                    self._free_entry(off)
                continue
            bucket = ent.path_hash % L.BUCKETS
            with self.recovery_lock(self._mutexes[bucket]):
                boff = L.bucket_offset(bucket)
                arena.store64(off + L.E_NEXT, area.load64(boff + L.B_HEAD))
                area.store64(boff + L.B_HEAD, L.make_ref(me, off))
        arena.store64(L.A_ENTRIES, len(self._entries))
        arena.store64(L.A_BYTES, self._alloc.used)

    # -- helpers ----------------------------------------------------------------------------

    def _bind(self) -> None:
        if self._mutex_area is not self.master_area:
            tag = self.member.incarnation
            area = self.master_area
            self._mutexes = [GlobalMutex.open(area, L.bucket_offset(b) + L.B_MUTEX, tag=tag)
                             for b in range(L.BUCKETS)]
            self._fill_event = GlobalEvent.open(area, L.T_FILL_EVENT)
            self._mutex_area = area

    def _pinned(self, off: int) -> bool:
        arena = self.contribution
        return any(arena.load64(off + L.E_PINS + 8 * s) for s in range(mcs_layout.MAX_MEMBERS))

    def _free_entry(self, off: int) -> None:
        ent = self._entries.pop(off)
        self.contribution.store64(off + L.E_MAGIC, 0)
        self.contribution.store64(off + L.E_STATE, L.STATE_FREE)
        self._alloc.free(off, ent.alloc)

    def _section_of(self, slot: int) -> Section:
        return self.contribution_of(slot)

    def _walk(self, bucket: int, h: int, path: bytes) -> tuple[int, int, int, Section] | None:
        """Under the bucket lock: (ref, predecessor ref or 0, slot, its section) of the entry
        for ``path`` (the walk itself is native: ``webcache._hit.walk``)."""
        found = _hit.walk(self.master_area, self._section_of, L.bucket_offset(bucket) + L.B_HEAD,
                          h, path, mcs_layout.MAX_MEMBERS, L.MAX_CHAIN)
        if found.__class__ is str:
            return self._corrupt(f"bucket {bucket}: {found}")
        return found

    def _corrupt(self, why: str) -> None:
        self.request_recovery(f"corrupt master table: {why}")
        raise Recovering(why)

    def _unlink(self, bucket: int, ref: int, pred: int) -> None:
        """Under the bucket lock: take ``ref`` out of its chain with one store."""
        slot, off = L.split_ref(ref)
        sec = self._section_of(slot)
        nxt = sec.load64(off + L.E_NEXT)
        if pred:
            pslot, poff = L.split_ref(pred)
            self._section_of(pslot).store64(poff + L.E_NEXT, nxt)
        else:
            self.master_area.store64(L.bucket_offset(bucket) + L.B_HEAD, nxt)
        sec.store64(off + L.E_STATE, L.STATE_UNLINKED)

    # -- the hit path ---------------------------------------------------------------------

    @property
    def recovering(self) -> bool:
        """True while a recovery runs: requests are then served from disk."""
        return self._gate_closed

    def _key(self, path: str) -> tuple[bytes, int]:
        """(encoded path, path hash), memoized: both are per-request costs on the hit path."""
        key = self._keys.get(path)
        if key is None:
            if len(self._keys) >= KEYS_MAX:
                self._keys.clear()
            key = self._keys[path] = (os.fsencode(path), path_hash(path))
        return key

    def lookup(self, f: ResolvedFile, into: bytearray | None = None) -> Hit | None:
        """A revalidated, checksum-verified copy of the entry for ``f``, or None (a miss).

        The entry is pinned only while its bytes are copied out (into ``into``, a buffer the
        caller reuses, when it is large enough; else a new ``bytes``) and summed from the copy,
        the bytes that will be sent. Verifying shared memory and then sending from it would
        leave a window in which a poisoned arena reaches a client."""
        stats = self.cache_stats
        if self._gate_closed:
            stats.served_during_recovery += 1
            return None
        path, h = self._key(f.path)
        bucket = h % L.BUCKETS
        try:
            with self.consistent():
                with self.lock(self._mutexes[bucket]):
                    found = self._walk(bucket, h, path)
                    if found is None:
                        return None
                    ref, _, _, sec = found
                    off = ref & L.OFFSET_MASK
                    pin = off + L.E_PINS + 8 * self.member.slot
                    sec.add64(pin, 1)
                    faults.point("webcache.hit.pinned")
                try:
                    # Pinned: the entry's fields cannot change under us (the owner frees only
                    # unpinned entries). Copied and summed in one pass, from the words written
                    # to the copy: what is verified is what will be sent.
                    got = _hit.copy_out(sec, off, len(path), f.size, f.mtime_ns, f.inode, f.dev,
                                        f.ctime_ns, into)
                finally:
                    sec.add64(pin, -1)
                if got is True:
                    data: bytes | memoryview = memoryview(into)[:f.size]  # type: ignore[arg-type]
                elif got.__class__ is bytes:
                    data = got
                else:
                    if got is _hit.CopyOutcome.CORRUPT:
                        stats.checksum_failures += 1  # corrupt: unlinked below, served from disk
                    elif got is _hit.CopyOutcome.STALE:
                        stats.stale += 1
                    self._drop(bucket, ref, h, path)
                    return None
        except UNAVAILABLE:
            stats.served_during_recovery += 1
            return None
        faults.point("webcache.hit.verified")  # verified, not yet sent: tests poison here
        stats.hits += 1
        return Hit(data)

    def _drop(self, bucket: int, ref: int, h: int, path: bytes) -> None:
        """Unlink a stale or corrupt entry (any member may; the owner reclaims the space)."""
        with self.lock(self._mutexes[bucket]):
            found = self._walk(bucket, h, path)
            if found is not None and found[0] == ref:
                self._unlink(bucket, ref, found[1])

    # -- the miss path ----------------------------------------------------------------------

    async def fill(self, f: ResolvedFile, read: Callable[[], bytes]) -> bytes:
        """Bytes of ``f`` for a miss: read from disk once in the domain (coalesced), cached in
        this node's arena if it fits and has settled. ``read()`` reads the file (called at
        most once, in the loop's default executor: a disk read never blocks the event loop);
        what it raises propagates.

        A file whose status changed less than :data:`SETTLE_NS` before the read ended is
        served but not cached: timestamps come from a clock that ticks every few milliseconds,
        so a second change within the same tick would leave size, mtime and ctime as they
        were, and revalidation could not see it."""
        self.cache_stats.misses += 1
        loop = asyncio.get_running_loop()
        if f.size > self.max_entry or self._gate_closed:
            self.cache_stats.disk_reads += 1
            return await loop.run_in_executor(None, read)
        path, h = self._key(f.path)
        bucket = h % L.BUCKETS
        waited = False
        deadline = time.monotonic() + LEASE_NS / 1e9 + WAIT_BEYOND_LEASE_S
        while True:
            if h in self._filling:
                decision = Lease.WAIT  # this node reads it already (the lease is ours)
            else:
                try:
                    decision = self._take_lease(bucket, h, path)
                except UNAVAILABLE:
                    decision = Lease.DISK
            if decision is Lease.MINE:
                break
            if decision is not Lease.WAIT or time.monotonic() > deadline:
                if decision is Lease.CACHED and waited:
                    self.cache_stats.coalesced += 1
                self.cache_stats.disk_reads += 1
                # a cached copy exists now: the caller's next request hits it
                return await loop.run_in_executor(None, read)
            waited = True
            await asyncio.sleep(COALESCE_POLL)
        self._filling.add(h)
        try:
            self.cache_stats.disk_reads += 1
            data = await loop.run_in_executor(None, read)
            if len(data) == f.size and time.time_ns() - f.ctime_ns >= SETTLE_NS:
                self._store(f, h, path, bucket, data)
            return data
        finally:
            self._filling.discard(h)
            self._clear_lease(bucket, h)

    def _take_lease(self, bucket: int, h: int, path: bytes) -> Lease:
        """Take the fill lease of ``path`` in its bucket, unless it is cached already or a
        live member other than us holds an unexpired lease on it (see :class:`Lease`)."""
        if self._gate_closed:
            return Lease.DISK
        area = self.master_area
        boff = L.bucket_offset(bucket)
        with self.consistent() as view:
            with self.lock(self._mutexes[bucket]):
                if self._walk(bucket, h, path) is not None:
                    return Lease.CACHED
                now = time.monotonic_ns()
                owner = area.load64(boff + L.B_LEASE_OWNER)
                if (area.load64(boff + L.B_LEASE_HASH) == h and owner
                        and area.load64(boff + L.B_LEASE_EXPIRY) > now
                        and view.member(owner - 1) is not None and owner - 1 != self.member.slot):
                    return Lease.WAIT
                area.store64(boff + L.B_LEASE_HASH, h)
                area.store64(boff + L.B_LEASE_OWNER, self.member.slot + 1)
                area.store64(boff + L.B_LEASE_EXPIRY, now + LEASE_NS)
                return Lease.MINE

    def _clear_lease(self, bucket: int, h: int) -> None:
        try:
            with self.consistent():
                area = self.master_area
                boff = L.bucket_offset(bucket)
                with self.lock(self._mutexes[bucket]):
                    if (area.load64(boff + L.B_LEASE_HASH) == h
                            and area.load64(boff + L.B_LEASE_OWNER) == self.member.slot + 1):
                        area.store64(boff + L.B_LEASE_OWNER, 0)
                        area.store64(boff + L.B_LEASE_HASH, 0)
        except UNAVAILABLE:
            pass  # the table is being rebuilt: leases go with it

    def _store(self, f: ResolvedFile, h: int, path: bytes, bucket: int, data: bytes) -> None:
        try:
            with self.consistent():
                size = L.entry_size(len(path), len(data))
                off = self._allocate(size)
                if off is None:
                    return
                arena = self.contribution
                arena.view(off, L.ENTRY_HEADER)[:] = bytes(L.ENTRY_HEADER)
                for field_, value in ((L.E_HASH, h), (L.E_SIZE, f.size), (L.E_MTIME, f.mtime_ns),
                                      (L.E_INODE, f.inode), (L.E_DEV, f.dev),
                                      (L.E_CTIME, f.ctime_ns), (L.E_ACCESS, time.monotonic_ns()),
                                      (L.E_PATH_LEN, len(path)), (L.E_ALLOC, size)):
                    arena.store64(off + field_, value)
                arena.view(off + L.ENTRY_HEADER, len(path))[:] = path
                doff = L.data_offset(off, len(path))
                arena.store64(off + L.E_SUM, copy_checksum(arena.view(doff, len(data)), data))
                arena.store64(off + L.E_MAGIC, L.ENTRY_MAGIC)
                self._entries[off] = _Local(off, size, h, f.path)
                area = self.master_area
                boff = L.bucket_offset(bucket)
                with self.lock(self._mutexes[bucket]):
                    if self._walk(bucket, h, path) is not None:  # someone else was faster
                        self._free_entry(off)
                        return
                    arena.store64(off + L.E_NEXT, area.load64(boff + L.B_HEAD))
                    arena.store64(off + L.E_STATE, L.STATE_LINKED)
                    faults.point("webcache.store.link")
                    area.store64(boff + L.B_HEAD, L.make_ref(self.member.slot, off))  # publish
                arena.store64(L.A_ENTRIES, len(self._entries))
                arena.store64(L.A_BYTES, self._alloc.used)
            self._fill_event.set()
        except UNAVAILABLE:
            pass  # recovery rebuilds from self._entries; an unlinked entry is reclaimed later

    def _allocate(self, size: int) -> int | None:
        """Space in our arena, evicting our least recently used unpinned entries if needed."""
        off = self._alloc.alloc(size)
        if off is not None:
            return off
        arena = self.contribution
        # reclaim entries others unlinked (stale/corrupt), then LRU by last access
        candidates = sorted(self._entries.values(),
                            key=lambda e: (arena.load64(e.offset + L.E_STATE) == L.STATE_LINKED,
                                           arena.load64(e.offset + L.E_ACCESS)))
        for ent in candidates:
            if self._evict(ent):
                off = self._alloc.alloc(size)
                if off is not None:
                    return off
        return None

    def _evict(self, ent: _Local) -> bool:
        arena = self.contribution
        if arena.load64(ent.offset + L.E_STATE) == L.STATE_LINKED:
            bucket = ent.path_hash % L.BUCKETS
            with self.lock(self._mutexes[bucket]):
                if self._pinned(ent.offset):
                    return False
                found = self._walk(bucket, ent.path_hash, os.fsencode(ent.path))
                if found is not None and found[0] == L.make_ref(self.member.slot, ent.offset):
                    self._unlink(bucket, found[0], found[1])
        elif self._pinned(ent.offset):
            return False
        self._free_entry(ent.offset)
        self.cache_stats.evictions += 1
        return True

    # -- reporting --------------------------------------------------------------------------

    def domain_usage(self) -> tuple[int, int]:
        """(entries, bytes) cached in the whole domain, from every arena's header."""
        entries = used = 0
        view = self.view
        if view is None:
            return 0, 0
        for m in view.members:
            try:
                sec = self.contribution_of(m.slot)
            except UNAVAILABLE:  # its arena is gone (a recovery runs): not counted
                continue
            entries += sec.load64(L.A_ENTRIES)
            used += sec.load64(L.A_BYTES)
        return entries, used
