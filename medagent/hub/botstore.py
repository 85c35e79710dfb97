"""What a bot may do with the hub store (``BotEvent.store``): keep and read FHIR resources.

Why a facade rather than the store: a bot is user code; it gets the few calls it needs, not the
agents, tokens and messages of every site. And the store is async and bound to the hub's event
loop, while most bots are plain functions on the bot thread pool: the plain methods here hand
the call to the loop and wait for it (thread-safe), the ``*_async`` ones are for ``async def``
bots (which run on the loop). A plain method called on the loop thread itself (an
``inline_bot``) raises instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from medagent.hub.records import ResourceRecord
from medagent.hub.store import HubStore

__all__ = ["BotStore"]

T = TypeVar("T")
#: how long a bot thread waits for one store call (the bot's own timeout is usually shorter)
CALL_TIMEOUT_S = 30.0


class BotStore:
    """Resources only; built by the hub on its event loop, used from any thread."""

    def __init__(self, store: HubStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self._loop = loop
        self._loop_thread = threading.get_ident()

    # -- for plain (threaded) bots ------------------------------------------------------------

    def upsert_resource(self, resource_type: str, identifier: str, resource: dict[str, Any]) -> ResourceRecord:
        """Insert or replace the resource keyed by (type, identifier); its id is kept on update."""
        return self._wait(self._store.upsert_resource(resource_type, identifier, resource))

    def get_resource(self, resource_type: str, resource_id: str) -> ResourceRecord:
        return self._wait(self._store.get_resource(resource_type, resource_id))

    def find_resources(self, resource_type: str, identifier: str | None = None, limit: int = 100) -> list[ResourceRecord]:
        return self._wait(self._store.find_resources(resource_type, identifier, limit))

    # -- for async def bots -------------------------------------------------------------------

    async def upsert_resource_async(self, resource_type: str, identifier: str,
                                    resource: dict[str, Any]) -> ResourceRecord:
        return await self._store.upsert_resource(resource_type, identifier, resource)

    async def get_resource_async(self, resource_type: str, resource_id: str) -> ResourceRecord:
        return await self._store.get_resource(resource_type, resource_id)

    async def find_resources_async(self, resource_type: str, identifier: str | None = None,
                                   limit: int = 100) -> list[ResourceRecord]:
        return await self._store.find_resources(resource_type, identifier, limit)

    def _wait(self, call: Coroutine[Any, Any, T]) -> T:
        if threading.get_ident() == self._loop_thread:
            call.close()
            raise RuntimeError("a bot on the hub's event loop must use the *_async store methods")
        return asyncio.run_coroutine_threadsafe(call, self._loop).result(CALL_TIMEOUT_S)
