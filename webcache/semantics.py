"""HTTP semantics of static files (RFC 9110): media types, validators, conditionals, ranges.

Pure functions, no I/O. ``headers`` arguments are mappings with case-insensitive keys (aiohttp's
``request.headers``); a plain ``dict`` works when its keys are spelled as below.

The order a handler applies them in (RFC 9110 §13.2.2), for GET and HEAD:

1. :func:`precondition_failed` → 412 (If-Match, else If-Unmodified-Since);
2. :func:`is_not_modified` → 304 (If-None-Match, else If-Modified-Since);
3. if there is a Range and :func:`if_range_ok`: :func:`parse_range` → 206, or 416 on
   :class:`RangeNotSatisfiable`; otherwise 200 with the whole body.

Multi-range requests (``bytes=0-1,5-6``) are answered with the whole body (200), as RFC 9110
§14.2 allows: a server MAY ignore Range. Invalid headers are ignored, never an error: a bad
If-None-Match or If-Modified-Since gives a full response, a bad Range gives 200, a bad If-Range
gives 200 (never a 206 built on a validator we could not check).
"""

from __future__ import annotations

import calendar
import datetime
import functools
import mimetypes
import re
import time
from collections.abc import Mapping
from email.utils import formatdate

from mcs.errors import McsError

__all__ = ["RangeNotSatisfiable", "content_type", "content_types", "etag", "http_date",
           "file_headers", "parse_http_date",
           "parse_etags", "is_not_modified", "precondition_failed", "if_range_ok", "parse_range",
           "MAX_RANGE_DIGITS"]

NS = 1_000_000_000
MAX_HTTP_SECONDS = 253402300799  # 9999-12-31T23:59:59Z: the last date with a 4-digit year
MAX_RANGE_DIGITS = 19  # larger positions exceed every file size: treated as "infinity"
_HUGE = 1 << 64
_U64 = (1 << 64) - 1
_OWS = " \t"
# Memo sizes: distinct extensions a site serves are a few dozen; distinct Last-Modified seconds
# are one per file at most, so 4096 covers the hot set of a cache-sized site.
_EXTENSIONS_MEMO = 512
_DATES_MEMO = 4096


class RangeNotSatisfiable(McsError):
    """A valid Range selecting no byte of a file of ``size`` bytes: answer 416 with
    ``Content-Range: bytes */size`` (:attr:`content_range`)."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for a {size}-byte file")
        self.size = size

    @property
    def content_range(self) -> str:
        """The Content-Range value of the 416 response."""
        return f"bytes */{self.size}"


# -- media types --------------------------------------------------------------------------

# Only the built-in table (``MimeTypes()`` does not read /etc/mime.types): the same answers on
# every machine. Modern web types are pinned below; ``.js`` follows RFC 9239 (text/javascript).
_DB = mimetypes.MimeTypes()
_OVERRIDES = {
    ".js": "text/javascript", ".mjs": "text/javascript", ".cjs": "text/javascript",
    ".json": "application/json", ".map": "application/json",
    ".jsonld": "application/ld+json", ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm", ".svg": "image/svg+xml", ".webp": "image/webp",
    ".avif": "image/avif", ".ico": "image/vnd.microsoft.icon",
    ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf", ".otf": "font/otf",
    ".md": "text/markdown", ".flac": "audio/flac",
}
# Compressed files are sent as they are (no Content-Encoding), so their type is the container's:
# ``a.tar.gz`` is application/gzip, never application/x-tar.
_COMPRESSED = {
    ".gz": "application/gzip", ".tgz": "application/gzip", ".svgz": "application/gzip",
    ".bz2": "application/x-bzip2", ".tbz2": "application/x-bzip2",
    ".xz": "application/x-xz", ".txz": "application/x-xz", ".zst": "application/zstd",
    ".z": "application/x-compress", ".taz": "application/x-compress",
    ".tz": "application/x-compress", ".br": "application/octet-stream",
}
_TEXTUAL = frozenset({"application/javascript", "application/json", "application/xml"})


def _is_textual(ctype: str) -> bool:
    return (ctype.startswith("text/") or ctype in _TEXTUAL
            or ctype.endswith("+json") or ctype.endswith("+xml"))


@functools.lru_cache(maxsize=_EXTENSIONS_MEMO)
def _type_of_extension(ext: str) -> str:
    ctype = (_COMPRESSED.get(ext) or _OVERRIDES.get(ext) or _DB.types_map[True].get(ext)
             or _DB.types_map[False].get(ext))
    if ctype is None:
        return "application/octet-stream"
    return f"{ctype}; charset=utf-8" if _is_textual(ctype) else ctype


def content_types() -> dict[str, str]:
    """Every extension (lowercase, with its dot) that has a type of its own, with the
    Content-Type :func:`content_type` gives it; any other extension gets
    ``application/octet-stream``. The native hit loop's table (webcache.native)."""
    known = (*_COMPRESSED, *_OVERRIDES, *_DB.types_map[True], *_DB.types_map[False])
    return {ext: _type_of_extension(ext) for ext in sorted(set(known)) if ext == ext.lower()}


