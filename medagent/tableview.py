"""Plain-text tables and human times for the command line's default (non ``--json``) output.

Why not a library such as rich: the gateway runs on locked-down hospital servers where every
dependency is reviewed, its output is piped into ``grep``/``less`` and log collectors more often
than it is read on a colour terminal, and a left-aligned table with a header is twenty lines.
``--json`` stays the machine format; these tables are for people.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Sequence

__all__ = ["render_table", "local_time_ms", "local_time_s", "human_bytes"]


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, empty: str = "(none)") -> str:
    """Columns padded to their widest cell, a header and a rule; ``empty`` when there are no rows.

    ``None`` cells print as ``-``; numbers are right-aligned.
    """
    cells = [[("-" if value is None else str(value)) for value in row] for row in rows]
    if not cells:
        return empty
    numeric = [all(_is_number(row[i]) for row in cells) for i in range(len(headers))]
    widths = [max(len(headers[i]), *(len(row[i]) for row in cells)) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def _is_number(text: str) -> bool:
    return text == "-" or text.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


def local_time_ms(epoch_ms: int | float | None) -> str | None:
    """ISO 8601 in the local time zone, to the second (``2026-11-30T09:15:02+01:00``)."""
    return None if epoch_ms is None else local_time_s(epoch_ms / 1000.0)


def local_time_s(epoch_s: int | float | None) -> str | None:
    if epoch_s is None:
        return None
    return _dt.datetime.fromtimestamp(epoch_s).astimezone().isoformat(timespec="seconds")


def human_bytes(size: int | None) -> str | None:
    if size is None:
        return None
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
