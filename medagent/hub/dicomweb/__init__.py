"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS; PS3.18) under ``/dicomweb`` on the hub.

:func:`add_dicomweb_routes` mounts the routes and opens the instance store
(:class:`~medagent.hub.dicomweb.store.DicomStore`, ``dicom.sqlite3`` plus ``dicom/`` in the hub's
data directory) when the application starts, closing it on cleanup. Every route needs a bearer
token: the hub's admin token or an agent access token (:func:`medagent.hub.access.principal`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from medagent.hub.context import CTX_KEY
from medagent.hub.dicomweb.common import PREFIX, STORE_KEY
from medagent.hub.dicomweb.qido import handle_qido
from medagent.hub.dicomweb.store import DicomStore
from medagent.hub.dicomweb.stow import handle_stow
from medagent.hub.dicomweb.wado import handle_frames, handle_metadata, handle_retrieve

__all__ = ["STORE_KEY", "add_dicomweb_routes"]


async def _store_lifetime(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE_KEY]
    store.open()
    try:
        yield
    finally:
        store.close()


def add_dicomweb_routes(app: web.Application) -> None:
    """Mount DICOMweb on the hub's application and tie the store to its lifetime."""
    app[STORE_KEY] = DicomStore(app[CTX_KEY].settings.data_dir)  # opened on startup, closed on cleanup
    app.cleanup_ctx.append(_store_lifetime)
    study = PREFIX + "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{instance}"
    router = app.router
    router.add_post(PREFIX + "/studies", handle_stow)
    router.add_post(study, handle_stow)
    for path in (PREFIX + "/studies", PREFIX + "/series", PREFIX + "/instances", study + "/series",
                 study + "/instances", series + "/instances"):
        router.add_get(path, handle_qido)
    for path in (study, series, instance):
        router.add_get(path, handle_retrieve)
        router.add_get(path + "/metadata", handle_metadata)
    router.add_get(instance + "/frames/{frames}", handle_frames)
