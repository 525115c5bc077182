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
VIEW_SEQ = 240  # seqlock around GENERATION/MEMBER_MASK/MASTER_SLOT: odd while being written
PENDING_EVENT = 256  # spare event (reserved for components)
HEARTBEAT_NS = 272  # domain timing, set by the first joiner, adopted by the others
SUSPECT_NS = 280
EVICT_NS = 288

# member slot states (M_STATE)
SLOT_FREE = 0
SLOT_MEMBER = 1
SLOT_DEAD = 2  # its life mutex was found abandoned
SLOT_FENCED = 3  # evicted (frozen) and killed through its pidfd
SLOT_LEFT = 4  # left cleanly
SLOT_STATE_NAMES = {SLOT_FREE: "free", SLOT_MEMBER: "member", SLOT_DEAD: "dead",
                    SLOT_FENCED: "fenced", SLOT_LEFT: "left"}

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
M_EXIT_INCARNATION = 192  # the last incarnation that left this slot...
M_EXIT_STATE = 200  # ...and how (SLOT_DEAD / SLOT_FENCED / SLOT_LEFT)

assert MUTEX_SIZE <= 64 and EVENT_SIZE <= 64
assert MEMBER_TABLE + MAX_MEMBERS * MEMBER_SLOT_SIZE <= ROOT_SIZE


def member_offset(slot: int, field: int = 0) -> int:
    """Offset of ``field`` of member ``slot`` in the root."""
    if not 0 <= slot < MAX_MEMBERS:
        raise IndexError(f"member slot {slot} out of range 0..{MAX_MEMBERS - 1}")
    return MEMBER_TABLE + slot * MEMBER_SLOT_SIZE + field

# component area (the root of a component's domain, "<domain>.<component>")
COMPONENT_AREA = 20480
C_REQUESTED = COMPONENT_AREA + 0  # newest requested recovery epoch
C_STABLE = COMPONENT_AREA + 8  # newest epoch every member of its view finished
C_AGREED = COMPONENT_AREA + 16  # epoch whose view is recorded below
C_VIEW_GEN = COMPONENT_AREA + 24  # membership generation of that view
C_VIEW_MASK = COMPONENT_AREA + 32
C_MASTER = COMPONENT_AREA + 40  # master slot + 1
C_MASTER_DONE = COMPONENT_AREA + 48  # epoch whose master phase is complete
C_RECOVERY_EVENT = COMPONENT_AREA + 64  # set on every request and phase step
C_MASTER_IDENT = COMPONENT_AREA + 128  # identifier of the master area, NUL-padded
IDENT_MAX = 64
C_QUIESCED = COMPONENT_AREA + 256  # per slot: newest epoch it quiesced for
C_ACKED = C_QUIESCED + 8 * MAX_MEMBERS  # per slot: newest epoch it contributed for
C_CONTRIB_IDENT = C_ACKED + 8 * MAX_MEMBERS  # per slot: identifier of its contribution
C_END = C_CONTRIB_IDENT + IDENT_MAX * MAX_MEMBERS

assert MEMBER_TABLE + MAX_MEMBERS * MEMBER_SLOT_SIZE <= COMPONENT_AREA
assert C_END <= ROOT_SIZE