def content_type(path: str) -> str:
    """The Content-Type for a file name, by its last extension (case-insensitive).

    Textual types (text/*, JavaScript, JSON, XML, ``+json``, ``+xml``) get ``; charset=utf-8``;
    unknown extensions, and names without one, get ``application/octet-stream``.
    """
    name = path.rpartition("/")[2]
    dot = name.rfind(".")
    if dot <= 0:  # no extension, or a dotfile name such as ".profile"
        return "application/octet-stream"
    return _type_of_extension(name[dot:].lower())


# -- validators -----------------------------------------------------------------------------

def etag(size: int, mtime_ns: int, inode: int, ctime_ns: int) -> str:
    """A strong ETag ``"<size>-<mtime_ns>-<inode>-<ctime_ns>"`` (lowercase hex, quoted).

    It changes whenever the file's size, modification time (to the nanosecond), inode or
    change time changes. ctime is in it because ``utime`` can put an mtime back after an
    in-place rewrite while the kernel moves ctime on every write, and user space cannot set
    it: a client holding the old tag gets the new bytes, never a 304 for stale ones. (A
    metadata-only change such as chmod also moves ctime: one extra full response, never a
    wrong one.) Negative (pre-1970) times are taken modulo 2**64 so the tag stays unambiguous.
    """
    return f'"{size:x}-{mtime_ns & _U64:x}-{inode:x}-{ctime_ns & _U64:x}"'


@functools.lru_cache(maxsize=_DATES_MEMO)
def _format_seconds(seconds: int) -> str:
    return formatdate(seconds, usegmt=True)


