"""The dicom channel with real pynetdicom peers, a real queue and the real hub (127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dicomtest import (
    FailingSink,
    QueueSink,
    ct_dataset,
    deliver,
    dicom_endpoint,
    scu_echo,
    scu_store,
    start_channel,
)
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from medagent.channels.base import channel_kind
from medagent.channels.endpoint import EndpointError
from medagent.hub import HubServer
from medagent.queue import DurableQueue
from medagent.records import DICOM_CONTENT_TYPE


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "agent" / "queue.db")
    await q.open()
    try:
        yield q
    finally:
        await q.close()


def agent_dir(tmp_path: Path) -> Path:
    return tmp_path / "agent"


async def test_echo_and_stats(tmp_path: Path, queue: DurableQueue) -> None:
    channel = await start_channel(agent_dir(tmp_path), QueueSink(queue))
    try:
        assert await asyncio.to_thread(scu_echo, channel.port) == (True, 0x0000)
        stats = channel.stats()
        assert stats["kind"] == "dicom" and stats["associationsTotal"] == 1
    finally:
        await channel.stop()


async def test_store_queue_upload_and_retrieve_byte_identical(tmp_path: Path, queue: DurableQueue, hub: HubServer) -> None:
    data_dir = agent_dir(tmp_path)
    sink = QueueSink(queue)
    channel = await start_channel(data_dir, sink, aet="MEDAGENT", fsync="true")
    study, series = generate_uid(), generate_uid()
    sent = [ct_dataset(rows=128, columns=128, syntax=syntax, study_uid=study, series_uid=series, seed=i,
                       instance_number=i + 1)
            for i, syntax in enumerate((ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless))]
    try:
        statuses = await asyncio.to_thread(scu_store, channel.port, sent, calling="CT01", called="MEDAGENT")
        assert statuses == [0x0000] * 3
        stats = channel.stats()
    finally:
        await channel.stop()
    assert stats["instances"] == 3 and stats["failures"] == 0 and stats["answers"] == {"0x0000": 3}
    assert stats["bytes"] > 3 * 128 * 128  # two uncompressed images at least
    assert sum(stats["storeLatencyMs"].values()) == 3
    records = sink.accepted
    assert [r.control_id for r in records] == [d.SOPInstanceUID for d in sent]
    for record in records:
        assert record.content_type == DICOM_CONTENT_TYPE and record.sender == "CT01" and record.message_type == "CT"
        assert record.file is not None
        spooled = data_dir / record.file.path
        assert spooled.parent == data_dir / "spool" / "pacs"
        assert stat.S_IMODE(spooled.stat().st_mode) == 0o600
        assert spooled.stat().st_size == record.file.size
        body = json.loads(record.body)
        assert body["association"] == {"callingAeTitle": "CT01", "calledAeTitle": "MEDAGENT"}
        assert body["dataset"]["00080018"]["Value"] == [record.control_id]
        assert "7FE00010" not in body["dataset"]  # no bulk data in the bot's JSON
    assert stat.S_IMODE((data_dir / "spool" / "pacs").stat().st_mode) == 0o700

    transmits = await deliver(queue, hub, data_dir)
    assert len(transmits) == 3
    for transmit, original in zip(transmits, sent, strict=True):
        assert "x-medagent-storage" not in transmit
        assert transmit["instance"]["sopInstanceUid"] == original.SOPInstanceUID
        assert transmit["instance"]["retrieveUrl"].endswith(f"/instances/{original.SOPInstanceUID}")
    web = DICOMwebClient(f"{hub.url}/dicomweb", headers={"Authorization": f"Bearer {hub.admin_token}"})
    found = await asyncio.to_thread(web.search_for_instances, study)
    assert len(found) == 3
    for original in sent:
        back = await asyncio.to_thread(web.retrieve_instance, study, series, original.SOPInstanceUID)
        assert back.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert back.PixelData == original.PixelData


async def test_resent_instance_is_success_and_one_row(tmp_path: Path, queue: DurableQueue) -> None:
    data_dir = agent_dir(tmp_path)
    channel = await start_channel(data_dir, QueueSink(queue))
    ds = ct_dataset()
    try:
        assert await asyncio.to_thread(scu_store, channel.port, [ds, ds]) == [0, 0]
    finally:
        await channel.stop()
    assert len(await queue.next_batch(10)) == 1
    assert len(list((data_dir / "spool" / "pacs").iterdir())) == 1  # the duplicate's file is gone


async def test_calling_and_called_ae_policy(tmp_path: Path, queue: DurableQueue) -> None:
    channel = await start_channel(agent_dir(tmp_path), QueueSink(queue), aet="MEDAGENT", callingAets="CT01,MR02")
    try:
        assert await asyncio.to_thread(scu_echo, channel.port, calling="MR02", called="MEDAGENT") == (True, 0)
        assert await asyncio.to_thread(scu_echo, channel.port, calling="INTRUDER", called="MEDAGENT") == (False, None)
        assert await asyncio.to_thread(scu_echo, channel.port, calling="CT01", called="OTHERAE") == (False, None)
        assert await asyncio.to_thread(scu_store, channel.port, [ct_dataset()], calling="INTRUDER",
                                       called="MEDAGENT") == [None]
        assert channel.stats()["associationsRejected"] == 3
    finally:
        await channel.stop()
    assert queue.stats()["committed"] == 0


async def test_commit_failure_answers_out_of_resources(tmp_path: Path, queue: DurableQueue) -> None:
    data_dir = agent_dir(tmp_path)
    channel = await start_channel(data_dir, FailingSink(queue))
    try:
        ae_answer = await asyncio.to_thread(_store_with_comment, channel.port)
    finally:
        await channel.stop()
    assert ae_answer[0] == 0xA700 and "disk is full" in ae_answer[1]
    assert list((data_dir / "spool" / "pacs").iterdir()) == []  # nothing half-accepted is left
    assert channel.stats()["answers"] == {"0xA700": 1}


def _store_with_comment(port: int) -> tuple[int, str]:
    from pynetdicom import AE, build_context

    ds = ct_dataset()
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, contexts=[build_context(ds.SOPClassUID, ExplicitVRLittleEndian)])
    assert assoc.is_established
    try:
        answer = assoc.send_c_store(ds)
        return int(answer.Status), str(answer.get("ErrorComment", ""))
    finally:
        assoc.release()


def test_kind_parameters_are_parsed_and_checked() -> None:
    kind = channel_kind("dicom")
    options = kind.parse_options(dicom_endpoint(
        aet="PACS", callingAets="CT01, MR02", maxPdu="0", maxAssociations="4",
        transferSyntaxes="explicit-le,rle,1.2.840.10008.1.2.4.50", storage="binary",
        moveDestinations="WS1@10.0.0.5:11112,WS2@[::1]:104", commitTimeoutMs="5000", fsync="true"))
    assert options.aet == "PACS" and options.calling_aets == {"CT01", "MR02"}
    assert options.max_pdu == 0 and options.max_associations == 4
    assert options.transfer_syntaxes == ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50")
    assert options.storage.value == "binary" and options.commit_timeout_s == 5.0 and options.fsync
    assert dict(options.move_destinations) == {"WS1": ("10.0.0.5", 11112), "WS2": ("::1", 104)}
    default = kind.parse_options(dicom_endpoint())
    assert default.aet is None and default.storage.value == "dicomweb" and len(default.transfer_syntaxes) > 20
    assert not default.fsync and default.max_pdu == 65536 and default.calling_aets == frozenset()
    for bad in ({"aet": "A\\B"}, {"aet": "X" * 17}, {"maxPdu": "100"}, {"maxAssociations": "0"},
                {"storage": "s3"}, {"transferSyntaxes": "jpeg-xl"}, {"moveDestinations": "WS1@host"},
                {"tlsCert": "/nonexistent.pem"}, {"commitTimeoutMs": "soon"}, {"fsync": "maybe"}):
        with pytest.raises(EndpointError) as info:
            kind.parse_options(dicom_endpoint(**bad))
        assert info.value.parameter == next(iter(bad))


async def test_junk_and_dropped_association_leave_nothing(tmp_path: Path, queue: DurableQueue) -> None:
    data_dir = agent_dir(tmp_path)
    channel = await start_channel(data_dir, QueueSink(queue))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", channel.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)))
        await writer.drain()
        # the SCP answers with an A-ABORT PDU (type 0x07, 10 bytes; PS3.8 §9.3.8), never silence
        abort = await asyncio.wait_for(reader.readexactly(10), 30)
        assert abort[0] == 0x07
        writer.close()
        assert await asyncio.to_thread(scu_echo, channel.port) == (True, 0)  # still serving
    finally:
        await channel.stop()
    assert queue.stats()["committed"] == 0
    assert list((data_dir / "spool" / "pacs").iterdir()) == []


class HoldingSink:
    """A sink whose commits never come back on their own (a stalled queue)."""

    def __init__(self) -> None:
        self.held: list[object] = []

    def accept(self, record: object, *, durable: bool, dedup: object, on_commit: object) -> None:
        self.held.append(on_commit)


async def test_commit_that_does_not_come_answers_a700_and_a_late_failure_cleans_up(tmp_path: Path) -> None:
    from medagent.records import CommitResult

    data_dir = agent_dir(tmp_path)
    sink = HoldingSink()
    channel = await start_channel(data_dir, sink, commitTimeoutMs="200")
    try:
        answer = await asyncio.to_thread(_store_with_comment, channel.port)
        assert answer[0] == 0xA700 and "did not commit in time" in answer[1]
        assert len(list((data_dir / "spool" / "pacs").iterdir())) == 1  # the queue may still take it
        sink.held[0](CommitResult(None, None, "storage error: database or disk is full"))  # type: ignore[operator]
        assert list((data_dir / "spool" / "pacs").iterdir()) == []
    finally:
        await channel.stop()
