"""Rate-limited logging: at most one line per interval for each kind of message.

A client (or a descriptor shortage) can make the same warning fire thousands of times a second:
a red team got 1.9 M "socket.accept() out of system resource" lines (807 MB) in 100 s. This
filter, installed on a node's log handlers, lets the first record of a kind through, drops the
repeats for ``interval`` seconds, and appends to the next record of that kind how many it
dropped. A kind is the logger, the message template and the exception's type and errno.
"""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitFilter", "install"]

INTERVAL = 10.0
_KINDS_MAX = 1024


class RateLimitFilter(logging.Filter):
    """Passes one record per kind per ``interval``; counts the others."""

    def __init__(self, interval: float = INTERVAL) -> None:
        super().__init__()
        self.interval = interval
        self._kinds: dict[tuple, list] = {}  # kind -> [time of the last line, dropped since]

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        kind = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg),
                type(exc), getattr(exc, "errno", None))
        now = time.monotonic()
        state = self._kinds.get(kind)
        if state is not None and now - state[0] < self.interval:
            state[1] += 1
            return False
        if len(self._kinds) >= _KINDS_MAX:
            self._kinds.clear()
        dropped = state[1] if state is not None else 0
        self._kinds[kind] = [now, 0]
        if dropped:
            note = f" [{dropped} similar message(s) suppressed]"
            record.msg = f"{record.getMessage()}{note}"
            record.args = None
        return True


def install(interval: float = INTERVAL) -> RateLimitFilter:
    """Put one filter on every handler of the root logger (call after ``basicConfig``)."""
    limiter = RateLimitFilter(interval)
    for handler in logging.getLogger().handlers:
        handler.addFilter(limiter)
    return limiter
