"""A 200 MB multi-frame instance through the channel and the hub, with bounded memory.

The receiving agent runs in a child process (large_receiver.py) so its peak RSS can be measured
alone: the growth while receiving, spooling, committing and uploading the instance must stay
below 150 MB (a behaviour bound: the instance is streamed, never held). The hub (this process)
must then serve the pixel data byte-identical.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from dicomtest import write_multiframe
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_context

from medagent.hub import HubServer

FRAMES = 400  # 400 x 512 x 512 x 2 bytes = 200 MiB
LIMIT = 150 * 1024 * 1024
HERE = Path(__file__).resolve().parent


def _send(port: int, path: Path, sop_class: str) -> int:
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the sender streams too (it is not measured)
    try:
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 300
        assoc = ae.associate("127.0.0.1", port, contexts=[build_context(sop_class, ExplicitVRLittleEndian)])
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak RSS")
async def test_200mb_multiframe_streams_with_bounded_memory(tmp_path: Path, hub: HubServer) -> None:
    source = tmp_path / "multiframe.dcm"
    header, pixel_sha = await asyncio.to_thread(write_multiframe, source, FRAMES)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-P", str(HERE / "large_receiver.py"), str(tmp_path / "agent"), hub.url, hub.admin_token,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "MEDAGENT_LOG_LEVEL": "WARNING"})
    try:
        assert child.stdout is not None
        port = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))["port"]
        assert await asyncio.to_thread(_send, port, source, header.SOPClassUID) == 0x0000
        report = json.loads(await asyncio.wait_for(child.stdout.readline(), 300))
        assert await asyncio.wait_for(child.wait(), 60) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    print(f"agent peak RSS growth {report['peak_growth'] / 2**20:.1f} MiB for {report['size'] / 2**20:.0f} MiB")
    assert report["size"] > FRAMES * 512 * 512 * 2
    assert report["peak_growth"] < LIMIT, f"peak RSS grew by {report['peak_growth'] / 2**20:.0f} MiB"
    assert report["transmit_bytes"] < 64 * 1024  # the bot's JSON has no bulk data

    stored = hub.data_dir / "dicom" / header.StudyInstanceUID / header.SeriesInstanceUID / f"{header.SOPInstanceUID}.dcm"
    pixel_bytes = FRAMES * 512 * 512 * 2

    def tail_digest() -> bytes:
        sha = hashlib.sha256()
        with open(stored, "rb") as f:
            f.seek(-pixel_bytes, os.SEEK_END)  # native Pixel Data is the last element
            while block := f.read(1 << 20):
                sha.update(block)
        return sha.digest()

    assert await asyncio.to_thread(tail_digest) == pixel_sha
