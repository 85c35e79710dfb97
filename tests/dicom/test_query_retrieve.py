"""C-FIND / C-GET / C-MOVE on the dicom channel, answered from the real hub's DICOMweb, and the
C-STORE SCU push to a pynetdicom SCP -- every peer a real pynetdicom AE on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomtest import AdminHubClient, QueueSink, ct_dataset, start_channel
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from medagent.channels.base import outbound_sender
from medagent.hub import HubServer
from medagent.queue import DurableQueue

TIMEOUT = 30


class StoreScp:
    """A pynetdicom storage SCP (a workstation / PACS) that keeps what it receives."""

    def __init__(self, ae_title: str = "STORESCP", status: int = 0x0000) -> None:
        self.received: list[Dataset] = []
        self.status = status
        ae = AE(ae_title=ae_title)
        for syntax in (ExplicitVRLittleEndian, RLELossless, "1.2.840.10008.1.2"):
            ae.add_supported_context(CTImageStorage, syntax)
        self._lock = threading.Lock()
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return self.status

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "agent" / "queue.db")
    await q.open()
    try:
        yield q
    finally:
        await q.close()


@pytest.fixture
def store_scp() -> Iterator[StoreScp]:
    scp = StoreScp()
    try:
        yield scp
    finally:
        scp.close()


def _stored(hub: HubServer) -> tuple[list[Dataset], Dataset]:
    study, series = generate_uid(), generate_uid()
    ct = [ct_dataset(study_uid=study, series_uid=series, seed=i, instance_number=i + 1,
                     syntax=RLELossless if i else ExplicitVRLittleEndian) for i in range(2)]
    other = ct_dataset(patient_id="OTHER", modality="CT", study_date="20200101")
    DICOMwebClient(f"{hub.url}/dicomweb", headers={"Authorization": f"Bearer {hub.admin_token}"}).store_instances(ct + [other])
    return ct, other


def _find(port: int, model: str, identifier: Dataset) -> list[tuple[int, Dataset | None]]:
    ae = AE(ae_title="WORKSTATION")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    try:
        return [(int(status.Status), ident) for status, ident in assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


def _identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


async def test_c_find_at_every_level(tmp_path: Path, queue: DurableQueue, hub: HubServer) -> None:
    ct, other = await asyncio.to_thread(_stored, hub)
    channel = await start_channel(tmp_path / "agent", QueueSink(queue), hub=hub)
    try:
        studies = await asyncio.to_thread(_find, channel.port, StudyRootQueryRetrieveInformationModelFind,
                                          _identifier("STUDY", PatientID="PAT1", StudyInstanceUID="",
                                                      PatientName="", NumberOfStudyRelatedInstances=""))
        assert [s for s, _ in studies] == [0xFF00, 0x0000]
        answer = studies[0][1]
        assert answer.StudyInstanceUID == ct[0].StudyInstanceUID and answer.PatientName == "TEST^SYNTHETIC"
        assert int(answer.NumberOfStudyRelatedInstances) == 2 and answer.QueryRetrieveLevel == "STUDY"

        patients = await asyncio.to_thread(_find, channel.port, PatientRootQueryRetrieveInformationModelFind,
                                           _identifier("PATIENT", PatientID="", PatientName=""))
        assert sorted(i.PatientID for s, i in patients if s == 0xFF00) == ["OTHER", "PAT1"]

        by_date = await asyncio.to_thread(_find, channel.port, StudyRootQueryRetrieveInformationModelFind,
                                          _identifier("STUDY", StudyDate="20190101-20201231", StudyInstanceUID=""))
        assert [i.StudyInstanceUID for s, i in by_date if s == 0xFF00] == [other.StudyInstanceUID]

        series = await asyncio.to_thread(_find, channel.port, StudyRootQueryRetrieveInformationModelFind,
                                         _identifier("SERIES", StudyInstanceUID=ct[0].StudyInstanceUID,
                                                     SeriesInstanceUID="", Modality=""))
        assert [(i.SeriesInstanceUID, i.Modality) for s, i in series if s == 0xFF00] == [(ct[0].SeriesInstanceUID, "CT")]

        images = await asyncio.to_thread(_find, channel.port, StudyRootQueryRetrieveInformationModelFind,
                                         _identifier("IMAGE", StudyInstanceUID=ct[0].StudyInstanceUID,
                                                     SeriesInstanceUID=ct[0].SeriesInstanceUID, SOPInstanceUID=""))
        assert [i.SOPInstanceUID for s, i in images if s == 0xFF00] == [d.SOPInstanceUID for d in ct]

        bad = await asyncio.to_thread(_find, channel.port, StudyRootQueryRetrieveInformationModelFind,
                                      _identifier("FRAME", StudyInstanceUID=""))
        assert bad[-1][0] == 0xA900
        assert channel.stats()["finds"] == 6
    finally:
        await channel.stop()


def _get(port: int, identifier: Dataset) -> tuple[list[int], list[Dataset]]:
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="WORKSTATION")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for syntax in (ExplicitVRLittleEndian, RLELossless):
        ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        statuses = [int(s.Status) for s, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    return statuses, received


async def test_c_get_returns_the_stored_instances_byte_identical(tmp_path: Path, queue: DurableQueue,
                                                                 hub: HubServer) -> None:
    ct, _ = await asyncio.to_thread(_stored, hub)
    channel = await start_channel(tmp_path / "agent", QueueSink(queue), hub=hub)
    try:
        statuses, received = await asyncio.to_thread(
            _get, channel.port, _identifier("STUDY", StudyInstanceUID=ct[0].StudyInstanceUID))
        nothing = await asyncio.to_thread(_get, channel.port, _identifier("STUDY", StudyInstanceUID=generate_uid()))
    finally:
        await channel.stop()
    assert statuses[-1] == 0x0000
    assert sorted((d.SOPInstanceUID, d.PixelData) for d in received) == sorted((d.SOPInstanceUID, d.PixelData) for d in ct)
    assert nothing == ([0x0000], [])
    assert not list((tmp_path / "agent" / "spool" / "pacs").glob("retrieve-*"))  # temporary files removed


def _move(port: int, destination: str, identifier: Dataset) -> list[tuple[int, int]]:
    ae = AE(ae_title="WORKSTATION")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port)
    assert assoc.is_established
    try:
        return [(int(s.Status), int(s.get("NumberOfCompletedSuboperations", 0) or 0))
                for s, _ in assoc.send_c_move(identifier, destination, StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()


async def test_c_move_to_a_configured_destination(tmp_path: Path, queue: DurableQueue, hub: HubServer,
                                                  store_scp: StoreScp) -> None:
    ct, _ = await asyncio.to_thread(_stored, hub)
    channel = await start_channel(tmp_path / "agent", QueueSink(queue), hub=hub,
                                  moveDestinations=f"STORESCP@127.0.0.1:{store_scp.port}")
    try:
        moved = await asyncio.to_thread(_move, channel.port, "STORESCP",
                                        _identifier("SERIES", StudyInstanceUID=ct[0].StudyInstanceUID,
                                                    SeriesInstanceUID=ct[0].SeriesInstanceUID))
        unknown = await asyncio.to_thread(_move, channel.port, "NOBODY",
                                          _identifier("STUDY", StudyInstanceUID=ct[0].StudyInstanceUID))
    finally:
        await channel.stop()
    assert moved[-1] == (0x0000, 2)
    assert sorted((d.SOPInstanceUID, d.PixelData) for d in store_scp.received) == \
        sorted((d.SOPInstanceUID, d.PixelData) for d in ct)
    assert unknown[-1][0] == 0xA801


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


async def test_push_base64_and_wado_urls_to_a_scp(hub: HubServer, store_scp: StoreScp) -> None:
    ct, _ = await asyncio.to_thread(_stored, hub)
    sender = outbound_sender("dicom")(hub=AdminHubClient(hub))
    remote = f"dicom://STORESCP@127.0.0.1:{store_scp.port}"
    try:
        single = ct_dataset()
        reply = await sender.send(remote, base64.b64encode(_part10(single)).decode(), "application/dicom")
        assert reply.status_code == 200
        assert '"status":"0x0000"' in reply.body and single.SOPInstanceUID in reply.body
        study_url = f"studies/{ct[0].StudyInstanceUID}"
        reply = await sender.send(remote, json.dumps({"retrieveUrls": [study_url]}), "application/json")
        assert reply.status_code == 200 and reply.body.count('"0x0000"') == 2
    finally:
        await sender.close()
    assert sorted(d.SOPInstanceUID for d in store_scp.received) == sorted(
        [single.SOPInstanceUID] + [d.SOPInstanceUID for d in ct])
    assert {d.SOPInstanceUID: d.PixelData for d in store_scp.received}[ct[1].SOPInstanceUID] == ct[1].PixelData


async def test_push_reports_per_instance_failures_and_refusals(hub: HubServer) -> None:
    refusing = StoreScp(status=0xA700)
    sender = outbound_sender("dicom")(hub=AdminHubClient(hub))
    try:
        ds = ct_dataset()
        reply = await sender.send(f"dicom://STORESCP@127.0.0.1:{refusing.port}",
                                  base64.b64encode(_part10(ds)).decode(), "application/dicom")
        assert reply.status_code == 502 and '"status":"0xA700"' in reply.body
        with pytest.raises(Exception, match="base64"):
            await sender.send(f"dicom://STORESCP@127.0.0.1:{refusing.port}", "%%%", "application/dicom")
        with pytest.raises(Exception, match="AE title"):
            await sender.send(f"dicom://{'X' * 20}@127.0.0.1:{refusing.port}", "", "application/dicom")
        with pytest.raises(Exception, match="cannot push"):
            await sender.send(f"dicom://STORESCP@127.0.0.1:{refusing.port}", "x", "text/plain")
    finally:
        await sender.close()
        refusing.close()
    # a closed port: the association fails, the push raises with a reason
    with pytest.raises(Exception, match="association"):
        await outbound_sender("dicom")().send(f"dicom://STORESCP@127.0.0.1:{refusing.port}",
                                              base64.b64encode(_part10(ct_dataset())).decode(),
                                              "application/dicom", timeout=5)
