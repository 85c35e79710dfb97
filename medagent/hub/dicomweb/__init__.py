"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) under ``/dicomweb``. Routes are added by :func:`add_dicomweb_routes`."""

from __future__ import annotations

from aiohttp import web

__all__ = ["add_dicomweb_routes"]


def add_dicomweb_routes(app: web.Application) -> None:
    """Mount DICOMweb on the hub's application (no routes yet in this version)."""
