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
    RLELossless,
    generate_uid,
)

from medagent.hub import HubServer, HubSettings

__all__ = ["ct_dataset", "hub_server", "study_uids", "write_multiframe"]


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


# --------------------------------------------------------------------------- agent-side helpers

import asyncio
import ssl
from collections.abc import Callable
from types import MappingProxyType
from urllib.parse import urlencode

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_context
from pynetdicom.sop_class import Verification

from medagent.channels.base import ChannelContext, file_uploader
from medagent.channels.dicom import DicomChannel, dicom_options
from medagent.channels.endpoint import Endpoint
from medagent.queue import DurableQueue
from medagent.records import CommitResult, DuplicatePolicy, InboundRecord

CALL_TIMEOUT_S = 30.0


def dicom_endpoint(port: int = 0, **params: str) -> Endpoint:
    query = urlencode(params)
    return Endpoint(scheme="dicom", host="127.0.0.1", port=port, params=MappingProxyType(dict(params)),
                    url=f"dicom://127.0.0.1:{port}" + (f"?{query}" if query else ""))


class AdminHubClient:
    """The HubClient protocol (channels/base.py) for a test hub, with its admin token."""

    def __init__(self, hub: HubServer) -> None:
        self._hub = hub

    @property
    def base_url(self) -> str:
        return self._hub.url

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return None

    async def authorization(self) -> str:
        return f"Bearer {self._hub.admin_token}"


class QueueSink:
    """The runtime stand-in: durable records go to the real queue."""

    def __init__(self, queue: DurableQueue) -> None:
        self.queue = queue
        self.accepted: list[InboundRecord] = []

    def accept(self, record: InboundRecord, *, durable: bool, dedup: DuplicatePolicy,
               on_commit: Callable[[CommitResult], None] | None) -> None:
        assert durable and on_commit is not None
        self.accepted.append(record)
        self.queue.submit(record, on_commit, dedup)


class FailingSink(QueueSink):
    """Reports the queue's documented disk-full result for every record."""

    def accept(self, record: InboundRecord, *, durable: bool, dedup: DuplicatePolicy,
               on_commit: Callable[[CommitResult], None] | None) -> None:
        assert on_commit is not None
        self.accepted.append(record)
        asyncio.get_running_loop().call_soon(on_commit, CommitResult(None, None, "storage error: database or disk is full"))


async def start_channel(data_dir: Path, sink: object, hub: HubServer | None = None, name: str = "pacs",
                        **params: str) -> DicomChannel:
    endpoint = dicom_endpoint(**params)
    context = ChannelContext(sink=sink, data_dir=data_dir, hub=AdminHubClient(hub) if hub else None)  # type: ignore[arg-type]
    channel = DicomChannel(name, endpoint, dicom_options(endpoint), context)
    await channel.start()
    return channel


async def deliver(queue: DurableQueue, hub: HubServer, data_dir: Path, limit: int = 100) -> list[dict]:
    """What the runtime's dispatcher does with DICOM rows: upload the file, build the transmit."""
    import orjson

    transmits = []
    for message in await queue.next_batch(limit):
        assert message.file is not None
        uploader = file_uploader(message.content_type)
        assert uploader is not None
        body, content_type = await uploader(AdminHubClient(hub), data_dir / message.file.path, message.file, message.body)
        assert content_type == "application/json"
        transmits.append(orjson.loads(body))
        queue.confirm([message.row_id])
    return transmits


def scu_store(port: int, datasets: list[Dataset], *, calling: str = "MODALITY", called: str = "ANY") -> list[int | None]:
    """A modality: one association, one C-STORE per dataset; the statuses (None: no answer)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CALL_TIMEOUT_S
    # one presentation context per (SOP class, transfer syntax): the acceptor picks one syntax
    # per context (PS3.8 §9.3.2.2), and each dataset must go in its own
    pairs = sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets})
    assoc = ae.associate("127.0.0.1", port, ae_title=called,
                         contexts=[build_context(cls, ts) for cls, ts in pairs])
    if not assoc.is_established:
        return [None] * len(datasets)
    try:
        statuses = []
        for ds in datasets:
            answer = assoc.send_c_store(ds)
            statuses.append(int(answer.Status) if "Status" in answer else None)
        return statuses
    finally:
        assoc.release()


def scu_echo(port: int, *, calling: str = "MODALITY", called: str = "ANY") -> tuple[bool, int | None]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = CALL_TIMEOUT_S
    assoc = ae.associate("127.0.0.1", port, ae_title=called, contexts=[build_context(Verification, ALL_TRANSFER_SYNTAXES[:2])])
    if not assoc.is_established:
        return False, None
    try:
        return True, int(assoc.send_c_echo().Status)
    finally:
        assoc.release()
