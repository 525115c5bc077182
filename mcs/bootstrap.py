"""A domain's bootstrap section: the well-known root ``/mcs.<domain>`` in POSIX shared memory.

It is the only mcs object that can outlive a crash (the kernel does not free a named POSIX
object when its users die), so it is created with ``O_EXCL`` (one creator wins the race), mode
0600, and a header that is validated before anything in it is trusted: magic, layout version,
size and owner. The magic is written last, so a joiner that sees it sees a fully initialised
root. Liveness is never guessed from pids: each member holds its *life mutex* (a robust mutex in
the member table) for its whole life, so a probe with ``trylock`` tells a live member (busy)
from a dead one (abandoned) exactly.
"""

from __future__ import annotations

import os
import re
import stat
import time
from typing import Iterator

import posix_ipc

from mcs import layout
from mcs._gsm import GlobalEvent, GlobalMutex
from mcs.errors import BootstrapError, LockUsageError
from mcs.section import Section, reap_orphans
from mcs.types import LockStatus

__all__ = ["Bootstrap", "domain_path", "validate_domain", "list_domains"]

_DOMAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
SHM_DIR = "/dev/shm"
PREFIX = "mcs."
_TOTAL = layout.ROOT_SIZE + 64  # header + user area


def validate_domain(domain: str) -> str:
    """Return ``domain`` if it is a valid domain name, else raise ValueError saying why."""
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        raise ValueError(
            f"invalid domain name {domain!r}: use 1-63 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit")
    return domain


def domain_path(domain: str) -> str:
    """The POSIX shm name of a domain's bootstrap object."""
    return "/" + PREFIX + validate_domain(domain)


