"""File payloads: the dispatcher uploads a queued file through the registered FileUploader, with the
runtime's HubClient, before it sends the transmit; a failed upload leaves the row pending and is
retried with backoff; rows still reach the hub in id order.

Real AgentRuntime against the Medplum stand-in (the hub and its tokens), a real DurableQueue,
a test uploader registered for a test content type that POSTs the file to a tiny aiohttp server
in the test. Both event loops.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "cloud"))
from medplum_standin import MedplumStandIn

from medagent.channels.base import HubClient, register_file_uploader
from medagent.config import load_config
from medagent.records import CommitResult, DuplicatePolicy, FilePayload, InboundRecord
from medagent.runtime.agent import AgentRuntime

TEST_FILE_TYPE = "application/x-medagent-test-file"
WAIT_S = 10.0


class UploadServer:
    """Stores what it is sent; answers 503 to the first ``fail_first`` uploads."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.requests: list[tuple[str, bytes]] = []  # (Authorization, body)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/upload", self._upload)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/upload"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _upload(self, request: web.Request) -> web.Response:
        self.requests.append((request.headers.get("Authorization", ""), await request.read()))
        if len(self.requests) <= self.fail_first:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"url": f"/files/{len(self.requests)}"})


@pytest.fixture
async def upload_server() -> AsyncIterator[UploadServer]:
    server = UploadServer(fail_first=1)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def standin() -> AsyncIterator[MedplumStandIn]:
    server = MedplumStandIn()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def register_test_uploader(server: UploadServer) -> None:
    async def upload(hub: HubClient, path: Path, payload: FilePayload, body: bytes) -> tuple[bytes, str]:
        headers = {"Authorization": await hub.authorization(), "X-Sha256": payload.sha256}
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url, data=path.read_bytes(), headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"upload answered HTTP {response.status}")
                document = await response.json()
        return json.dumps({"metadata": json.loads(body), "url": document["url"]}).encode(), "application/json"

    register_file_uploader(TEST_FILE_TYPE, upload)


async def commit(runtime: AgentRuntime, record: InboundRecord) -> CommitResult:
    future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
    assert runtime.intake is not None
    runtime.intake.accept(record, durable=True, dedup=DuplicatePolicy.OFF, on_commit=future.set_result)
    result = await asyncio.wait_for(future, WAIT_S)
    assert result.ok, result.error
    return result


async def test_a_file_row_is_uploaded_then_transmitted_in_order_after_a_retry(standin, upload_server, tmp_path) -> None:
    register_test_uploader(upload_server)
    data_dir = tmp_path / "data"
    config = load_config(None, env={}, overrides={"agent": {
        "hub": standin.base_url.rstrip("/"), "client_id": standin.client_id, "client_secret": standin.client_secret,
        "agent_id": standin.agent_id, "data_dir": str(data_dir)}})
    runtime = AgentRuntime(config)
    await runtime.start()
    try:
        content = bytes(range(256)) * 64
        spool = data_dir / "spool" / "files-in"
        spool.mkdir(parents=True, mode=0o700)
        (spool / "one.bin").write_bytes(content)
        payload = FilePayload("spool/files-in/one.bin", len(content), hashlib.sha256(content).hexdigest())
        now = time.time()
        await commit(runtime, InboundRecord("files-in", "127.0.0.1:9", "S", "F1", "TEST", b'{"name": "one"}', now,
                                            TEST_FILE_TYPE, payload))
        await commit(runtime, InboundRecord("files-in", "127.0.0.1:9", "S", "B1", "TEST", b"\x01\x02", now,
                                            "application/octet-stream"))

        def transmits() -> list[dict[str, Any]]:
            return [f for f in standin.frames_of("agent:transmit:request") if f.get("channel") == "files-in"]

        for _ in range(int(WAIT_S / 0.02)):
            if len(transmits()) >= 2:
                break
            await asyncio.sleep(0.02)
        first, second = transmits()[:2]
        # The first upload failed (503): the row stayed pending, nothing was sent, the retry succeeded.
        assert len(upload_server.requests) == 2
        assert all(body == content for _, body in upload_server.requests)
        assert all(auth.startswith("Bearer standin-token-") for auth, _ in upload_server.requests)
        assert first["contentType"] == "application/json"
        assert json.loads(first["body"]) == {"metadata": {"name": "one"}, "url": "/files/2"}
        assert second["contentType"] == "application/octet-stream" and second["body"] == "0102"  # after, in order
        assert len(transmits()) == 2
        assert runtime.dispatcher is not None
        stats = runtime.dispatcher.stats()
        assert stats["uploads"] == 1 and stats["uploadFailures"] == 1
    finally:
        await runtime.stop()
