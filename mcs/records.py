"""Typed layouts: shared records declared by name, their offsets and alignment computed.

A record is a class whose attributes are field kinds, in declaration order (like a dataclass or
a ``ctypes.Structure``, but with instances of the kinds as values so that a type checker sees
``b.count`` as an ``int``)::

    class Ref(Record):
        slot = UInt64()
        offset = UInt64()

    class Bucket(Record):
        mutex = Mutex()           # a robust mutex slot, 64-aligned (mcs.layout.MUTEX_SIZE)
        count = Int64()           # 8-aligned
        refs = Array(Ref, 32)     # an array of records
        name = Bytes(88)          # fixed-size bytes, 1-aligned

    Bucket.SIZE, Bucket.ALIGN            # 704, 64: the size is rounded to the alignment
    Bucket.count.offset                  # 64
    Bucket.offset_of("refs", 3, "slot")  # 120
    Bucket.FINGERPRINT                   # 64-bit hash of names, kinds, offsets and sizes

    b = Bucket.at(section, 4096)         # a view bound to a Section at an offset
    b.count = 3; b.add("count", 1)       # atomic store64 / add64
    b.refs[3].slot                       # nested records and arrays
    Bucket.mutex.create(b); b.mutex      # GlobalMutex.create / GlobalMutex.open
    Array(Bucket, 64).at(section, 0)[7]  # arrays of records on their own

Every process computes the same offsets from the same declaration; :class:`LayoutHeader`
stamps an area with a magic and the layout's fingerprint and checks both on attach, so a
process running another declaration is refused (:class:`mcs.errors.LayoutMismatchError`)
instead of reading fields at the wrong offsets. Field offsets are computed once, when the class
is made; a bound view holds only the section and its base offset.

Pure Python, in the core layer: a view works on any object with the :class:`mcs.Section`
methods (``load64``/``store64``/``cas64``/``add64``/``view``).
"""

from __future__ import annotations

import hashlib
from typing import (TYPE_CHECKING, Any, ClassVar, Generic, Iterator, Protocol, TypeVar, Union, cast,
                    overload)

from mcs._gsm import EVENT_SIZE, MUTEX_SIZE, GlobalEvent, GlobalMutex
from mcs.errors import LayoutMismatchError

__all__ = ["Array", "Bytes", "Event", "Int32", "Int64", "Kind", "LayoutHeader", "Mutex",
           "Nested", "Pad", "Record", "Stamp", "UInt32", "UInt64", "define"]

T = TypeVar("T")
R = TypeVar("R", bound="Record")
K = TypeVar("K", bound="Kind[Any]")

SYNC_ALIGN = 64  # a mutex or event slot starts on its own cache line
_MASK = (1 << 64) - 1
_new = object.__new__


class Memory(Protocol):
    """What a bound view needs of a section (mcs.Section has it)."""

    def load64(self, offset: int) -> int: ...
    def store64(self, offset: int, value: int) -> None: ...
    def cas64(self, offset: int, expected: int, new: int) -> bool: ...
    def add64(self, offset: int, delta: int) -> int: ...
    def view(self, offset: int = 0, length: int | None = None) -> memoryview: ...


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _fingerprint(layout: str) -> int:
    """A 64-bit hash of a layout's canonical text, the same in every process and build."""
    return int.from_bytes(
        hashlib.blake2b(layout.encode(), digest_size=8, person=b"mcs.records").digest(), "little")


def _positive(n: object, what: str) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"{what}: n must be a positive int, got {n!r}")
    return n


def _index(i: object, n: int, what: str) -> int:
    if not isinstance(i, int) or isinstance(i, bool):
        raise TypeError(f"{what} index must be an int, not {type(i).__name__}")
    if not 0 <= i < n:
        raise IndexError(f"{what} index {i} out of range 0..{n - 1}")
    return i


