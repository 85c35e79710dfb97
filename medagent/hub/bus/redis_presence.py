"""Agent presence in Redis: which hub process holds which agent, kept fresh by that process.

Theory of operation
-------------------
Two keys per agent (names from :class:`~medagent.hub.bus.envelope.Namespace`):

* ``lease:<id>`` — a string, the id of the process holding the agent's socket, with a short TTL
  (``lease_ttl_s``, default 15 s). The holder renews it every few seconds; a process that dies
  stops renewing, so its agents read as disconnected within the TTL. Its existence *is*
  "connected".
* ``info:<id>`` — a hash ``{process, since, version, heartbeat}`` with Medplum's 24 h TTL
  (``medplum:agent:<id>:info``, medplum-next-waves.md §6): what ``$status`` shows, also after a
  disconnect (the version and when the agent was last heard from).

Three Lua scripts keep each change atomic on the server, whatever other processes do:
``announce`` (a new connection: take the lease unconditionally — the newest socket wins),
``renew`` (take or keep the lease only if it is free or already ours; 0 tells the caller another
process now holds the agent) and ``release`` (drop the lease only if it is still ours, and stamp
the disconnect time). Renewals of all agents of a process go in one pipeline per tick.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from medagent.hub.bus.base import Hold, Presence
from medagent.hub.bus.envelope import Namespace

__all__ = ["INFO_TTL_S", "RedisPresence"]

#: how long what an agent last reported stays readable after it disconnected (Medplum's 24 h)
INFO_TTL_S = 24 * 3600

# KEYS: lease, info. ARGV: process, lease ttl ms, since, heartbeat, version ('' = unknown), info ttl s
_WRITE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], 'process', ARGV[1], 'since', ARGV[3], 'heartbeat', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'version', ARGV[5]) end
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 1
"""
_ANNOUNCE = _WRITE
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
""" + _WRITE
# KEYS: lease, info. ARGV: process, now, info ttl s
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'heartbeat', ARGV[2])
redis.call('HDEL', KEYS[2], 'process', 'since')
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


class RedisPresence:
    def __init__(self, redis: Redis, namespace: Namespace, process_id: str, lease_ttl_s: float) -> None:
        self._redis = redis
        self._ns = namespace
        self._process_id = process_id
        self._lease_ttl_ms = max(1, int(lease_ttl_s * 1000))
        self._announce = redis.register_script(_ANNOUNCE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def _keys(self, agent_id: str) -> list[str]:
        return [self._ns.lease_key(agent_id), self._ns.info_key(agent_id)]

    def _write_args(self, hold: Hold) -> list[Any]:
        return [self._process_id, self._lease_ttl_ms, repr(hold.since), repr(hold.heartbeat), hold.version or "",
                INFO_TTL_S]

    async def announce(self, hold: Hold) -> None:
        await self._announce(keys=self._keys(hold.agent_id), args=self._write_args(hold))

    async def renew(self, holds: Sequence[Hold]) -> list[bool]:
        """Renew every hold's lease in one round trip; False where another process holds the agent."""
        if not holds:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for hold in holds:
                await self._renew(keys=self._keys(hold.agent_id), args=self._write_args(hold), client=pipe)
            results = await pipe.execute()
        return [bool(r) for r in results]

    async def release(self, holds: Sequence[Hold]) -> None:
        if not holds:
            return
        now = repr(time.time())
        async with self._redis.pipeline(transaction=False) as pipe:
            for hold in holds:
                await self._release(keys=self._keys(hold.agent_id), args=[self._process_id, now, INFO_TTL_S],
                                    client=pipe)
            await pipe.execute()

    async def read(self, agent_ids: Sequence[str]) -> dict[str, Presence]:
        if not agent_ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for agent_id in agent_ids:
                pipe.get(self._ns.lease_key(agent_id))
                pipe.hgetall(self._ns.info_key(agent_id))
            results = await pipe.execute()
        return {agent_id: _presence(results[2 * i], results[2 * i + 1]) for i, agent_id in enumerate(agent_ids)}


def _presence(lease: bytes | None, info: dict[bytes, bytes]) -> Presence:
    version = info.get(b"version")
    heartbeat = info.get(b"heartbeat")
    since = info.get(b"since")
    return Presence(
        connected=lease is not None,
        version=version.decode() if version else None,
        last_updated=_float(heartbeat),
        process_id=lease.decode() if lease is not None else None,
        connected_since=_float(since) if lease is not None else None,
    )


def _float(value: bytes | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
