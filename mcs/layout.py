"""Byte layout of a domain's bootstrap section (the root), shared by every module that reads it.

Offsets are relative to the user area of the root section. Everything is fixed-size so that a
reader never follows a length it read from shared memory without bounding it first.
"""

from __future__ import annotations

from mcs._gsm import EVENT_SIZE, MUTEX_SIZE
from mcs.errors import LayoutMismatchError

ROOT_MAGIC = int.from_bytes(b"MCSROOT1", "little")
ROOT_VERSION = 1
ROOT_SIZE = 64 * 1024  # user area of the bootstrap section
EVENT_SLOT_MAX = 64  # room the layout gives each mutex or event (the native sizes must fit)

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
# 256..271: reserved (a spare event once; no longer initialised)
HEARTBEAT_NS = 272  # domain timing, set by the first joiner, adopted by the others
SUSPECT_NS = 280
EVICT_NS = 288
HOLD_LIMIT_NS = 296  # a lock held this long while others wait: the holder is hung (0: default)
PROGRESS_NS = 304  # no progress signal for this long: the member is hung (0: default)
EVICTIONS = 312  # domain-wide eviction counters, one word per cause (EVICTION_CAUSES)...
EVICTION_CAUSES = 4  # ...frozen, stopped, hung, stalled (membership.EvictionCause - 1)

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
M_PROGRESS_NS = 120  # monotonic ns of the recovery thread's last progress (0: not watched)
M_NODE = 128  # node name, NUL-padded
NODE_NAME_MAX = 64
M_EXIT_INCARNATION = 192  # the last incarnation that left this slot...
M_EXIT_STATE = 200  # ...and how (SLOT_DEAD / SLOT_FENCED / SLOT_LEFT)
M_APP_PROGRESS_NS = 208  # monotonic ns of the application's last progress() (0: not watched)
M_PAUSED_UNTIL_NS = 216  # monotonic ns a maintenance pause lasts (or ended) until (0: never)
M_HELD = 224  # locks the member's process holds (copied by its heartbeat thread)...
M_HELD_SINCE_NS = 232  # ...and since when (coarse monotonic ns; 0: none held)
M_RESTARTS = 240  # times a supervisor restarted this member's program (MCS_RESTARTS)
M_FENCE_CAUSE = 248  # why the incarnation in M_FENCED was fenced (membership.EvictionCause)


def member_offset(slot: int, field: int = 0) -> int:
    """Offset of ``field`` of member ``slot`` in the root."""
    if not 0 <= slot < MAX_MEMBERS:
        raise IndexError(f"member slot {slot} out of range 0..{MAX_MEMBERS - 1}")
    return MEMBER_TABLE + slot * MEMBER_SLOT_SIZE + field


# The area of the layer above (components): the core only reserves it and initialises one event
# in it when it lays out a root; mcs.component_record lays out the rest.
COMPONENT_AREA = 20480
COMPONENT_EVENT = COMPONENT_AREA + 64


def _check() -> None:
    """The layout fits the root and the native mutex and event sizes: a real check (not an
    ``assert``, which ``python -O`` strips), failing the import with what disagrees."""
    if MUTEX_SIZE > EVENT_SLOT_MAX or EVENT_SIZE > EVENT_SLOT_MAX:
        raise LayoutMismatchError(
            f"mcs.layout: the native core's mutex ({MUTEX_SIZE} B) or event ({EVENT_SIZE} B) "
            f"does not fit the {EVENT_SLOT_MAX} B the layout gives it: rebuild mcs._gsm from "
            "this source tree")
    if (EVICTIONS + 8 * EVICTION_CAUSES > MEMBER_TABLE or M_FENCE_CAUSE + 8 > MEMBER_SLOT_SIZE
            or MEMBER_TABLE + MAX_MEMBERS * MEMBER_SLOT_SIZE > COMPONENT_AREA
            or COMPONENT_AREA >= ROOT_SIZE):
        raise LayoutMismatchError("mcs.layout: the member table runs into the component area")


_check()
