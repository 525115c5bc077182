"""Byte layout of the web cache's shared structures (offsets, never pointers: every process maps
a section at its own address).

Master table (the component's master area)::

    0   magic | 8 bucket count | 64 fill event (GlobalEvent) | 128.. buckets
    bucket (128 B): mutex 64 | head ref 8 | lease hash 8 | lease owner 8 | lease expiry 8

Arena (each node's contribution)::

    0   magic | 8 entries | 16 bytes used | 4096.. entries
    entry: header 640 B | path | data (8-byte aligned)
    header: 0 next ref | 8 state | 16 path hash | 24 size | 32 mtime_ns | 40 inode | 48 dev
            56 checksum of data (mcs.checksum) | 64 last access ns | 72 path length | 80 allocation size
            88 magic (written last) | 96 ctime_ns | 128.. one pin counter per member slot (64 x 8 B)

A *ref* names an entry anywhere in the domain: ``(slot + 1) << 48 | offset``; 0 is null.
"""

from __future__ import annotations

from mcs import layout as mcs_layout
from mcs.errors import LayoutMismatchError
from mcs.layout import EVENT_SIZE, MUTEX_SIZE

TABLE_MAGIC = int.from_bytes(b"MCSWCTB4", "little")
ARENA_MAGIC = int.from_bytes(b"MCSWCAR4", "little")
ENTRY_MAGIC = int.from_bytes(b"MCSWCEN4", "little")

BUCKETS = 4096
BUCKET_SIZE = 128
T_MAGIC, T_BUCKETS, T_FILL_EVENT = 0, 8, 64
TABLE_HEADER = 128
B_MUTEX, B_HEAD, B_LEASE_HASH, B_LEASE_OWNER, B_LEASE_EXPIRY = 0, 64, 72, 80, 88
TABLE_SIZE = TABLE_HEADER + BUCKETS * BUCKET_SIZE

A_MAGIC, A_ENTRIES, A_BYTES = 0, 8, 16
ARENA_HEADER = 4096

E_NEXT, E_STATE, E_HASH, E_SIZE, E_MTIME, E_INODE, E_DEV = 0, 8, 16, 24, 32, 40, 48
E_SUM, E_ACCESS, E_PATH_LEN, E_ALLOC, E_MAGIC, E_CTIME, E_PINS = 56, 64, 72, 80, 88, 96, 128
WORD = 8  # every field is a 64-bit word, every entry 8-byte aligned
ENTRY_HEADER = E_PINS + WORD * mcs_layout.MAX_MEMBERS
PATH_MAX = 4096

STATE_FREE, STATE_LINKED, STATE_UNLINKED = 0, 1, 2

SLOT_SHIFT = 48
OFFSET_MASK = (1 << SLOT_SHIFT) - 1
MAX_CHAIN = 100_000  # a longer walk means a corrupt (cyclic) chain

if MUTEX_SIZE > B_HEAD - B_MUTEX or EVENT_SIZE > TABLE_HEADER - T_FILL_EVENT:
    # A real check (``python -O`` strips asserts): the native sizes must fit their slots.
    raise LayoutMismatchError(
        f"webcache.layout: the native mutex ({MUTEX_SIZE} B) or event ({EVENT_SIZE} B) does not "
        "fit its slot in the master table: rebuild mcs._gsm from this source tree")


def bucket_offset(bucket: int) -> int:
    return TABLE_HEADER + bucket * BUCKET_SIZE


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
