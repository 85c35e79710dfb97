"""The agent runtime behind `medagent serve`: channels -> durable queue -> link -> hub, and back.

Theory of operation
-------------------
`AgentRuntime.start()` brings the parts up in dependency order and `stop()` takes them down in
reverse, so nothing accepted is lost:

1. the durable queue (SQLite WAL in the data directory; its lease keeps a second agent off it);
2. the hub: an embedded one started as a child process (see `embedded_hub`), or a remote base URL
   (a medagent hub or a Medplum server) with client credentials;
3. the dispatcher (queue -> link) and the link (websocket, heartbeats, reconnects);
4. the channels (listening sockets). Remote hubs send the channel list through FHIR reads of the
   Agent and its Endpoints, like Medplum's agent; the embedded hub uses the config file's channels.

Stopping: channels stop accepting and wait for commits in flight (every committed message still
gets its ACK), then the dispatcher and link stop, the queue flushes and closes, and the embedded
hub is stopped last. Unconfirmed messages stay in the queue and are sent after the next start.

The runtime is the `InboundSink` of its channels and the `LinkHandler` of its link; it owns no
protocol logic of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medagent import __version__, _compat
from medagent.channels import Hl7Channel
from medagent.channels.endpoint import AckMode
from medagent.channels.mllp_client import MllpClientPool
from medagent.cloud.link import AgentLink, LinkSettings
from medagent.cloud.messages import AgentMessage, TransmitResponse
from medagent.config import EMBEDDED_HUB, ChannelConfig, Config
from medagent.queue import QUEUE_FILENAME, CommitResult, DuplicatePolicy, DurableQueue, InboundRecord
from medagent.runtime.dispatcher import Dispatcher
from medagent.runtime.embedded_hub import EmbeddedHub, HubCredentials
from medagent.runtime.remote_config import fetch_remote_channels, pool_settings
from medagent.runtime.requests import RequestHandler

__all__ = ["AgentRuntime", "StartupError"]

log = logging.getLogger("medagent.agent")

#: Above this many messages waiting for their group commit, channels stop reading sockets.
BACKPRESSURE_HIGH = 50_000
BACKPRESSURE_LOW = 10_000


class StartupError(RuntimeError):
    """Something the operator must fix before the agent can run (message says what)."""


@dataclass(frozen=True, slots=True)
class _ChannelView:
    """What the dispatcher needs of a channel: its encoding and whether bot replies reach devices."""

    channel: Hl7Channel
    encoding: str
    wants_replies: bool

    def deliver_reply(self, remote: str, control_id: str, body: str, status_code: int = 200) -> bool:
        return self.channel.deliver_reply(remote, control_id, body, status_code)


class AgentRuntime:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.data_dir = Path(config.agent.data_dir)
        self.queue: DurableQueue | None = None
        self.hub: EmbeddedHub | None = None
        self.credentials: HubCredentials | None = None
        self.link: AgentLink | None = None
        self.dispatcher: Dispatcher | None = None
        self.pool = MllpClientPool()
        self._pool_options: dict[str, Any] = {}
        self.channels: dict[str, Hl7Channel] = {}
        self._views: dict[str, _ChannelView] = {}
        self._requests: RequestHandler | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._paused = False
        self._stopping = False
        self.started_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.started_at = time.time()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log.info("medagent %s starting (%s)", __version__, _compat.implementation_summary())
        agent = self.config.agent
        self.queue = DurableQueue(
            self.data_dir / QUEUE_FILENAME,
            durability=str(agent.durability),
            dedup_window_s=agent.dedup_window_s,
            retention_days=agent.retention_days,
            retention_max_mb=agent.retention_max_mb,
            failed_retention_days=agent.failed_retention_days,
        )
        await self.queue.open()
        try:
            await self._start_hub_and_link()
            channel_configs = await self._channel_configs()
            await self._start_channels(channel_configs)
        except BaseException:
            await self.stop()
            raise
        self._tick_task = asyncio.get_running_loop().create_task(self._tick(), name="medagent-tick")

    async def stop(self) -> None:
        self._stopping = True
        if self._tick_task is not None:
            self._tick_task.cancel()
            self._tick_task = None
        for channel in list(self.channels.values()):
            await channel.stop()
        self.channels.clear()
        self._views.clear()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.link is not None:
            await self.link.close()
        await self.pool.close()
        if self.queue is not None:
            await self.queue.close()
            self.queue = None
        if self.hub is not None:
            await self.hub.stop()
            self.hub = None
        log.info("medagent stopped")

    async def _start_hub_and_link(self) -> None:
        agent = self.config.agent
        if agent.hub == EMBEDDED_HUB:
            self.hub = EmbeddedHub(self.config)
            self.credentials = await self.hub.start()
        else:
            assert agent.client_id and agent.client_secret and agent.agent_id  # checked by config
            self.credentials = HubCredentials(agent.hub, agent.agent_id, agent.client_id, agent.client_secret)
        creds = self.credentials
        settings = LinkSettings(
            base_url=creds.base_url,
            client_id=creds.client_id,
            client_secret=creds.client_secret,
            agent_id=creds.agent_id,
            ca_file=str(agent.ca_file) if agent.ca_file else None,
            heartbeat_s=agent.heartbeat_s,
            reconnect_min_s=agent.reconnect_min_s,
            reconnect_max_s=agent.reconnect_max_s,
            use_batching=agent.batching,
        )
        self.link = AgentLink(settings, self)
        assert self.queue is not None
        self.dispatcher = Dispatcher(self.queue, self.link, creds.agent_id, lambda: self._views)
        self._requests = RequestHandler(self)
        self.dispatcher.start()
        await self.link.start()

    async def _channel_configs(self) -> Sequence[ChannelConfig]:
        if self.hub is not None or self.config.channels:
            return self.config.channels
        assert self.link is not None and self.credentials is not None
        try:
            channels = await fetch_remote_channels(self.link, self.credentials.agent_id, self.data_dir)
        except RuntimeError as exc:  # no hub answer and no cached list: nothing to listen on
            raise StartupError(str(exc)) from None
        await self._apply_pool_settings()
        return channels

    async def _apply_pool_settings(self) -> None:
        """Medplum's Agent.setting keepAlive / maxClientsPerRemote; the pool is rebuilt on change."""
        assert self.link is not None and self.credentials is not None
        try:
            options = pool_settings(await self.link.fetch_json(f"/fhir/R4/Agent/{self.credentials.agent_id}"))
        except Exception as exc:  # noqa: BLE001 - the hub may be down; keep the current pool
            log.warning("cannot read Agent settings from the hub (%s); outbound pool unchanged", exc)
            return
        if options != self._pool_options:
            old, self.pool, self._pool_options = self.pool, MllpClientPool(**options), options
            await old.close()
            log.info("outbound MLLP pool: %s", ", ".join(f"{k}={v}" for k, v in options.items()))

    async def _start_channels(self, configs: Sequence[ChannelConfig]) -> None:
        for cfg in configs:
            if cfg.mllp is None:
                log.error("channel %s: %s channels are not available in this version; skipped",
                          cfg.name, cfg.endpoint.scheme)
                continue
            channel = Hl7Channel(cfg.name, cfg.endpoint, cfg.mllp, self, log_phi=self.config.agent.log_phi)
            try:
                await channel.start()
            except OSError as exc:
                raise StartupError(
                    f"channel {cfg.name}: cannot listen on {cfg.endpoint.host}:{cfg.endpoint.port}: {exc.strerror or exc}"
                ) from None
            self.channels[cfg.name] = channel
            wants = cfg.mllp.ack_mode in (AckMode.ORIGINAL, AckMode.TWO_PHASE)
            self._views[cfg.name] = _ChannelView(channel, cfg.mllp.encoding, wants)
            log.info("channel %s listening on mllp://%s:%d (%s mode)", cfg.name, channel.host, channel.port,
                     cfg.mllp.ack_mode.value)

    async def reload_channels(self) -> None:
        """Re-read the channel list and restart what changed (reload-config)."""
        configs = await self._channel_configs()
        wanted = {c.name: c for c in configs}
        for name in [n for n in self.channels if n not in wanted]:
            await self.channels.pop(name).stop()
            self._views.pop(name, None)
        changed = []
        for cfg in configs:
            current = self.channels.get(cfg.name)
            if current is not None and current.endpoint == cfg.endpoint:
                continue
            if current is not None:
                await self.channels.pop(cfg.name).stop()
                self._views.pop(cfg.name, None)
            changed.append(cfg)
        await self._start_channels(changed)

    # -- InboundSink (channels) ---------------------------------------------------------------------
    def accept(
        self,
        record: InboundRecord,
        *,
        durable: bool,
        dedup: DuplicatePolicy,
        on_commit: Callable[[CommitResult], None] | None,
    ) -> None:
        if not durable:
            assert self.dispatcher is not None
            self.dispatcher.send_immediate(record)
            return
        assert self.queue is not None and on_commit is not None
        self.queue.submit(record, on_commit, dedup)
        self._apply_backpressure()

    def _apply_backpressure(self) -> None:
        assert self.queue is not None
        backlog = self.queue.uncommitted
        if not self._paused and backlog > BACKPRESSURE_HIGH:
            self._paused = True
            log.warning("queue commit backlog %d: pausing reads on all channels", backlog)
            for channel in self.channels.values():
                channel.pause_reading()
        elif self._paused and backlog < BACKPRESSURE_LOW:
            self._paused = False
            for channel in self.channels.values():
                channel.resume_reading()

    # -- LinkHandler (link) ------------------------------------------------------------------------
    def on_live(self, features: Mapping[str, Any]) -> None:
        log.info("link live (hub features: %s)", ", ".join(sorted(features)) or "none")
        if self.dispatcher is not None:
            self.dispatcher.on_live()

    def on_down(self, reason: str) -> None:
        log.log(logging.INFO if self._stopping else logging.WARNING, "link down: %s", reason)
        if self.dispatcher is not None:
            self.dispatcher.on_down()

    def on_confirmed(self, callbacks: Sequence[str]) -> None:
        if self.dispatcher is not None:
            self.dispatcher.on_confirmed(callbacks)

    def on_transmit_error(self, callback: str, reason: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.on_error(callback, reason)

    def on_transmit_response(self, message: TransmitResponse) -> None:
        if self.dispatcher is not None:
            self.dispatcher.on_transmit_response(message)

    async def on_request(self, message: AgentMessage) -> AgentMessage | None:
        assert self._requests is not None
        return await self._requests.handle(message)

    # -- status ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "implementation": _compat.implementation_summary(),
            "extensionsActive": _compat.EXTENSIONS_ACTIVE,
            "uptimeSeconds": round(time.time() - self.started_at, 1),
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "live": bool(self.link and self.link.live),
            "link": self.link.stats() if self.link else {},
            "dispatch": self.dispatcher.stats() if self.dispatcher else {},
            "durableQueue": self.queue.stats() if self.queue else {},
            "channelStats": {name: ch.stats() for name, ch in self.channels.items()},
            "clientStats": self.pool.stats(),
        }

    async def _tick(self) -> None:
        """Housekeeping at the heartbeat period: idle outbound clients, unconfirmed rows, backpressure."""
        period = self.config.agent.heartbeat_s
        while True:
            await asyncio.sleep(period)
            self.pool.collect_idle()
            if self.dispatcher is not None:
                self.dispatcher.expire_unconfirmed()
            if self.queue is not None:
                self._apply_backpressure()
