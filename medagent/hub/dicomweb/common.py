"""What every DICOMweb handler shares: the store key, auth, DICOM JSON responses, URLs."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from medagent.dicom.uids import is_uid
from medagent.hub.access import principal
from medagent.hub.dicomweb.store import DicomStore

__all__ = ["DICOM_JSON", "STORE_KEY", "authorize", "dicom_json_response", "error", "path_uids", "service_url"]

STORE_KEY: web.AppKey[DicomStore] = web.AppKey("medagent_dicom_store", DicomStore)
DICOM_JSON = "application/dicom+json"
PREFIX = "/dicomweb"


async def authorize(request: web.Request) -> DicomStore:
    """The store, for a caller holding the admin token or an agent token (401 otherwise)."""
    await principal(request)
    return request.app[STORE_KEY]


def dicom_json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=DICOM_JSON)


def error(status: int, text: str) -> web.HTTPException:
    """An HTTP error with a plain reason (never PHI: only UIDs and parameter names)."""
    return _ERRORS[status](text=text)


_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest, 404: web.HTTPNotFound, 406: web.HTTPNotAcceptable,
    409: web.HTTPConflict, 415: web.HTTPUnsupportedMediaType,
}


def service_url(request: web.Request) -> str:
    """Absolute base of the DICOMweb service as the caller reached it (for RetrieveURLs)."""
    return f"{request.scheme}://{request.host}{PREFIX}"


def path_uids(request: web.Request, *names: str) -> list[str]:
    """The UIDs named in the path, each checked (404 for anything that is not a UID)."""
    values = [request.match_info[name] for name in names]
    for value in values:
        if not is_uid(value):
            raise error(404, f"not a UID: {value[:70]!r}")
    return values
