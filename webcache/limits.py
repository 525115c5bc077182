"""Connection limits of a node: the deadlines every connection lives under and the per-node cap.

One place defines the options (``--header-timeout``, ``--body-timeout``,
``--keepalive-timeout``, ``--send-timeout``, ``--max-connections``, ``--drain-timeout``), their
defaults, their validation and how the launcher passes them to its nodes. The policy is enforced by
webcache/fastpath.py (deadlines, on the fast path and after the hand-over to aiohttp alike) and
webcache/acceptor.py (the cap, descriptor exhaustion).
"""

from __future__ import annotations

import argparse
import enum
import math
import re
import resource
from dataclasses import dataclass, field
from typing import Any

from mcs.errors import McsError
from webcache.sealdir import SealedDirError, check_sealed_dir

__all__ = ["ConnectionLimits", "ConnectionStats", "InvalidLimit", "Expiry", "add_arguments",
           "add_native_argument", "default_max_connections", "descriptor_share", "parse_size",
           "FD_RESERVE", "MAX_TIMEOUT", "NATIVE_HITS_DEFAULT", "SEALED_COPIES_DEFAULT"]

HEADER_TIMEOUT = 10.0  # a whole request head, from its first byte (or from accept)
BODY_TIMEOUT = 10.0  # a whole request body, from the end of its head
KEEPALIVE_TIMEOUT = 75.0  # idle between requests: longer than a proxy's pool (nginx: 60 s)
SEND_TIMEOUT = 60.0  # a response the client does not read (no progress at all), as nginx
DRAIN_TIMEOUT = 5.0  # a stopping node lets responses in progress finish for this long at most
MAX_DRAIN_TIMEOUT = 3600.0
MAX_TIMEOUT = 86400.0
FD_RESERVE = 64  # descriptors never given to connections: listeners, loop, membership, ...
CONNECTIONS_CEILING = 16384  # memory, not descriptors, bounds a node beyond this
NATIVE_HITS_DEFAULT = True  # the native hit loop (webcache/native.py) unless --no-native-hits
SEALED_COPIES_DEFAULT = 32 << 20  # bytes of sealed copies per node's native loop (--sealed-copies)
SEALED_COPIES_MAX = 1 << 40

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class InvalidLimit(McsError, ValueError):
    """A connection limit given on the command line is out of range."""


class Expiry(enum.Enum):
    """Why a connection was closed by a deadline (the keys of ``ConnectionStats.timed_out``)."""

    HEADER = "header"  # a request head not complete within header_timeout: 408
    BODY = "body"  # a request body not complete within body_timeout
    IDLE = "idle"  # nothing received for keepalive_timeout between requests
    SEND = "send"  # the client read nothing of a response for send_timeout


