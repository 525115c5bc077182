"""Byte layout of a domain's bootstrap section (the root), shared by every module that reads it.

Offsets are relative to the user area of the root section. Everything is fixed-size so that a
reader never follows a length it read from shared memory without bounding it first.
"""

from __future__ import annotations

from mcs._gsm import EVENT_SIZE, MUTEX_SIZE

ROOT_MAGIC = int.from_bytes(b"MCSROOT1", "little")
ROOT_VERSION = 1
ROOT_SIZE = 64 * 1024  # user area of the bootstrap section

# header ``state`` word of the root
STATE_LIVE = 0
STATE_REMOVED = 1

# domain-wide words
ROOT_MUTEX = 0
VIEW_EVENT = 128  # set on every membership change
GENERATION = 192  # agreed membership generation
MASTER_SLOT = 200  # slot of the master (+1; 0: none)
MEMORY_FAILURES = 208  # domain-wide memory-failure counter
NEXT_INCARNATION = 216  # incarnation numbers are handed out from here
MEMBER_MASK = 224  # bit i set: slot i is in the agreed view
VIEW_CHANGED_NS = 232  # monotonic time of the last view change
PENDING_EVENT = 256  # set when a member asks for a new view (death seen, join, leave)

# member table
MEMBER_TABLE = 1024
MAX_MEMBERS = 64
MEMBER_SLOT_SIZE = 256

# fields of a member slot (relative to the slot)
M_LIFE_MUTEX = 0  # held by the member for its whole life
M_STATE = 64
M_PID = 72
M_INCARNATION = 80
M_HEARTBEAT_NS = 88
M_HEARTBEAT_COUNT = 96
M_JOINED_NS = 104
M_FENCED = 112  # incarnation that was fenced in this slot (0: none)
M_PROGRESS = 120  # bumped by the member's Python side (liveness of the interpreter)
M_NODE = 128  # node name, NUL-padded
NODE_NAME_MAX = 64

assert MUTEX_SIZE <= 64 and EVENT_SIZE <= 64
assert MEMBER_TABLE + MAX_MEMBERS * MEMBER_SLOT_SIZE <= ROOT_SIZE


def member_offset(slot: int, field: int = 0) -> int:
    """Offset of ``field`` of member ``slot`` in the root."""
    if not 0 <= slot < MAX_MEMBERS:
        raise IndexError(f"member slot {slot} out of range 0..{MAX_MEMBERS - 1}")
    return MEMBER_TABLE + slot * MEMBER_SLOT_SIZE + field
