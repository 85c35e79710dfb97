"""The embedded hub: `medagent serve`'s own cloud side, run as a child process.

Why a child process: the hub (message store, bots) and the agent (sockets, queue) each keep a
core busy under load; one process would share one GIL between them (DESIGN.md measures agent
and hub in separate processes). The child is the same `medagent hub serve` a user can run alone.

Start-up: provision the hub database in-process (register the agent named "embedded" once,
keep its credentials in `embedded-agent.json`, mode 0600, and make the hub's channel list match
the configuration), then spawn the hub, wait until `/healthz` answers, and return the
credentials for the link. The hub's output goes to `<hub data dir>/hub.log`; its tail is shown
when it fails to start. If the hub dies while the agent runs, it is restarted with backoff;
the agent keeps accepting and queueing meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from medagent.config import Config
from medagent.storage.files import ensure_private_dir, write_private_file

__all__ = ["EMBEDDED_AGENT_NAME", "EmbeddedHub", "HubCredentials", "HubStartError"]

log = logging.getLogger("medagent.embedded_hub")

EMBEDDED_AGENT_NAME = "embedded"
CREDENTIALS_FILENAME = "embedded-agent.json"
LOG_FILENAME = "hub.log"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class HubStartError(RuntimeError):
    """The embedded hub could not be started; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class HubCredentials:
    base_url: str
    agent_id: str
    client_id: str
    client_secret: str

    def __repr__(self) -> str:
        return f"HubCredentials(base_url={self.base_url!r}, agent_id={self.agent_id!r}, client_secret=***)"


class EmbeddedHub:
    def __init__(self, config: Config) -> None:
        self._config = config
        self.data_dir = Path(config.hub.data_dir or Path(config.agent.data_dir) / "hub")
        self.host = config.hub.host
        self.port = config.hub.port
        self._tls = config.hub.tls_cert is not None
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def base_url(self) -> str:
        scheme = "https" if self._tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILENAME

    async def start(self) -> HubCredentials:
        ensure_private_dir(self.data_dir)
        if self.port == 0:
            self.port = _free_port(self.host)
        elif _port_in_use(self.host, self.port):
            raise HubStartError(
                f"the embedded hub's port {self.host}:{self.port} is already in use "
                f"(another medagent?); choose another with --hub-port or [hub] port"
            )
        credentials = await asyncio.to_thread(self._provision)  # needs the final port for base_url
        await self._spawn()
        await self._wait_healthy()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="medagent-hub-watch")
        log.info("embedded hub running at %s (pid %d)", self.base_url, self._process.pid if self._process else -1)
        return credentials

    async def stop(self) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("embedded hub did not stop within %.0f s; killing it", STOP_TIMEOUT_S)
            process.kill()
            await process.wait()

    # -- provisioning ------------------------------------------------------------------------------
    def _provision(self) -> HubCredentials:
        """On a thread of its own (the agent's loop must not wait on the hub's store)."""
        return asyncio.run(self._provision_store())

    async def _provision_store(self) -> HubCredentials:
        from medagent.hub.store import (
            open_store,  # only a process with an embedded hub loads the store
        )

        store = await open_store(self._config.hub.store, self.data_dir)
        try:
            agent_id, client_id, client_secret = await self._agent_credentials(store)
            await self._sync_channels(store, agent_id)
        finally:
            await store.close()
        return HubCredentials(self.base_url, agent_id, client_id, client_secret)

    async def _agent_credentials(self, store: Any) -> tuple[str, str, str]:
        path = self.data_dir / CREDENTIALS_FILENAME
        known = {a.id for a in await store.list_agents(EMBEDDED_AGENT_NAME)}
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("agent_id") in known:
                return saved["agent_id"], saved["client_id"], saved["client_secret"]
        if known:
            creds = await store.reset_client_secret(next(iter(known)))
        else:
            creds = await store.add_agent(EMBEDDED_AGENT_NAME)
        document = {"agent_id": creds.agent_id, "client_id": creds.client_id, "client_secret": creds.client_secret}
        write_private_file(path, json.dumps(document, indent=2).encode())
        return creds.agent_id, creds.client_id, creds.client_secret

    async def _sync_channels(self, store: Any, agent_id: str) -> None:
        """Make the hub's channel list of the embedded agent equal to the configuration's."""
        current = {c.name: c for c in await store.list_channels(agent_id)}
        wanted = {c.name: c for c in self._config.channels}
        for name, channel in current.items():
            if name not in wanted:
                await store.remove_channel(channel.id)
        for name, cfg in wanted.items():
            existing = current.get(name)
            if existing is None:
                await store.add_channel(agent_id, name, cfg.endpoint.url, cfg.bot)
            else:
                await store.update_channel(existing.id, address=cfg.endpoint.url, bot=cfg.bot)

    # -- the child process ---------------------------------------------------------------------------
    def _command(self) -> list[str]:
        # -P: never import medagent from the working directory (e.g. a source checkout, where the
        # uncompiled tree would shadow the installed package and its extensions).
        hub = self._config.hub
        command = [sys.executable, "-P", "-m", "medagent", "hub", "serve", "--data-dir", str(self.data_dir),
                   "--host", self.host, "--port", str(self.port), "--cpu-slice-ms", f"{hub.cpu_slice_ms:g}"]
        if hub.tls_cert is not None and hub.tls_key is not None:
            command += ["--tls-cert", str(hub.tls_cert), "--tls-key", str(hub.tls_key)]
        return command

    async def _spawn(self) -> None:
        env = dict(os.environ)
        if self._config.hub.admin_token:
            env["MEDAGENT_HUB_ADMIN_TOKEN"] = self._config.hub.admin_token
        if self._config.hub.store:  # in the environment, not argv: the URL may carry a password
            env["MEDAGENT_HUB_STORE"] = self._config.hub.store
        # The embedded hub routes through Redis only when this configuration says so, never because
        # the operator's shell happens to export MEDAGENT_HUB_BUS for a standalone hub.
        env.pop("MEDAGENT_HUB_BUS", None)
        if self._config.hub.bus:
            env["MEDAGENT_HUB_BUS"] = self._config.hub.bus
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # data files 0600 whatever the umask (an older log may be wider)
        with os.fdopen(fd, "ab") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                *self._command(), stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    async def _wait_healthy(self) -> None:
        assert self._process is not None
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        ssl_check = not self._tls  # our own self-signed hub: no verification of its health check
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if self._process.returncode is not None:
                    raise HubStartError(f"the embedded hub exited with status {self._process.returncode}:\n{self._log_tail()}")
                try:
                    async with session.get(f"{self.base_url}/healthz", ssl=ssl_check) as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    self._process.kill()
                    raise HubStartError(f"the embedded hub did not answer within {START_TIMEOUT_S:.0f} s:\n{self._log_tail()}")
                await asyncio.sleep(0.05)

    async def _watch(self) -> None:
        delay = 1.0
        while not self._stopping:
            assert self._process is not None
            status = await self._process.wait()
            if self._stopping:
                return
            log.error("embedded hub exited unexpectedly (status %s); restarting in %.0f s; see %s",
                      status, delay, self.log_path)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                await self._spawn()
                await self._wait_healthy()
                delay = 1.0
            except HubStartError as exc:
                log.error("embedded hub restart failed: %s", exc)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no hub log)"
        return "\n".join("  " + line for line in text[-lines:])


def _die_with_parent() -> None:
    """Linux: the hub gets SIGTERM when the agent dies, even by kill -9, so no orphan keeps the port."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
