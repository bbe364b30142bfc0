"""Log rate limiting: one line per interval for messages a client or an outage
can repeat without end.

What it is for: :class:`RateLimitFilter`, attached to a logger whose records
can come once per request (aiohttp's parse errors, 502/504 lines while the
backend is down, OTLP export failures while the collector is down). The
first record goes through, the next ones within the interval are counted and
the count rides on the next record let through, so the log keeps its signal
and a flood cannot fill a disk or block the loop on a slow log sink.

Not for: choosing levels or handlers (each program's ``cli``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp.http_exceptions import HttpProcessingError


class RateLimitFilter(logging.Filter):
    """Let one selected record through per ``interval_s``; count the rest.

    Subclasses choose which records are limited (:meth:`selects`, default
    WARNING and worse) and how the one let through reports the others
    (:meth:`summarise`). ``clock`` is injectable for tests.
    """

    def __init__(self, interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._next_ok = float("-inf")
        self._suppressed = 0

    def selects(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING

    def summarise(self, record: logging.LogRecord, suppressed: int) -> None:
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar messages suppressed)"

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.selects(record):
            return True
        now = self._clock()
        if now < self._next_ok:
            self._suppressed += 1
            return False
        self.summarise(record, self._suppressed)
        self._suppressed = 0
        self._next_ok = now + self._interval_s
        return True


class BadRequestLogFilter(RateLimitFilter):
    """aiohttp's per-request parse-error tracebacks as a periodic count: any
    client could otherwise flood the log of an aiohttp server (the gateway's
    and the viewer's alike) with one traceback per malformed request."""

    def selects(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return isinstance(exc, HttpProcessingError)

    def summarise(self, record: logging.LogRecord, suppressed: int) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = "rejected %d malformed request(s) with 400 (last: %s)"
        record.args = (suppressed + 1, str(exc).splitlines()[0][:200])
        record.exc_info = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
