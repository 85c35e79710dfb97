"""One wording for storage failures, shared by the agent's queue and the hub's store.

The reason goes into answers to devices (HL7 MSA-3, DICOM error comments) and into logs, so it
is short, stable in its prefix and free of PHI: SQLite's and the OS's messages name the failure
("database or disk is full", "No space left on device"), never the data being written.
"""

from __future__ import annotations

import errno
import sqlite3

__all__ = ["STORAGE_ERROR_PREFIX", "storage_error_reason", "is_out_of_space"]

STORAGE_ERROR_PREFIX = "storage error: "

# sqlite3 exposes extended result codes on errors (Python >= 3.11): SQLITE_FULL is 13.
_SQLITE_FULL = 13


def storage_error_reason(exc: BaseException) -> str:
    """Short, PHI-free reason for answers and logs: "storage error: database or disk is full"."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{STORAGE_ERROR_PREFIX}{exc.strerror.lower()}"
    return f"{STORAGE_ERROR_PREFIX}{exc}"


def is_out_of_space(exc: BaseException) -> bool:
    """True for "disk full" failures (SQLITE_FULL, ENOSPC, EDQUOT), following ``__cause__``."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:  # bounded: cause chains are short
        if isinstance(current, sqlite3.Error) and (getattr(current, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_FULL:
            return True
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__
        seen += 1
    return False
