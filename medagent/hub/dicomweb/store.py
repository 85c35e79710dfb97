"""The hub's DICOM instance store: Part 10 files on disk, their index in ``dicom.sqlite3``.

Layout below the hub's data directory (directories 0700, files 0600)::

    dicom.sqlite3                         the index (WAL), one row per SOP Instance UID
    dicom/<study>/<series>/<sop>.dcm      the instance, exactly as received (Part 10)
    dicom/.incoming/                      uploads being received (removed on success or error)

Invariants
----------
* A row exists only for a file that is complete and fsynced: :meth:`DicomStore.add` renames
  the received file into place, fsyncs, then commits the row.
* SOP Instance UID is the key. Storing an instance that is already stored is a success that
  changes nothing (``added=False``): the agent re-uploads after a crash or a link drop, and
  the store must end up with one copy (PS3.4 §B.2.3 allows the SCP to keep the first).
* Path components are UIDs checked by :func:`medagent.dicom.uids.is_uid`, so no request can
  name a file outside ``dicom/``.

The connection is used from the hub's event loop only; statements are short (indexed lookups
and one-row inserts), and the slow parts (fsync, header parsing) run in a worker thread before
the insert. Queries are built from :class:`medagent.dicom.query.Query` with bound parameters.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medagent.dicom.files import InstanceInfo
from medagent.dicom.query import Query
from medagent.dicom.uids import is_uid

__all__ = ["DB_FILE", "FILES_DIR", "DicomStore", "StoredInstance"]

DB_FILE = "dicom.sqlite3"
FILES_DIR = "dicom"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    modality TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    patient_name TEXT NOT NULL,
    study_date TEXT NOT NULL,
    accession_number TEXT NOT NULL,
    series_number INTEGER,
    instance_number INTEGER,
    frames INTEGER NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    metadata TEXT NOT NULL,
    stored_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, series_uid);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_patient ON instances(patient_id);
CREATE INDEX IF NOT EXISTS instances_date ON instances(study_date);
"""


@dataclass(frozen=True, slots=True)
class StoredInstance:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    frames: int
    size: int
    path: Path
    metadata: dict[str, Any]


