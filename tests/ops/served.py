"""`medagent serve` as a real process against a test hub, for the upgrade-switch tests (its PID
changes across a switch, so it cannot run inside the test process).

The agent is a remote-hub agent: the hub holds its channel list (one fast-mode MLLP channel on
port 0). Its output goes to a file the test reads (the banner names the bound port); the
process is started in a session of its own and every process a test started (the agent, and
the version it switched to) is stopped by its PID at the end, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from opstest import http

from medagent.hub import HubServer

START_WAIT_S = 60.0
STOP_WAIT_S = 30.0
_CHANNEL = re.compile(r"channel adt-in\s+mllp://[\d.]+:(\d+)")


@dataclass
class ServedAgent:
    hub: HubServer
    agent_id: str
    process: asyncio.subprocess.Process
    port: int
    output: Path
    pids: set[int] = field(default_factory=set)  # every agent process seen (old and new)

    async def stats(self) -> dict[str, Any] | None:
        """The agent's `$stats` through the hub, or None while it is not linked (during a switch)."""
        try:
            status, text = await http(self.hub, "GET", f"/fhir/R4/Agent/{self.agent_id}/$stats")
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        if status != 200:
            return None
        stats = json.loads(orjson.loads(text)["parameter"][0]["valueString"])
        self.pids.add(int(stats["pid"]))
        return stats

    async def status_version(self, wanted: str, timeout_s: float = 30.0) -> str:
        """The version the hub's `$status` shows (learned from heartbeats); waits, bounded, for ``wanted``."""
        version = ""
        for _ in range(int(timeout_s / 0.2)):
            status, text = await http(self.hub, "GET", f"/fhir/R4/Agent/{self.agent_id}/$status")
            assert status == 200, text
            values = {p["name"]: p for p in orjson.loads(text)["parameter"]}
            version = values["version"]["valueString"]
            if version == wanted and values["status"]["valueCode"] == "connected":
                break
            await asyncio.sleep(0.2)
        return version

    async def wait_upgrade(self, timeout_s: float) -> dict[str, Any]:
        """Poll `$stats` until the upgrade ended (completed or rolled-back); the last stats."""
        async with asyncio.timeout(timeout_s):
            while True:
                stats = await self.stats()
                if stats is not None and stats.get("upgrade", {}).get("state") in ("completed", "rolled-back"):
                    return stats
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """SIGTERM every agent process seen, by PID; SIGKILL what is left after STOP_WAIT_S."""
        self.pids.add(self.process.pid)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for _ in range(int(STOP_WAIT_S / 0.1)):
            if not any(_alive(pid) for pid in self.pids):
                break
            await asyncio.sleep(0.1)
        for pid in self.pids:
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(self.process.wait(), STOP_WAIT_S)


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie nobody reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def serve_agent(hub: HubServer, root: Path) -> ServedAgent:
    credentials = await hub.store.add_agent("switch-lab")
    await hub.store.add_channel(credentials.agent_id, "adt-in", "mllp://127.0.0.1:0?ackMode=fast")
    root.mkdir(parents=True, exist_ok=True)
    config = root / "agent.toml"
    config.write_text(
        f'[agent]\ndata_dir = "{(root / "data").as_posix()}"\nhub = "{hub.url}"\n'
        f'client_id = "{credentials.client_id}"\nclient_secret = "{credentials.client_secret}"\n'
        f'agent_id = "{credentials.agent_id}"\nreconnect_min_s = 0.05\nreconnect_max_s = 0.5\n')
    output = root / "serve.log"
    with output.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "medagent", "serve", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    agent = ServedAgent(hub, credentials.agent_id, process, 0, output)
    try:
        async with asyncio.timeout(START_WAIT_S):
            while not agent.port:
                if process.returncode is not None:
                    raise AssertionError(f"medagent serve exited {process.returncode}:\n{output.read_text()[-3000:]}")
                match = _CHANNEL.search(output.read_text(errors="replace"))
                agent.port = int(match.group(1)) if match else 0
                await asyncio.sleep(0.1)
            while await agent.stats() is None:  # linked
                await asyncio.sleep(0.1)
    except BaseException:
        await agent.stop()
        raise
    return agent
