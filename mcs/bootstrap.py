"""A domain's bootstrap section: the well-known root ``mcs.<domain>`` in POSIX shared memory.

It is the only mcs object that can outlive a crash (the kernel does not free a named POSIX
object when its users die), so it is created with ``O_EXCL`` (one creator wins the race), mode
0600, its memory reserved before it is mapped, and a header that is validated before anything in
it is trusted: magic, layout version, size and owner. The name lives in the shared ``/dev/shm``
name space and is handled by :mod:`mcs.shmname` (``lstat``, ``O_NOFOLLOW``, owner checks). The
magic is written last, so a joiner that sees it sees a fully initialised root. Liveness is never
guessed from pids: each member holds its *life mutex* (a robust mutex in the member table) for
its whole life, so a probe with ``trylock`` tells a live member (busy) from a dead one
(abandoned) exactly.

A name unlinked under a running domain (systemd ``RemoveIPC=yes``) cannot be linked again (tmpfs
has no ``linkat`` of an unlinked object), and a new object under that name would start a second
domain beside the running one. So whoever is about to create a root first looks for processes
of this user that still map an unlinked object of that name, and refuses
(:class:`DomainUnlinkedError`) while any does.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from typing import Callable, Iterator, TypeVar

from mcs import layout, procfs, shmname
from mcs._gsm import HEADER_SIZE, GlobalEvent, GlobalMutex
from mcs.errors import (BootstrapError, DomainNotFoundError, DomainUnlinkedError, LockUsageError,
                        UninitialisedError)
from mcs.section import Section, reap_orphans
from mcs.types import LockStatus

__all__ = ["Bootstrap", "domain_path", "validate_domain", "list_domains", "iter_objects",
           "DOMAIN_MAX", "DOMAIN_NAME"]

DOMAIN_MAX = 63  # characters in a domain name
OPEN_ATTEMPTS = 100  # opens retried while a concurrent creator keeps removing its half-made root
CREATOR_POLL = 0.001  # how often a waiting opener looks at a root being initialised
PIDS_SHOWN = 10  # processes named in a DomainUnlinkedError
START_SLACK_NS = 1_000_000_000  # a member's process started before it joined (clock-tick precision)
PID_LIMIT = 1 << 22  # the kernel's largest pid_max
FUTEX_OWNER_DIED = 0x40000000  # set by the kernel in a robust mutex word whose holder exited
FUTEX_TID_MASK = 0x3FFFFFFF
#: what a domain name (and a component name, a part of one) may be
DOMAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}" % (DOMAIN_MAX - 1))
PREFIX = "mcs."
_TOTAL = HEADER_SIZE + layout.ROOT_SIZE  # the mapping: section header, then the user area
_T = TypeVar("_T")
log = logging.getLogger("mcs.bootstrap")


def validate_domain(domain: str) -> str:
    """Return ``domain`` if it is a valid domain name, else raise ValueError saying why."""
    if not isinstance(domain, str) or not DOMAIN_NAME.fullmatch(domain):
        raise ValueError(
            f"invalid domain name {domain!r}: use 1-{DOMAIN_MAX} characters from "
            "[A-Za-z0-9_.-], starting with a letter or digit")
    return domain


def domain_path(domain: str) -> str:
    """The POSIX shm name of a domain's bootstrap object."""
    return "/" + PREFIX + validate_domain(domain)


def _file(domain: str) -> str:
    return os.path.join(shmname.shm_dir(), PREFIX + domain)


