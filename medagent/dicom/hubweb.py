"""The agent's DICOMweb client of the hub: QIDO-RS searches and WADO-RS instance downloads.

Used by the ``dicom`` channel to answer C-FIND/C-GET/C-MOVE from what the hub stores, and by the
C-STORE SCU sender to fetch the instances a ``$push`` names. Every request carries the hub's
current ``Authorization`` (:class:`medagent.channels.base.HubClient`), verifies TLS with the
hub's context, and streams downloads to a file (an instance never sits in memory here).

Coroutines run on the agent's loop; the channel's pynetdicom threads call them through
``asyncio.run_coroutine_threadsafe`` only.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from medagent.channels.base import HubClient

__all__ = ["HubDicomWeb", "HubDicomWebError"]

_CHUNK = 1 << 20
_ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class HubDicomWebError(RuntimeError):
    """The hub could not answer (HTTP status and a short reason; no PHI)."""


class HubDicomWeb:
    def __init__(self, hub: HubClient, session: aiohttp.ClientSession, timeout_s: float = 60.0) -> None:
        self.hub = hub
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)

    @property
    def base(self) -> str:
        return self.hub.base_url.rstrip("/") + "/dicomweb"

    async def _headers(self, accept: str) -> dict[str, str]:
        return {"Authorization": await self.hub.authorization(), "Accept": accept}

    async def search(self, level: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """QIDO-RS at ``level`` (study|series|instance) across the whole store."""
        path = {"study": "/studies", "series": "/series", "instance": "/instances"}[level]
        async with self.session.get(self.base + path, params=params, headers=await self._headers("application/dicom+json"),
                                    ssl=self.hub.ssl_context or True, timeout=self.timeout) as response:
            if response.status == 204:
                return []
            if response.status != 200:
                raise HubDicomWebError(f"QIDO-RS {path}: HTTP {response.status}")
            result = await response.json(content_type=None)
        if not isinstance(result, list):
            raise HubDicomWebError(f"QIDO-RS {path}: not a JSON array")
        return result

    async def download(self, url: str, directory: Path) -> list[Path]:
        """WADO-RS ``url`` (a study, series or instance) into files under ``directory`` (0600)."""
        if not url.startswith(("http://", "https://")):
            url = self.base + "/" + url.lstrip("/")
        files: list[Path] = []
        async with self.session.get(url, headers=await self._headers(_ACCEPT_DICOM), ssl=self.hub.ssl_context or True,
                                    timeout=self.timeout) as response:
            if response.status != 200:
                raise HubDicomWebError(f"WADO-RS: HTTP {response.status}")
            reader = aiohttp.MultipartReader.from_response(response)
            try:
                while (part := await reader.next()) is not None:
                    if not isinstance(part, aiohttp.BodyPartReader):
                        raise HubDicomWebError("WADO-RS: nested multipart answer")
                    target = directory / f"{uuid.uuid4().hex}.dcm"
                    fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                    files.append(target)
                    with os.fdopen(fd, "wb") as f:
                        while chunk := await part.read_chunk(_CHUNK):
                            f.write(chunk)
            except BaseException:
                for path in files:
                    path.unlink(missing_ok=True)
                raise
        return files
