"""What the hub knows of an agent's remote upgrade (issue 16): the ``upgrade`` part of ``$status``.

Theory of operation
-------------------
The agent reports its upgrade in the ``upgrade`` section of ``$stats`` (medagent.ops.upgrade:
``state``, ``targetVersion``, ``fromVersion``, ``error``, ``switchedAt``, ``intakePauseS``).
``$upgrade`` is answered as soon as the agent *accepts* the request; the outcome comes later,
often from a new agent process on a new socket (possibly on another hub process). So after an
accepted ``$upgrade`` the hub asks for ``$stats`` through the bus every
:data:`POLL_INTERVAL_S`, for at most :data:`WATCH_LIMIT_S`, until the state is final
(:data:`FINAL_STATES`); a not-connected or silent agent (it is restarting) is asked again at the
next tick. Every upgrade section seen — by this watch or by an operator's ``$stats`` — is kept
in the store (``agent_upgrades``), so ``$status`` on any hub process reports the latest.

Invariants: at most one watch per agent per process; :meth:`UpgradeWatcher.close` cancels every
watch (the hub's stop); nothing here raises into the operation that started the watch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import orjson

from medagent.cloud.messages import StatsRequest, StatsResponse, new_callback
from medagent.hub.bus import AgentBus, BusError
from medagent.hub.store import HubStore

__all__ = ["FIELDS", "FINAL_STATES", "POLL_INTERVAL_S", "WATCH_LIMIT_S", "UpgradeWatcher", "upgrade_section"]

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 5.0
WATCH_LIMIT_S = 600.0
FINAL_STATES = frozenset({"completed", "rolled-back", "failed"})
#: the fields of the agent's upgrade section that ``$status`` reports
FIELDS = ("state", "targetVersion", "fromVersion", "error", "switchedAt", "intakePauseS")


def upgrade_section(stats: Mapping[str, Any]) -> dict[str, Any] | None:
    """The reportable upgrade fields of a ``$stats`` object; None when it has no upgrade section."""
    section = stats.get("upgrade")
    if not isinstance(section, Mapping) or not isinstance(section.get("state"), str):
        return None
    return {name: section.get(name) for name in FIELDS}


class UpgradeWatcher:
    def __init__(self, store: HubStore, bus: AgentBus, poll_interval_s: float = POLL_INTERVAL_S,
                 limit_s: float = WATCH_LIMIT_S) -> None:
        self._store = store
        self._bus = bus
        self._interval = poll_interval_s
        self._limit = limit_s
        self._watches: dict[str, asyncio.Task[None]] = {}

    async def record(self, agent_id: str, stats: Mapping[str, Any]) -> dict[str, Any] | None:
        """Keep the upgrade section of ``stats`` (if any) as the agent's latest; returns it."""
        section = upgrade_section(stats)
        if section is not None:
            await self._store.set_upgrade_status(agent_id, orjson.dumps(section).decode())
        return section

    async def latest(self, agent_id: str) -> str | None:
        """The kept upgrade section (JSON text), or None."""
        return await self._store.upgrade_status(agent_id)

    def watch(self, agent_id: str) -> None:
        """Poll the agent's ``$stats`` until its upgrade reaches a final state (bounded)."""
        running = self._watches.get(agent_id)
        if running is not None and not running.done():
            running.cancel()  # a newer $upgrade: watch that one
        task = asyncio.create_task(self._watch(agent_id), name=f"medagent-hub-upgrade-watch-{agent_id}")
        self._watches[agent_id] = task
        task.add_done_callback(lambda t: self._watches.pop(agent_id, None) if self._watches.get(agent_id) is t else None)

    async def _watch(self, agent_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._limit
        while loop.time() < deadline:
            await asyncio.sleep(self._interval)
            try:
                reply = await self._bus.request(agent_id, StatsRequest(new_callback(agent_id)), self._interval)
            except BusError:
                continue  # restarting, or on its way to another hub process: ask again
            if not isinstance(reply, StatsResponse):
                continue
            try:
                section = await self.record(agent_id, reply.stats)
            except Exception as exc:  # noqa: BLE001 - the store's trouble must not end the watch silently
                log.warning("agent %s: cannot keep its upgrade status: %s", agent_id, type(exc).__name__)
                continue
            if section is not None and section["state"] in FINAL_STATES:
                log.info("agent %s: upgrade %s", agent_id, section["state"])
                return
        log.info("agent %s: no final upgrade state within %.0f s; stopped asking", agent_id, self._limit)

    async def close(self) -> None:
        tasks = list(self._watches.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
