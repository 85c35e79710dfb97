"""The agent runtime behind `medagent serve`: channels -> durable queue -> link -> hub, and back.

Theory of operation
-------------------
`AgentRuntime.start()` brings the parts up in dependency order and `stop()` takes them down in
reverse, so nothing accepted is lost:

1. the durable queue (SQLite WAL in the data directory; its lease keeps a second agent off it);
2. the hub: an embedded one started as a child process (see `embedded_hub`), or a remote base URL
   (a medagent hub or a Medplum server) with client credentials;
3. the dispatcher (queue -> link; it is the link's handler) and the link (websocket, heartbeats,
   reconnects);
4. the channels, through the one channel-set owner (`channel_set.ChannelSet`). Remote hubs send
   the channel list through FHIR reads of the Agent and its Endpoints, like Medplum's agent; the
   embedded hub (or a config file with channels) uses the config file's channels.

A reload (`agent:reloadconfig:request`) may arrive as soon as the link is up, before step 4 has
run; the channel set makes it wait for start-up and then applies the desired set as a diff, so
start-up and reloads never race for a port (issue 13, defect 1). At first start a channel that
cannot start is a StartupError; once serving, a channel problem is answered, never fatal.

Upgrade switch (medagent.ops.switch): a runtime may be built with ``inherited`` listening
sockets (by channel name; its channels start on them and bind nothing) and a ``lease_wait_s``
during which opening the queue retries while the previous process still holds its lease
(``QueueLocked``); ``on_staged`` is handed to the upgrader so `medagent serve` learns that a
staged version is ready to switch to.

Stopping: channels stop accepting and wait for commits in flight (every committed message still
gets its ACK), then the dispatcher and link stop, the queue flushes and closes, and the embedded
hub is stopped last. Unconfirmed messages stay in the queue and are sent after the next start.

Wiring (who talks to whom; the runtime itself relays nothing):

* channels hand units to `intake.Intake` (their InboundSink): queue or, immediate, dispatcher;
* the link reports to `dispatcher.Dispatcher` (its LinkHandler): confirmations and errors go to
  the queue, bot replies to `Channel.deliver_reply`, hub requests to `requests.RequestHandler`;
* `RequestHandler` gets the channel set's reload, a stats provider and `outbound.OutboundSenders`
  (one OutboundSender per scheme, from the registry, built with the Agent's settings);
* channel kinds and file uploaders reach the hub through `hub_client.RuntimeHubClient`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medagent import __version__, _compat
from medagent.channels.base import Channel, ChannelContext
from medagent.cloud.link import AgentLink, LinkSettings
from medagent.config import EMBEDDED_HUB, Config, Durability
from medagent.ops.agent_ops import AgentOps
from medagent.ops.upgrade import Staged, Upgrader
from medagent.queue import QUEUE_FILENAME, DurableQueue, QueueLocked
from medagent.runtime.channel_set import ChannelSet, DesiredChannels
from medagent.runtime.dispatcher import Dispatcher
from medagent.runtime.embedded_hub import EmbeddedHub, HubCredentials
from medagent.runtime.hub_client import RuntimeHubClient
from medagent.runtime.intake import Intake
from medagent.runtime.outbound import OutboundSenders
from medagent.runtime.remote_config import fetch_remote_channels, pool_settings
from medagent.runtime.requests import RequestHandler
from medagent.storage.files import ensure_private_dir

__all__ = ["AgentRuntime", "StartupError"]

log = logging.getLogger("medagent.agent")


class StartupError(RuntimeError):
    """Something the operator must fix before the agent can run (message says what)."""


class _NoChannelList(RuntimeError):
    """The remote hub gave no channel list and none is cached."""


#: Between two attempts to take the queue's lease from a process that is handing it over.
LEASE_RETRY_S = 0.05


class AgentRuntime:
    def __init__(self, config: Config, *, inherited: Mapping[str, socket.socket] | None = None,
                 lease_wait_s: float = 0.0, on_staged: Callable[[Staged], None] | None = None) -> None:
        self.config = config
        self._inherited = dict(inherited or {})
        self._lease_wait_s = lease_wait_s
        self._on_staged = on_staged
        self.data_dir = Path(config.agent.data_dir)
        self.queue: DurableQueue | None = None
        self.hub: EmbeddedHub | None = None
        self.credentials: HubCredentials | None = None
        self.link: AgentLink | None = None
        self.dispatcher: Dispatcher | None = None
        self.channel_set: ChannelSet | None = None
        self.intake: Intake | None = None
        self.senders = OutboundSenders()
        self._tick_task: asyncio.Task[None] | None = None
        self.started_at = 0.0
        # Operations (issue 16): stats document, link round trips, rates, /metrics, main log file.
        self.ops = AgentOps(self.stats, self.data_dir, metrics_port=config.agent.metrics_port,
                            log_json=config.agent.log_format == "json")
        self.upgrader: Upgrader | None = None

    @property
    def channels(self) -> Mapping[str, Channel]:
        """The running channels by name."""
        return self.channel_set.channels if self.channel_set is not None else {}

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        self.started_at = time.time()
        ensure_private_dir(self.data_dir)
        log.info("medagent %s starting (%s)", __version__, _compat.implementation_summary())
        await self._open_queue()
        try:
            await self.ops.start()
            await self._start_hub_and_link()
            await self._start_channels()
        except BaseException:
            await self.stop()
            raise
        self._tick_task = asyncio.get_running_loop().create_task(self._tick(), name="medagent-tick")

    async def _open_queue(self) -> None:
        """Open the durable queue; while ``lease_wait_s`` lasts, retry when its lease is still held
        (the previous process of an upgrade closes its queue a moment later)."""
        deadline = time.monotonic() + self._lease_wait_s
        while True:
            self.queue = self._new_queue()
            try:
                await self.queue.open()
                return
            except QueueLocked:
                self.queue = None
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(LEASE_RETRY_S)

    def _new_queue(self) -> DurableQueue:
        agent = self.config.agent
        return DurableQueue(
            self.data_dir / QUEUE_FILENAME,
            durability="fsync" if agent.durability is Durability.FSYNC else "normal",
            intake_journal=None if agent.intake_journal else False,  # None: on where it applies (durability normal)
            dedup_window_s=agent.dedup_window_s,
            dedup_filter_mb=agent.dedup_filter_mb,
            retention_days=agent.retention_days,
            retention_max_mb=agent.retention_max_mb,
            failed_retention_days=agent.failed_retention_days,
            min_free_mb=agent.min_free_mb,
            min_free_percent=agent.min_free_percent,
            reserve_mb=agent.storage_reserve_mb,
        )

    async def stop_unstarted(self) -> None:
        """Release what a runtime that was never started holds (inherited sockets)."""
        for sock in self._inherited.values():
            sock.close()
        self._inherited = {}

    async def stop(self) -> None:
        await self.stop_unstarted()  # start failed before the channel set took the inherited sockets
        if self.dispatcher is not None:
            self.dispatcher.stopping = True
        if self._tick_task is not None:
            self._tick_task.cancel()
            self._tick_task = None
        if self.upgrader is not None:
            await self.upgrader.close()
        if self.channel_set is not None:
            await self.channel_set.close()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.link is not None:
            await self.link.close()
        await self.senders.close()
        if self.queue is not None:
            await self.queue.close()
            self.queue = None
        if self.hub is not None:
            await self.hub.stop()
            self.hub = None
        log.info("medagent stopped")
        await self.ops.stop()

    async def _start_hub_and_link(self) -> None:
        agent = self.config.agent
        if agent.hub == EMBEDDED_HUB:
            self.hub = EmbeddedHub(self.config)
            self.credentials = await self.hub.start()
        else:
            assert agent.client_id and agent.client_secret and agent.agent_id  # checked by config
            self.credentials = HubCredentials(agent.hub, agent.agent_id, agent.client_id, agent.client_secret)
        creds = self.credentials
        ca_file = str(agent.ca_file) if agent.ca_file else None
        settings = LinkSettings(
            base_url=creds.base_url,
            client_id=creds.client_id,
            client_secret=creds.client_secret,
            agent_id=creds.agent_id,
            ca_file=ca_file,
            heartbeat_s=agent.heartbeat_s,
            reconnect_min_s=agent.reconnect_min_s,
            reconnect_max_s=agent.reconnect_max_s,
            use_batching=agent.batching,
        )
        assert self.queue is not None
        hub_client = RuntimeHubClient(creds.base_url, ca_file=ca_file)
        self.intake = Intake(self.queue)
        context = ChannelContext(sink=self.intake, data_dir=self.data_dir, log_phi=agent.log_phi, hub=hub_client,
                                 durability="fsync" if agent.durability is Durability.FSYNC else "normal")
        self.senders.use_hub(hub_client)
        self.channel_set = ChannelSet(context, self._desired_channels, inherited=self._inherited)
        self._inherited = {}  # the channel set owns (and closes) them now
        self.upgrader = Upgrader(hub_client, self.data_dir, allowed=agent.allow_remote_upgrade,
                                 on_staged=self._on_staged)
        self.ops.add_section("upgrade", self.upgrader.status)
        requests = RequestHandler(self.channel_set.reload, self.ops.stats, self.senders, self.upgrader.request)
        self.dispatcher = Dispatcher(self.queue, creds.agent_id, self.channel_set.get, requests.handle,
                                     hub=hub_client, data_dir=self.data_dir)
        self.link = AgentLink(settings, self.ops.rtt.wrap_handler(self.dispatcher))
        self.dispatcher.attach(self.ops.rtt.wrap_link(self.link))
        hub_client.attach(self.link.tokens)
        self.intake.attach(self.dispatcher, self.channel_set)
        self.dispatcher.start()
        await self.link.start()

    async def _start_channels(self) -> None:
        assert self.channel_set is not None
        try:
            report = await self.channel_set.start()
        except _NoChannelList as exc:
            raise StartupError(str(exc)) from None
        if not report.failed:
            return
        problems = "; ".join(f"channel {name}: {problem}" for name, problem in report.failed.items())
        raise StartupError(problems)

    async def _desired_channels(self) -> DesiredChannels:
        """The channel set to run: the config file's, or the remote hub's (with its settings)."""
        if self.hub is not None or self.config.channels:
            return DesiredChannels(self.config.channels)
        assert self.link is not None and self.credentials is not None
        try:
            desired = await fetch_remote_channels(self.link, self.credentials.agent_id, self.data_dir)
        except RuntimeError as exc:  # no hub answer and no cached list: nothing to listen on
            raise _NoChannelList(str(exc)) from None
        await self._apply_agent_settings()
        return desired

    async def _apply_agent_settings(self) -> None:
        """Medplum's Agent.setting keepAlive / maxClientsPerRemote for the outbound senders."""
        assert self.link is not None and self.credentials is not None
        try:
            options = pool_settings(await self.link.fetch_json(f"/fhir/R4/Agent/{self.credentials.agent_id}"))
        except Exception as exc:  # noqa: BLE001 - the hub may be down; keep the current settings
            log.warning("cannot read Agent settings from the hub (%s); outbound settings unchanged", exc)
            return
        await self.senders.configure(options)

    # -- status ------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        channel_set = self.channel_set
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
            "channelStats": channel_set.stats() if channel_set else {},
            "reloads": {"applied": channel_set.reloads, "failed": channel_set.reload_failures} if channel_set else {},
            "clientStats": self.senders.stats(),
        }

    async def _tick(self) -> None:
        """Housekeeping at the heartbeat period: idle outbound clients, unconfirmed rows, backpressure."""
        period = self.config.agent.heartbeat_s
        while True:
            await asyncio.sleep(period)
            self.senders.collect_idle()
            if self.dispatcher is not None:
                self.dispatcher.expire_unconfirmed()
            if self.intake is not None and self.queue is not None:
                self.intake.apply_backpressure()
