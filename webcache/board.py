"""The board: every member's counters in shared memory, so that any node answers ``/metrics``
and ``/_mcs/status`` for the whole domain (the nodes share one port: a scrape reaches whichever
node the kernel picks, and must describe them all).

Where: the web cache's master area, right after the table (``webcache/layout.py``: ``Board``,
``NodeBoard``). The master area is domain-owned: a new master adopts it, so a node's death
(the master's included) leaves every count where it was. Only a fresh master area (the first
master, or one rebuilt because it was poisoned or unreadable) starts a new board; its
``created_ns`` says when, and the domain totals restart there.

Who writes: only the member in a slot writes that slot's :class:`~webcache.layout.NodeBoard`,
without a lock, from its event loop (:class:`BoardWriter`, every :data:`PUBLISH_INTERVAL` and
before it answers a status request). A seqlock (``seq`` odd while the owner writes) lets
readers take a consistent copy; a reader that keeps meeting an odd ``seq`` (the owner died
mid-write) uses what it read and marks the snapshot ``torn``: every counter word only grows,
so even a torn copy never shows a counter below an earlier reading.

Restart semantics: ``counters`` count since the owner's incarnation claimed the slot, and are
reported per member with ``node``, ``slot`` and ``incarnation`` labels: a restarted node is a
new incarnation, a new series starting at 0; the old series ends. When a slot is claimed, what
the previous occupant counted is folded into the slot's ``carried`` words first, so
``carried + counters`` summed over every slot (live or departed) -- the domain totals -- never
goes down while the board lives. A node loses at most the counts of its last
:data:`PUBLISH_INTERVAL` when it is killed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mcs import layout as mcs_layout
from mcs.errors import LayoutMismatchError, McsError

from webcache import layout as L

if TYPE_CHECKING:
    from mcs.section import Section

    from webcache.cache import McsWebCache
    from webcache.fastpath import FastPathStats

__all__ = ["COUNTERS", "GAUGES", "PHASES", "PUBLISH_INTERVAL", "BoardWriter", "NodeSnapshot",
           "RecoveryMark", "init_board", "read_board", "domain_totals", "recent_recoveries",
           "local_values"]

PUBLISH_INTERVAL = 0.25  # seconds between a node's publications (the lag of others' counters)

# The counter words of a NodeBoard, by index (append only: an index never changes meaning).
COUNTERS = (
    "requests", "hits", "misses", "evictions", "coalesced_misses", "checksum_failures",
    "stale_revalidations", "disk_reads", "served_during_recovery", "recoveries",
    "fast_path_served", "fast_path_handed_over", "fast_path_connections",
    "connections_accepted", "connections_refused_at_cap", "connections_accept_errors",
    "connections_shed", "connections_version_refused",
    "connections_timed_out_header", "connections_timed_out_body",
    "connections_timed_out_idle", "connections_timed_out_send",
    "arenas_adopted", "entries_adopted", "entries_dropped", "entries_reread", "chains_cut",
    "native_served", "native_handed_off", "native_sealed_hits",
)
GAUGES = ("entries", "bytes", "arena_bytes", "max_entry", "connections_open", "max_connections",
          "sealed_bytes")
# The phases of a recovery (mcs.component's _recover), in order.
PHASES = ("quiesce", "agree", "barrier", "master", "contribute", "stable")
if len(COUNTERS) > L.BOARD_COUNTERS or len(GAUGES) > L.BOARD_GAUGES or len(PHASES) > L.BOARD_PHASES:
    raise LayoutMismatchError("webcache.board: more names than webcache/layout.py has words")

_W = 8
_NB = L.NodeBoard
_OFF = {f.name: f.offset // _W for f in _NB.fields()}  # word index of each field in a NodeBoard
_MARK_WORDS = L.RecoveryMark.SIZE // _W
SEQ_RETRIES = 100  # a reader's attempts at a consistent copy before it takes a torn one
SEQ_SPIN = 10  # ...of which this many without a pause


def _slot_offset(slot: int) -> int:
    return L.BOARD_OFFSET + L.Board.offset_of("nodes", slot)


def init_board(area: "Section") -> None:
    """Zero and stamp the board of a fresh master area (the master, during its master phase,
    before anyone else can see the area)."""
    area.view(L.BOARD_OFFSET, L.Board.SIZE)[:] = bytes(L.Board.SIZE)
    area.store64(L.BOARD_OFFSET + L.BoardHeader.offset_of("created_ns"), time.time_ns())
    L.BOARD_HEADER.write(area, L.BOARD_OFFSET)


def board_ok(area: "Section | None") -> bool:
    """True if ``area`` holds a board of this layout."""
    if area is None or area.closed or area.size < L.MASTER_AREA_SIZE:
        return False
    try:
        L.BOARD_HEADER.check(area, L.BOARD_OFFSET)
    except LayoutMismatchError:
        return False
    return True


def board_created_ns(area: "Section") -> int:
    return area.load64(L.BOARD_OFFSET + L.BoardHeader.offset_of("created_ns"))


@dataclass(frozen=True)
class RecoveryMark:
    """One recovery as a member saw it finish."""

    epoch: int
    generation: int
    at_ns: int  # wall clock, within PUBLISH_INTERVAL after the member finished it
    duration_ms: float


@dataclass
class NodeSnapshot:
    """A copy of one slot's NodeBoard."""

    slot: int
    incarnation: int
    pid: int
    node: str
    started_ns: int
    published_ns: int
    generation: int
    epoch: int
    recovering: bool
    last_recovery_ms: float
    phases_ms: dict[str, float]
    recent: list[RecoveryMark]
    gauges: dict[str, int]
    counters: dict[str, int]
    carried: dict[str, int]
    torn: bool = False  # no consistent copy: its owner died while writing it
    extra: dict[str, Any] = field(default_factory=dict)

    def total(self, name: str) -> int:
        """What this slot counted of ``name`` over every occupant (domain totals)."""
        return self.carried[name] + self.counters[name]