def descriptor_share(share: float, ceiling: int, nofile: int | None = None) -> int:
    """``share`` of what RLIMIT_NOFILE (or ``nofile``) leaves after ``FD_RESERVE``, at most
    ``ceiling`` (all of it without a limit); can be 0 or less at a tiny limit."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        return ceiling
    return min(ceiling, int((nofile - FD_RESERVE) * share))


def default_max_connections(nofile: int | None = None) -> int:
    """Three quarters of what RLIMIT_NOFILE leaves after ``FD_RESERVE``: each connection can
    need a second descriptor for a moment (a file opened for a miss or a stream), and the cache,
    membership (pidfds) and the loop need their own; at most ``CONNECTIONS_CEILING``."""
    return max(1, descriptor_share(3 / 4, CONNECTIONS_CEILING, nofile))


def _timeout(name: str, value: float, *, zero: bool = False, most: float = MAX_TIMEOUT) -> float:
    """``value`` if it is a number of seconds in (0, most], or [0, most] with ``zero``."""
    if not (isinstance(value, (int, float)) and math.isfinite(value)
            and (0 <= value if zero else 0 < value) and value <= most):
        raise InvalidLimit(f"--{name} must be a number of seconds in {'[' if zero else '('}0, "
                           f"{most:.0f}], not {value!r}")
    return float(value)


@dataclass(frozen=True)
class ConnectionLimits:
    """Validated limits; ``max_connections`` None means :func:`default_max_connections`."""

    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    max_connections: int | None = None
    drain_timeout: float = DRAIN_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keepalive_timeout", "send_timeout"):
            _timeout(name.replace("_", "-"), getattr(self, name))
        _timeout("drain-timeout", self.drain_timeout, zero=True, most=MAX_DRAIN_TIMEOUT)
        cap = self.max_connections
        if cap is not None and not (isinstance(cap, int) and 1 <= cap <= 1_000_000):
            raise InvalidLimit(f"--max-connections must be an integer in 1..1000000, not {cap!r}")

    @property
    def cap(self) -> int:
        """The connection cap in force."""
        return self.max_connections if self.max_connections is not None \
            else default_max_connections()

    @property
    def sweep_interval(self) -> float:
        """How often deadlines are checked: a quarter of the shortest, within 50 ms..1 s."""
        shortest = min(self.header_timeout, self.body_timeout, self.keepalive_timeout,
                       self.send_timeout)
        return min(1.0, max(0.05, shortest / 4))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ConnectionLimits":
        return cls(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                   keepalive_timeout=args.keepalive_timeout, send_timeout=args.send_timeout,
                   max_connections=args.max_connections, drain_timeout=args.drain_timeout)

    def argv(self) -> list[str]:
        """The node options that reproduce these limits (the launcher passes them on)."""
        out = ["--header-timeout", repr(self.header_timeout), "--body-timeout",
               repr(self.body_timeout), "--keepalive-timeout", repr(self.keepalive_timeout),
               "--send-timeout", repr(self.send_timeout),
               "--drain-timeout", repr(self.drain_timeout)]
        if self.max_connections is not None:
            out += ["--max-connections", str(self.max_connections)]
        return out

    def describe(self) -> dict[str, Any]:
        return {"header_timeout": self.header_timeout, "body_timeout": self.body_timeout,
                "keepalive_timeout": self.keepalive_timeout, "send_timeout": self.send_timeout,
                "max_connections": self.cap, "drain_timeout": self.drain_timeout}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The limit options, shared by ``mcs-webcache serve/demo`` and ``python -m webcache.node``."""
    seconds = "seconds (default %(default)s)"
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT, metavar="S",
                        help="a request head must be complete within S " + seconds
                        + " of its first byte, else 408")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT, metavar="S",
                        help="a request body must be complete within S " + seconds)
    parser.add_argument("--keepalive-timeout", type=float, default=KEEPALIVE_TIMEOUT,
                        metavar="S", help="close a connection idle between requests after S "
                        + seconds)
    parser.add_argument("--send-timeout", type=float, default=SEND_TIMEOUT, metavar="S",
                        help="close a connection whose client reads nothing of a response "
                        "for S " + seconds)
    parser.add_argument("--max-connections", type=int, default=None, metavar="N",
                        help="connections per node; more are closed at once (default: 3/4 of "
                        f"RLIMIT_NOFILE minus {FD_RESERVE}, at most {CONNECTIONS_CEILING})")
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT, metavar="S",
                        help="on SIGTERM/SIGINT, a node stops taking connections, closes the "
                        "idle ones and lets the responses in progress finish for at most S "
                        + seconds + "; 0: close everything at once")


def parse_size(text: str) -> int:
    """``64M``, ``64MiB``, ``512k``, ``1G``, ``4096`` -> bytes (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise InvalidLimit(f"bad size {text!r}: use a number with an optional K/M/G/T suffix")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _sealed_copies(text: str) -> int:
    try:
        size = parse_size(text)
    except InvalidLimit as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size > SEALED_COPIES_MAX:
        raise argparse.ArgumentTypeError(f"at most {SEALED_COPIES_MAX >> 30}G")
    return size


def _sealed_dir(text: str) -> str:
    try:
        return check_sealed_dir(text)
    except SealedDirError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_native_argument(parser: argparse.ArgumentParser, check_dir: bool = True) -> None:
    """``--native-hits`` / ``--no-native-hits``, ``--sealed-copies`` and ``--sealed-dir``
    (checked here unless ``check_dir`` is false: a node falls back to memfds), shared like the
    limits (the native hit loop takes the node's connections: the limits above are enforced by
    it too)."""
    parser.add_argument("--native-hits", action=argparse.BooleanOptionalAction,
                        default=NATIVE_HITS_DEFAULT,
                        help="serve plain cache hits from a native thread, without Python "
                        "(default: %(default)s; needs the fast path)")
    parser.add_argument("--sealed-copies", type=_sealed_copies, default=SEALED_COPIES_DEFAULT,
                        metavar="SIZE",
                        help="memory per node for sealed copies of hot large bodies, which the "
                        "native loop sends without copying (default 32M; 0: none)")
    parser.add_argument("--sealed-dir", type=_sealed_dir if check_dir else str, default=None,
                        metavar="DIR",
                        help="keep sealed copies as unnamed read-only files in DIR's page cache "
                        "instead of sealed memfds (default: memfds); on ext4 (Linux >= 6.16) "
                        "or XFS, large bodies are then sent in large folios, as nginx sends "
                        "files; the filesystem writes them back to its disk")


@dataclass
class ConnectionStats:
    """Counters of one node's connections (``connections`` in /_mcs/status and /metrics)."""

    accepted: int = 0  # connections taken into service
    refused_at_cap: int = 0  # closed at once: max_connections were open
    accept_errors: int = 0  # accept() failures (EMFILE, ENFILE, ENOBUFS, ...)
    shed: int = 0  # connections closed unserved with the reserve descriptor at EMFILE/ENFILE
    version_refused: int = 0  # 505: a request line of an HTTP version other than 1.x
    timed_out: dict[str, int] = field(default_factory=lambda: {e.value: 0 for e in Expiry})
