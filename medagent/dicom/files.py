"""Part 10 files on local disk: header reading, identity, and durable copies.

* :func:`read_header` parses a Part 10 file (PS3.10 §7) up to, not including, its Pixel Data,
  and defers any other large value, so a 2 GB multi-frame costs a few KB of memory.
* :class:`InstanceInfo` is the identity and the few indexed attributes both the agent (record
  fields, transmit body) and the hub (its instance table) need; :func:`instance_info` builds it
  and raises :class:`InvalidInstance` naming the missing attribute.
* :func:`durable_move` / :func:`digest_file` put a received file in place with mode 0600,
  optionally fsynced (file and directory), and return its size and SHA-256 (1 MiB blocks).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medagent.dicom.uids import is_uid

__all__ = ["InstanceInfo", "InvalidInstance", "digest_file", "durable_move", "instance_info", "read_header"]

_BLOCK = 1 << 20
#: values longer than this are not loaded by read_header (read on access, from the file)
_DEFER_BYTES = 4096


class InvalidInstance(ValueError):
    """A file that is not a usable DICOM instance (the text says why; no PHI in it)."""


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    patient_id: str
    patient_name: str
    study_date: str
    study_time: str
    accession_number: str
    study_description: str
    series_description: str
    series_number: int | None
    instance_number: int | None
    number_of_frames: int


def read_header(path: Path) -> Dataset:
    """The dataset of a Part 10 file without Pixel Data (file meta in ``.file_meta``).

    A file that starts directly with its File Meta group (no 128-byte preamble and "DICM", as
    ``pydicom.dcmwrite`` produces for a dataset without a preamble, and as some STOW-RS clients
    send) is accepted too; anything else is :class:`InvalidInstance`.
    """
    with open(path, "rb") as f:
        start = f.read(132)
    force = start[128:132] != b"DICM" and start[:2] == b"\x02\x00"
    try:
        return dcmread(str(path), stop_before_pixels=True, defer_size=_DEFER_BYTES, force=force)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidInstance(f"not a DICOM Part 10 file: {type(exc).__name__}") from None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def instance_info(ds: Dataset) -> InstanceInfo:
    """The identity of an instance read by :func:`read_header` (UIDs checked, PS3.5 §9.1)."""
    meta = getattr(ds, "file_meta", None)
    uids = {}
    for keyword, fallback in (("StudyInstanceUID", None), ("SeriesInstanceUID", None),
                              ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
                              ("SOPClassUID", "MediaStorageSOPClassUID")):
        value = _text(ds, keyword) or (_text(meta, fallback) if meta is not None and fallback else "")
        if not is_uid(value):
            raise InvalidInstance(f"missing or invalid {keyword}")
        uids[keyword] = value
    transfer_syntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    if not is_uid(transfer_syntax):
        raise InvalidInstance("missing or invalid TransferSyntaxUID in the file meta")
    return InstanceInfo(
        study_uid=uids["StudyInstanceUID"], series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"], sop_class_uid=uids["SOPClassUID"],
        transfer_syntax=transfer_syntax, modality=_text(ds, "Modality"),
        patient_id=_text(ds, "PatientID"), patient_name=_text(ds, "PatientName"),
        study_date=_text(ds, "StudyDate"), study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"), study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"), series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"), number_of_frames=_int(ds, "NumberOfFrames") or 1,
    )


def digest_file(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            sha.update(block)
            size += len(block)
    return size, sha.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_move(source: Path, target: Path, *, fsync: bool = True) -> tuple[int, str]:
    """Move ``source`` to ``target`` (0600; fsynced with its directory if ``fsync``); return (size, sha256).

    A rename when both are on one file system; otherwise a streamed copy (so a full target file
    system raises ``OSError(ENOSPC)`` here and ``target`` is removed). ``source`` is gone after
    success and left in place on failure.
    """
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        try:
            with open(source, "rb") as src, open(target, "xb") as dst:
                shutil.copyfileobj(src, dst, _BLOCK)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        source.unlink(missing_ok=True)
    os.chmod(target, 0o600)
    try:
        if fsync:  # power-loss durability; a rename alone already survives a process kill
            with open(target, "rb+") as f:
                os.fsync(f.fileno())
            _fsync_dir(target.parent)
        return digest_file(target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
