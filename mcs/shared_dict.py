"""SharedDict: a dict in a domain's shared memory, shared by every process that joins it.

    with mcs.SharedDict("mydomain", capacity=100_000, max_key=64, max_value=256) as d:
        d["hits"] = 0
        d.incr("hits")
        d[b"blob"] = b"..."
        d.set("worker-3", b"alive", ephemeral=True)   # gone when this process dies or leaves
        with d.transaction() as tx:                    # atomic over several keys
            tx["a"] = tx.get("a", 0) - 10
            tx["b"] = tx.get("b", 0) + 10

Keys are ``str`` or ``bytes`` (``"a"`` and ``b"a"`` are different keys), values ``bytes`` or
``int`` (int64, read back as int). Every item operation is native code on a striped hash table
in the component's master area (mcs/_dict.pyx): a robust mutex per stripe, writes made
crash-atomic by the undo log (mcs/undo.py). A process killed in the middle of any write leaves
the old or the new value, never a mix: the next locker of the stripe rolls its log back.

Transactions: every stripe a transaction touches stays locked until its end (serializable);
the end commits with one store or, on an exception, undoes everything. While holding a stripe,
waiting for another is bounded (``tx_wait``): on timeout (a possible deadlock) the transaction
is rolled back and :class:`~mcs.errors.TransactionConflict` raised. :meth:`SharedDict.transact`
runs a function as a transaction and re-runs it after such a conflict, so **its body may run
more than once** (keep side effects out of it); a committed transaction is never re-run.

Membership is the component's (:class:`~mcs.component.McsComponent`): the recovery, run by the
master, rolls back the undo logs of departed members and removes their ephemeral items, at a
cost that follows what they held, not the size of the dict. Item operations never wait for a
recovery (the table is never rebuilt, so they need no gate).

What survives what: the table is the component's master area, which is domain-owned: a new
master adopts it (mcs.component), so the dict survives the death of any member, the master's
included, as long as one member lives. A poisoned area is re-created empty (the loss is
counted in :attr:`SharedDict.dict_stats` ``resets`` and logged); when every member is gone, the
kernel frees the memory and the dict is gone. See docs/state.md.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from mcs._dict import (Table, geometry, init_table, read_geometry, record_view, recorded_view,
                       table_magic)
from mcs.component import McsComponent
from mcs.errors import TransactionConflict

__all__ = ["SharedDict", "DictStats"]

log = logging.getLogger("mcs.shared_dict")

T = TypeVar("T")

RETRY_BACKOFF_MIN = 0.0002  # first random pause after a conflict (seconds, upper bound)
RETRY_BACKOFF_MAX = 0.05


@dataclass
class DictStats:
    """What :attr:`SharedDict.dict_stats` reports (this process's view)."""

    resets: int = 0  # times this member saw the table re-created empty (data lost)
    departed: int = 0  # departed members whose logs and ephemerals this member cleaned up
    logs_rolled_back: int = 0  # of those, ACTIVE logs rolled back
    ephemerals_removed: int = 0
    conflicts: int = 0  # transaction conflicts retried by transact()
    abandoned_repairs: int = 0  # stripes found abandoned and repaired by this process
    last_cleanup_ms: float = 0.0


class SharedDict(Table, McsComponent):
    """A dict shared by the processes of a domain; see the module docstring.

    ``capacity`` keys (about: each of the table's stripes holds its share plus a margin; a
    full stripe raises :class:`~mcs.errors.DictFullError`), keys up to ``max_key`` bytes (UTF-8
    for str), values up to ``max_value`` bytes. The first process to create the table fixes
    its geometry; later ones adopt it. ``lanes``: concurrent writes of one process;
    ``tx_wait``: the bounded wait of a transaction for a stripe while it holds others.
    A handle belongs to its process: used in a forked child it raises
    :class:`~mcs.errors.ForkedHandleError`.
    """

    #: the dict keeps its own undo logs inside its table (mcs.undo): no component log region
    transaction_lanes = 0

    def __init__(self, domain: str, *, name: str = "dict", capacity: int = 100_000,
                 max_key: int = 64, max_value: int = 256, node: str | None = None,
                 lanes: int = 8, stripes: int | None = None, tx_wait: float = 0.02,
                 **timing: Any) -> None:
        self.name = name
        McsComponent.__init__(self, domain, node=node, **timing)
        self.geometry = geometry(capacity, max_key, max_value, lanes=lanes, stripes=stripes)
        self.master_area_size = self.geometry["size"]
        self.dict_stats = DictStats()
        self._bound_area: Any = None
        self._had_table = False
        self._set_tx_wait(tx_wait)

    # -- component hooks ------------------------------------------------------------------

    def on_master(self, view: Any) -> None:
        """Initialise the table if the area is fresh (adopt it otherwise), then clean up after
        every member of the recorded view that is gone: roll back its logs, remove its
        ephemeral items; record the new view."""
        started = time.monotonic()
        area = self.master_area
        if table_magic(area) == 0:
            if self._had_table:
                self.dict_stats.resets += 1
                log.warning("%s: the table was re-created empty (new or poisoned master area)",
                            self.component_name)
            init_table(area, self.geometry)
        self._ensure_bound()
        recorded = recorded_view(area)
        current = {m.slot: m.incarnation for m in view.members}
        for slot, inc in recorded.items():
            if current.get(slot) != inc:
                rolled = self.rollback_member(slot, inc)
                removed = self.remove_ephemerals(slot, inc)
                st = self.dict_stats
                st.departed += 1
                st.logs_rolled_back += rolled
                st.ephemerals_removed += removed
                log.info("%s: member slot %d incarnation %d gone: %d log(s) rolled back, %d "
                         "ephemeral item(s) removed", self.component_name, slot, inc, rolled,
                         removed)
        record_view(area, current)
        self.dict_stats.last_cleanup_ms = (time.monotonic() - started) * 1e3

    def build_shared_state(self, view: Any) -> None:
        self._ensure_bound()

    def _ensure_bound(self) -> None:
        area = self.master_area
        if area is not None and area is not self._bound_area:
            if read_geometry(area) != {k: v for k, v in self.geometry.items()}:
                log.info("%s: adopting the table's geometry %s", self.component_name,
                         read_geometry(area))
            self._bind(area, self.member.slot, self.member.incarnation)
            self._bound_area = area
            self._had_table = True

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "SharedDict":
        """Join the domain's dict (creating the table if this is the first member)."""
        McsComponent.start(self, timeout)
        return self

    def stop(self) -> None:
        """Leave: remove this process's ephemeral items, then leave the membership."""
        if self.bound and not self._stopping.is_set():
            try:
                self.remove_ephemerals(self.member.slot, self.member.incarnation)
            except Exception:  # the recovery of the others removes them anyway
                log.exception("%s: removing own ephemerals at stop failed", self.component_name)
        McsComponent.stop(self)
        self._unbind()
        self._bound_area = None

    def __enter__(self) -> "SharedDict":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __bool__(self) -> bool:
        return not self.bound or len(self) > 0

    # -- transactions ---------------------------------------------------------------------

    def transact(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(tx, *args, **kwargs)`` as one transaction and return its result, re-running
        it after a :class:`TransactionConflict` (after a random pause): ``fn`` may run more
        than once, but its effects are committed exactly once."""
        backoff = RETRY_BACKOFF_MIN
        while True:
            try:
                with self.transaction() as tx:
                    return fn(tx, *args, **kwargs)
            except TransactionConflict:
                self.dict_stats.conflicts += 1
                time.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, RETRY_BACKOFF_MAX)

    @property
    def stats_summary(self) -> DictStats:
        """:attr:`dict_stats` with the native counters filled in."""
        self.dict_stats.abandoned_repairs = self.abandoned_repairs
        return self.dict_stats

    def __repr__(self) -> str:
        state = "bound" if self.bound else "not started"
        return f"<SharedDict {self.domain}/{self.component_name} {state}>"
