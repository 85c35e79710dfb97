"""C-STORE SCU for hub-initiated pushes: the OutboundSender for ``dicom://AE@host:port``.

A ``$push`` to a DICOM remote carries, by content type:

* ``application/dicom``: one Part 10 instance, base64-encoded in the body;
* ``application/json``: ``{"retrieveUrls": [...]}`` -- WADO-RS URLs of the hub (absolute, or
  relative to ``<hub>/dicomweb``) of instances, series or studies; fetched through the agent's
  hub client into private temporary files;
* ``text/uri-list``: the same URLs, one per line (RFC 2483).

All instances go over one association to the remote (called AE = the URL's user part, calling
AE = ``?callingAet=`` or ``MEDAGENT``), proposing each instance's own SOP class and transfer
syntax, sent from the file in PDU-sized chunks (pynetdicom ``STORE_SEND_CHUNKED_DATASET``).
The reply is JSON ``{"results": [{"sopInstanceUid", "status"}...]}`` with the PS3.4 status of
every instance (``"0x0000"`` success, ``null`` when no status came back); HTTP-style
``status_code`` 200 when all succeeded, 502 otherwise. An unreachable or refusing remote raises
:class:`DicomPushError` (the runtime answers 400 with its text).

pynetdicom blocks, so the association runs in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
import orjson
from pynetdicom import AE, _config, build_context

from medagent.dicom.files import InvalidInstance, read_header

if TYPE_CHECKING:
    from medagent.channels.base import HubClient, OutboundReply

__all__ = ["DicomPushError", "DicomStoreSender", "parse_dicom_remote"]

_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


class DicomPushError(RuntimeError):
    """A push that could not be carried out (the text is the reason)."""


def parse_dicom_remote(remote: str) -> tuple[str, str, int, str]:
    """``dicom://AE@host:port[?callingAet=X]`` -> (called AE, host, port, calling AE)."""
    parts = urlsplit(remote)
    if parts.scheme != "dicom" or not parts.hostname or parts.port is None:
        raise DicomPushError(f"not a DICOM remote (dicom://AE@host:port): {remote!r}")
    called = unquote(parts.username or "")
    calling = parse_qs(parts.query).get("callingAet", ["MEDAGENT"])[0]
    for title in (called, calling):
        if not _AE_TITLE.fullmatch(title):
            raise DicomPushError(f"{title!r} is not an AE title in {remote!r}")
    return called, parts.hostname, parts.port, calling


def _associate_and_store(called: str, host: str, port: int, calling: str, files: list[Path],
                         timeout: float) -> list[dict[str, Any]]:
    headers = []
    for path in files:
        try:
            header = read_header(path)
        except InvalidInstance as exc:
            raise DicomPushError(f"a pushed instance is unreadable: {exc}") from None
        headers.append((path, str(header.SOPInstanceUID), str(header.SOPClassUID),
                        str(header.file_meta.TransferSyntaxUID)))
    # one presentation context per (SOP class, transfer syntax): the acceptor chooses one syntax
    # per context (PS3.8 §9.3.2.2) and a file is sent as it is, in its own syntax
    pairs = sorted({(sop_class, syntax) for _, _, sop_class, syntax in headers})
    if len(pairs) > 128:
        raise DicomPushError("more than 128 SOP class/transfer syntax pairs in one push")
    _config.STORE_SEND_CHUNKED_DATASET = True  # send files as they are, in PDU-sized reads
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = [build_context(cls, syntax) for cls, syntax in pairs]
    assoc = ae.associate(host, port, ae_title=called, contexts=contexts)
    if not assoc.is_established:
        raise DicomPushError(f"association with {called}@{host}:{port} was rejected or failed")
    results: list[dict[str, Any]] = []
    try:
        for path, sop_uid, _, _ in headers:
            try:
                answer = assoc.send_c_store(path)
            except (ValueError, RuntimeError) as exc:  # no accepted context for it
                results.append({"sopInstanceUid": sop_uid, "status": None, "error": str(exc)[:200]})
                continue
            status = answer.get("Status") if answer is not None else None
            results.append({"sopInstanceUid": sop_uid,
                            "status": None if status is None else f"0x{int(status):04X}"})
    finally:
        if assoc.is_established:
            assoc.release()
    return results


class DicomStoreSender:
    """The runtime's one sender for ``dicom://`` remotes (base.register_outbound_sender)."""

    def __init__(self, *, hub: HubClient | None = None, **_agent_settings: Any) -> None:
        self.hub = hub
        self._session: aiohttp.ClientSession | None = None

    async def _urls_to_files(self, urls: list[str], directory: Path) -> list[Path]:
        from medagent.dicom.hubweb import HubDicomWeb

        if self.hub is None:
            raise DicomPushError("this agent has no hub client to fetch WADO-RS URLs with")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        web = HubDicomWeb(self.hub, self._session)
        files: list[Path] = []
        for url in urls:
            files.extend(await web.download(url, directory))
        return files

    async def send(self, remote: str, body: str, content_type: str, *, return_ack: str | None = None,
                   timeout: float | None = None) -> OutboundReply:
        from medagent.channels.base import OutboundReply

        called, host, port, calling = parse_dicom_remote(remote)
        directory = Path(tempfile.mkdtemp(prefix="medagent-push-"))
        try:
            media = content_type.split(";")[0].strip().lower()
            if media == "application/dicom":
                try:
                    data = base64.b64decode(body, validate=True)
                except (binascii.Error, ValueError):
                    raise DicomPushError("an application/dicom push body must be base64 Part 10") from None
                path = directory / "push.dcm"
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                files = [path]
            elif media in ("application/json", "text/uri-list"):
                if media == "application/json":
                    try:
                        urls = orjson.loads(body)["retrieveUrls"]
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        raise DicomPushError('a JSON push body must be {"retrieveUrls": [...]}') from None
                else:
                    urls = [line.strip() for line in body.splitlines() if line.strip() and not line.startswith("#")]
                if not urls or not all(isinstance(u, str) for u in urls):
                    raise DicomPushError("no retrieve URLs in the push body")
                files = await self._urls_to_files(urls, directory)
            else:
                raise DicomPushError(f"cannot push {media!r} to a DICOM remote "
                                     "(application/dicom, application/json or text/uri-list)")
            if not files:
                raise DicomPushError("nothing to push")
            results = await asyncio.to_thread(_associate_and_store, called, host, port, calling, files,
                                              timeout or 30.0)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        ok = all(r["status"] == "0x0000" for r in results)
        return OutboundReply(orjson.dumps({"remote": remote, "results": results}).decode(), "application/json",
                             200 if ok else 502)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