def list_domains() -> list[str]:
    """Names of the domains that have a bootstrap object on this host."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n[len(PREFIX):] for n in names
                  if n.startswith(PREFIX) and _DOMAIN.fullmatch(n[len(PREFIX):]))


class Bootstrap:
    """An open bootstrap section. Use :meth:`open`; close with :meth:`close` or ``with``."""

    def __init__(self, domain: str, section: Section, inode: int, created: bool) -> None:
        self.domain = domain
        self.section = section
        self.inode = inode
        self.created = created

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, domain: str, *, create: bool = True, wait: float = 2.0) -> "Bootstrap":
        """Open the root of ``domain``, creating it if ``create`` and it does not exist.

        Raises :class:`BootstrapError` for a foreign, truncated, mis-versioned or foreign-owned
        object, or a missing one when ``create`` is false. ``wait`` bounds how long to wait for
        a concurrent creator to finish initialising.
        """
        path = domain_path(domain)
        for _ in range(100):
            created = False
            if create:
                try:
                    shm = posix_ipc.SharedMemory(path, posix_ipc.O_CREX, mode=0o600, size=_TOTAL)
                    created = True
                except posix_ipc.ExistentialError:
                    pass
            if not created:
                try:
                    shm = posix_ipc.SharedMemory(path)
                except posix_ipc.ExistentialError:
                    if create:
                        continue  # removed between our two opens: try creating again
                    raise BootstrapError(f"domain {domain!r} does not exist ({path})") from None
                except posix_ipc.PermissionsError as exc:
                    raise BootstrapError(f"{path}: permission denied ({exc})") from None
            try:
                st = _stat_when_sized(shm.fd, wait)
                if created:
                    os.fchmod(shm.fd, 0o600)
                else:
                    _check_object(path, st)
                section = Section._map_fd(shm.fd, _TOTAL)
            finally:
                shm.close_fd()
            boot = cls(domain, section, st.st_ino, created)
            try:
                if created:
                    boot._initialise()
                else:
                    boot._check_header(wait)
            except BaseException:
                section.close()
                raise
            return boot
        raise BootstrapError(f"{path}: could not open or create (kept vanishing)")

    def _initialise(self) -> None:
        """Lay out a fresh root: mutexes and events first, the header magic last."""
        sec = self.section
        sec._init(0, int.from_bytes(os.urandom(8), "little"), layout.ROOT_VERSION)
        GlobalMutex.create(sec, layout.ROOT_MUTEX)
        GlobalEvent.create(sec, layout.VIEW_EVENT)
        GlobalEvent.create(sec, layout.PENDING_EVENT)
        GlobalEvent.create(sec, layout.C_RECOVERY_EVENT)
        for slot in range(layout.MAX_MEMBERS):
            GlobalMutex.create(sec, layout.member_offset(slot, layout.M_LIFE_MUTEX))
        sec._publish(layout.ROOT_MAGIC)

    def reinitialise(self) -> None:
        """Re-lay out a root whose members are all dead. Call holding the root mutex, which this
        re-creates (so the caller must not unlock it afterwards)."""
        self._initialise()

    def _check_header(self, wait: float) -> None:
        path = domain_path(self.domain)
        deadline = time.monotonic() + wait
        header = self.section._header()
        while header["magic"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # a concurrent creator is still initialising
            header = self.section._header()
        if header["magic"] == 0:
            raise BootstrapError(
                f"{path}: never initialised (its creator died during creation?); "
                "remove it with 'mcs gc'")
        if header["magic"] != layout.ROOT_MAGIC:
            raise BootstrapError(f"{path}: not an mcs bootstrap object (bad magic)")
        if header["version"] != layout.ROOT_VERSION:
            raise BootstrapError(
                f"{path}: layout version {header['version']}, this mcs reads version "
                f"{layout.ROOT_VERSION}; stop that domain or use another domain name")
        if header["size"] != layout.ROOT_SIZE:
            raise BootstrapError(f"{path}: header size {header['size']} != {layout.ROOT_SIZE}")
        if header["uid"] != os.geteuid():
            raise BootstrapError(f"{path}: created by uid {header['uid']}, not by this user")

    # -- state --------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return domain_path(self.domain)

    @property
    def removed(self) -> bool:
        """True once ``mcs gc`` (or a re-initialiser) retired this object: reopen the domain."""
        return self.section._header()["state"] == layout.STATE_REMOVED

    @property
    def created_ns(self) -> int:
        """CLOCK_REALTIME of the root's creation."""
        return int(self.section._header()["created_ns"])

    def root_mutex(self, tag: int = 0) -> GlobalMutex:
        """The mutex that serialises joins, leaves, view changes and gc."""
        return GlobalMutex.open(self.section, layout.ROOT_MUTEX, tag=tag)

    def life_mutex(self, slot: int, tag: int = 0) -> GlobalMutex:
        """The life mutex of member ``slot``."""
        return GlobalMutex.open(self.section, layout.member_offset(slot, layout.M_LIFE_MUTEX),
                                tag=tag)

    def probe_slot(self, slot: int) -> str:
        """``"live"`` if a process holds the slot's life mutex, ``"dead"`` if its holder died
        (the probe then releases it), ``"free"`` if nobody holds it."""
        mutex = self.life_mutex(slot)
        try:
            status = mutex.lock(timeout=0)
        except LockUsageError:
            return "live"  # this very thread holds it
        if status is LockStatus.TIMEOUT:
            return "live"
        if status is LockStatus.ABANDONED:
            mutex.mark_consistent()
        mutex.unlock()
        return "dead" if status is LockStatus.ABANDONED else "free"

    def live_slots(self) -> list[int]:
        """Slots whose life mutex is held by a live process (frozen ones count as live)."""
        return [s for s in range(layout.MAX_MEMBERS) if self.probe_slot(s) == "live"]

    def reap_dead_members_segments(self) -> list[int]:
        """Reclaim segments left unmarked by members that died (a slot in use whose life mutex
        nobody holds). Call with no live member, e.g. before re-initialising or retiring."""
        dead = []
        for slot in range(layout.MAX_MEMBERS):
            state = self.section.load64(layout.member_offset(slot, layout.M_STATE))
            if state in (layout.SLOT_MEMBER, layout.SLOT_DEAD, layout.SLOT_FENCED) and (
                    self.probe_slot(slot) != "live"):
                dead.append((self.section.load64(layout.member_offset(slot, layout.M_PID)),
                             self.section.load64(layout.member_offset(slot, layout.M_JOINED_NS))))
        return reap_orphans(dead)

    def still_linked(self) -> bool:
        """True if the name still refers to the object this handle mapped."""
        try:
            return os.stat(os.path.join(SHM_DIR, PREFIX + self.domain)).st_ino == self.inode
        except FileNotFoundError:
            return False

    def retire(self) -> None:
        """Mark removed and unlink the name. Call holding the root mutex, with no live member."""
        self.section._set_state(layout.STATE_REMOVED)
        if self.still_linked():
            try:
                posix_ipc.unlink_shared_memory(self.path)
            except posix_ipc.ExistentialError:
                pass

    def close(self) -> None:
        """Unmap the root (idempotent). Never removes the named object."""
        self.section.close()

    def __enter__(self) -> "Bootstrap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Bootstrap {self.path}{' closed' if self.section.closed else ''}>"


def _stat_when_sized(fd: int, wait: float) -> os.stat_result:
    """fstat, waiting up to ``wait`` s while a concurrent creator has not yet sized the object."""
    deadline = time.monotonic() + wait
    st = os.fstat(fd)
    while st.st_size == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
        st = os.fstat(fd)
    return st


def _check_object(path: str, st: os.stat_result) -> None:
    """Validate a named object's owner, mode and size before mapping it."""
    if st.st_uid != os.geteuid():
        raise BootstrapError(f"{path}: owned by uid {st.st_uid}, not by this user; refusing")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise BootstrapError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users in; refusing "
            "(mcs objects are 0600)")
    if st.st_size < _TOTAL:
        raise BootstrapError(f"{path}: truncated ({st.st_size} bytes, expected {_TOTAL})")
    if st.st_size != _TOTAL:
        raise BootstrapError(f"{path}: wrong size ({st.st_size} bytes, expected {_TOTAL})")


def iter_objects() -> Iterator[tuple[str, os.stat_result]]:
    """(domain, stat) of every bootstrap object on this host."""
    for domain in list_domains():
        try:
            yield domain, os.stat(os.path.join(SHM_DIR, PREFIX + domain))
        except FileNotFoundError:
            continue
