"""Byte layout of the web cache's shared structures (offsets, never pointers: every process maps
a section at its own address), declared as records (:mod:`mcs.records`) that compute the offsets;
the constants below are derived from them, and tests/test_records.py pins their values (the
native hit path, webcache/_layout.pxd, has them too and is checked against them at import).

Master table (the component's master area)::

    0   magic | 8 bucket count | 16 table id | 64 fill event (GlobalEvent) | 128.. buckets
    bucket (128 B): mutex 64 | head ref 8 | lease hash 8 | lease owner 8 | lease expiry 8

Arena (each node's contribution)::

    0   magic | 8 entries | 16 bytes used | 24 arena id | 4096.. entries
    entry: header 640 B | path | data (8-byte aligned)
    header: 0 next ref | 8 state | 16 path hash | 24 size | 32 mtime_ns | 40 inode | 48 dev
            56 checksum of data (mcs.checksum) | 64 last access ns | 72 path length | 80 allocation size
            88 magic (written last) | 96 ctime_ns | 128.. one pin counter per member slot (64 x 8 B)

A *ref* names an entry anywhere in the domain: ``(slot + 1) << 48 | offset``; 0 is null.

Board (the operator's counters; in the master area right after the table, at BOARD_OFFSET, so it
is domain-owned: a new master adopts it with the table, and a node's death leaves its counters)::

    0   magic | 8 fingerprint | 16 created (wall ns) | 64.. one NodeBoard per member slot
    NodeBoard: seq (seqlock: odd while its owner writes) | incarnation | pid | started | ...
               | gauges | recent recoveries | node name | counters[32] | carried[32]

Only the member in a slot writes that slot's NodeBoard (no lock: a seqlock, see
webcache/board.py); everyone reads every slot.

Pin journals (after the board, at JOURNALS_OFFSET): per member slot, its incarnation and the
(ref, arena id) of each entry it has pinned now. A reader marks before it pins and clears after it
unpins, so a dead reader's pins are released from its journal alone: the table and the arenas
outlive recoveries (a recovery does work in proportion to what the dead held, not to the cache).
"""

from __future__ import annotations

from mcs import layout as mcs_layout
from mcs.records import Array, Bytes, Event, LayoutHeader, Mutex, Nested, Pad, Record, UInt64

TABLE_MAGIC = int.from_bytes(b"MCSWCTB5", "little")
ARENA_MAGIC = int.from_bytes(b"MCSWCAR5", "little")
ENTRY_MAGIC = int.from_bytes(b"MCSWCEN4", "little")

BUCKETS = 4096
PATH_MAX = 4096


class Bucket(Record):
    """One hash bucket of the master table: its chain and the lease of a fill in flight."""

    mutex = Mutex()
    head = UInt64()  # ref of the first entry of the chain
    lease_hash = UInt64()
    lease_owner = UInt64()  # the filler's membership incarnation (0: none)
    lease_expiry = UInt64()


class TableHeader(Record):
    magic = UInt64()
    bucket_count = UInt64()
    table_id = UInt64()  # random, new at every (re)initialisation: "the table I linked into"
    fill_event = Event()


class Table(Record):
    """The master table (the component's master area)."""

    header = Nested(TableHeader)
    buckets = Array(Bucket, BUCKETS)


class ArenaHeader(Record, size=4096):
    magic = UInt64()
    entries = UInt64()
    bytes_used = UInt64()
    arena_id = UInt64()  # random, new with every arena: a pin journal names its arena by it


class EntryHeader(Record):
    """The header of an entry in an arena; its path and data follow it."""

    next = UInt64()  # ref of the next entry in the chain
    state = UInt64()
    hash = UInt64()
    size = UInt64()
    mtime_ns = UInt64()
    inode = UInt64()
    dev = UInt64()
    checksum = UInt64()  # of the data (mcs.checksum)
    access_ns = UInt64()
    path_len = UInt64()
    alloc = UInt64()
    magic = UInt64()  # written last
    ctime_ns = UInt64()
    reserved = Pad(24)
    pins = Array(UInt64(), mcs_layout.MAX_MEMBERS)  # one pin counter per member slot


# The names the rest of the web cache (and webcache/_layout.pxd) use, derived from the records.
T_MAGIC, T_BUCKETS, T_TABLE_ID, T_FILL_EVENT = (
    TableHeader.offset_of(f) for f in ("magic", "bucket_count", "table_id", "fill_event"))
TABLE_HEADER = Table.offset_of("buckets")
BUCKET_SIZE = Bucket.SIZE
B_MUTEX, B_HEAD, B_LEASE_HASH, B_LEASE_OWNER, B_LEASE_EXPIRY = (
    Bucket.offset_of(f) for f in ("mutex", "head", "lease_hash", "lease_owner", "lease_expiry"))
TABLE_SIZE = Table.SIZE

A_MAGIC, A_ENTRIES, A_BYTES, A_ID = (ArenaHeader.offset_of(f)
                                    for f in ("magic", "entries", "bytes_used", "arena_id"))
ARENA_HEADER = ArenaHeader.SIZE

(E_NEXT, E_STATE, E_HASH, E_SIZE, E_MTIME, E_INODE, E_DEV, E_SUM, E_ACCESS, E_PATH_LEN, E_ALLOC,
 E_MAGIC, E_CTIME, E_PINS) = (EntryHeader.offset_of(f) for f in (
     "next", "state", "hash", "size", "mtime_ns", "inode", "dev", "checksum", "access_ns",
     "path_len", "alloc", "magic", "ctime_ns", "pins"))
ENTRY_HEADER = EntryHeader.SIZE
WORD = 8  # every field is a 64-bit word, every entry 8-byte aligned

