"""Helpers imported by test modules (kept out of conftest.py, of which there are several)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

DATA_DIR = Path(__file__).parent / "data"


def pick(module: Any, name: str, impl: str) -> Any:
    """The Py or C twin of `name` exported by a selector module (`MllpDecoderPy` / `MllpDecoderC`)."""
    obj = getattr(module, name + ("Py" if impl == "py" else "C"), None)
    if obj is None:
        pytest.fail(f"{module.__name__}.{name}C is missing although extensions are expected")
    return obj


def wait_until_sync(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` every 20 ms until it holds (True) or ``timeout`` seconds passed (False):
    for tests that watch a background thread (e.g. the WAL checkpointer) from plain code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@contextlib.contextmanager
def mounted_tmpfs(tmp_path: Path, size_bytes: int) -> Iterator[Path]:
    """A tmpfs of `size_bytes` (a real full disk for ENOSPC tests), unmounted on exit (lazily, if
    a test left a file open). Skips the test when not root (mounting needs it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; see tests/queue/test_durable_storage.py for the unprivileged cases")
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(mount_point)],
                   check=True, capture_output=True, timeout=30)
    try:
        yield mount_point
    finally:
        done = subprocess.run(["umount", str(mount_point)], check=False, capture_output=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True, timeout=30)


@contextlib.contextmanager
def failing_hub_commits(database: Path, when: str) -> Iterator[Callable[[], None]]:
    """Make the COMMIT of every hub store round that inserts a message matching ``when`` (an SQL
    condition on ``NEW``, the inserted ``messages`` row) fail, with a real SQLite error: a
    trigger inserts a row breaking a deferred foreign key, which SQLite checks at COMMIT. Yields
    ``disarm`` (the rounds commit again after it)."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.executescript(f"""
            CREATE TABLE test_parent (id INTEGER PRIMARY KEY);
            CREATE TABLE test_child (parent INTEGER REFERENCES test_parent (id) DEFERRABLE INITIALLY DEFERRED);
            CREATE TABLE test_switch (armed INTEGER NOT NULL);
            INSERT INTO test_switch VALUES (1);
            CREATE TRIGGER test_failing_commit AFTER INSERT ON messages
                WHEN ({when}) AND (SELECT armed FROM test_switch) = 1
                BEGIN INSERT INTO test_child VALUES (42); END;
        """)

        def disarm() -> None:
            db.execute("UPDATE test_switch SET armed = 0")
            db.commit()

        yield disarm