class Kind(Generic[T]):
    """A field kind: its size, alignment and how a value of it is read and written.

    An instance in a record's class body declares a field; the record binds a copy of it to the
    field's name and offset, and the copy is a descriptor: on the class it is the field itself
    (``Bucket.count.offset``), on a bound view it is the value (``b.count``).
    """

    size: int = 0
    align: int = 1
    name: str = ""
    offset: int = 0
    owner: str = ""

    def describe(self) -> str:
        """A canonical text of the kind (what the fingerprint hashes)."""
        raise NotImplementedError

    def get(self, mem: Memory, off: int) -> T:
        raise TypeError(f"a {self.short()} field cannot be read as a value")

    def set(self, mem: Memory, off: int, value: T) -> None:
        raise TypeError(f"a {self.short()} field cannot be assigned")

    def _bind(self: K, name: str, offset: int, owner: str) -> K:
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        bound.name, bound.offset, bound.owner = name, offset, owner
        return bound

    def short(self) -> str:
        """A short name of the kind for messages."""
        return self.describe()

    def _where(self) -> str:
        return f"{self.owner}.{self.name}" if self.name else self.short()

    @overload
    def __get__(self: K, obj: None, owner: type | None = None) -> K: ...
    @overload
    def __get__(self, obj: Record, owner: type | None = None) -> T: ...

    def __get__(self, obj: Record | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return self.get(obj._mem, obj._base + self.offset)

    def __set__(self, obj: Record, value: T) -> None:
        self.set(obj._mem, obj._base + self.offset, value)

    def __repr__(self) -> str:
        where = f" {self._where()} at {self.offset}" if self.name else ""
        return f"<{self.short()}{where}>"


class _Word(Kind[int]):
    """A 64-bit word: atomic loads and stores (Section.load64/store64), 8-aligned."""

    size = align = 8
    signed = False

    def __init__(self) -> None:
        self.lo, self.hi = (-(1 << 63), 1 << 63) if self.signed else (0, 1 << 64)

    def describe(self) -> str:
        return type(self).__name__

    def get(self, mem: Memory, off: int) -> int:
        v = mem.load64(off)
        return v - (1 << 64) if self.signed and v >> 63 else v

    def _check(self, value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{self._where()} takes an int, not {type(value).__name__}")
        if not self.lo <= value < self.hi:
            raise OverflowError(f"{value} does not fit {self._where()} ({self.describe()})")
        return value & 0xFFFFFFFFFFFFFFFF

    def set(self, mem: Memory, off: int, value: int) -> None:
        mem.store64(off, self._check(value))


class Int64(_Word):
    """A signed 64-bit integer."""

    signed = True

    if not TYPE_CHECKING:  # the fast paths of Kind.__get__/__set__ (the hot ones)
        def __get__(self, obj, owner=None):
            if obj is None:
                return self
            v = obj._mem.load64(obj._base + self.offset)
            return v - (1 << 64) if v >> 63 else v

        def __set__(self, obj, value):
            if type(value) is not int or not -(1 << 63) <= value < 1 << 63:
                self._check(value)
            obj._mem.store64(obj._base + self.offset, value & _MASK)


class UInt64(_Word):
    """An unsigned 64-bit integer (also what a ref, a hash or a magic is)."""

    if not TYPE_CHECKING:
        def __get__(self, obj, owner=None):
            if obj is None:
                return self
            return obj._mem.load64(obj._base + self.offset)

        def __set__(self, obj, value):
            if type(value) is not int or not 0 <= value < 1 << 64:
                self._check(value)
            obj._mem.store64(obj._base + self.offset, value)


class _Word32(Kind[int]):
    """A 32-bit integer, 4-aligned, little-endian. Not atomic: guard it with a mutex."""

    size = align = 4
    signed = False

    def describe(self) -> str:
        return type(self).__name__

    def get(self, mem: Memory, off: int) -> int:
        return int.from_bytes(mem.view(off, 4), "little", signed=self.signed)

    def set(self, mem: Memory, off: int, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{self._where()} takes an int, not {type(value).__name__}")
        try:
            data = value.to_bytes(4, "little", signed=self.signed)
        except OverflowError:
            raise OverflowError(f"{value} does not fit {self._where()} ({self.describe()})") \
                from None
        mem.view(off, 4)[:] = data


class Int32(_Word32):
    """A signed 32-bit integer."""

    signed = True


class UInt32(_Word32):
    """An unsigned 32-bit integer."""


class _Sized(Kind[T]):
    """``n`` bytes, 1-aligned."""

    align = 1

    def __init__(self, n: int) -> None:
        self.size = _positive(n, f"{type(self).__name__}(n)")

    def describe(self) -> str:
        return f"{type(self).__name__}({self.size})"


class Bytes(_Sized[bytes]):
    """``n`` bytes, 1-aligned. Reads give all ``n`` bytes; a write of fewer pads with NULs, a
    longer one is refused (nothing is written)."""

    def get(self, mem: Memory, off: int) -> bytes:
        return bytes(mem.view(off, self.size))

    def set(self, mem: Memory, off: int, value: bytes) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"{self._where()} takes bytes, not {type(value).__name__}")
        n = len(value)
        if n > self.size:
            raise ValueError(f"{n} bytes are too long for {self._where()} ({self.size} bytes)")
        mem.view(off, self.size)[:] = bytes(value) + bytes(self.size - n)


class Pad(_Sized[None]):
    """``n`` reserved bytes: they keep later fields where an existing layout has them."""

    def __get__(self, obj: Record | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        raise AttributeError(f"{self._where()} is padding: it has no value")


class _Sync(Kind[T]):
    """A slot of a native synchronisation object, 64-aligned; reading the field opens it."""

    align = SYNC_ALIGN
    native: Any

    def describe(self) -> str:
        return f"{type(self).__name__}({self.size})"

    def get(self, mem: Memory, off: int) -> T:
        return cast(T, self.native.open(mem, off))

    def _create(self, mem: Memory, off: int, tag: int) -> T:
        raise NotImplementedError


class Mutex(_Sync[GlobalMutex]):
    """A robust process-shared mutex slot (:class:`mcs.GlobalMutex`). Reading the field opens a
    handle (tag 0); :meth:`open` takes a tag, :meth:`create` initialises it."""

    size = _round_up(MUTEX_SIZE, SYNC_ALIGN)
    native = GlobalMutex

    def _create(self, mem: Memory, off: int, tag: int) -> GlobalMutex:
        return GlobalMutex.create(mem, off, tag=tag)

    def open(self, view: Record, *, tag: int = 0) -> GlobalMutex:
        """A handle to the mutex of ``view`` (created by someone); ``tag`` as GlobalMutex.open."""
        return GlobalMutex.open(view._mem, view._base + self.offset, tag=tag)

    def create(self, view: Record, *, tag: int = 0) -> GlobalMutex:
        """Initialise the mutex of ``view`` (never one another process may hold)."""
        return self._create(view._mem, view._base + self.offset, tag)


class Event(_Sync[GlobalEvent]):
    """A process-shared event slot (:class:`mcs.GlobalEvent`)."""

    size = _round_up(EVENT_SIZE, SYNC_ALIGN)
    native = GlobalEvent

    def _create(self, mem: Memory, off: int, tag: int) -> GlobalEvent:
        return GlobalEvent.create(mem, off)

    def create(self, view: Record) -> GlobalEvent:
        """Initialise the event of ``view``."""
        return self._create(view._mem, view._base + self.offset, 0)


class Nested(Kind[R]):
    """A record inside a record: reading the field gives the inner record's bound view."""

    def __init__(self, record: type[R]) -> None:
        if not (isinstance(record, type) and issubclass(record, Record)) or record is Record:
            raise TypeError(f"Nested() takes a Record subclass, not {record!r}")
        self.record = record
        self.size, self.align = record.SIZE, record.ALIGN

    def describe(self) -> str:
        return self.record.LAYOUT

    def short(self) -> str:
        return self.record.__name__

    def get(self, mem: Memory, off: int) -> R:
        return self.record._view(mem, off)

    if not TYPE_CHECKING:
        def __get__(self, obj, owner=None):
            if obj is None:
                return self
            view = _new(self.record)
            view._mem, view._base = obj._mem, obj._base + self.offset
            return view

    def set(self, mem: Memory, off: int, value: R) -> None:
        raise TypeError(f"{self._where()} is a record: assign its fields")


def _kind_of(kind: object) -> Kind[Any]:
    if isinstance(kind, type) and issubclass(kind, Record) and kind is not Record:
        return Nested(kind)
    if isinstance(kind, type) and issubclass(kind, Kind):
        raise TypeError(f"use an instance of the kind: {kind.__name__}(), not {kind.__name__}")
    if not isinstance(kind, Kind):
        raise TypeError(f"not a field kind: {kind!r}")
    if isinstance(kind, Pad):
        raise TypeError("an array of Pad is just a larger Pad")
    return kind


class Array(Kind["ArrayView[T]"], Generic[T]):
    """``n`` elements of a kind or a record, each at a multiple of the element's (aligned) size.
    Indexing a bound array gives an element's value (or its record view); ``a[i] = v`` writes
    a value element. Also usable on its own: ``Array(Bucket, 64).at(section, offset)``."""

    @overload
    def __init__(self: Array[R], kind: type[R], n: int) -> None: ...
    @overload
    def __init__(self: Array[T], kind: Kind[T], n: int) -> None: ...

    def __init__(self, kind: Any, n: int) -> None:
        self.n = _positive(n, "Array(kind, n)")
        self.kind: Kind[T] = _kind_of(kind)
        self.record = self.kind.record if isinstance(self.kind, Nested) else None
        self.stride = _round_up(self.kind.size, self.kind.align)
        self.size, self.align = self.stride * n, self.kind.align

    @property
    def SIZE(self) -> int:  # noqa: N802 - the same spelling as Record.SIZE
        return self.size

    def describe(self) -> str:
        return f"Array({self.kind.describe()}, {self.n})"

    def short(self) -> str:
        return f"Array({self.kind.short()}, {self.n})"

    def get(self, mem: Memory, off: int) -> ArrayView[T]:
        return ArrayView(self, mem, off)

    if not TYPE_CHECKING:
        def __get__(self, obj, owner=None):
            if obj is None:
                return self
            view = _new(ArrayView)
            view.array, view._mem, view._base = self, obj._mem, obj._base + self.offset
            return view

    def set(self, mem: Memory, off: int, value: ArrayView[T]) -> None:
        raise TypeError(f"{self._where()} is an array: assign its elements")

    def at(self, section: Memory, offset: int) -> ArrayView[T]:
        """This array bound to ``section`` at ``offset`` (must fit and be aligned)."""
        _check_place(section, offset, self.size, self.align, self.short())
        return ArrayView(self, section, offset)

    def offset_of(self, i: int, *path: str | int) -> int:
        """Offset of element ``i`` (and of ``path`` inside it) from the array's start."""
        i = _index(i, self.n, self.short())
        return i * self.stride + _path_offset(self.kind, path)


class ArrayView(Generic[T]):
    """An :class:`Array` bound to a section at an offset."""

    __slots__ = ("array", "_mem", "_base")

    def __init__(self, array: Array[T], mem: Memory, base: int) -> None:
        self.array, self._mem, self._base = array, mem, base

    def __len__(self) -> int:
        return self.array.n

    def _at(self, i: object) -> int:
        a = self.array
        if type(i) is not int or not 0 <= i < a.n:  # the fast path: a plain int in range
            _index(i, a.n, a._where())
        return self._base + cast(int, i) * a.stride

    def __getitem__(self, i: int) -> T:
        a = self.array
        if type(i) is not int or not 0 <= i < a.n:
            _index(i, a.n, a._where())
        if a.record is not None:  # an element record: its view, made here (the hot path)
            view = _new(a.record)
            view._mem, view._base = self._mem, self._base + i * a.stride
            return cast(T, view)
        return a.kind.get(self._mem, self._base + i * a.stride)

    def __setitem__(self, i: int, value: T) -> None:
        self.array.kind.set(self._mem, self._at(i), value)

    def __iter__(self) -> Iterator[T]:
        for i in range(self.array.n):
            yield self[i]

    def offset(self, i: int) -> int:
        """The section offset of element ``i``."""
        return self._at(i)

    def __repr__(self) -> str:
        return f"<{self.array.short()} at {self._base}>"


def _path_offset(kind: Kind[Any], path: tuple[str | int, ...]) -> int:
    """Offset of ``path`` (field names and array indices) from the start of ``kind``."""
    off = 0
    for step in path:
        if isinstance(kind, Nested):
            if not isinstance(step, str):
                raise TypeError(f"{kind.record.__name__}: expected a field name, got {step!r}")
            kind = kind.record._field(step)
            off += kind.offset
        elif isinstance(kind, Array):
            off += _index(step, kind.n, kind._where()) * kind.stride
            kind = kind.kind
        else:
            raise TypeError(f"{kind._where()} has no fields or elements: cannot follow {step!r}")
    return off


def _check_place(mem: Memory, offset: int, size: int, align: int, what: str) -> None:
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, not {type(offset).__name__}")
    if offset < 0 or offset % align:
        raise ValueError(f"{what} needs a {align}-aligned offset >= 0, got {offset}")
    total = getattr(mem, "size", None)
    if total is not None and offset + size > total:
        raise IndexError(f"{what} ({size} B at {offset}) runs past the section (size {total})")


class _RecordMeta(type):
    """Lays out a record class: binds each declared kind to its name and offset."""

    def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any],
                *, size: int | None = None, align: int | None = None,
                version: int = 0) -> _RecordMeta:
        ns.setdefault("__slots__", ())  # a view has no other attributes: a typo is an error
        declared = [(k, v) for k, v in ns.items() if isinstance(v, Kind)]
        for k, v in ns.items():
            if isinstance(v, type) and issubclass(v, Kind) and not k.startswith("_"):
                raise TypeError(f"{name}.{k}: use an instance of the kind ({v.__name__}())")
        cls: Any = super().__new__(mcls, name, bases, ns)
        if not any(isinstance(b, _RecordMeta) for b in bases):
            return cast(_RecordMeta, cls)  # Record itself
        # A subclass of a record extends it (as ctypes.Structure does): its fields follow.
        parents: list[Any] = [b for b in bases
                              if isinstance(b, _RecordMeta) and cast(Any, b)._FIELDS]
        if len(parents) > 1:
            raise TypeError(f"{name}: a record extends at most one record with fields")
        fields: list[Kind[Any]] = list(parents[0]._FIELDS) if parents else []
        off, natural = (parents[0].SIZE, parents[0].ALIGN) if parents else (0, 1)
        for fname, kind in declared:
            if fname.startswith("_") or fname in _RESERVED or fname.isupper():
                raise TypeError(f"{name}.{fname}: a field may not be private, upper-case or "
                                f"one of {sorted(_RESERVED)}")
            if any(f.name == fname for f in fields):
                raise TypeError(f"{name}.{fname}: declared twice")
            off = _round_up(off, kind.align)
            bound = kind._bind(fname, off, name)
            setattr(cls, fname, bound)
            fields.append(bound)
            off += kind.size
            natural = max(natural, kind.align)
        if align is not None:
            if not isinstance(align, int) or align <= 0 or align & (align - 1) or align < natural:
                raise ValueError(f"{name}: align={align!r} must be a power of two >= {natural}")
            natural = align
        total = _round_up(max(off, 1), natural)
        if size is not None:
            if not isinstance(size, int) or size < total or size % natural:
                raise ValueError(f"{name}: size={size!r} must be a multiple of {natural} "
                                 f">= {total}, what the fields need")
            total = size
        layout = "{" + "; ".join(f"{f.name}@{f.offset}:{f.describe()}" for f in fields) \
            + f"}}/{total}/{natural}" + (f"/v{version}" if version else "")
        cls._FIELDS = tuple(fields)
        cls._BY_NAME = {f.name: f for f in fields}
        cls.SIZE, cls.ALIGN, cls.LAYOUT = total, natural, layout
        cls.FINGERPRINT = _fingerprint(layout)
        return cast(_RecordMeta, cls)



# (record class, field, path) -> offset: what Record.offset_of computed already.
_OFFSETS: dict[tuple[type, str, tuple[str | int, ...]], int] = {}


class Record(metaclass=_RecordMeta):
    """Base of every record declaration (see the module docstring); an instance is a view of
    one record in a section, made by :meth:`at`."""

    __slots__ = ("_mem", "_base")
    _mem: Memory
    _base: int

    SIZE: ClassVar[int] = 0
    """Bytes of one record, rounded up to :attr:`ALIGN` (its stride in an array)."""
    ALIGN: ClassVar[int] = 1
    """The largest alignment of its fields (or the ``align=`` class keyword)."""
    LAYOUT: ClassVar[str] = ""
    """Canonical text of the layout: field names, offsets and kinds, size and alignment."""
    FINGERPRINT: ClassVar[int] = 0
    """64-bit hash of :attr:`LAYOUT`, the same in every process and build: what an area is
    stamped with and checked against (:class:`LayoutHeader`). Class names are not in it."""
    _FIELDS: ClassVar[tuple[Kind[Any], ...]] = ()
    _BY_NAME: ClassVar[dict[str, Kind[Any]]] = {}

    def __init__(self) -> None:
        raise TypeError(f"bind a record to a section with {type(self).__name__}.at(section, "
                        "offset)")

    @classmethod
    def _view(cls: type[R], mem: Memory, base: int) -> R:
        view = object.__new__(cls)
        view._mem = mem
        view._base = base
        return view

    @classmethod
    def at(cls: type[R], section: Memory, offset: int = 0) -> R:
        """A view of the record at ``offset`` of ``section`` (must fit and be aligned)."""
        if cls is Record:
            raise TypeError("Record itself has no layout: subclass it")
        _check_place(section, offset, cls.SIZE, cls.ALIGN, cls.__name__)
        return cls._view(section, offset)

    @classmethod
    def fields(cls) -> tuple[Kind[Any], ...]:
        """The bound fields in offset order (each has ``name``, ``offset``, ``size``, ``align``)."""
        return cls._FIELDS

    @classmethod
    def _field(cls, name: str) -> Kind[Any]:
        try:
            return cls._BY_NAME[name]
        except KeyError:
            raise AttributeError(f"{cls.__name__} has no field {name!r} "
                                 f"(fields: {', '.join(cls._BY_NAME)})") from None

    @classmethod
    def offset_of(cls, name: str, *path: str | int) -> int:
        """Offset from the record's start of field ``name`` and, for a record or an array
        field, of ``path`` inside it: ``Bucket.offset_of("refs", 3, "slot")``. Computed once per
        path, then remembered (a layout is fixed; the paths of one are finitely many)."""
        key = (cls, name, path)
        offset = _OFFSETS.get(key)
        if offset is None:
            field = cls._field(name)
            offset = _OFFSETS[key] = field.offset + _path_offset(field, path)
        return offset

    # -- on a bound view -------------------------------------------------------------------------

    @property
    def section(self) -> Memory:
        """The section the view is bound to."""
        return self._mem

    @property
    def base(self) -> int:
        """The section offset of the record's first byte."""
        return self._base

    def address(self, name: str, *path: str | int) -> int:
        """The section offset of a field (``offset_of`` from :attr:`base`)."""
        return self._base + self.offset_of(name, *path)

    def _word(self, name: str) -> _Word:
        field = self._field(name)
        if not isinstance(field, _Word):
            raise TypeError(f"{field._where()} is a {field.short()}, not a 64-bit word")
        return field

    def add(self, name: str, delta: int) -> int:
        """Atomically add ``delta`` to 64-bit field ``name``; the value before (as the field's
        kind reads it). Wraps modulo 2**64 like Section.add64."""
        field = self._word(name)
        old = self._mem.add64(self._base + field.offset, delta)
        return old - (1 << 64) if field.signed and old >> 63 else old

    def cas(self, name: str, expected: int, new: int) -> bool:
        """Compare-and-swap 64-bit field ``name``: store ``new`` if it holds ``expected``."""
        field = self._word(name)
        return self._mem.cas64(self._base + field.offset, field._check(expected),
                               field._check(new))

    def memory(self, name: str | None = None) -> memoryview:
        """A writable zero-copy view of field ``name`` (or of the whole record)."""
        if name is None:
            return self._mem.view(self._base, self.SIZE)
        field = self._field(name)
        return self._mem.view(self._base + field.offset, field.size)

    def create_sync(self, *, tag: int = 0) -> None:
        """Initialise every mutex and event of the record, nested ones and arrays included
        (a fresh area; never one another process may be using)."""
        _create_sync(Nested(type(self)), self._mem, self._base, tag)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} at {self._base}>"


