"""QIDO-RS: search for studies, series and instances (PS3.18 §10.6).

Routes: ``/studies``, ``/series``, ``/instances``, ``/studies/{s}/series``,
``/studies/{s}/instances``, ``/studies/{s}/series/{se}/instances``. Matching is
:mod:`medagent.dicom.query`'s; each result carries the level's default attributes (PS3.18
Table 10.6.3-3..5) copied from a representative instance's stored metadata, the computed
counts and ModalitiesInStudy, any ``includefield`` attribute the metadata has (``all``: every
attribute), and RetrieveURL (0008,1190). No match is ``200 []``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from medagent.dicom.query import Query, QueryError, parse_qido
from medagent.hub.dicomweb.common import (
    authorize,
    dicom_json_response,
    error,
    path_uids,
    service_url,
)

__all__ = ["handle_qido"]

_COMMON = ("00080005",)
_STUDY = ("00080020", "00080030", "00080050", "00080056", "00080090", "00100010", "00100020", "00100030",
          "00100040", "0020000D", "00200010", "00081030")
_SERIES = ("00080060", "0008103E", "0020000D", "0020000E", "00200011", "00080021", "00080031")
_INSTANCE = ("00080016", "00080018", "0020000D", "0020000E", "00200013", "00280008", "00280010", "00280011",
             "00280100", "00080060")
_DEFAULTS: dict[str, tuple[str, ...]] = {"study": _COMMON + _STUDY, "series": _COMMON + _SERIES,
                                         "instance": _COMMON + _INSTANCE}


def _result(level: str, query: Query, metadata: dict[str, Any], computed: dict[str, Any], base: str) -> dict[str, Any]:
    if "all" in query.include:
        out = dict(metadata)
    else:
        wanted = _DEFAULTS[level] + tuple(query.include)
        out = {tag: metadata[tag] for tag in wanted if tag in metadata}
    url = computed.pop("_url")
    out.update(computed)
    out["00081190"] = {"vr": "UR", "Value": [base + url]}
    return dict(sorted(out.items()))


def _level(request: web.Request) -> str:
    tail = request.path.rstrip("/").rsplit("/", 1)[-1]
    return {"studies": "study", "series": "series", "instances": "instance"}[tail]


async def handle_qido(request: web.Request) -> web.Response:
    store = await authorize(request)
    level = _level(request)
    params = list(request.query.items())
    names = [n for n in ("study", "series") if n in request.match_info]
    uids = dict(zip(names, path_uids(request, *names), strict=True))
    if "study" in uids:
        params.append(("StudyInstanceUID", uids["study"]))
    if "series" in uids:
        params.append(("SeriesInstanceUID", uids["series"]))
    try:
        query = parse_qido(level, params)
    except QueryError as exc:
        raise error(400, f"invalid query parameter {exc}") from None
    base = service_url(request)
    return dicom_json_response([_result(level, query, meta, computed, base) for meta, computed in store.search(query)])
