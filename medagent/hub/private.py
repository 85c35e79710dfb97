"""Private files of the hub: the data directory 0700, every database, log and key file 0600.

Theory of operation
-------------------
The umask only removes permission bits, so a file created with ``os.open(..., 0o600)`` can never
be wider than 0600; a directory made with ``mkdir(mode=0o700)`` likewise. What the umask cannot
fix is a path that already exists with wider bits (created by an older medagent, by a parent
process, or by hand): those are narrowed with ``chmod`` and the change is logged once, because
patient data (message bodies) lives in the database and its WAL (issue 18, defect 2).

SQLite creates ``-wal`` and ``-shm`` with the mode of the main database file (it copies the
database's permission bits, whatever the umask: checked with umask 022), so pre-creating
``hub.sqlite3`` 0600 makes its companions 0600 too; existing companions are narrowed as well.

Invariant: after :func:`private_dir` / :func:`private_file` the path has no group or other bits.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["private_dir", "private_file", "narrow", "DIR_MODE", "FILE_MODE"]

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def narrow(path: Path, mode: int) -> None:
    """Drop the group/other bits of an existing ``path`` (owner bits set to ``mode``'s)."""
    try:
        current = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if current & 0o077:
        os.chmod(path, mode)
        log.warning("%s was mode %04o; narrowed to %04o (patient data must not be readable by others)",
                    path, current, mode)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as 0700, or narrow an existing one to 0700."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    narrow(path, DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty as 0600 if missing, else narrow it to 0600."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        narrow(path, FILE_MODE)
    else:
        os.close(fd)
    return path