STATE_FREE, STATE_LINKED, STATE_UNLINKED = 0, 1, 2

SLOT_SHIFT = 48
OFFSET_MASK = (1 << SLOT_SHIFT) - 1
MAX_CHAIN = 100_000  # a longer walk means a corrupt (cyclic) chain


_BUCKETS_AT = Table.offset_of("buckets", 0)


def bucket_offset(bucket: int) -> int:
    """Offset of bucket ``bucket`` in the table (on every lookup: plain arithmetic)."""
    return _BUCKETS_AT + bucket * BUCKET_SIZE


def make_ref(slot: int, offset: int) -> int:
    return (slot + 1) << SLOT_SHIFT | offset


def split_ref(ref: int) -> tuple[int, int]:
    return (ref >> SLOT_SHIFT) - 1, ref & OFFSET_MASK


def align8(n: int) -> int:
    return (n + WORD - 1) & ~(WORD - 1)


def entry_size(path_len: int, size: int) -> int:
    return align8(ENTRY_HEADER + path_len) + align8(size)


def data_offset(entry: int, path_len: int) -> int:
    return entry + align8(ENTRY_HEADER + path_len)


# -- the board: every member's counters, for the domain-wide /metrics and /_mcs/status ----------

BOARD_MAGIC = b"MCSWCBD1"
BOARD_COUNTERS = 32  # counter words per member (webcache/board.py names them; the rest is spare)
BOARD_GAUGES = 8
BOARD_PHASES = 8  # phase durations of the member's last recovery (board.PHASES names them)
BOARD_RECENT = 8  # the member's last recoveries, a ring
NODE_NAME_MAX = 64


class RecoveryMark(Record):
    """One recovery a member finished: its epoch, the view's generation, when, how long."""

    epoch = UInt64()
    generation = UInt64()
    at_ns = UInt64()  # wall clock (time.time_ns) when the member saw it finished
    duration_us = UInt64()


class NodeBoard(Record, align=64):
    """One member slot's counters. Written only by the member in the slot (seqlock ``seq``);
    ``counters`` count since its incarnation started, ``carried`` holds what earlier occupants of
    the slot counted (folded in when the slot is claimed), so carried + counters of every slot is
    the domain's total and never goes down."""

    seq = UInt64()  # odd while the owner writes; readers retry on odd or changed
    incarnation = UInt64()  # the owner's membership incarnation (0: never claimed)
    pid = UInt64()
    started_ns = UInt64()  # wall clock when this incarnation claimed the slot
    published_ns = UInt64()  # wall clock of the last publish
    generation = UInt64()  # the view generation the owner works in
    epoch = UInt64()  # the owner's last finished recovery epoch
    recovering = UInt64()  # 1 while the owner's gate is closed
    last_recovery_us = UInt64()
    phases_us = Array(UInt64(), BOARD_PHASES)
    recent_count = UInt64()  # recoveries written to ``recent`` (index = count % BOARD_RECENT)
    recent = Array(RecoveryMark, BOARD_RECENT)
    gauges = Array(UInt64(), BOARD_GAUGES)
    node = Bytes(NODE_NAME_MAX)  # NUL-padded UTF-8
    counters = Array(UInt64(), BOARD_COUNTERS)
    carried = Array(UInt64(), BOARD_COUNTERS)


class BoardHeader(Record, size=64):
    magic = UInt64()
    fingerprint = UInt64()
    created_ns = UInt64()  # wall clock when the board was (re)initialised: totals restart there


class Board(Record, align=64):
    header = Nested(BoardHeader)
    nodes = Array(NodeBoard, mcs_layout.MAX_MEMBERS)


BOARD_HEADER = LayoutHeader(BOARD_MAGIC, Board, header=BoardHeader)
BOARD_OFFSET = (TABLE_SIZE + Board.ALIGN - 1) // Board.ALIGN * Board.ALIGN


# -- pin journals: what each member has pinned, so that a dead reader's pins are released -------

PIN_JOURNAL = 4  # entries one member may have pinned at once (the hit path pins one at a time)


class PinMark(Record):
    """One pin in flight: the entry's ref and the id of the arena it was in (0: free mark)."""

    ref = UInt64()
    arena_id = UInt64()


class SlotJournal(Record, align=64):
    """Member slot's pins in flight (written by that member only, cleared by the master once
    the incarnation is gone)."""

    incarnation = UInt64()  # whose journal this is (set by the master phase)
    arena_id = UInt64()  # the arena whose entries the table links under this slot (0: none)
    marks = Array(PinMark, PIN_JOURNAL)


class Journals(Record, align=64):
    slots = Array(SlotJournal, mcs_layout.MAX_MEMBERS)


JOURNALS_OFFSET = ((BOARD_OFFSET + Board.SIZE + Journals.ALIGN - 1)
                   // Journals.ALIGN * Journals.ALIGN)
J_INCARNATION = SlotJournal.offset_of("incarnation")
J_ARENA = SlotJournal.offset_of("arena_id")
M_REF, M_ARENA = PinMark.offset_of("ref"), PinMark.offset_of("arena_id")


def journal_offset(slot: int) -> int:
    """Offset of member ``slot``'s pin journal in the master area."""
    return JOURNALS_OFFSET + slot * SlotJournal.SIZE


def mark_offset(slot: int, k: int) -> int:
    """Offset of pin mark ``k`` of member ``slot``'s journal in the master area."""
    return journal_offset(slot) + SlotJournal.offset_of("marks", k)


MASTER_AREA_SIZE = JOURNALS_OFFSET + Journals.SIZE  # the table, the board, the pin journals