class DicomStore:
    """Open with :meth:`open` (creates files and tables), :meth:`close` when the hub stops."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / FILES_DIR
        self.incoming = self.root / ".incoming"
        self._db_path = data_dir / DB_FILE
        self._db: sqlite3.Connection | None = None

    def open(self) -> None:
        for directory in (self.root, self.incoming):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        for leftover in self.incoming.iterdir():  # uploads cut off by a crash: never indexed
            leftover.unlink(missing_ok=True)
        fd = os.open(self._db_path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
        os.chmod(self._db_path, 0o600)
        db = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # an answered STOW survives power loss
        db.executescript(_SCHEMA)
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the DICOM store is not open")
        return self._db

    # -- files ------------------------------------------------------------------------------

    def file_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_uid(uid):
                raise ValueError("invalid UID")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def contains(self, sop_uid: str) -> bool:
        return self.db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone() is not None

    def add(self, info: InstanceInfo, size: int, sha256: str, metadata: dict[str, Any]) -> bool:
        """Index an instance whose file is already in place at :meth:`file_path`; False if known."""
        cursor = self.db.execute(
            "INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (info.sop_uid, info.study_uid, info.series_uid, info.sop_class_uid, info.transfer_syntax,
             info.modality, info.patient_id, info.patient_name, info.study_date, info.accession_number,
             info.series_number, info.instance_number, info.number_of_frames, size, sha256,
             json.dumps(metadata, separators=(",", ":")), time.time()),
        )
        return cursor.rowcount == 1

    # -- queries ----------------------------------------------------------------------------

    def _where(self, query: Query) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []

        def any_of(column: str, values: tuple[str, ...]) -> None:
            if values:
                clauses.append(f"{column} IN ({','.join('?' * len(values))})")
                args.extend(values)

        any_of("study_uid", query.study_uids)
        any_of("series_uid", query.series_uids)
        any_of("sop_uid", query.sop_uids)
        any_of("sop_class_uid", query.sop_class_uids)
        for column, pattern in (("patient_id", query.patient_id), ("patient_name", query.patient_name),
                                ("accession_number", query.accession_number)):
            if pattern is not None:
                clauses.append(f"{column} GLOB ?")
                args.append(pattern)
        if query.study_date is not None:
            low, high = query.study_date
            if low:
                clauses.append("study_date >= ?")
                args.append(low)
            if high:
                clauses.append("study_date <= ?")
                args.append(high)
            clauses.append("study_date != ''")
        if query.modalities:
            marks = ",".join("?" * len(query.modalities))
            if query.level == "study":  # ModalitiesInStudy: any series of the study
                clauses.append(f"study_uid IN (SELECT study_uid FROM instances WHERE modality IN ({marks}))")
            else:
                clauses.append(f"modality IN ({marks})")
            args.extend(query.modalities)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def search(self, query: Query) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(representative instance metadata, computed attributes) per study/series/instance."""
        where, args = self._where(query)
        page = [query.limit, query.offset]
        if query.level == "study":
            sql = ("SELECT study_uid, MIN(sop_uid), GROUP_CONCAT(DISTINCT modality), COUNT(DISTINCT series_uid),"
                   f" COUNT(*) FROM instances{where} GROUP BY study_uid ORDER BY MIN(stored_at) LIMIT ? OFFSET ?")
            for study_uid, sop_uid, modalities, n_series, n_instances in self.db.execute(sql, args + page):
                yield self._metadata(sop_uid), {
                    "00080061": {"vr": "CS", "Value": sorted(m for m in (modalities or "").split(",") if m)},
                    "00201206": {"vr": "IS", "Value": [n_series]},
                    "00201208": {"vr": "IS", "Value": [n_instances]},
                    "_url": f"/studies/{study_uid}",
                }
        elif query.level == "series":
            sql = (f"SELECT study_uid, series_uid, MIN(sop_uid), COUNT(*) FROM instances{where}"
                   " GROUP BY series_uid ORDER BY MIN(series_number), MIN(stored_at) LIMIT ? OFFSET ?")
            for study_uid, series_uid, sop_uid, n_instances in self.db.execute(sql, args + page):
                yield self._metadata(sop_uid), {
                    "00201209": {"vr": "IS", "Value": [n_instances]},
                    "_url": f"/studies/{study_uid}/series/{series_uid}",
                }
        else:
            sql = (f"SELECT study_uid, series_uid, sop_uid, metadata, transfer_syntax FROM instances{where}"
                   " ORDER BY instance_number, stored_at LIMIT ? OFFSET ?")
            for study_uid, series_uid, sop_uid, metadata, transfer_syntax in self.db.execute(sql, args + page):
                yield json.loads(metadata), {
                    "00083002": {"vr": "UI", "Value": [transfer_syntax]},
                    "_url": f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
                }

    def _metadata(self, sop_uid: str) -> dict[str, Any]:
        row = self.db.execute("SELECT metadata FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return json.loads(row[0]) if row else {}

    def instances(self, study_uid: str, series_uid: str | None = None,
                  sop_uid: str | None = None) -> list[StoredInstance]:
        """The stored instances of a study, series or one instance, in instance order."""
        sql = ("SELECT study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax, frames, size, metadata"
               " FROM instances WHERE study_uid = ?")
        args: list[Any] = [study_uid]
        if series_uid is not None:
            sql += " AND series_uid = ?"
            args.append(series_uid)
        if sop_uid is not None:
            sql += " AND sop_uid = ?"
            args.append(sop_uid)
        sql += " ORDER BY series_number, series_uid, instance_number, stored_at"
        return [
            StoredInstance(st, se, sop, cls, ts, frames, size, self.file_path(st, se, sop), json.loads(meta))
            for st, se, sop, cls, ts, frames, size, meta in self.db.execute(sql, args)
        ]
