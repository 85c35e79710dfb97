"""The hub's operator dashboard (served at ``/``). Routes are added by :func:`add_dashboard_routes`."""

from __future__ import annotations

from aiohttp import web

__all__ = ["add_dashboard_routes"]


def add_dashboard_routes(app: web.Application) -> None:
    """Mount the dashboard on the hub's application (no routes yet in this version)."""
