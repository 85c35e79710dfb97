"""The hub process: HTTP + websocket on one port (aiohttp), wiring store, auth, bots and routes.

Theory of operation
-------------------
:meth:`HubServer.start` makes the bus (``settings.bus``: :class:`~medagent.hub.bus.LocalBus`, or
Redis when several hub processes share one store), opens the store (migrating it), takes the
token signing key and the admin token from the store (shared by every hub process; a copy in the
data directory, mode 0600), builds the aiohttp application —
``/oauth2/token``, ``/ws/agent``, the FHIR reads under ``/fhir/R4``, the Agent operations under
``/fhir/R4`` and at the root, ``/messages``, ``/admin/...``, ``/healthz`` — and binds it to
``host:port`` (``port=0`` picks a free port, read back from :attr:`HubServer.port`) or serves on
an inherited listening socket (``listen_fd``), with TLS when a certificate and key are
configured; the bus starts delivering routed operations before the listener opens.
:meth:`HubServer.stop` closes every agent socket, stops the upgrade watches and the bus (this
process's agents read disconnected at once), fails pending operations, drains the channel workers, stops the listener,
finishes the queued store writes and closes the store — in that order, so nothing already
acknowledged is lost.

Hardening (issue 18): the data directory is made 0700 and every file the hub keeps there
(``hub.sqlite3`` and its ``-wal``/``-shm``, ``hub.log``, the signing key, the admin token) 0600,
whatever the umask (:mod:`medagent.storage.files`); aiohttp's request-error logging goes through
:class:`~medagent.hub.httplog.HttpErrorLog` (one short rate-limited line per client error);
access tokens are checked against the agent's token generation (revocation); a
:class:`~medagent.hub.retention.RetentionWorker` bounds the store and a
:class:`~medagent.hub.diskspace.DiskWatermark` stops intake before the disk is full.

Invariant: a started server always has a store, a signer and an admin token; ``stop`` is
idempotent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import socket
import ssl
from pathlib import Path

from aiohttp import web

from medagent import __version__
from medagent.hub.admin import add_admin_routes
from medagent.hub.auth import (
    ADMIN_TOKEN_FILE,
    SIGNING_KEY_FILE,
    TokenSigner,
    load_shared_secret,
)
from medagent.hub.botrunner import BotRunner
from medagent.hub.bus import AgentBus, make_bus
from medagent.hub.context import CONNECTIONS_KEY, CTX_KEY, HubContext
from medagent.hub.dashboard import add_dashboard_routes
from medagent.hub.dicomweb import add_dicomweb_routes
from medagent.hub.diskspace import DiskWatermark, FreePages
from medagent.hub.fhir import add_fhir_routes
from medagent.hub.httplog import HttpErrorLog
from medagent.hub.intake import ChannelDispatcher
from medagent.hub.oauth import add_oauth_routes
from medagent.hub.operations import add_operation_routes, deliver_local
from medagent.hub.registry import AgentRegistry, Connection, PendingReplies
from medagent.hub.retention import RetentionWorker
from medagent.hub.settings import HubSettings
from medagent.hub.store import HubStore, open_store
from medagent.hub.upgrades import UpgradeWatcher
from medagent.hub.websocket import handle_agent_websocket
from medagent.hub.writer import StoreWriter
from medagent.storage.files import ensure_private_dir, tighten_file

__all__ = ["LOG_FILE", "HubServer", "HubSettings"]

log = logging.getLogger(__name__)

#: the hub's log file when a parent process (medagent serve's embedded hub) writes one
LOG_FILE = "hub.log"


class HubServer:
    """One hub process. ``await start()``, use ``url``/``port``/``store``/``admin_token``, ``await stop()``."""

    def __init__(self, settings: HubSettings) -> None:
        settings.validate()
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.port: int = settings.port
        self.host: str = settings.host
        self._ctx: HubContext | None = None
        self._runner: web.AppRunner | None = None
        self._app: web.Application | None = None
        self._retention: RetentionWorker | None = None
        self._free_pages: FreePages | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def context(self) -> HubContext:
        if self._ctx is None:
            raise RuntimeError("the hub is not started")
        return self._ctx

    @property
    def store(self) -> HubStore:
        return self.context.store

    @property
    def retention(self) -> RetentionWorker:
        if self._retention is None:
            raise RuntimeError("the hub is not started")
        return self._retention

    @property
    def admin_token(self) -> str:
        return self.context.admin_token

    @property
    def admin_token_file(self) -> Path | None:
        """Where the admin token is kept (``None`` when it came from the settings)."""
        return None if self.settings.admin_token else self.data_dir / ADMIN_TOKEN_FILE

    @property
    def tls(self) -> bool:
        return self.settings.tls_cert is not None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8103`` (``https`` with TLS)."""
        host = self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws/agent"

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._ctx is not None:
            raise RuntimeError("the hub is already started")
        ensure_private_dir(self.data_dir)
        tighten_file(self.data_dir / LOG_FILE)  # opened by a parent process, maybe under umask 022
        bus = make_bus(self.settings.bus)  # BusConfigError (a ValueError) before anything opens
        store = await open_store(self.settings.store, self.data_dir, pool_size=self.settings.store_pool_size)
        started_bus = False
        try:
            ctx = await self._build_context(store, bus)
            app = self._build_app(ctx)
            await bus.start(functools.partial(deliver_local, ctx))
            started_bus = True
            runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=HttpErrorLog())
            await runner.setup()
            await self._site(runner).start()
        except BaseException:
            if started_bus:
                await bus.close()
            if self._free_pages is not None:
                await self._free_pages.stop()
                self._free_pages = None
            await store.close()
            raise
        self._ctx, self._app, self._runner = ctx, app, runner
        settings = self.settings
        self._retention = RetentionWorker(store, settings.retention, settings.retention_channels,
                                          settings.retention_max_bytes, settings.retention_interval_s,
                                          settings.retention_batch_rows)
        self._retention.start()
        host, self.port = _bound_address(runner, self.settings.host, self.settings.port)
        if self.settings.listen_fd is not None:
            self.host = host  # an inherited socket's address is known only now
        log.info("medagent hub %s listening on %s (data in %s, store %s, bus %s)", __version__, self.url,
                 self.data_dir, store.url, type(bus).__name__)

    async def _build_context(self, store: HubStore, bus: AgentBus) -> HubContext:
        settings = self.settings
        key = bytes.fromhex(await load_shared_secret(store.shared_secret, self.data_dir / SIGNING_KEY_FILE,
                                                     SIGNING_KEY_FILE, lambda: secrets.token_hex(32)))
        admin_token = settings.admin_token or await load_shared_secret(
            store.shared_secret, self.data_dir / ADMIN_TOKEN_FILE, ADMIN_TOKEN_FILE, lambda: secrets.token_urlsafe(32))
        writer = StoreWriter(store)
        await writer.start()
        bots = BotRunner(settings.bot_workers, settings.bot_timeout_s)
        registry: AgentRegistry[Connection] = AgentRegistry()
        self._free_pages = FreePages(store.free_page_bytes)
        await self._free_pages.start()
        disk = DiskWatermark(self.data_dir, settings.min_free_bytes, settings.min_free_percent, self._free_pages)
        dispatcher = ChannelDispatcher(store, writer, bots, registry, settings.max_backlog_messages, disk)  # type: ignore[arg-type]
        signer = TokenSigner(key, settings.token_ttl_s, store.token_generation)
        return HubContext(settings, store, writer, signer, bots, registry, PendingReplies(), dispatcher, admin_token,
                          bus, UpgradeWatcher(store, bus, settings.upgrade_poll_s))

    def _build_app(self, ctx: HubContext) -> web.Application:
        app = web.Application(client_max_size=ctx.settings.max_frame_bytes)
        app[CTX_KEY] = ctx
        app[CONNECTIONS_KEY] = set()
        add_oauth_routes(app)
        app.router.add_get("/ws/agent", handle_agent_websocket)
        add_fhir_routes(app)
        add_operation_routes(app)
        add_admin_routes(app)
        add_dicomweb_routes(app)
        add_dashboard_routes(app)
        return app

    def _site(self, runner: web.AppRunner) -> web.BaseSite:
        """Where to listen: ``host:port``, or an inherited listening socket (``listen_fd``: the
        port is handed over by a parent, e.g. an agent upgrading its embedded hub)."""
        ssl_context = self._ssl_context()
        if self.settings.listen_fd is None:
            return web.TCPSite(runner, self.settings.host, self.settings.port, ssl_context=ssl_context)
        sock = socket.socket(fileno=self.settings.listen_fd)
        sock.setblocking(False)
        return web.SockSite(runner, sock, ssl_context=ssl_context)

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.settings.tls_cert is None or self.settings.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.settings.tls_cert), str(self.settings.tls_key))
        return context

    async def stop(self) -> None:
        ctx, runner, app = self._ctx, self._runner, self._app
        if ctx is None or runner is None or app is None:
            return
        self._ctx = self._runner = self._app = None
        if self._retention is not None:
            await self._retention.stop()
            self._retention = None
        if self._free_pages is not None:
            await self._free_pages.stop()
            self._free_pages = None
        connections = list(app[CONNECTIONS_KEY])
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
        await ctx.upgrades.close()
        await ctx.bus.close()
        ctx.pending.cancel_all()
        await ctx.dispatcher.close()
        await runner.cleanup()
        ctx.bots.close()
        await ctx.writer.close()
        await ctx.store.close()
        log.info("medagent hub stopped")

    async def __aenter__(self) -> HubServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _bound_address(runner: web.AppRunner, host: str, port: int) -> tuple[str, int]:
    """The address actually listened on (``port=0`` and an inherited socket are known only now)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound = str(address[0])
            return (host if bound in ("0.0.0.0", "::") else bound), int(address[1])
    return host, port