_RESERVED = frozenset(n for n in dir(Record) if not n.startswith("__")) | {"_mem", "_base"}


def _create_sync(kind: Kind[Any], mem: Memory, off: int, tag: int) -> None:
    if isinstance(kind, _Sync):
        kind._create(mem, off, tag)
    elif isinstance(kind, Nested):
        for f in kind.record._FIELDS:
            _create_sync(f, mem, off + f.offset, tag)
    elif isinstance(kind, Array) and _has_sync(kind.kind):
        for i in range(kind.n):
            _create_sync(kind.kind, mem, off + i * kind.stride, tag)


def _has_sync(kind: Kind[Any]) -> bool:
    if isinstance(kind, _Sync):
        return True
    if isinstance(kind, Nested):
        return any(_has_sync(f) for f in kind.record._FIELDS)
    return isinstance(kind, Array) and _has_sync(kind.kind)


def define(name: str, fields: list[tuple[str, Kind[Any] | type[Record]]], *,
           size: int | None = None, align: int | None = None, version: int = 0) -> type[Record]:
    """A record class from an explicit field list (for layouts built at run time): the same as
    a class statement with the fields in this order. A Record subclass stands for Nested(it)."""
    ns: dict[str, Any] = {"__module__": __name__}
    for fname, kind in fields:
        if fname in ns:
            raise TypeError(f"{name}.{fname}: declared twice")
        ns[fname] = _kind_of(kind) if not isinstance(kind, Pad) else kind
    return cast(type[Record], _RecordMeta(name, (Record,), ns, size=size, align=align,
                                          version=version))