def list_domains() -> list[str]:
    """Names of the domains that have a bootstrap name on this host (whatever it names)."""
    try:
        names = os.listdir(shmname.shm_dir())
    except FileNotFoundError:
        return []
    return sorted(n[len(PREFIX):] for n in names
                  if n.startswith(PREFIX) and DOMAIN_NAME.fullmatch(n[len(PREFIX):]))


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
        object (:class:`ForeignObjectError` for another user's name or a non-regular file), a
        full tmpfs (:class:`ShmFullError`), a name unlinked under a running domain
        (:class:`DomainUnlinkedError`), or a missing one when ``create`` is false
        (:class:`DomainNotFoundError`). ``wait`` bounds how long to wait for a concurrent
        creator to finish initialising.
        """
        name = PREFIX + validate_domain(domain)
        for _ in range(OPEN_ATTEMPTS):
            opened = shmname.create(name, _TOTAL) if create else None
            created = opened is not None
            if created:
                fd, st = opened
                try:
                    _refuse_second_domain(domain)
                except BaseException:
                    shmname.remove_if_same(name, st.st_ino)
                    os.close(fd)
                    raise
            else:
                opened = shmname.open_existing(name)
                if opened is None:
                    if create:
                        continue  # removed between our two opens: try creating again
                    _refuse_second_domain(domain)
                    raise DomainNotFoundError(
                        f"domain {domain!r} does not exist ({_file(domain)})")
                fd, st = opened
            try:
                if not created:
                    st = _wait_until(lambda: os.fstat(fd), lambda s: s.st_size > 0, name,
                                     st.st_ino, wait)
                    _check_object(_file(domain), st)
                section = Section._map_fd(fd, _TOTAL)
            except BootstrapError:
                if not created and not shmname.is_linked(name, st.st_ino):
                    continue  # its creator gave up and removed it: start again
                raise
            except BaseException:
                if created:
                    shmname.remove_if_same(name, st.st_ino)
                raise
            finally:
                os.close(fd)
            boot = cls(domain, section, st.st_ino, created)
            try:
                if created:
                    boot._initialise()
                else:
                    boot._check_header(wait)
            except UninitialisedError:
                section.close()
                if not boot.still_linked():
                    continue  # its creator gave up and removed it: start again
                raise
            except BaseException:
                section.close()
                if created:
                    shmname.remove_if_same(name, st.st_ino)  # never a half-made root
                raise
            return boot
        raise BootstrapError(f"{_file(domain)}: could not open or create (kept vanishing)")

    def _initialise(self) -> None:
        """Lay out a fresh root: mutexes and events first, the header magic last."""
        sec = self.section
        sec._init(0, int.from_bytes(os.urandom(8), "little"), layout.ROOT_VERSION)
        GlobalMutex.create(sec, layout.ROOT_MUTEX)
        GlobalEvent.create(sec, layout.VIEW_EVENT)
        GlobalEvent.create(sec, layout.COMPONENT_EVENT)  # the layer above's (component record)
        for slot in range(layout.MAX_MEMBERS):
            GlobalMutex.create(sec, layout.member_offset(slot, layout.M_LIFE_MUTEX))
        sec._publish(layout.ROOT_MAGIC)

    def _check_header(self, wait: float) -> None:
        path = self.path
        # a concurrent creator may still be initialising (or give up and remove it)
        header = _wait_until(self.section._header, lambda h: h["magic"] != 0,
                             PREFIX + self.domain, self.inode, wait)
        if header["magic"] == 0:
            raise UninitialisedError(
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
        """The object's file (``/dev/shm/mcs.<domain>``)."""
        return _file(self.domain)

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
        mutex = GlobalMutex.open(self.section, layout.member_offset(slot, layout.M_LIFE_MUTEX),
                                 tag=tag)
        mutex.watched = False  # held for a whole life: never judged by the hold watch
        return mutex

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
        """Slots whose member is alive: its life mutex is held (frozen ones count as live), or
        the mutex looks abandoned or free while the slot's own process still runs and maps this
        root (:meth:`runs_domain`). That second case must never happen (the kernel marks a
        life mutex abandoned only when its holder thread exits); it is logged, and counted as
        live so that no re-initialiser or gc ever starts a second domain beside a running
        member."""
        live = []
        for slot in range(layout.MAX_MEMBERS):
            probe = self.probe_slot(slot)
            if probe == "live":
                live.append(slot)
            elif self.runs_domain(slot):
                log.error("domain %s: member slot %d (pid %d) still runs the domain although its "
                          "life mutex was found %s; counting it as live", self.domain, slot,
                          self._member_word(slot, layout.M_PID), probe)
                live.append(slot)
        return live

    def runs_domain(self, slot: int) -> bool:
        """Whether member ``slot``'s recorded process is still that member's and still runs:
        the slot is a member, its pid is not ours, the process is not dying, it started before
        the member joined (so the pid was not reused) and it maps this very root object."""
        if self._member_word(slot, layout.M_STATE) != layout.SLOT_MEMBER:
            return False
        pid = self._member_word(slot, layout.M_PID)
        if pid in (0, os.getpid()) or pid > PID_LIMIT:
            return False
        try:
            stat = procfs.read_stat(pid)
        except (OSError, ValueError):
            return False
        joined = self._member_word(slot, layout.M_JOINED_NS)
        return (not stat.dying and stat.started_ns() <= joined + START_SLACK_NS
                and shmname.maps_object(pid, self.inode))

    def life_word(self, slot: int) -> int:
        """The futex word of member ``slot``'s life mutex: the holder thread's id, plus the
        kernel's owner-died bit (:data:`FUTEX_OWNER_DIED`) once that thread has exited."""
        return self.section.load64(layout.member_offset(slot, layout.M_LIFE_MUTEX)) & 0xFFFFFFFF

    def _member_word(self, slot: int, field: int) -> int:
        return self.section.load64(layout.member_offset(slot, field))

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
        """True if the name still refers to the object this handle mapped (``lstat``)."""
        return shmname.is_linked(PREFIX + self.domain, self.inode)

    def retire(self) -> None:
        """Mark removed and unlink the name. Call holding the root mutex, with no live member."""
        self.section._set_state(layout.STATE_REMOVED)
        shmname.remove_if_same(PREFIX + self.domain, self.inode)

    def close(self) -> None:
        """Unmap the root (idempotent). Never removes the named object."""
        self.section.close()

    def __enter__(self) -> "Bootstrap":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Bootstrap {self.path}{' closed' if self.section.closed else ''}>"


def _wait_until(read: Callable[[], _T], done: Callable[[_T], bool], name: str, inode: int,
                wait: float) -> _T:
    """``read()`` until ``done`` (a concurrent creator finished), the name stops naming
    ``inode`` (it gave up), or ``wait`` seconds pass; returns the last value read."""
    deadline = time.monotonic() + wait
    value = read()
    while not done(value) and time.monotonic() < deadline and shmname.is_linked(name, inode):
        time.sleep(CREATOR_POLL)
        value = read()
    return value


def _refuse_second_domain(domain: str) -> None:
    """Raise :class:`DomainUnlinkedError` if processes still run ``domain`` on an object whose
    name was unlinked: a new root would start a second domain beside theirs."""
    pids = shmname.mappers_of_unlinked(PREFIX + domain)
    if pids:
        shown = ", ".join(map(str, pids[:PIDS_SHOWN])) + (
            ", ..." if len(pids) > PIDS_SHOWN else "")
        raise DomainUnlinkedError(
            f"domain {domain!r}: its bootstrap object {_file(domain)} was unlinked while "
            f"{len(pids)} process(es) still run the domain (pid {shown}); systemd's "
            "RemoveIPC=yes does this. Refusing to start a second domain beside it: stop those "
            "processes first (and set RemoveIPC=no, or run the service as a system user)")


def _check_object(path: str, st: os.stat_result) -> None:
    """Validate a named object's mode, links and size before mapping it (its type and owner
    were checked by :func:`mcs.shmname.open_existing`)."""
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise BootstrapError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users in; refusing "
            "(mcs objects are 0600)")
    if st.st_nlink != 1:
        raise BootstrapError(f"{path}: has {st.st_nlink} hard links (mcs objects have one)")
    if st.st_size < _TOTAL:
        raise BootstrapError(f"{path}: truncated ({st.st_size} bytes, expected {_TOTAL})")
    if st.st_size != _TOTAL:
        raise BootstrapError(f"{path}: wrong size ({st.st_size} bytes, expected {_TOTAL})")


def iter_objects() -> Iterator[shmname.Entry]:
    """What ``lstat`` says about every bootstrap name on this host, whatever it names."""
    for domain in list_domains():
        entry = shmname.examine(PREFIX + domain)
        if entry is not None:
            yield entry