def _parse(slot: int, raw: bytes, torn: bool) -> NodeSnapshot:
    w = memoryview(raw).cast("Q")
    o = _OFF

    def arr(name: str, names: tuple[str, ...]) -> dict[str, int]:
        base = o[name]
        return {n: w[base + i] for i, n in enumerate(names)}

    count = w[o["recent_count"]]
    recent = []
    for k in range(min(count, L.BOARD_RECENT)):
        i = o["recent"] + ((count - 1 - k) % L.BOARD_RECENT) * _MARK_WORDS
        recent.append(RecoveryMark(w[i], w[i + 1], w[i + 2], w[i + 3] / 1000))
    name_off = _NB.offset_of("node")
    node = raw[name_off:name_off + L.NODE_NAME_MAX].rstrip(b"\0").decode("utf-8", "replace")
    return NodeSnapshot(
        slot=slot, incarnation=w[o["incarnation"]], pid=w[o["pid"]], node=node,
        started_ns=w[o["started_ns"]], published_ns=w[o["published_ns"]],
        generation=w[o["generation"]], epoch=w[o["epoch"]], recovering=bool(w[o["recovering"]]),
        last_recovery_ms=w[o["last_recovery_us"]] / 1000,
        phases_ms={p: v / 1000 for p, v in arr("phases_us", PHASES).items()},
        recent=recent, gauges=arr("gauges", GAUGES), counters=arr("counters", COUNTERS),
        carried=arr("carried", COUNTERS), torn=torn)


def read_slot(area: "Section", slot: int) -> NodeSnapshot | None:
    """A consistent copy of ``slot``'s board (None: never claimed), lock-free (seqlock)."""
    off = _slot_offset(slot)
    seq_at = off + _NB.offset_of("seq")
    if area.load64(off + _NB.offset_of("incarnation")) == 0:
        return None
    raw = b""
    for attempt in range(SEQ_RETRIES):
        s1 = area.load64(seq_at)
        if not s1 & 1:
            raw = bytes(area.view(off, _NB.SIZE))
            if area.load64(seq_at) == s1:
                return _parse(slot, raw, torn=False)
        if attempt >= SEQ_SPIN:
            time.sleep(0.0001)
    return _parse(slot, raw or bytes(area.view(off, _NB.SIZE)), torn=True)


