"""STOW-RS: ``POST /dicomweb/studies[/{study}]`` (PS3.18 §10.5).

The request is ``multipart/related; type="application/dicom"``; each part is one Part 10
instance. Parts are streamed to ``dicom/.incoming/`` in 64 KiB reads (an instance never sits in
memory, whatever its size), then parsed (header only, in a worker thread), moved into place and
fsynced, then indexed. An instance already stored (same SOP Instance UID) is answered as stored:
the agent re-sends after a crash or a link drop and must not get a failure or a second copy.

Answer (PS3.18 §10.5.3): 200 when every part was stored, 202 when some failed, 409 when all
failed; the body is DICOM JSON with ReferencedSOPSequence (0008,1199), FailedSOPSequence
(0008,1198) with FailureReason (0008,1197), and RetrieveURL (0008,1190) of the study when the
request named one study. Reasons: 0xC000 not a DICOM instance, 0xA700 out of resources (disk
full), 0xC122 study UID not the one in the request path (PS3.18 Table 10.5.3-3).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import uuid
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from medagent.dicom.dicomjson import dataset_json
from medagent.dicom.files import (
    InstanceInfo,
    InvalidInstance,
    durable_move,
    instance_info,
    read_header,
)
from medagent.hub.dicomweb.common import (
    authorize,
    dicom_json_response,
    error,
    path_uids,
    service_url,
)
from medagent.hub.dicomweb.store import DicomStore

__all__ = ["handle_stow"]

log = logging.getLogger("medagent.hub.dicomweb")

_CHUNK = 64 * 1024
_PREAMBLE = b"\x00" * 128 + b"DICM"
FAILURE_INVALID = 0xC000
FAILURE_RESOURCES = 0xA700
FAILURE_STUDY_MISMATCH = 0xC122


class _PartFailure(Exception):
    def __init__(self, status: int, reason: str, info: InstanceInfo | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.info = info


def _media_parameters(content_type: str) -> tuple[str, dict[str, str]]:
    media, *rest = [item.strip() for item in content_type.split(";")]
    params = {}
    for item in rest:
        name, _, value = item.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return media.lower(), params


async def _receive(part: BodyPartReader, target: Path) -> None:
    first = True
    with open(target, "xb") as f:  # noqa: ASYNC230 - 64 KiB page-cache writes; fsync runs in a thread
        while chunk := await part.read_chunk(_CHUNK):
            if first and chunk[:2] == b"\x02\x00":
                # File Meta without the preamble (pydicom.dcmwrite of a dataset without one, as
                # dicomweb-client sends): store a standard Part 10 file (PS3.10 §7.1)
                f.write(_PREAMBLE)
            first = False
            f.write(chunk)
    target.chmod(0o600)


def _parse(path: Path) -> tuple[InstanceInfo, dict[str, Any]]:
    header = read_header(path)
    return instance_info(header), dataset_json(header)


async def _store_part(store: DicomStore, part: BodyPartReader, study: str | None) -> tuple[InstanceInfo, bool]:
    incoming = store.incoming / f"{uuid.uuid4().hex}.part"
    try:
        try:
            await _receive(part, incoming)
            info, metadata = await asyncio.to_thread(_parse, incoming)
        except InvalidInstance as exc:
            raise _PartFailure(FAILURE_INVALID, str(exc)) from None
        if study is not None and info.study_uid != study:
            raise _PartFailure(FAILURE_STUDY_MISMATCH, "Study Instance UID differs from the request's", info)
        if store.contains(info.sop_uid):
            return info, False
        target = store.file_path(info.study_uid, info.series_uid, info.sop_uid)
        try:
            size, sha256 = await asyncio.to_thread(durable_move, incoming, target)
        except OSError as exc:
            status = FAILURE_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else FAILURE_INVALID
            raise _PartFailure(status, f"cannot store: {exc.strerror}", info) from None
        return info, store.add(info, size, sha256, metadata)
    finally:
        incoming.unlink(missing_ok=True)


def _referenced(base: str, info: InstanceInfo) -> dict[str, Any]:
    return {
        "00081150": {"vr": "UI", "Value": [info.sop_class_uid]},
        "00081155": {"vr": "UI", "Value": [info.sop_uid]},
        "00081190": {"vr": "UR", "Value": [
            f"{base}/studies/{info.study_uid}/series/{info.series_uid}/instances/{info.sop_uid}"]},
    }


async def handle_stow(request: web.Request) -> web.Response:
    store = await authorize(request)
    study = path_uids(request, "study")[0] if "study" in request.match_info else None
    media, params = _media_parameters(request.headers.get("Content-Type", ""))
    if media != "multipart/related" or params.get("type", "application/dicom").lower() != "application/dicom":
        raise error(415, 'STOW-RS here takes multipart/related; type="application/dicom"')
    base = service_url(request)
    referenced: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise error(400, "nested multipart bodies are not supported")
        part_media, _ = _media_parameters(part.headers.get("Content-Type", "application/dicom"))
        if part_media != "application/dicom":
            await part.release()
            failed.append({"00081197": {"vr": "US", "Value": [FAILURE_INVALID]}})
            continue
        try:
            info, added = await _store_part(store, part, study)
        except _PartFailure as exc:
            log.warning("STOW-RS part refused: %s (0x%04X)", exc, exc.status)
            item = {"00081197": {"vr": "US", "Value": [exc.status]}}
            if exc.info is not None:
                item["00081150"] = {"vr": "UI", "Value": [exc.info.sop_class_uid]}
                item["00081155"] = {"vr": "UI", "Value": [exc.info.sop_uid]}
            failed.append(item)
            continue
        referenced.append(_referenced(base, info))
        log.info("STOW-RS %s instance %s", "stored" if added else "already had", info.sop_uid)
    body: dict[str, Any] = {}
    if study is not None:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if referenced else 409)
    return dicom_json_response(body, status)
