"""The uploader against a Medplum stand-in (a small aiohttp app): storage=binary and dicomweb.

The stand-in implements only what Medplum's server does for the agent's DICOM uploads
(medplum-next-waves.md §1): ``POST /fhir/R4/Binary`` (application/dicom body -> a Binary with
an id) and ``POST /dicomweb/studies`` (STOW-RS multipart -> ReferencedSOPSequence).
"""

from __future__ import annotations

import asyncio
import io
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from dicomtest import QueueSink, ct_dataset, scu_store, start_channel
from pydicom import dcmread

from medagent.channels.base import file_uploader
from medagent.queue import DurableQueue
from medagent.records import DICOM_CONTENT_TYPE

TOKEN = "medplum-access-token"


class MedplumStandIn:
    def __init__(self) -> None:
        self.binaries: list[bytes] = []
        self.stow_parts: list[bytes] = []
        self.stow_content_types: list[str] = []
        self.fail_next = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    def _check(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            raise web.HTTPUnauthorized()
        if self.fail_next:
            self.fail_next -= 1
            raise web.HTTPServiceUnavailable()

    async def binary(self, request: web.Request) -> web.Response:
        self._check(request)
        assert request.content_type == "application/dicom"
        self.binaries.append(await request.read())
        return web.json_response({"resourceType": "Binary", "id": f"bin-{len(self.binaries)}",
                                  "contentType": "application/dicom"}, status=201)

    async def stow(self, request: web.Request) -> web.Response:
        self._check(request)
        self.stow_content_types.append(request.headers["Content-Type"])
        reader = await request.multipart()
        sops = []
        while (part := await reader.next()) is not None:
            data = await part.read()  # type: ignore[union-attr]
            self.stow_parts.append(bytes(data))
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
            sops.append(ds.SOPInstanceUID)
        return web.json_response({"00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [sop]},
             "00081190": {"vr": "UR", "Value": [f"{self.url}/dicomweb/instances/{sop}"]}} for sop in sops]}})

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/fhir/R4/Binary", self.binary)
        app.router.add_post("/dicomweb/studies", self.stow)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class MedplumClient:
    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def base_url(self) -> str:
        return self._url

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return None

    async def authorization(self) -> str:
        return f"Bearer {TOKEN}"


@pytest.fixture
async def medplum() -> AsyncIterator[MedplumStandIn]:
    server = MedplumStandIn()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[DurableQueue]:
    q = DurableQueue(tmp_path / "agent" / "queue.db")
    await q.open()
    try:
        yield q
    finally:
        await q.close()


@pytest.mark.parametrize("storage", ["binary", "dicomweb"])
async def test_medplum_storage_modes(tmp_path: Path, queue: DurableQueue, medplum: MedplumStandIn, storage: str) -> None:
    data_dir = tmp_path / "agent"
    channel = await start_channel(data_dir, QueueSink(queue), storage=storage)
    ds = ct_dataset(rows=256, columns=256)
    try:
        assert await asyncio.to_thread(scu_store, channel.port, [ds]) == [0]
    finally:
        await channel.stop()
    [message] = await queue.next_batch(10)
    assert message.file is not None
    uploader = file_uploader(DICOM_CONTENT_TYPE)
    assert uploader is not None
    spooled = data_dir / message.file.path

    medplum.fail_next = 1  # the first attempt fails (hub down): raises, the row stays pending
    with pytest.raises(Exception, match="HTTP 503"):
        await uploader(MedplumClient(medplum.url), spooled, message.file, message.body)
    body, content_type = await uploader(MedplumClient(medplum.url), spooled, message.file, message.body)
    transmit = json.loads(body)
    assert content_type == "application/json"
    assert transmit["association"]["callingAeTitle"] == "MODALITY"
    assert transmit["dataset"]["00080018"]["Value"] == [ds.SOPInstanceUID]
    if storage == "binary":
        assert transmit["binary"] == {"reference": "Binary/bin-1"}
        assert medplum.binaries == [spooled.read_bytes()] and not medplum.stow_parts
    else:
        assert "binary" not in transmit and not medplum.binaries
        assert medplum.stow_parts == [spooled.read_bytes()]
        assert 'type="application/dicom"' in medplum.stow_content_types[0]
        assert transmit["instance"]["retrieveUrl"].endswith(ds.SOPInstanceUID)


async def test_upload_errors_name_the_problem(tmp_path: Path, queue: DurableQueue, medplum: MedplumStandIn) -> None:
    data_dir = tmp_path / "agent"
    channel = await start_channel(data_dir, QueueSink(queue))
    try:
        assert await asyncio.to_thread(scu_store, channel.port, [ct_dataset()]) == [0]
    finally:
        await channel.stop()
    [message] = await queue.next_batch(10)
    assert message.file is not None
    uploader = file_uploader(DICOM_CONTENT_TYPE)
    assert uploader is not None
    unreachable = MedplumClient("http://127.0.0.1:9/")  # discard port: connection refused
    with pytest.raises(Exception, match="upload to the hub failed"):
        await uploader(unreachable, data_dir / message.file.path, message.file, message.body)
