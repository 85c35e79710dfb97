"""Helpers of the DICOM tests: generated instances (pydicom), a test hub, small waits.

Datasets are synthetic (no PHI): a CT image of a given size and transfer syntax, and a
multi-frame file written frame by frame so that even the 200 MB case never sits in memory.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from medagent.hub import HubServer, HubSettings

__all__ = ["ct_dataset", "write_multiframe", "hub_server", "study_uids"]


def _base(study_uid: str, series_uid: str, sop_uid: str, patient_id: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = "TEST^SYNTHETIC"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    return ds


def study_uids() -> tuple[str, str]:
    return generate_uid(), generate_uid()


def ct_dataset(*, rows: int = 64, columns: int = 64, syntax: str = ExplicitVRLittleEndian,
               study_uid: str | None = None, series_uid: str | None = None, sop_uid: str | None = None,
               patient_id: str = "PAT1", modality: str = "CT", seed: int = 0,
               study_date: str = "20240315", instance_number: int = 1) -> Dataset:
    """A single-frame CT image with random 12-bit pixels in ``syntax`` (RLE is encoded here)."""
    ds = _base(study_uid or generate_uid(), series_uid or generate_uid(), sop_uid or generate_uid(),
               patient_id, modality)
    ds.StudyDate = study_date
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = rows, columns
    pixels = np.random.default_rng(seed).integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if syntax == RLELossless:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = pixels.tobytes()
        ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = pixels.tobytes()
    return ds


def write_multiframe(path: Path, frames: int, rows: int = 512, columns: int = 512,
                     study_uid: str | None = None) -> tuple[Dataset, bytes]:
    """Write a native multi-frame CT of ``frames`` frames without holding it in memory.

    Returns the header dataset and the SHA-256 of the pixel data (frame i is filled with a
    pattern derived from i, so corruption anywhere is visible).
    """
    import hashlib

    ds = _base(study_uid or generate_uid(), generate_uid(), generate_uid(), "PATMF", "CT")
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = frames
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    frame_bytes = rows * columns * 2
    ds.save_as(path, enforce_file_format=True)
    sha = hashlib.sha256()
    with open(path, "ab") as f:
        # (7FE0,0010) OW, explicit VR little endian with a 4-byte length (PS3.5 §7.1.2)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frame_bytes * frames))
        for frame in _frames(frames, frame_bytes):
            f.write(frame)
            sha.update(frame)
    return ds, sha.digest()


def _frames(frames: int, frame_bytes: int) -> Iterator[bytes]:
    base = np.arange(frame_bytes // 2, dtype=np.uint16)
    for i in range(frames):
        yield ((base + i * 7) & 0x0FFF).astype("<u2").tobytes()


def hub_server(tmp_path: Path) -> HubServer:
    return HubServer(HubSettings(data_dir=tmp_path / "hub", port=0, heartbeat_interval_s=30.0))