class Stamp(Record):
    """The default layout header: a magic word, then the layout's fingerprint."""

    magic = UInt64()
    fingerprint = UInt64()


Layout = Union[type[Record], Array[Any]]


class LayoutHeader:
    """Stamps an area with ``magic`` and the fingerprint of its layout, and checks both.

    ``header`` is the record holding the two words (fields ``magic`` and ``fingerprint``,
    64-bit), :class:`Stamp` unless an existing layout has them elsewhere. The magic is written
    last, so a half-written header never passes :meth:`check`.
    """

    def __init__(self, magic: bytes | int, layout: Layout, *,
                 header: type[Record] = Stamp) -> None:
        if isinstance(magic, bytes):
            if len(magic) != 8:
                raise ValueError(f"magic must be 8 bytes, got {magic!r}")
            magic = int.from_bytes(magic, "little")
        if not 0 < magic < 1 << 64:
            raise ValueError(f"magic must be a non-zero 64-bit word, got {magic!r}")
        for word in ("magic", "fingerprint"):
            if not isinstance(header._BY_NAME.get(word), _Word):
                raise TypeError(f"{header.__name__} has no 64-bit field {word!r}")
        self.magic, self.layout, self.header = magic, layout, header
        self.fingerprint = (layout.FINGERPRINT if isinstance(layout, type)
                            else _fingerprint(layout.describe()))
        self.name = layout.__name__ if isinstance(layout, type) else layout.short()

    def _magic_text(self, magic: int) -> str:
        raw = magic.to_bytes(8, "little")
        return repr(raw) if raw.isascii() and raw.decode().isprintable() else f"{magic:#018x}"

    def write(self, section: Memory, offset: int = 0) -> None:
        """Stamp the header at ``offset`` (fingerprint first, the magic last)."""
        h = self.header.at(section, offset)
        h.magic = 0  # type: ignore[attr-defined]
        h.fingerprint = self.fingerprint  # type: ignore[attr-defined]
        h.magic = self.magic  # type: ignore[attr-defined]

    def check(self, section: Memory, offset: int = 0) -> None:
        """Raise :class:`LayoutMismatchError` unless the area at ``offset`` was stamped by
        :meth:`write` with this magic and this layout's fingerprint."""
        h = self.header.at(section, offset)
        magic, fingerprint = h.magic, h.fingerprint  # type: ignore[attr-defined]
        if magic != self.magic:
            what = "is not initialised (magic 0)" if magic == 0 else (
                f"is not a {self._magic_text(self.magic)} area (magic {self._magic_text(magic)})")
            raise LayoutMismatchError(f"the area at offset {offset} {what}")
        if fingerprint != self.fingerprint:
            raise LayoutMismatchError(
                f"the {self._magic_text(self.magic)} area at offset {offset} was made by another "
                f"layout of {self.name} (fingerprint {fingerprint:#018x} there, "
                f"{self.fingerprint:#018x} here): every process that attaches it must run the "
                "same declaration")
