"""The hub's durable store: agents, channels, bots, inbound messages and bot-made resources.

:class:`HubStore` (``base.py``) is the async interface every hub module uses; two engines
implement it: SQLite (``sqlite.py``, one file in the data directory, the default) and
PostgreSQL (``postgres.py``, several hub processes on one database). :func:`open_store` picks
one from a store URL (``--store`` / ``[hub] store``):

* none — ``<data_dir>/hub.sqlite3``;
* ``sqlite:///path/to/hub.sqlite3`` (or ``sqlite:///path/to/dir``);
* ``postgresql://user[:password]@host[:port]/database`` (``postgres://`` too).

See docs/hub-store.md.
"""

from __future__ import annotations

from pathlib import Path

from medagent.hub.store.base import HubStore
from medagent.hub.store.common import (
    CHANNEL_SCHEMES,
    DB_FILE,
    DEFAULT_BOT,
    MAX_PAGE,
    InvalidValue,
    NotFound,
    StoreError,
    StoreUnavailable,
    now_ms,
)

__all__ = [
    "CHANNEL_SCHEMES",
    "DB_FILE",
    "DEFAULT_BOT",
    "MAX_PAGE",
    "HubStore",
    "InvalidValue",
    "NotFound",
    "StoreError",
    "StoreUnavailable",
    "is_postgres",
    "now_ms",
    "open_store",
    "sqlite_location",
]

_PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(url: str | None) -> bool:
    return bool(url) and url.startswith(_PG_SCHEMES)  # type: ignore[union-attr]


def sqlite_location(url: str | None, data_dir: Path) -> tuple[Path, str]:
    """(directory, file name) of the SQLite store a URL (or None: the default) names."""
    if not url:
        return Path(data_dir), DB_FILE
    if not url.startswith("sqlite:///"):
        raise StoreUnavailable(
            f"unknown hub store {url!r}: use sqlite:///path/to/hub.sqlite3 or"
            " postgresql://user@host:port/database (default: hub.sqlite3 in the data directory)"
        )
    path = Path(url[len("sqlite://"):])
    if path.is_dir() or not path.suffix:
        return path, DB_FILE
    return path.parent, path.name


async def open_store(url: str | None, data_dir: Path, *, pool_size: int = 10) -> HubStore:
    """Open (creating and migrating as needed) the store ``url`` names; StoreUnavailable if not."""
    if is_postgres(url):
        from medagent.hub.store.postgres import PostgresHubStore

        return await PostgresHubStore.open(url, pool_size=pool_size)  # type: ignore[arg-type]
    from medagent.hub.store.sqlite import SqliteHubStore

    directory, name = sqlite_location(url, data_dir)
    return SqliteHubStore(directory, name)
