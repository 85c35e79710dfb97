"""One wording for storage failures, shared by the agent's queue and the hub's store.

The reason goes into answers to devices (HL7 MSA-3, DICOM error comments) and into logs, so it
is short, stable in its prefix and free of PHI: SQLite's and the OS's messages name the failure
("database or disk is full", "no space left on device"), never the data being written.
"""

from __future__ import annotations

__all__ = ["STORAGE_ERROR_PREFIX", "storage_error_reason"]

STORAGE_ERROR_PREFIX = "storage error: "


def storage_error_reason(exc: BaseException) -> str:
    """Short, PHI-free reason for answers and logs: "storage error: database or disk is full"."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{STORAGE_ERROR_PREFIX}{exc.strerror.lower()}"
    return f"{STORAGE_ERROR_PREFIX}{exc}"
