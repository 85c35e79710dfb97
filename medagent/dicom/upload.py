"""Delivery of a queued DICOM instance to the hub: the ``application/dicom`` FileUploader.

The runtime's dispatcher calls :func:`upload_instance` with the spooled Part 10 file and the
record's metadata body before it sends the unit's transmit (channels/base.py FileUploader):

* ``storage=dicomweb`` (medagent's default): STOW-RS (PS3.18 §10.5) of the one instance to
  ``<hub>/dicomweb/studies`` as ``multipart/related; type="application/dicom"``, the file
  streamed from disk in 1 MiB reads. Works with medagent's hub and with a Medplum server
  (Medplum's own ``storage=dicomweb``). The answer's RetrieveURL becomes ``instance.retrieveUrl``.
* ``storage=binary`` (Medplum's default): a FHIR ``Binary`` created by POSTing the file as
  ``application/dicom`` to ``<hub>/fhir/R4/Binary``; ``binary: {reference: "Binary/<id>"}`` is
  added to the transmit body, as Medplum's agent does.

Idempotent by construction: the hub dedups STOW-RS by SOP Instance UID, so an upload cut off by
a link drop or a crash is simply sent again (whole instance; the row stays pending until this
returns). Any failure raises :class:`UploadError`; the dispatcher retries with backoff.

The storage choice travels inside the queued body under :data:`STORAGE_KEY` (so it survives
restarts with the row) and is removed before the transmit is built.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

if TYPE_CHECKING:
    from medagent.channels.base import HubClient
    from medagent.records import FilePayload

__all__ = ["STORAGE_KEY", "UploadError", "upload_instance"]

STORAGE_KEY = "x-medagent-storage"
_CHUNK = 1 << 20
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)


class UploadError(RuntimeError):
    """The hub did not take the instance (HTTP status and reason; the row stays pending)."""


async def _stow_body(path: Path, boundary: str) -> AsyncIterator[bytes]:
    yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    with open(path, "rb") as f:  # noqa: ASYNC230 - page-cache reads of 1 MiB between sends
        while block := f.read(_CHUNK):
            yield block
    yield f"\r\n--{boundary}--\r\n".encode()


def _retrieve_url(answer: dict[str, Any], sop_uid: str) -> str:
    for item in answer.get("00081199", {}).get("Value", []):
        if item.get("00081155", {}).get("Value", [None])[0] == sop_uid:
            urls = item.get("00081190", {}).get("Value", [])
            return str(urls[0]) if urls else ""
    for item in answer.get("00081198", {}).get("Value", []):
        reason = item.get("00081197", {}).get("Value", [0])[0]
        raise UploadError(f"the hub refused instance {sop_uid}: failure reason 0x{int(reason):04X}")
    raise UploadError(f"the hub's STOW-RS answer does not reference instance {sop_uid}")


async def _stow(session: aiohttp.ClientSession, hub: HubClient, path: Path, sop_uid: str) -> str:
    boundary = f"medagent-{secrets.token_hex(12)}"
    headers = {"Authorization": await hub.authorization(), "Accept": "application/dicom+json",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    url = hub.base_url.rstrip("/") + "/dicomweb/studies"
    async with session.post(url, data=_stow_body(path, boundary), headers=headers, ssl=hub.ssl_context or True,
                            timeout=_TIMEOUT) as response:
        text = await response.read()
        if response.status not in (200, 202, 409):
            raise UploadError(f"STOW-RS to the hub: HTTP {response.status}")
        try:
            answer = orjson.loads(text) if text else {}
        except orjson.JSONDecodeError:
            raise UploadError("STOW-RS to the hub: the answer is not JSON") from None
    return _retrieve_url(answer, sop_uid)


async def _binary(session: aiohttp.ClientSession, hub: HubClient, path: Path) -> str:
    headers = {"Authorization": await hub.authorization(), "Content-Type": "application/dicom",
               "Accept": "application/fhir+json"}
    url = hub.base_url.rstrip("/") + "/fhir/R4/Binary"

    async def body() -> AsyncIterator[bytes]:
        with open(path, "rb") as f:  # noqa: ASYNC230
            while block := f.read(_CHUNK):
                yield block

    async with session.post(url, data=body(), headers=headers, ssl=hub.ssl_context or True, timeout=_TIMEOUT) as response:
        if response.status not in (200, 201):
            raise UploadError(f"Binary upload to the hub: HTTP {response.status}")
        resource = await response.json(content_type=None)
    if not isinstance(resource, dict) or not resource.get("id"):
        raise UploadError("Binary upload to the hub: no resource id in the answer")
    return f"Binary/{resource['id']}"


async def upload_instance(hub: HubClient, path: Path, payload: FilePayload, body: bytes) -> tuple[bytes, str]:
    """Upload the instance at ``path``; return the transmit body (Medplum's JSON) and its type."""
    document = orjson.loads(body)
    storage = document.pop(STORAGE_KEY, "dicomweb")
    sop_uid = document.get("instance", {}).get("sopInstanceUid", "")
    try:
        async with aiohttp.ClientSession() as session:
            if storage == "binary":
                document["binary"] = {"reference": await _binary(session, hub, path)}
            else:
                document.setdefault("instance", {})["retrieveUrl"] = await _stow(session, hub, path, sop_uid)
    except aiohttp.ClientError as exc:
        raise UploadError(f"upload to the hub failed: {type(exc).__name__}: {exc}") from None
    return orjson.dumps(document), "application/json"
