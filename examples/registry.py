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

Run ``python examples/registry.py DOMAIN`` in several terminals to play with it.
"""

from __future__ import annotations

import hashlib
import struct
import sys

from mcs import McsError, faults
from mcs._gsm import GlobalMutex
from mcs.component import McsComponent, transaction
from mcs.section import Section

BUCKETS = 64
BUCKET_CAP = 32
REF = 24  # slot, offset, hash
BUCKET_SIZE = 896  # mutex 64 | count 8 | pad 8 | refs 32*24 = 768 -> 848, rounded up
AREA_HEADER = 64
MAGIC = int.from_bytes(b"REGISTRY", "little")

ENTRY = 192  # hash 8 | key length 4 | value length 4 | key 88 | value 88
KEY_MAX = VALUE_MAX = 88
CAPACITY = 256


class InvariantViolation(AssertionError):
    """A shared structure was seen in a state that must never be visible."""


def key_hash(key: bytes) -> int:
    """A stable 64-bit hash (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def bucket_offset(bucket: int) -> int:
    return AREA_HEADER + bucket * BUCKET_SIZE


class Registry(McsComponent):
    """Domain-wide key/value registry; see the module docstring."""

    name = "registry"
    master_area_size = AREA_HEADER + BUCKETS * BUCKET_SIZE
    contribution_size = CAPACITY * ENTRY

    def init_local(self) -> None:
        self._entries: dict[bytes, tuple[int, bytes]] = {}  # key -> (index, value)
        self._mutexes: list[GlobalMutex] = []
        self._mutex_area: Section | None = None

    # -- the hooks ------------------------------------------------------------------------

    def on_master(self, view) -> None:
        area = self.master_area
        area.view(0, self.master_area_size)[:] = bytes(self.master_area_size)
        for b in range(BUCKETS):
            GlobalMutex.create(area, bucket_offset(b))  # re-created: a poisoned one is healed
        area.store64(8, BUCKETS)
        area.store64(0, MAGIC)

    def build_shared_state(self, view) -> None:
        area = self.master_area
        if area.load64(0) != MAGIC:
            raise McsError("master area not initialised")
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
        off = bucket_offset(h % BUCKETS)
        area = self.master_area
        with self.lock(self._mutexes[h % BUCKETS]):
            for i in range(area.load64(off + 64)):
                slot, eoff, rh = struct.unpack_from("<QQQ", area.view(off + 80 + i * REF, REF))
                if rh != h:
                    continue
                entry = self.contribution_of(slot).view(eoff, ENTRY)
                klen, vlen = struct.unpack_from("<II", entry, 8)
                if bytes(entry[16:16 + klen]) == key:
                    return bytes(entry[104:104 + vlen])
        return None

    def local_keys(self) -> list[bytes]:
        return list(self._entries)

    def check_invariants(self) -> int:
        """Inside a consistent block: verify every bucket; return the number of entries."""
        view = self.view
        slots = {m.slot for m in view.members}
        area = self.master_area
        total = 0
        seen: set[bytes] = set()
        for b in range(BUCKETS):
            off = bucket_offset(b)
            with self.lock(self._mutexes[b]):
                count = area.load64(off + 64)
                if count > BUCKET_CAP:
                    raise InvariantViolation(f"bucket {b}: count {count} > {BUCKET_CAP}")
                for i in range(count):
                    slot, eoff, h = struct.unpack_from("<QQQ", area.view(off + 80 + i * REF, REF))
                    if slot not in slots:
                        raise InvariantViolation(f"bucket {b}: ref to slot {slot} not in view {slots}")
                    if eoff % ENTRY or eoff + ENTRY > self.contribution_size:
                        raise InvariantViolation(f"bucket {b}: bad entry offset {eoff}")
                    if h % BUCKETS != b:
                        raise InvariantViolation(f"bucket {b}: hash {h:#x} belongs elsewhere")
                    entry = self.contribution_of(slot).view(eoff, ENTRY)
                    eh, klen, vlen = struct.unpack_from("<QII", entry)
                    if eh != h or not 0 < klen <= KEY_MAX or vlen > VALUE_MAX:
                        raise InvariantViolation(f"bucket {b}: ref {i} -> corrupt entry")
                    key = bytes(entry[16:16 + klen])
                    if key_hash(key) != h or key in seen:
                        raise InvariantViolation(f"bucket {b}: wrong or duplicate key {key!r}")
                    seen.add(key)
                    total += 1
        return total

    # -- internals --------------------------------------------------------------------------

    def _bind_mutexes(self) -> None:
        if self._mutex_area is not self.master_area:
            tag = self.member.incarnation
            self._mutexes = [GlobalMutex.open(self.master_area, bucket_offset(b), tag=tag)
                             for b in range(BUCKETS)]
            self._mutex_area = self.master_area

    def _write_entry(self, index: int, key: bytes, value: bytes) -> None:
        entry = bytearray(ENTRY)
        struct.pack_into("<QII", entry, 0, key_hash(key), len(key), len(value))
        entry[16:16 + len(key)] = key
        entry[104:104 + len(value)] = value
        self.contribution.view(index * ENTRY, ENTRY)[:] = entry

    def _insert_ref(self, h: int, entry_offset: int, *, recovering: bool) -> None:
        area = self.master_area
        b = h % BUCKETS
        off = bucket_offset(b)
        me = self.member.slot
        mutex = self._mutexes[b]
        held = self.recovery_lock(mutex) if recovering else self.lock(mutex)
        with held:
            count = area.load64(off + 64)
            for i in range(count):
                if struct.unpack_from("<QQ", area.view(off + 80 + i * REF, 16)) == (me, entry_offset):
                    return  # already there (a retried transaction)
            if count >= BUCKET_CAP:
                raise McsError(f"registry bucket {b} is full")
            # Two steps on purpose (see the module docstring): count, crash point, reference.
            area.store64(off + 64, count + 1)
            faults.point("registry.insert.mid")
            struct.pack_into("<QQQ", area.view(off + 80 + count * REF, REF), 0, me, entry_offset, h)


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
