"""A domain-wide registry (key -> value), written as a recoverable McsComponent.

Each member owns its entries: they live in its *contribution* (shared memory that dies with it)
and in a local dict (private memory that also dies with it: enough to rebuild the contribution).
The *master area* holds the index: buckets of references (slot, offset, hash), each bucket with a
robust mutex. Any member can look up any key; after a failure the master resets the index and
every survivor re-inserts its own entries, so a dead member's entries simply disappear.

The insert is deliberately a two-step update (count first, reference second) with a crash point
between the two: a member killed there leaves a bucket whose count covers a garbage reference.
The framework makes that harmless: the next locker sees the mutex ABANDONED, releases it
unrepaired (so it becomes not-recoverable: nobody can read the half-update), and a global
recovery rebuilds the index. ``check_invariants`` is what the tests run in every block.

The shared layouts are declared as records (:mod:`mcs.records`: no offset is written by hand);
the master area starts with a :class:`~mcs.records.LayoutHeader` that every member checks before
it uses the index, so a member running another declaration is refused instead of misreading it.

Run ``python examples/registry.py DOMAIN`` in several terminals to play with it.
"""

from __future__ import annotations

import hashlib
import sys

from mcs import McsError, faults
from mcs._gsm import GlobalMutex
from mcs.component import McsComponent, transaction
from mcs.records import Array, Bytes, LayoutHeader, Mutex, Nested, Pad, Record, UInt32, UInt64
from mcs.section import Section

BUCKETS = 64
BUCKET_CAP = 32
KEY_MAX = VALUE_MAX = 88
CAPACITY = 256


class Ref(Record):
    """A reference from the index to an entry in a member's contribution."""

    slot = UInt64()
    offset = UInt64()
    hash = UInt64()


class Bucket(Record):
    mutex = Mutex()
    count = UInt64()
    reserved = Pad(8)
    refs = Array(Ref, BUCKET_CAP)


class AreaHeader(Record, size=64):
    magic = UInt64()
    buckets = UInt64()
    fingerprint = UInt64()  # of the Area layout (LayoutHeader)


class Area(Record):
    """The master area: the index."""

    header = Nested(AreaHeader)
    buckets = Array(Bucket, BUCKETS)


class Entry(Record):
    """One entry of a member's contribution."""

    hash = UInt64()
    key_len = UInt32()
    value_len = UInt32()
    key = Bytes(KEY_MAX)
    value = Bytes(VALUE_MAX)


HEADER = LayoutHeader(b"REGISTRY", Area, header=AreaHeader)
ENTRY = Entry.SIZE
Entries = Array(Entry, CAPACITY)


class InvariantViolation(AssertionError):
    """A shared structure was seen in a state that must never be visible."""


