"""What the hub's HTTP server logs about requests that fail: one short line, rate-limited.

Theory of operation
-------------------
aiohttp's request handler reports a request it could not parse (a 9,000-byte header, a bad
request line, a bad chunk) and an exception escaping a route handler through
``logger.exception("Error handling request from %s", remote, exc_info=exc)`` — a full traceback
each time, which an unauthenticated client can trigger at will (issue 18, defect 4: 18.6 MB of
``hub.log`` per minute under a fuzzer). :class:`HttpErrorLog` is handed to aiohttp as that
logger (``AppRunner(..., logger=...)``) and writes instead:

* a client error (``HttpProcessingError``: the client's fault, answered 4xx by aiohttp) as ONE
  line without traceback — ``HTTP 400 from 10.0.0.9: LineTooLong: Got more than 8190 bytes when
  reading`` (the reason up to the first quote, at most 120 characters: what aiohttp quotes is the
  request's own content, which is never logged);
* any other exception (a defect of the hub, answered 500) with its traceback, because that is
  what a developer needs;

both through :class:`medagent.ops.logs.RateLimitedLog`, one line per kind (exception class) per
``interval_s``, with the count of suppressed ones on the next line. Debug messages pass through
unchanged without tracebacks.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from medagent.ops.logs import RateLimitedLog

__all__ = ["REASON_MAX_CHARS", "HttpErrorLog"]

REASON_MAX_CHARS = 120


class HttpErrorLog:
    """A stand-in for aiohttp's ``aiohttp.server`` logger (``debug`` and ``exception``)."""

    def __init__(self, logger: logging.Logger | None = None, interval_s: float = 60.0) -> None:
        self.logger = logger or logging.getLogger("medagent.hub.http")
        self._limited = RateLimitedLog(self.logger, interval_s)

    def debug(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        self.logger.debug(msg, *args)

    def exception(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        remote = str(args[0]) if args and "%s" in msg else "unknown"
        if isinstance(exc_info, HttpProcessingError):
            reason = _reason(str(exc_info.message or ""))
            self._limited.warning(
                f"client:{type(exc_info).__name__}", "HTTP %d from %s: %s: %s",
                exc_info.code or 400, remote, type(exc_info).__name__, reason or "bad request",
            )
            return
        error = exc_info if isinstance(exc_info, BaseException) else None
        self._limited.log(logging.ERROR, f"server:{type(error).__name__}", "HTTP 500 for a request from %s",
                          remote, exc_info=error)

    # aiohttp only calls debug/exception; these keep the object usable as a logger elsewhere
    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(level)


def _reason(message: str) -> str:
    """aiohttp's reason without what it quotes of the request (``...reading: b'aaaa…'``)."""
    cut = min((i for i in (message.find("'"), message.find('"')) if i >= 0), default=len(message))
    head = message[:cut].rstrip(" :b")
    return " ".join(head.split())[:REASON_MAX_CHARS]