def http_date(mtime_ns: int) -> str:
    """IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``) of a time in ns since the epoch.

    Truncated to the second (floor); clamped to 1970..9999 so it is always a valid HTTP-date.
    RFC 9110 §8.8.2.1: a caller must not send a Last-Modified later than now — pass
    ``min(mtime_ns, time.time_ns())`` for files with a future mtime.
    """
    return _format_seconds(min(max(mtime_ns // NS, 0), MAX_HTTP_SECONDS))


def file_headers(path: str, size: int, mtime_ns: int, inode: int, ctime_ns: int, *,
                 now_ns: int | None = None) -> dict[str, str]:
    """The headers every answer about a file carries: ETag, Last-Modified (never later than
    ``now_ns``, default now), Content-Type, Accept-Ranges."""
    now = time.time_ns() if now_ns is None else now_ns
    return {"ETag": etag(size, mtime_ns, inode, ctime_ns), "Last-Modified": http_date(min(mtime_ns, now)),
            "Content-Type": content_type(path), "Accept-Ranges": "bytes"}


_DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = "(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MON = "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_FIXDATE = re.compile(f"{_DAY}, ([0-9]{{2}}) {_MON} ([0-9]{{4}}) {_TIME} GMT")
_RFC850 = re.compile(f"{_LONG_DAY}, ([0-9]{{2}})-{_MON}-([0-9]{{2}}) {_TIME} GMT")
_ASCTIME = re.compile(f"{_DAY} {_MON} ( [0-9]|[0-9]{{2}}) {_TIME} ([0-9]{{4}})")
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def parse_http_date(value: str | None) -> int | None:
    """Seconds since the epoch of an HTTP-date (RFC 9110 §5.6.7), or None if it is not one.

    All three formats are accepted, case-sensitively as the grammar says: IMF-fixdate,
    the obsolete RFC 850 form (a two-digit year more than 50 years ahead is taken in the
    past century) and asctime. The day name is not cross-checked (as in nginx); impossible
    dates (Feb 30, 25:00:00) are refused; a leap second (:60) is accepted.
    """
    if value is None:
        return None
    value = value.strip(_OWS)
    if m := _IMF_FIXDATE.fullmatch(value):
        day, mon, year, hh, mm, ss = m.groups()
    elif m := _ASCTIME.fullmatch(value):
        mon, day, hh, mm, ss, year = m.groups()
    elif m := _RFC850.fullmatch(value):
        day, mon, yy, hh, mm, ss = m.groups()
        this_year = time.gmtime().tm_year
        year_n = this_year - this_year % 100 + int(yy)
        if year_n > this_year + 50:
            year_n -= 100
        year = str(year_n)
    else:
        return None
    fields = (int(year), _MONTHS[mon], int(day), int(hh), int(mm), int(ss))
    try:
        datetime.datetime(*fields[:5], min(fields[5], 59))
    except ValueError:
        return None
    if fields[5] > 60:
        return None
    return calendar.timegm(fields)


# -- entity tags ----------------------------------------------------------------------------

# entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; etagc excludes DQUOTE, controls and space.
_ENTITY_TAG = re.compile('(W/)?("[^"\x00-\x20\x7f]*")')


def parse_etags(value: str) -> list[tuple[bool, str]] | None:
    """A comma-separated list of entity tags as ``(weak, opaque_tag)`` pairs (the opaque tag
    keeps its quotes), or None if malformed. Empty list elements are allowed (RFC 9110 §5.6.1);
    a comma inside a quoted tag is part of it."""
    tags: list[tuple[bool, str]] = []
    pos, end = 0, len(value)
    while True:
        while pos < end and value[pos] in " \t,":
            pos += 1
        if pos == end:
            return tags
        m = _ENTITY_TAG.match(value, pos)
        if m is None:
            return None
        tags.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
        while pos < end and value[pos] in _OWS:
            pos += 1
        if pos < end and value[pos] != ",":
            return None


def _split_tag(tag: str) -> tuple[bool, str]:
    return (True, tag[2:]) if tag.startswith("W/") else (False, tag)


def _any_match(value: str, tag: str, *, strong: bool) -> bool:
    """Whether ``value`` (an If-Match/If-None-Match list) matches ``tag``; ``*`` matches all."""
    if value.strip(_OWS) == "*":
        return True
    tags = parse_etags(value)
    if not tags:
        return False
    weak, opaque = _split_tag(tag)
    if strong:
        return not weak and (False, opaque) in tags
    return any(o == opaque for _, o in tags)


# -- conditional requests ------------------------------------------------------------------

def _now_s(now: float | None) -> float:
    return time.time() if now is None else now


def is_not_modified(headers: Mapping[str, str], etag: str, mtime_ns: int, *,
                    now: float | None = None) -> bool:
    """Whether a GET/HEAD is answered 304 Not Modified (RFC 9110 §13.1.2, §13.1.3).

    If-None-Match, when present, decides alone: true when one of its tags matches ``etag`` by
    weak comparison, or it is ``*`` (the file exists); a malformed list matches nothing.
    Otherwise If-Modified-Since: true when the file's mtime, to the second, is not after the
    date. An invalid date, or one later than ``now`` (seconds; default the clock: a client
    whose clock runs ahead must not get 304 for later changes), is ignored.
    """
    inm = headers.get("If-None-Match")
    if inm is not None:
        return _any_match(inm, etag, strong=False)
    since = parse_http_date(headers.get("If-Modified-Since"))
    if since is None or since > _now_s(now):
        return False
    return mtime_ns // NS <= since


def precondition_failed(headers: Mapping[str, str], etag: str, mtime_ns: int) -> bool:
    """Whether the request is answered 412 Precondition Failed (RFC 9110 §13.1.1, §13.1.4).

    If-Match, when present, decides alone: it fails unless ``*`` or one of its tags matches
    ``etag`` by strong comparison (a malformed list fails). Otherwise If-Unmodified-Since
    fails when the file's mtime, to the second, is after the date; an invalid date is ignored.
    """
    im = headers.get("If-Match")
    if im is not None:
        return not _any_match(im, etag, strong=True)
    since = parse_http_date(headers.get("If-Unmodified-Since"))
    return since is not None and mtime_ns // NS > since


def if_range_ok(headers: Mapping[str, str], etag: str, mtime_ns: int, *,
                now: float | None = None) -> bool:
    """Whether a Range may be honoured with respect to If-Range (RFC 9110 §13.1.5).

    True when there is no If-Range. An entity tag must equal ``etag`` by strong comparison (a
    weak one never matches). A date must equal the file's mtime to the second, and that second
    must be over (before ``now``): a Last-Modified of the current second is a weak validator,
    as the file may change again within it. Anything else (malformed) → False: send 200.
    """
    value = headers.get("If-Range")
    if value is None:
        return True
    value = value.strip(_OWS)
    if value.startswith('"') or value.startswith("W/"):
        m = _ENTITY_TAG.fullmatch(value)
        if m is None or m.group(1) is not None:
            return False
        weak, opaque = _split_tag(etag)
        return not weak and m.group(2) == opaque
    date = parse_http_date(value)
    mtime_s = mtime_ns // NS
    return date is not None and date == mtime_s and mtime_s + 1 <= _now_s(now)


# -- ranges ----------------------------------------------------------------------------------

_RANGE_SPEC = re.compile("([0-9]*)-([0-9]*)")  # ASCII digits only (str.isdigit takes "²")


def _position(digits: str) -> int:
    """The value of a run of ASCII digits; above MAX_RANGE_DIGITS digits, 2**64 (larger than
    any file) without ever converting a huge number."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= MAX_RANGE_DIGITS else _HUGE


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """The byte range ``[start, stop)`` a Range header selects in a file of ``size`` bytes.

    Forms (RFC 9110 §14.1.2): ``bytes=a-b`` (b clamped to size-1), ``bytes=a-``, ``bytes=-n``
    (the last n bytes; the whole file when n > size). The unit is case-insensitive. Returns
    None — serve the whole file with 200 — when there is no header, it is malformed (an unknown
    unit, b < a, junk) or it asks for several ranges. Raises :class:`RangeNotSatisfiable`
    (416) when it is valid but selects nothing: a >= size, ``-0``, or any range of an empty file.
    """
    if value is None:
        return None
    unit, eq, ranges = value.partition("=")
    if not eq or unit.strip(_OWS).lower() != "bytes":
        return None
    specs = [s for s in (part.strip(_OWS) for part in ranges.split(",")) if s]
    if len(specs) != 1:
        return None  # none (invalid), or several: the whole body
    m = _RANGE_SPEC.fullmatch(specs[0])
    if m is None:
        return None
    first, last = m.groups()
    if not first:
        if not last:
            return None  # "bytes=-"
        n = _position(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - n), size
    start = _position(first)
    stop = size
    if last:
        end = _position(last)
        if end < start:
            return None  # invalid: ignore the header
        stop = min(end + 1, size)
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, stop