def read_board(area: "Section") -> list[NodeSnapshot]:
    """Every claimed slot of the board (live and departed occupants), by slot."""
    return [s for s in (read_slot(area, slot) for slot in range(mcs_layout.MAX_MEMBERS))
            if s is not None and s.incarnation]


def domain_totals(snapshots: list[NodeSnapshot]) -> dict[str, int]:
    """Every counter summed over every slot and every occupant it had (never goes down)."""
    return {n: sum(s.total(n) for s in snapshots) for n in COUNTERS}


def recent_recoveries(snapshots: list[NodeSnapshot], limit: int = 10) -> list[dict[str, Any]]:
    """The domain's last recoveries, newest first, merged from every member's ring: epoch,
    generation, when (the earliest member's report), the slowest member's duration, and how
    many members reported it."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for s in snapshots:
        for m in s.recent:
            e = by_epoch.setdefault(m.epoch, {"epoch": m.epoch, "generation": m.generation,
                                              "at": m.at_ns / 1e9, "duration_ms": 0.0,
                                              "members": 0})
            e["at"] = min(e["at"], m.at_ns / 1e9)
            e["duration_ms"] = round(max(e["duration_ms"], m.duration_ms), 3)
            e["members"] += 1
    return [by_epoch[k] for k in sorted(by_epoch, reverse=True)[:limit]]


def local_values(cache: "McsWebCache",
                 fast: "FastPathStats | None") -> tuple[dict[str, int], dict[str, int]]:
    """(counters, gauges) of this node, from its private statistics."""
    if fast is not None and fast.sync is not None:
        fast.sync()  # the native hit loop's counts, folded in
    cs, st = cache.cache_stats, cache.stats
    conn = None if fast is None or fast.connection_status is None else fast.connection_status()
    counters = {
        "requests": 0 if fast is None else fast.served + fast.requests,
        "hits": cs.hits, "misses": cs.misses, "evictions": cs.evictions,
        "coalesced_misses": cs.coalesced, "checksum_failures": cs.checksum_failures,
        "stale_revalidations": cs.stale, "disk_reads": cs.disk_reads,
        "served_during_recovery": cs.served_during_recovery, "recoveries": st.recoveries,
        "arenas_adopted": cs.arenas_adopted, "entries_adopted": cs.entries_adopted,
        "entries_dropped": cs.entries_dropped, "entries_reread": cs.reread,
        "chains_cut": cs.chains_cut,
        "fast_path_served": 0 if fast is None else fast.served,
        "fast_path_handed_over": 0 if fast is None else fast.handed_over,
        "fast_path_connections": 0 if fast is None else fast.connections,
        "native_served": 0 if fast is None else fast.native_served,
        "native_handed_off": 0 if fast is None else fast.native_handed_off,
        "native_sealed_hits": 0 if fast is None else fast.native_sealed_hits,
    }
    gauges = {"entries": len(cache._entries), "bytes": cache._alloc.used,
              "arena_bytes": cache.contribution_size, "max_entry": cache.max_entry,
              "connections_open": 0, "max_connections": 0,
              "sealed_bytes": 0 if fast is None else fast.sealed_bytes}
    if conn is not None:
        for key in ("accepted", "refused_at_cap", "accept_errors", "shed", "version_refused"):
            counters[f"connections_{key}"] = conn[key]
        for kind, n in conn["timed_out"].items():
            counters[f"connections_timed_out_{kind}"] = n
        gauges["connections_open"] = conn["open"]
        gauges["max_connections"] = conn["limits"]["max_connections"]
    return counters, gauges


class BoardWriter:
    """The owner's side: claims this member's slot of the board and publishes its counters
    there (from the event loop thread only)."""

    def __init__(self, cache: "McsWebCache") -> None:
        self.cache = cache
        self.fast: "FastPathStats | None" = None  # set by the node when its front is in place
        self._epoch_seen = 0
        self.publications = 0

    def publish(self) -> bool:
        """Write this member's counters to its slot (claiming it first if needed). False when
        there is no board to write to now (a recovery replaces the master area, this member
        was fenced): the next publication catches up, the counters being cumulative."""
        cache = self.cache
        if cache.member.fenced or cache.recovering:
            return False
        area = cache.master_area
        try:
            if not board_ok(area):
                return False
            assert area is not None
            counters, gauges = local_values(cache, self.fast)
            off = _slot_offset(cache.member.slot)
            mine = (area.load64(off + _NB.offset_of("incarnation")) == cache.member.incarnation
                    and area.load64(off + _NB.offset_of("pid")) == os.getpid())
            with _Writing(area, off):
                if not mine:  # first publication, or a rebuilt board: (re)claim the slot
                    self._claim(area, off)
                self._write(area, off, counters, gauges)
        except McsError:  # closed or poisoned under us: a recovery deals with it
            return False
        self.publications += 1
        return True

    def _claim(self, area: "Section", off: int) -> None:
        """Take the slot: what its previous occupant counted goes into ``carried`` (once: the
        occupant's identity is overwritten in the same write), our counters start from what
        this incarnation has counted so far (written by :meth:`_write` before ``seq`` is even
        again, so no reader sees the zeros)."""
        st = area.store64
        if area.load64(off + _NB.offset_of("incarnation")):
            for i in range(len(COUNTERS)):
                c = off + _NB.offset_of("counters", i)
                k = off + _NB.offset_of("carried", i)
                st(k, area.load64(k) + area.load64(c))
                st(c, 0)
        st(off + _NB.offset_of("incarnation"), self.cache.member.incarnation)
        st(off + _NB.offset_of("pid"), os.getpid())
        st(off + _NB.offset_of("started_ns"), time.time_ns())
        st(off + _NB.offset_of("recent_count"), 0)
        st(off + _NB.offset_of("epoch"), 0)
        name = self.cache.member.info.node.encode()[:L.NODE_NAME_MAX]
        area.view(off + _NB.offset_of("node"), L.NODE_NAME_MAX)[:] = name.ljust(
            L.NODE_NAME_MAX, b"\0")
        self._epoch_seen = 0

    def _write(self, area: "Section", off: int, counters: dict[str, int],
               gauges: dict[str, int]) -> None:
        st, cache = area.store64, self.cache
        for i, n in enumerate(COUNTERS):  # one atomic word each, only ever growing
            st(off + _NB.offset_of("counters", i), counters.get(n, 0))
        for i, n in enumerate(GAUGES):
            st(off + _NB.offset_of("gauges", i), gauges[n])
        stats = cache.stats
        view = cache.view
        st(off + _NB.offset_of("generation"), view.generation if view is not None else 0)
        st(off + _NB.offset_of("recovering"), int(cache.recovering))
        if stats.epoch != self._epoch_seen:  # a recovery finished since the last publication
            self._epoch_seen = stats.epoch
            st(off + _NB.offset_of("epoch"), stats.epoch)
            st(off + _NB.offset_of("last_recovery_us"), int(stats.last_duration_ms * 1000))
            for i, p in enumerate(PHASES):
                st(off + _NB.offset_of("phases_us", i),
                   int(stats.last_phases_ms.get(p, 0.0) * 1000))
            n = area.load64(off + _NB.offset_of("recent_count"))
            mark = off + _NB.offset_of("recent", n % L.BOARD_RECENT)
            for field_, value in (("epoch", stats.epoch), ("generation", stats.generation),
                                  ("at_ns", time.time_ns()),
                                  ("duration_us", int(stats.last_duration_ms * 1000))):
                st(mark + L.RecoveryMark.offset_of(field_), value)
            st(off + _NB.offset_of("recent_count"), n + 1)
        st(off + _NB.offset_of("published_ns"), time.time_ns())


class _Writing:
    """The writer's half of the seqlock: ``seq`` odd inside, even (and changed) after."""

    __slots__ = ("area", "at")

    def __init__(self, area: "Section", off: int) -> None:
        self.area, self.at = area, off + _NB.offset_of("seq")

    def __enter__(self) -> None:
        s = self.area.load64(self.at)
        self.area.store64(self.at, s + 1 if not s & 1 else s + 2)  # odd (a dead writer's odd too)

    def __exit__(self, *exc: Any) -> None:
        self.area.store64(self.at, self.area.load64(self.at) + 1)