def key_hash(key: bytes) -> int:
    """A stable 64-bit hash (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def bucket_offset(bucket: int) -> int:
    return Area.offset_of("buckets", bucket)


class Registry(McsComponent):
    """Domain-wide key/value registry; see the module docstring."""

    name = "registry"
    master_area_size = Area.SIZE
    contribution_size = Entries.SIZE

    def init_local(self) -> None:
        self._entries: dict[bytes, tuple[int, bytes]] = {}  # key -> (index, value)
        self._mutexes: list[GlobalMutex] = []
        self._mutex_area: Section | None = None
        self._area: Area | None = None

    # -- the hooks ------------------------------------------------------------------------

    def on_master(self, view) -> None:
        area = Area.at(self.master_area)
        area.memory()[:] = bytes(Area.SIZE)
        area.create_sync()  # every bucket mutex, re-created: a poisoned one is healed
        area.header.buckets = BUCKETS
        HEADER.write(self.master_area)

    def build_shared_state(self, view) -> None:
        HEADER.check(self.master_area)  # LayoutMismatchError: not ours, or another layout
        self._bind_mutexes()
        for key, (index, value) in self._entries.items():
            self._write_entry(index, key, value)
            self._insert_ref(key_hash(key), index * ENTRY, recovering=True)

    # -- worker operations ----------------------------------------------------------------

    @transaction
    def register(self, key: bytes, value: bytes) -> None:
        """Publish ``key -> value`` for the whole domain (this member owns it)."""
        if not (0 < len(key) <= KEY_MAX and len(value) <= VALUE_MAX):
            raise ValueError(f"key must be 1..{KEY_MAX} bytes and value at most {VALUE_MAX}")
        known = self._entries.get(key)
        if known is None:
            if len(self._entries) >= CAPACITY:
                raise McsError("registry contribution is full")
            index = len(self._entries)
        else:
            index = known[0]
        self._entries[key] = (index, value)
        self._write_entry(index, key, value)
        self._insert_ref(key_hash(key), index * ENTRY, recovering=False)

    @transaction
    def lookup(self, key: bytes) -> bytes | None:
        """The value registered for ``key`` by any live member, or None."""
        h = key_hash(key)
        bucket = self._area.buckets[h % BUCKETS]
        with self.lock(self._mutexes[h % BUCKETS]):
            for i in range(bucket.count):
                ref = bucket.refs[i]
                if ref.hash != h:
                    continue
                entry = Entry.at(self.contribution_of(ref.slot), ref.offset)
                if entry.key[:entry.key_len] == key:
                    return entry.value[:entry.value_len]
        return None

    def local_keys(self) -> list[bytes]:
        return list(self._entries)

    def check_invariants(self) -> int:
        """Inside a consistent block: verify every bucket; return the number of entries."""
        view = self.view
        slots = {m.slot for m in view.members}
        total = 0
        seen: set[bytes] = set()
        for b in range(BUCKETS):
            bucket = self._area.buckets[b]
            with self.lock(self._mutexes[b]):
                count = bucket.count
                if count > BUCKET_CAP:
                    raise InvariantViolation(f"bucket {b}: count {count} > {BUCKET_CAP}")
                for i in range(count):
                    ref = bucket.refs[i]
                    slot, eoff, h = ref.slot, ref.offset, ref.hash
                    if slot not in slots:
                        raise InvariantViolation(f"bucket {b}: ref to slot {slot} not in view {slots}")
                    if eoff % ENTRY or eoff + ENTRY > self.contribution_size:
                        raise InvariantViolation(f"bucket {b}: bad entry offset {eoff}")
                    if h % BUCKETS != b:
                        raise InvariantViolation(f"bucket {b}: hash {h:#x} belongs elsewhere")
                    entry = Entry.at(self.contribution_of(slot), eoff)
                    klen, vlen = entry.key_len, entry.value_len
                    if entry.hash != h or not 0 < klen <= KEY_MAX or vlen > VALUE_MAX:
                        raise InvariantViolation(f"bucket {b}: ref {i} -> corrupt entry")
                    key = entry.key[:klen]
                    if key_hash(key) != h or key in seen:
                        raise InvariantViolation(f"bucket {b}: wrong or duplicate key {key!r}")
                    seen.add(key)
                    total += 1
        return total

    # -- internals --------------------------------------------------------------------------

    def _bind_mutexes(self) -> None:
        if self._mutex_area is not self.master_area:
            tag = self.member.incarnation
            self._area = Area.at(self.master_area)
            self._mutexes = [Bucket.mutex.open(bucket, tag=tag) for bucket in self._area.buckets]
            self._mutex_area = self.master_area

    def _write_entry(self, index: int, key: bytes, value: bytes) -> None:
        entry = Entries.at(self.contribution, 0)[index]
        entry.hash, entry.key_len, entry.value_len = key_hash(key), len(key), len(value)
        entry.key, entry.value = key, value

    def _insert_ref(self, h: int, entry_offset: int, *, recovering: bool) -> None:
        b = h % BUCKETS
        bucket = self._area.buckets[b]
        me = self.member.slot
        mutex = self._mutexes[b]
        held = self.recovery_lock(mutex) if recovering else self.lock(mutex)
        with held:
            count = bucket.count
            for i in range(count):
                ref = bucket.refs[i]
                if (ref.slot, ref.offset) == (me, entry_offset):
                    return  # already there (a retried transaction)
            if count >= BUCKET_CAP:
                raise McsError(f"registry bucket {b} is full")
            # Two steps on purpose (see the module docstring): count, crash point, reference.
            bucket.count = count + 1
            faults.point("registry.insert.mid")
            ref = bucket.refs[count]
            ref.slot, ref.offset, ref.hash = me, entry_offset, h


def main(argv: list[str]) -> int:  # pragma: no cover - interactive demo
    import logging

    logging.basicConfig(level=logging.INFO)
    domain = argv[1] if len(argv) > 1 else "demo"
    with Registry(domain) as reg:
        print(f"member slot {reg.slot}; commands: set KEY VALUE | get KEY | check | quit")
        for line in sys.stdin:
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "set" and len(cmd) == 3:
                reg.register(cmd[1].encode(), cmd[2].encode())
            elif cmd[0] == "get" and len(cmd) == 2:
                print(reg.lookup(cmd[1].encode()))
            elif cmd[0] == "check":
                print(reg.run(reg.check_invariants), "entries;", reg.stats)
            elif cmd[0] == "quit":
                break
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv))
