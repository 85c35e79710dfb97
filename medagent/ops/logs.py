"""Logging setup, the in-memory log ring buffer behind `agent:logs:request` / `$fetch-logs`, the
main log file in the data directory (text or JSON lines, rotated), and a rate limiter for log
lines that outsiders can trigger.

The main log (`<data_dir>/medagent.log`, :class:`PrivateRotatingFileHandler`) is created 0600 and
every rotated generation stays 0600 whatever the umask; it rotates at `LOG_MAX_BYTES` keeping
`LOG_BACKUPS` generations (medagent.log.1 ... .5), so the data directory's use by logs is
bounded. With JSON lines each record is one object `{timestamp, level, logger, msg}` (plus
`exc` with the exception's type and text), the same shape `$fetch-logs` returns.

Invariant: nothing here formats message bodies. Code that logs PHI must check `log_phi` itself;
these handlers only keep and forward what was logged. The ring buffer is bounded (default
1000 records, Medplum's maximum for one logs request), so memory stays flat in a long run.

`RateLimitedLog` exists because an unauthenticated client can make the hub log at will (a bad
HTTP request, a refused token request): a fuzzer wrote 18.6 MB of tracebacks per minute into
hub.log (issue 18, defect 4). Per *kind* of event it writes the first line, then at most one
line per `interval_s`, and that line says how many similar ones were suppressed in between.
"""

from __future__ import annotations

import collections
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_LOG_LIMIT", "LOG_FILENAME", "LOG_RING", "MAX_LOG_LIMIT", "JsonLinesFormatter", "LogRing",
           "PrivateRotatingFileHandler", "RateLimitedLog", "add_file_log", "setup_logging"]

DEFAULT_LOG_LIMIT = 20
MAX_LOG_LIMIT = 1000
LOG_FILENAME = "medagent.log"
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _entry(record: logging.LogRecord) -> dict[str, Any]:
    """A record as Medplum's log entry ``{level, msg, timestamp}`` plus the logger's name."""
    return {
        "level": record.levelname,
        "msg": record.getMessage(),
        "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "logger": record.name,
    }


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line; an exception adds ``exc`` (type and text, no traceback frames)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = _entry(record)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["exc"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(entry, ensure_ascii=False)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log whose every generation is 0600 (DESIGN: log files 0600, any umask)."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # an existing file created under a looser umask is tightened
        return os.fdopen(fd, self.mode.replace("w", "a"), encoding=self.encoding, errors=self.errors)


class LogRing(logging.Handler):
    """Keeps the last `capacity` records as Medplum-shaped dicts: {level, msg, timestamp, logger}."""

    def __init__(self, capacity: int = MAX_LOG_LIMIT) -> None:
        super().__init__(level=logging.DEBUG)
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        entry = _entry(record)
        with self._guard:
            self._records.append(entry)

    def tail(self, limit: int = DEFAULT_LOG_LIMIT) -> list[dict[str, Any]]:
        limit = max(1, min(int(limit), MAX_LOG_LIMIT))
        with self._guard:
            return list(self._records)[-limit:]


LOG_RING = LogRing()


class RateLimitedLog:
    """At most one line per ``interval_s`` per kind, each carrying the count suppressed before it.

    Thread-safe. At most ``max_kinds`` kinds are tracked (callers use a few fixed kinds; the
    bound only protects against a caller that puts outside text into the kind).
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, max_kinds: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._max_kinds = max_kinds
        self._clock = clock
        self._guard = threading.Lock()
        #: kind -> (time of the last line written, lines suppressed since)
        self._kinds: dict[str, tuple[float, int]] = {}

    def log(self, level: int, kind: str, msg: str, *args: Any, exc_info: BaseException | None = None) -> bool:
        """Write ``msg % args`` unless this kind wrote within ``interval_s``; True if written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        with self._guard:
            last, suppressed = self._kinds.get(kind, (None, 0))
            if last is not None and now - last < self.interval_s:
                self._kinds[kind] = (last, suppressed + 1)
                return False
            if kind not in self._kinds and len(self._kinds) >= self._max_kinds:
                self._kinds.pop(next(iter(self._kinds)))
            self._kinds[kind] = (now, 0)
        if suppressed:
            msg += " (%d similar suppressed in the last %.0f s)"
            args = (*args, suppressed, now - last if last is not None else 0.0)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, kind: str, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, kind, msg, *args)

    def info(self, kind: str, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, kind, msg, *args)

    def error(self, kind: str, msg: str, *args: Any) -> bool:
        return self.log(logging.ERROR, kind, msg, *args)


def setup_logging(level: str = "INFO") -> None:
    """Console logging for the CLI plus the ring buffer; idempotent."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(isinstance(h, LogRing) for h in root.handlers):
        root.addHandler(LOG_RING)
    if not any(getattr(h, "_medagent_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(TEXT_FORMAT))
        console._medagent_console = True  # type: ignore[attr-defined]
        root.addHandler(console)


def add_file_log(data_dir: Path, json_lines: bool = False, max_bytes: int = LOG_MAX_BYTES,
                 backups: int = LOG_BACKUPS) -> logging.Handler:
    """Attach the main log file in ``data_dir`` to the root logger; the caller removes it with
    ``logging.getLogger().removeHandler(handler); handler.close()``."""
    handler = PrivateRotatingFileHandler(Path(data_dir) / LOG_FILENAME, maxBytes=max_bytes, backupCount=backups,
                                         encoding="utf-8")
    handler.setFormatter(JsonLinesFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler
