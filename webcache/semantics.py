"""HTTP semantics for static files (RFC 9110): types, validators, conditionals, ranges."""

from __future__ import annotations

import mimetypes
from email.utils import formatdate, parsedate_to_datetime
from typing import Mapping

from mcs.errors import McsError

__all__ = ["RangeNotSatisfiable", "content_type", "etag", "http_date", "parse_http_date",
           "is_not_modified", "parse_range", "if_range_ok"]

_TEXTUAL = ("application/javascript", "application/json", "application/xml", "image/svg+xml")


class RangeNotSatisfiable(McsError):
    """A syntactically valid Range that selects no byte of the file (416)."""


def content_type(path: str) -> str:
    ctype, _ = mimetypes.guess_type(path)
    if ctype is None:
        return "application/octet-stream"
    if ctype.startswith("text/") or ctype in _TEXTUAL:
        return f"{ctype}; charset=utf-8"
    return ctype


def etag(size: int, mtime_ns: int, inode: int) -> str:
    """A strong validator: changes when the file's size, mtime or inode change."""
    return f'"{inode:x}-{mtime_ns:x}-{size:x}"'


def http_date(mtime_ns: int) -> str:
    return formatdate(mtime_ns / 1e9, usegmt=True)


def parse_http_date(value: str) -> int | None:
    try:
        return int(parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _etag_list(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _weak_equal(a: str, b: str) -> bool:
    return a.removeprefix("W/") == b.removeprefix("W/")


def is_not_modified(headers: Mapping[str, str], tag: str, mtime_ns: int) -> bool:
    """304 for GET/HEAD: If-None-Match (weak comparison) wins over If-Modified-Since."""
    inm = headers.get("If-None-Match")
    if inm is not None:
        tags = _etag_list(inm)
        return "*" in tags or any(_weak_equal(t, tag) for t in tags)
    ims = headers.get("If-Modified-Since")
    if ims is not None:
        since = parse_http_date(ims)
        return since is not None and mtime_ns // 1_000_000_000 <= since
    return False


def if_range_ok(headers: Mapping[str, str], tag: str, mtime_ns: int) -> bool:
    """True if a Range may be honoured: no If-Range, or it matches (strong etag or exact date)."""
    value = headers.get("If-Range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"'):
        return value == tag
    date = parse_http_date(value)
    return date is not None and date == mtime_ns // 1_000_000_000


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """(start, stop) of a single satisfiable byte range; None to serve the whole file (no
    Range, a malformed one, or several ranges); RangeNotSatisfiable for a 416."""
    if value is None:
        return None
    unit, sep, spec = value.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if len(first) > 19 or len(last) > 19 or (not first and not last):
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"bytes */{size}")
        return max(0, size - n), size
    start = int(first)
    stop = size if not last else int(last) + 1
    if last and stop <= start:
        return None  # last < first: invalid, ignore the header
    if start >= size:
        raise RangeNotSatisfiable(f"bytes */{size}")
    return start, min(stop, size)
