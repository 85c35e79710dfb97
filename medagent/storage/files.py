"""Private files and directories: patient data is readable by its owner only, whatever the umask.

Theory of operation
-------------------
A process umask only *removes* permission bits, so creating with an explicit mode of 0700
(directories) or 0600 (files) is enough for new objects; but ``Path.mkdir(parents=True)``
creates missing parents with the default mode, and files made by older versions (or by a tool
run with another umask) may already exist with looser bits. So every helper here both creates
with the private mode and tightens what it finds.

SQLite creates a database's ``-wal``, ``-shm`` and ``-journal`` files itself and gives them the
permission bits of the main database file (os_unix.c ``findCreateFileMode``).
:func:`prepare_private_database` therefore creates the database file 0600 *before* SQLite opens
it, and tightens sidecar files left by an earlier run.

Tightening an existing directory is done only when this process owns it and it has no sticky
bit (``/tmp``-like shared directories are reported, never changed): one log line either way.

Invariants: after :func:`ensure_private_dir` the directory exists with no group/other bits (or a
warning named it); after :func:`create_private_file` / :func:`write_private_file` the file is
0600; no helper ever loosens a mode.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "SQLITE_SIDECARS",
    "ensure_private_dir",
    "create_private_file",
    "tighten_file",
    "write_private_file",
    "prepare_private_database",
    "fsync_dir",
]

log = logging.getLogger("medagent.storage.files")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: Files SQLite keeps beside a database (rollback journal, WAL, shared-memory index).
SQLITE_SIDECARS = ("-journal", "-wal", "-shm")
_GROUP_OTHER = 0o077


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and missing parents) 0700, or tighten an existing one we own to 0700."""
    directory = Path(path)
    missing: list[Path] = []
    probe = directory
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for created in reversed(missing):  # each level 0700: mkdir(parents=True) would use 0777 & ~umask
        try:
            os.mkdir(created, PRIVATE_DIR_MODE)
        except FileExistsError:  # another process made it meanwhile
            pass
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{directory} is not a directory")
    if st.st_mode & _GROUP_OTHER:
        if st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX:
            os.chmod(directory, stat.S_IMODE(st.st_mode) & ~_GROUP_OTHER)
            log.info("tightened permissions of %s from %04o to %04o (it holds patient data)",
                     directory, stat.S_IMODE(st.st_mode), stat.S_IMODE(st.st_mode) & ~_GROUP_OTHER)
        else:
            log.warning("directory %s is accessible to other users (mode %04o); it holds patient data",
                        directory, stat.S_IMODE(st.st_mode))
    return directory


def tighten_file(path: str | os.PathLike[str]) -> bool:
    """Remove group/other bits of an existing file; False when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if st.st_mode & _GROUP_OTHER:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~_GROUP_OTHER)
    return True


def create_private_file(path: str | os.PathLike[str], *, exclusive: bool = False) -> int:
    """Open ``path`` for writing, creating it 0600 (an existing file is tightened, not
    truncated). Returns an OS file descriptor the caller closes."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | (os.O_EXCL if exclusive else 0)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    try:
        if os.name == "posix":
            os.fchmod(fd, PRIVATE_FILE_MODE)  # an existing file keeps its old mode on O_CREAT
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a new or removed name in it survives a power loss (POSIX only)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to a new 0600 file at ``path`` atomically (temp name, fsync, rename, fsync
    of the directory), so a reader never sees a partial file under the final name."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = create_private_file(temp)
    try:
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temp, target)
    if fsync:
        fsync_dir(target.parent)


def prepare_private_database(path: str | os.PathLike[str]) -> None:
    """Make sure the SQLite database at ``path`` and its sidecar files are 0600 before SQLite
    opens it: an empty 0600 file is a valid empty database, and SQLite copies its mode to the
    ``-wal``/``-shm`` files it creates."""
    database = Path(path)
    if not tighten_file(database):
        try:
            os.close(create_private_file(database, exclusive=True))
        except FileExistsError:  # created by another process meanwhile
            tighten_file(database)
    for suffix in SQLITE_SIDECARS:
        tighten_file(f"{database}{suffix}")
