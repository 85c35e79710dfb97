"""Escaped-by-default HTML building for the dashboard's server-rendered pages.

Theory of operation
-------------------
Pages are small, so they are built from Python format strings instead of a template engine
(no dependency). The one rule that keeps them safe against HTML injection (OWASP XSS
Prevention, rule #1): every value put into a page goes through :func:`render`, which escapes it
with :func:`html.escape` (quotes included, so values are safe inside attributes) unless it is a
:class:`Markup` — a string this package itself built. Raw strings are never concatenated into
markup. Pages contain no inline script or style (the CSP forbids both).
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable
from typing import Any

__all__ = ["Markup", "age", "escape", "instant", "join", "render"]


class Markup(str):
    """Text that is already HTML (built by :func:`render`): inserted without escaping."""

    __slots__ = ()


def escape(value: Any) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def render(template: str, /, **values: Any) -> Markup:
    """``template.format(**values)`` with every value escaped unless it is :class:`Markup`."""
    return Markup(template.format(**{name: escape(value) for name, value in values.items()}))


def join(parts: Iterable[Markup]) -> Markup:
    return Markup("".join(escape(p) for p in parts))


def instant(epoch_ms: float | None) -> str:
    """``2026-11-30 08:22:58Z`` (UTC, second precision), or an em dash."""
    if epoch_ms is None:
        return "—"
    moment = datetime.datetime.fromtimestamp(epoch_ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def age(seconds: float | None) -> str:
    """A short human age: ``4 s``, ``3 min``, ``2 h``, ``5 d``."""
    if seconds is None:
        return "—"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"
