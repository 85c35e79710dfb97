"""Private directories and files (issue 18, defect 2): 0700 / 0600 whatever the umask, existing
loose modes tightened, shared sticky directories never changed; and the reserve file."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from medagent.storage.files import (
    create_private_file,
    ensure_private_dir,
    prepare_private_database,
    write_private_file,
)
from medagent.storage.reserve import ReserveFile


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_directories_and_their_missing_parents_are_created_0700(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "a" / "b" / "spool"
    ensure_private_dir(target)
    assert [mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", target)] == [0o700] * 3
    ensure_private_dir(target)  # idempotent


def test_an_existing_loose_directory_is_tightened_but_a_sticky_one_only_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loose = tmp_path / "data"
    loose.mkdir()
    os.chmod(loose, 0o755)
    ensure_private_dir(loose)
    assert mode(loose) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    ensure_private_dir(shared)
    assert mode(shared) == 0o1777 and "accessible to other users" in caplog.text
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        ensure_private_dir(not_a_dir)


def test_files_are_0600_new_or_existing(tmp_path: Path, umask_022: None) -> None:
    fresh = tmp_path / "fresh"
    os.close(create_private_file(fresh))
    existing = tmp_path / "existing"
    existing.write_bytes(b"old")
    os.chmod(existing, 0o644)
    os.close(create_private_file(existing))
    assert mode(fresh) == mode(existing) == 0o600 and existing.read_bytes() == b"old"
    written = tmp_path / "spool" / "x.dcm"
    written.parent.mkdir()
    write_private_file(written, b"DICM" * 10)
    assert mode(written) == 0o600 and written.read_bytes() == b"DICM" * 10
    assert [p.name for p in written.parent.iterdir()] == ["x.dcm"]  # no temp file left


def test_sqlite_copies_the_prepared_mode_to_wal_and_shm(tmp_path: Path, umask_022: None) -> None:
    database = tmp_path / "hub.sqlite3"
    prepare_private_database(database)
    conn = sqlite3.connect(database)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    assert {suffix: mode(Path(f"{database}{suffix}")) for suffix in ("", "-wal", "-shm")} == {
        "": 0o600, "-wal": 0o600, "-shm": 0o600}
    conn.close()
    # a database left 0644 by an older version, with its WAL
    os.chmod(database, 0o644)
    prepare_private_database(database)
    assert mode(database) == 0o600


def test_reserve_is_allocated_0600_released_and_never_half_there(tmp_path: Path, umask_022: None) -> None:
    reserve = ReserveFile(tmp_path / "queue.sqlite3.reserve", 2 * 1024 * 1024)
    assert not reserve.held and reserve.missing_bytes == 2 * 1024 * 1024
    assert reserve.allocate() and reserve.held and reserve.missing_bytes == 0
    assert mode(reserve.path) == 0o600 and reserve.path.stat().st_size == 2 * 1024 * 1024
    assert reserve.path.stat().st_blocks * 512 >= 2 * 1024 * 1024  # really allocated, not sparse
    assert reserve.release() and not reserve.path.exists()
    assert not reserve.release()  # idempotent
    assert ReserveFile(tmp_path / "none", 0).held  # no reserve wanted
