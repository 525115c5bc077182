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
import threading
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
# The pin journal mark of the native hit loop (webcache.native), one per member; the Python hit
# path uses the others. The loop pins one entry at a time, so one mark is all it needs.
NATIVE_MARK = L.PIN_JOURNAL - 1
SCAN_BATCH = 64  # buckets a warm takeover's scan walks per consistent block
SCAN_RETRY = 0.01  # seconds the scan waits before it retries a batch a recovery interrupted

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


def _consistent() -> None:
    """The repair of a bucket abandoned by a dead holder: nothing to do. Every update of a
    chain or a lease is one publishing store, so a holder that dies leaves it whole."""


def _entry_in(sec: Section, off: int) -> bool:
    """Whether an entry header at ``off`` fits in ``sec`` (aligned, after the arena header)."""
    return L.ARENA_HEADER <= off <= sec.size - L.ENTRY_HEADER and not off % 8


def _random_id() -> int:
    return int.from_bytes(os.urandom(8), "little") | 1  # never 0 ("none")


def cacheable(f: ResolvedFile) -> bool:
    """Whether ``f`` may be cached at all: its times are stored (and compared by the native hit
    loop) as unsigned 64-bit words, so a file dated before 1970 is served from disk every time,
    by every path."""
    return f.mtime_ns >= 0 and f.ctime_ns >= 0


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
    arenas_adopted: int = 0  # arenas taken over from this slot's previous holder (warm takeover)
    entries_adopted: int = 0  # entries found linked in them and kept
    entries_dropped: int = 0  # entries of adopted arenas refused (torn, overlapping) or unlinked
    reread: int = 0  # entries dropped as corrupt or stale at a hit: their file was read again
    chains_cut: int = 0  # bucket chains found corrupt (garbage refs) and cut at their head


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
    notify_ready = False  # the node says READY=1 once it serves (webcache.node)
    # The table, then the board of every member's counters (webcache/board.py). Version 2: the
    # board was added (a master of version 1 left an area without it; it is rebuilt).
    master_area_size = L.MASTER_AREA_SIZE
    master_area_version = 3  # 3: pin journals, table and arena ids (the table outlives recoveries)
    # No transactions: every update of the table is one publishing store under its bucket
    # mutex, so a dead holder leaves it consistent (LMDB's "recover by design"): no undo logs.
    transaction_lanes = 0
    # A dead node's arena stays attached and its entries keep serving; the slot's next holder
    # takes it over (warm takeover), verifying entries by their checksums as they are served.
    adopt_contributions = True

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
        self._table_id = 0  # the table our entries are linked into (0: none yet)
        self._adopted: Section | None = None  # an adopted arena whose entries are being found
        self._scanner: threading.Thread | None = None
        self._sweeper: threading.Thread | None = None
        self._marks: list[int] = []  # offsets of our free pin journal marks (master area)
        self._native: Any = None  # the native hit loop's gate (attach_native)

    def on_new_contribution(self, section: Section) -> None:
        # a new arena (first start, or the old one was poisoned): everything cached is gone
        self._entries.clear()
        self._alloc = Allocator(L.ARENA_HEADER, self.contribution_size)
        self._adopted = None
        section.store64(L.A_ID, _random_id())
        section.store64(L.A_MAGIC, L.ARENA_MAGIC)

    def adopt_contribution(self, section: Section) -> bool:
        # The arena this slot's previous holder left: its linked entries keep serving (each hit
        # checks the copy against the entry's checksum); which they are, and so the free space,
        # is found in the background (_scan_adopted). Until then this node caches nothing new.
        if section.load64(L.A_MAGIC) != L.ARENA_MAGIC or not section.load64(L.A_ID):
            return False
        self._entries.clear()
        self._alloc = Allocator(L.ARENA_HEADER, L.ARENA_HEADER)  # no space until the scan ends
        self._adopted = section
        self.cache_stats.arenas_adopted += 1
        return True

    def on_master(self, view: Any) -> None:
        area = self.master_area
        if (self.master_area_fresh or area.load64(L.T_MAGIC) != L.TABLE_MAGIC
                or area.load64(L.T_BUCKETS) != L.BUCKETS):
            self._init_table(area)
            self._bind()
        else:
            # The table outlives the recovery: release what the departed held (their pins, by
            # their journals) and re-create any bucket mutex left unrecoverable. Leases of
            # departed fillers are ignored by the next miss (webcache: _take_lease).
            self._bind()
            for mutex in self._mutexes:
                if not mutex.recoverable:  # nobody holds or waits on it: all are quiesced
                    GlobalMutex.create(area, mutex.offset)
        self._release_journals(view)  # (a new table: just gives each journal to its member)
        # The board survives a change of master (the counters of the whole domain's life);
        # only a fresh master area gets a new one.
        if self.master_area_fresh or not board.board_ok(area):
            board.init_board(area)

    def _init_table(self, area: Section) -> None:
        """Lay out an empty table (first master, or the published one was unusable): every
        member links its entries again in its contribute phase (``T_TABLE_ID`` changed)."""
        area.view(0, L.TABLE_HEADER)[:] = bytes(L.TABLE_HEADER)
        for b in range(L.BUCKETS):
            off = L.bucket_offset(b)
            area.view(off, L.BUCKET_SIZE)[:] = bytes(L.BUCKET_SIZE)
            GlobalMutex.create(area, off + L.B_MUTEX)
        GlobalEvent.create(area, L.T_FILL_EVENT)
        area.view(L.JOURNALS_OFFSET, L.Journals.SIZE)[:] = bytes(L.Journals.SIZE)
        area.store64(L.T_BUCKETS, L.BUCKETS)
        area.store64(L.T_TABLE_ID, _random_id())
        area.store64(L.T_MAGIC, L.TABLE_MAGIC)

    def _release_journals(self, view: Any) -> None:
        """Master phase: for every slot whose journal belongs to an incarnation that is gone,
        zero the pin counters its marks name (in the arena they name: the arena id must match),
        clear the marks, and give the journal to the slot's current member. 64 x 4 marks: the
        cost does not depend on the cache."""
        area = self.master_area
        for slot in range(mcs_layout.MAX_MEMBERS):
            joff = L.journal_offset(slot)
            member = view.member(slot)
            incarnation = member.incarnation if member is not None else 0
            if member is None and area.load64(joff + L.J_ARENA):
                # A departed slot's arena keeps serving while it is attached somewhere; one that
                # is gone (every process that had it attached went too) must leave the table.
                # A poisoned one is dropped whole, as a live owner drops its own.
                sec = self.contribution_of(slot, missing_ok=True)
                if (sec is None or sec.failed
                        or sec.load64(L.A_ID) != area.load64(joff + L.J_ARENA)):
                    self._purge_slot(slot)
                    area.store64(joff + L.J_ARENA, 0)
            if area.load64(joff + L.J_INCARNATION) == incarnation:
                continue
            for k in range(L.PIN_JOURNAL):
                moff = L.mark_offset(slot, k)
                ref = area.load64(moff + L.M_REF)
                if ref:
                    owner, off = L.split_ref(ref)
                    sec = (self.contribution_of(owner, missing_ok=True)
                           if owner < mcs_layout.MAX_MEMBERS else None)
                    if (sec is not None and sec.load64(L.A_ID) == area.load64(moff + L.M_ARENA)
                            and _entry_in(sec, off)):
                        sec.store64(off + L.E_PINS + 8 * slot, 0)
                    area.store64(moff + L.M_REF, 0)
                    area.store64(moff + L.M_ARENA, 0)
            area.store64(joff + L.J_INCARNATION, incarnation)

    def build_shared_state(self, view: Any) -> None:
        area = self.master_area
        if area.load64(L.T_MAGIC) != L.TABLE_MAGIC or area.load64(L.T_BUCKETS) != L.BUCKETS:
            raise McsError("master table not initialised")
        self._bind()
        arena = self.contribution
        me = self.member.slot
        table_id = area.load64(L.T_TABLE_ID)
        joff = L.journal_offset(me)
        if table_id != self._table_id:
            if self._table_id:
                self._relink(view)  # a new table: link what we hold (only then: O(our entries))
            self._table_id = table_id
        mine = arena.load64(L.A_ID)
        if area.load64(joff + L.J_ARENA) not in (0, mine):
            # The table links entries of another arena under this slot (its previous holder's,
            # which we did not adopt: gone, poisoned or refused). Rare: O(table).
            self._purge_slot(me)
        area.store64(joff + L.J_ARENA, mine)
        self._marks = [m for m in (L.mark_offset(me, k) for k in range(NATIVE_MARK))
                       if not area.load64(m + L.M_REF)]
        if self._adopted is not None:
            if self._scanner is None or not self._scanner.is_alive():
                self._scanner = threading.Thread(target=self._scan_adopted, daemon=True,
                                                 name=f"mcs-webcache-adopt-{me}")
                self._scanner.start()
        else:
            arena.store64(L.A_ENTRIES, len(self._entries))
            arena.store64(L.A_BYTES, self._alloc.used)

    def _scan_adopted(self) -> None:
        """Background, after a warm takeover: find the entries of the adopted arena that the
        table links, then make them ours: the allocator is rebuilt around them. Entries torn by
        the previous holder's death, or no longer linked, are dropped; the checksum of each
        entry is verified at every hit, so a corrupt one is re-read from disk, never served."""
        me = self.member.slot
        arena = self._adopted
        found: dict[int, _Local] = {}
        table_id = self.master_area.load64(L.T_TABLE_ID)

        def current() -> bool:  # not replaced meanwhile (poisoned): still ours to take over
            return arena is not None and self._adopted is arena and arena is self.contribution

        def same_table() -> bool:
            return current() and self.master_area.load64(L.T_TABLE_ID) == table_id

        try:
            if not self._walk_buckets(lambda b: self._collect(b, me, arena, found), same_table):
                if not current():
                    return
                found.clear()  # a new table: none of the old entries is linked any more
            self._retrying(lambda: current() and self._take_over(arena, found))
        except Exception:
            if not self._stopping.is_set():
                log.exception("%s: taking over the adopted arena failed; it caches nothing new "
                              "until the next recovery", self.component_name)

    def _retrying(self, step: Callable[[], bool]) -> bool:
        """``step()`` in a consistent block, run again after a recovery interrupted it; its
        result, or False once the component stops."""
        while not self._stopping.is_set():
            try:
                with self.consistent():
                    return step()
            except UNAVAILABLE:
                time.sleep(SCAN_RETRY)
        return False

    def _walk_buckets(self, visit: Callable[[int], None],
                      keep_going: Callable[[], bool] = lambda: True) -> bool:
        """``visit(bucket)`` under each bucket's lock in turn, SCAN_BATCH buckets per consistent
        block, so recoveries go on (a batch they interrupt is visited again: ``visit`` must be
        idempotent); ``keep_going()`` is asked before each batch. True once all were visited."""
        def batch(start: int) -> bool:
            if not keep_going():
                return False
            for b in range(start, min(start + SCAN_BATCH, L.BUCKETS)):
                with self.lock(self._mutexes[b], repair=_consistent):
                    visit(b)
            return True

        return all(self._retrying(lambda start=start: batch(start))
                   for start in range(0, L.BUCKETS, SCAN_BATCH))

    def _collect(self, bucket: int, me: int, arena: Section, found: dict[int, _Local]) -> None:
        """Under the bucket lock: the entries of ``arena`` (slot ``me``) the chain links."""
        ref = self.master_area.load64(L.bucket_offset(bucket) + L.B_HEAD)
        for _ in range(L.MAX_CHAIN):
            if not ref:
                return
            owner, off = L.split_ref(ref)
            if owner >= mcs_layout.MAX_MEMBERS:
                self._cut_chain(bucket, f"ref slot {owner} out of range")
                return
            sec = arena if owner == me else self._section_of(owner)
            if not _entry_in(sec, off):
                self._cut_chain(bucket, f"ref slot {owner} offset {off} out of range")
                return
            if owner == me:
                plen = arena.load64(off + L.E_PATH_LEN)
                if (arena.load64(off + L.E_MAGIC) == L.ENTRY_MAGIC and plen <= L.PATH_MAX
                        and arena.load64(off + L.E_STATE) == L.STATE_LINKED):
                    path = os.fsdecode(bytes(arena.view(off + L.ENTRY_HEADER, plen)))
                    found[off] = _Local(off, arena.load64(off + L.E_ALLOC),
                                        arena.load64(off + L.E_HASH), path)
            ref = sec.load64(off + L.E_NEXT)
        raise McsError(f"bucket {bucket}: chain longer than {L.MAX_CHAIN}")

    def _take_over(self, arena: Section, found: dict[int, _Local]) -> bool:
        """Inside a block: the adopted arena's entries become ours (allocator, LRU, stats)."""
        alloc, refused = Allocator.around(L.ARENA_HEADER, self.contribution_size,
                                          [(e.offset, e.alloc) for e in found.values()])
        for off, _ in refused:  # torn or overlapping: out of the table, never served
            ent = found.pop(off)
            bucket = ent.path_hash % L.BUCKETS
            with self.lock(self._mutexes[bucket], repair=_consistent):
                hit = self._walk(bucket, ent.path_hash, os.fsencode(ent.path))
                if hit is not None and hit[0] == L.make_ref(self.member.slot, off):
                    self._unlink(bucket, hit[0], hit[1])
        self._entries = found
        self._alloc = alloc
        self._adopted = None
        stats = self.cache_stats
        stats.entries_adopted += len(found)
        stats.entries_dropped += len(refused)
        arena.store64(L.A_ENTRIES, len(found))
        arena.store64(L.A_BYTES, alloc.used)
        log.info("%s: took over %d entries (%d bytes) of slot %d's previous arena, dropped %d",
                 self.component_name, len(found), alloc.used, self.member.slot, len(refused))
        return True

    def _relink(self, view: Any) -> None:
        """Link every entry we hold into a table that was just (re)initialised."""
        area = self.master_area
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
            with self.recovery_lock(self._mutexes[bucket], repair=_consistent):
                boff = L.bucket_offset(bucket)
                arena.store64(off + L.E_NEXT, area.load64(boff + L.B_HEAD))
                area.store64(boff + L.B_HEAD, L.make_ref(me, off))

    def _purge_slot(self, slot: int) -> int:
        """Recovery: unlink every entry of the table that names ``slot``; returns how many."""
        area = self.master_area
        purged = 0
        for bucket in range(L.BUCKETS):
            head = L.bucket_offset(bucket) + L.B_HEAD
            if not area.load64(head):
                continue
            with self.recovery_lock(self._mutexes[bucket], repair=_consistent):
                pred_sec, pred_at = area, head  # where the ref being looked at is stored
                ref = area.load64(head)
                for _ in range(L.MAX_CHAIN):
                    if not ref:
                        break
                    owner, off = L.split_ref(ref)
                    sec = (None if owner == slot or owner >= mcs_layout.MAX_MEMBERS
                           else self.contribution_of(owner, missing_ok=True))
                    if sec is not None and not _entry_in(sec, off):
                        sec = None
                    if sec is None:  # its next is in an arena we cannot read: cut the chain
                        pred_sec.store64(pred_at, 0)
                        purged += 1
                        break
                    pred_sec, pred_at = sec, off + L.E_NEXT
                    ref = sec.load64(pred_at)
                else:
                    raise McsError(f"bucket {bucket}: chain longer than {L.MAX_CHAIN}")
        if purged:
            log.info("%s: unlinked %d chain(s) through slot %d's previous arena",
                     self.component_name, purged, slot)
        return purged

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
            self._cut_chain(bucket, found)
            return None
        return found

    def _cut_chain(self, bucket: int, why: str) -> None:
        """Under the bucket lock: a chain that is not one (a ref out of range, a cycle, an
        entry without its magic: garbage in shared memory that no failure reported) is cut at
        its head. Its entries are then unreachable: never served, and freed by their owners
        when they evict; the files are read again at the next miss. One store, no recovery:
        the rest of the table is not touched."""
        self.master_area.store64(L.bucket_offset(bucket) + L.B_HEAD, 0)
        self.cache_stats.chains_cut += 1
        log.warning("%s: bucket %d: %s; chain cut", self.component_name, bucket, why)
        if self._sweeper is None or not self._sweeper.is_alive():
            # Garbage in one chain: look at every chain (in the background), since buckets
            # that no request visits would keep theirs.
            self._sweeper = threading.Thread(target=self._sweep, daemon=True,
                                             name=f"mcs-webcache-sweep-{self.member.slot}")
            self._sweeper.start()

    def _sweep(self) -> None:
        """Walk every chain once, cutting corrupt ones (:meth:`_cut_chain`, through
        :meth:`_walk` with a path no entry has)."""
        try:
            self._walk_buckets(lambda b: self._walk(b, 0, b""))
        except Exception:
            if not self._stopping.is_set():
                log.exception("%s: table sweep failed", self.component_name)

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

    # -- the native hit loop's gate ---------------------------------------------------------

    def attach_native(self, worker: Any) -> None:
        """Let a native hit loop (webcache.native.NativeHits) read the cache: it gets the
        shared memory of every stable state and its gate follows this component's
        (``worker.open_gate(memory)``, ``worker.close_gate()``, ``worker.wait_quiet(timeout)``).
        Its worker holds no Python thread's block: the recovery waits for it through
        :meth:`workers_quiet`."""
        with self._gate:
            self._native = worker
            if not self._gate_closed:
                self.on_gate(False)

    def detach_native(self) -> None:
        """The native hit loop reads the cache no more (it is closed, then waited for)."""
        with self._gate:
            worker, self._native = getattr(self, "_native", None), None
        if worker is not None:
            worker.close_gate()
            worker.wait_quiet(1.0)

    def on_gate(self, closed: bool) -> None:
        worker = getattr(self, "_native", None)
        if worker is None:
            return
        if closed:
            worker.close_gate()
            return
        try:
            worker.open_gate(self.native_memory())
        except Exception:  # its gate stays closed: every request goes to the asyncio side
            log.exception("%s: the native hit loop could not be given the shared memory",
                          self.component_name)

    def workers_quiet(self, timeout: float) -> bool:
        worker = getattr(self, "_native", None)
        return worker is None or worker.wait_quiet(timeout)

    def native_memory(self) -> tuple[Section, Section, dict[int, Section], int, int, int, int]:
        """What the native hit loop reads in this stable state: (master area, the domain's
        root (its memory-failure counter), {slot: arena} of every arena attached or still
        published and not poisoned, our slot, our incarnation (the bucket mutexes' tag), the
        loop's pin journal mark, the memory failures seen)."""
        arenas: dict[int, Section] = {}
        for slot in range(mcs_layout.MAX_MEMBERS):
            try:
                sec = self.contribution_of(slot, missing_ok=True)
            except McsError:
                sec = None
            if sec is not None and not sec.closed and not sec.failed:
                arenas[slot] = sec
        me = self.member.slot
        return (self.master_area, self._root, arenas, me, self.member.incarnation,
                L.mark_offset(me, NATIVE_MARK), self._mf_seen)

    def stop(self) -> None:
        self.detach_native()
        super().stop()

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
        if not cacheable(f):
            return None
        path, h = self._key(f.path)
        bucket = h % L.BUCKETS
        try:
            with self.consistent():
                with self.lock(self._mutexes[bucket], repair=_consistent):
                    found = self._walk(bucket, h, path)
                    if found is None:
                        return None
                    ref, _, _, sec = found
                    if not self._marks:  # every journal mark in use (threads): do not pin
                        return None
                    mark = self._marks.pop()
                    area = self.master_area
                    # The journal first, then the pin: a reader that dies between the two
                    # leaves a mark whose counter is 0, which the master zeroes again.
                    area.store64(mark + L.M_ARENA, sec.load64(L.A_ID))
                    area.store64(mark + L.M_REF, ref)
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
                    area.store64(mark + L.M_REF, 0)
                    self._marks.append(mark)
                if got is True:
                    data: bytes | memoryview = memoryview(into)[:f.size]  # type: ignore[arg-type]
                elif got.__class__ is bytes:
                    data = got
                else:
                    if got is _hit.CopyOutcome.CORRUPT:
                        stats.checksum_failures += 1  # corrupt: unlinked below, served from disk
                    elif got is _hit.CopyOutcome.STALE:
                        stats.stale += 1
                    stats.reread += 1
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
        with self.lock(self._mutexes[bucket], repair=_consistent):
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
        if f.size > self.max_entry or self._gate_closed or not cacheable(f):
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
            with self.lock(self._mutexes[bucket], repair=_consistent):
                if self._walk(bucket, h, path) is not None:
                    return Lease.CACHED
                now = time.monotonic_ns()
                # The owner is an incarnation, not a slot: a filler that died is not waited
                # for, even when a new member already holds its slot.
                owner = area.load64(boff + L.B_LEASE_OWNER)
                me = self.member.incarnation
                if (area.load64(boff + L.B_LEASE_HASH) == h and owner and owner != me
                        and area.load64(boff + L.B_LEASE_EXPIRY) > now
                        and any(m.incarnation == owner for m in view.members)):
                    return Lease.WAIT
                area.store64(boff + L.B_LEASE_HASH, h)
                area.store64(boff + L.B_LEASE_OWNER, me)
                area.store64(boff + L.B_LEASE_EXPIRY, now + LEASE_NS)
                return Lease.MINE

    def _clear_lease(self, bucket: int, h: int) -> None:
        try:
            with self.consistent():
                area = self.master_area
                boff = L.bucket_offset(bucket)
                with self.lock(self._mutexes[bucket], repair=_consistent):
                    if (area.load64(boff + L.B_LEASE_HASH) == h
                            and area.load64(boff + L.B_LEASE_OWNER) == self.member.incarnation):
                        area.store64(boff + L.B_LEASE_OWNER, 0)
                        area.store64(boff + L.B_LEASE_HASH, 0)
        except UNAVAILABLE:
            pass  # the table is being rebuilt: leases go with it

    def store(self, f: ResolvedFile, data: bytes) -> bool:
        """Put ``data``, the bytes of ``f``, in this node's arena, as a miss does after its read
        (to warm a cache from a list of files, say). True if it is cached now (by this call, or
        already by someone); False if it was not: larger than ``max_entry``, not the file's size,
        changed too recently (:data:`SETTLE_NS`), no room, or a recovery is running."""
        if (len(data) != f.size or f.size > self.max_entry or not cacheable(f)
                or time.time_ns() - f.ctime_ns < SETTLE_NS or self._gate_closed):
            return False
        path, h = self._key(f.path)
        return self._store(f, h, path, h % L.BUCKETS, data)

    def _store(self, f: ResolvedFile, h: int, path: bytes, bucket: int, data: bytes) -> bool:
        try:
            with self.consistent():
                size = L.entry_size(len(path), len(data))
                off = self._allocate(size)
                if off is None:
                    return False
                self._entries[off] = _Local(off, size, h, f.path)  # freed again if it fails
                try:
                    self._write_entry(off, f, h, path, size, data)
                except BaseException:
                    self._free_entry(off)
                    raise
                arena = self.contribution
                area = self.master_area
                boff = L.bucket_offset(bucket)
                with self.lock(self._mutexes[bucket], repair=_consistent):
                    if self._walk(bucket, h, path) is not None:  # someone else was faster
                        self._free_entry(off)
                        return True
                    arena.store64(off + L.E_NEXT, area.load64(boff + L.B_HEAD))
                    arena.store64(off + L.E_STATE, L.STATE_LINKED)
                    faults.point("webcache.store.link")
                    area.store64(boff + L.B_HEAD, L.make_ref(self.member.slot, off))  # publish
                arena.store64(L.A_ENTRIES, len(self._entries))
                arena.store64(L.A_BYTES, self._alloc.used)
            self._fill_event.set()
            return True
        except UNAVAILABLE:
            return False  # an entry not linked yet is reclaimed later (it is in _entries)

    def _write_entry(self, off: int, f: ResolvedFile, h: int, path: bytes, size: int,
                     data: bytes) -> None:
        """Fill the allocated block at ``off`` with the entry for ``f`` (not linked yet)."""
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
            with self.lock(self._mutexes[bucket], repair=_consistent):
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
