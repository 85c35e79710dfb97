"""WADO-RS: retrieve studies, series, instances, metadata and frames (PS3.18 §10.4).

* ``GET /studies/{s}[/series/{se}[/instances/{i}]]``: ``multipart/related;
  type="application/dicom"``, one part per instance, each file streamed from disk in 1 MiB reads
  with an exact Content-Length (no transcoding: instances go out in the transfer syntax they
  were stored in, named in each part's Content-Type; an Accept that allows only other transfer
  syntaxes gets 406).
* ``.../metadata``: a JSON array of the stored instances' DICOM JSON without bulk data.
* ``.../instances/{i}/frames/{list}``: ``multipart/related; type="application/octet-stream"``,
  one part per frame (native pixel data sliced by frame size; encapsulated data split into
  frames by pydicom, PS3.5 §A.4). Frame numbers are 1-based (PS3.18 §10.4.1.1.1).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from medagent.hub.dicomweb.common import authorize, dicom_json_response, error, path_uids
from medagent.hub.dicomweb.store import StoredInstance

__all__ = ["handle_frames", "handle_metadata", "handle_retrieve"]

_READ = 1 << 20


def _accepted_syntaxes(accept: str) -> set[str] | None:
    """Transfer syntaxes the Accept header allows for application/dicom; None = any."""
    allowed: set[str] = set()
    for media_range in accept.split(","):
        media, *params = [p.strip() for p in media_range.split(";")]
        values = {k.strip().lower(): v.strip().strip('"') for k, _, v in (p.partition("=") for p in params)}
        if media in ("*/*", "multipart/*", "") or (media == "multipart/related" and "type" not in values):
            return None
        if media == "multipart/related" and values.get("type") in ("application/dicom", "application/*"):
            syntax = values.get("transfer-syntax", "*")  # lenient: no parameter means any
            if syntax == "*":
                return None
            allowed.add(syntax)
    return allowed


async def _selected(request: web.Request) -> list[StoredInstance]:
    store = await authorize(request)
    names = [n for n in ("study", "series", "instance") if n in request.match_info]
    uids = path_uids(request, *names) + [None] * (3 - len(names))
    found = store.instances(uids[0], uids[1], uids[2])  # type: ignore[arg-type]
    if not found:
        raise error(404, f"no such {names[-1]}")
    return found


async def _stream_multipart(request: web.Request, parts: Sequence[tuple[str, Path | bytes, int]], media: str) -> web.StreamResponse:
    boundary = secrets.token_hex(16)
    heads = [f"--{boundary}\r\nContent-Type: {ctype}\r\nContent-Length: {size}\r\n\r\n".encode()
             for ctype, _, size in parts]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + size + 2 for h, (_, _, size) in zip(heads, parts, strict=True)) + len(tail)
    response = web.StreamResponse(headers={
        "Content-Type": f'multipart/related; type="{media}"; boundary={boundary}'})
    response.content_length = length
    await response.prepare(request)
    for head, (_, source, _) in zip(heads, parts, strict=True):
        await response.write(head)
        if isinstance(source, bytes):
            await response.write(source)
        else:
            with open(source, "rb") as f:  # noqa: ASYNC230 - reads run in a thread below
                while block := await asyncio.to_thread(f.read, _READ):
                    await response.write(block)
        await response.write(b"\r\n")
    await response.write(tail)
    await response.write_eof()
    return response


async def handle_retrieve(request: web.Request) -> web.StreamResponse:
    instances = await _selected(request)
    allowed = _accepted_syntaxes(request.headers.get("Accept", ""))
    if allowed is not None:
        instances = [i for i in instances if i.transfer_syntax in allowed]
        if not instances:
            raise error(406, "the instances are stored in other transfer syntaxes; transcoding is not supported")
    parts = [(f"application/dicom; transfer-syntax={i.transfer_syntax}", i.path, i.size) for i in instances]
    return await _stream_multipart(request, parts, "application/dicom")


async def handle_metadata(request: web.Request) -> web.Response:
    out = []
    for instance in await _selected(request):
        metadata = dict(instance.metadata)
        metadata["00083002"] = {"vr": "UI", "Value": [instance.transfer_syntax]}
        out.append(metadata)
    return dicom_json_response(out)


def _frames(path: Path, numbers: list[int]) -> tuple[str, list[bytes]]:
    ds = dcmread(str(path))
    if "PixelData" not in ds:
        raise LookupError("the instance has no pixel data")
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if any(n > count for n in numbers):
        raise LookupError(f"the instance has {count} frame(s)")
    if syntax.is_encapsulated:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
    else:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        frames = [ds.PixelData[i * size:(i + 1) * size] for i in range(count)]
    return str(syntax), [frames[n - 1] for n in numbers]


async def handle_frames(request: web.Request) -> web.StreamResponse:
    instance = (await _selected(request))[0]
    try:
        numbers = [int(n) for n in request.match_info["frames"].split(",")]
    except ValueError:
        raise error(400, "frame numbers must be integers") from None
    if not numbers or min(numbers) < 1:
        raise error(400, "frame numbers start at 1")
    try:
        syntax, frames = await asyncio.to_thread(_frames, instance.path, numbers)
    except LookupError as exc:
        raise error(404, str(exc)) from None
    ctype = f"application/octet-stream; transfer-syntax={syntax}"
    return await _stream_multipart(request, [(ctype, f, len(f)) for f in frames], "application/octet-stream")
