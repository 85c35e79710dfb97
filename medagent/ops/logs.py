"""Logging setup and the in-memory log ring buffer behind `agent:logs:request` / `$fetch-logs`.

Invariant: nothing here formats message bodies. Code that logs PHI must check `log_phi` itself;
these handlers only keep and forward what was logged. The ring buffer is bounded (default
1000 records, Medplum's maximum for one logs request), so memory stays flat in a long run.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from datetime import datetime, timezone
from typing import Any

__all__ = ["LogRing", "setup_logging", "LOG_RING", "MAX_LOG_LIMIT", "DEFAULT_LOG_LIMIT"]

DEFAULT_LOG_LIMIT = 20
MAX_LOG_LIMIT = 1000


class LogRing(logging.Handler):
    """Keeps the last `capacity` records as Medplum-shaped dicts: {level, msg, timestamp, logger}."""

    def __init__(self, capacity: int = MAX_LOG_LIMIT) -> None:
        super().__init__(level=logging.DEBUG)
        self._records: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        entry = {
            "level": record.levelname,
            "msg": record.getMessage(),
            "timestamp": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "logger": record.name,
        }
        with self._guard:
            self._records.append(entry)

    def tail(self, limit: int = DEFAULT_LOG_LIMIT) -> list[dict[str, Any]]:
        limit = max(1, min(int(limit), MAX_LOG_LIMIT))
        with self._guard:
            return list(self._records)[-limit:]


LOG_RING = LogRing()


def setup_logging(level: str = "INFO") -> None:
    """Console logging for the CLI plus the ring buffer; idempotent."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    if not any(isinstance(h, LogRing) for h in root.handlers):
        root.addHandler(LOG_RING)
    if not any(getattr(h, "_medagent_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        console._medagent_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
