"""The real deployment path: a standalone `medagent hub` process and a `medagent serve` agent that
knows only the hub's URL and its own credentials, as an operator sets them up.

1. `medagent hub add-agent NAME --json` registers the agent (client id and secret shown once);
   `medagent hub add-channel` gives it an MLLP channel (a FHIR Endpoint on the hub).
2. `medagent hub serve --port 0` runs the hub; its banner names the URL it listens on.
3. `medagent serve --config X`, where X has `[agent] hub = <url>`, the credentials (the secret in a
   file) and no `[[channel]]`: the agent reads its channel list from the hub (FHIR reads of the
   Agent and its Endpoints, medplum-protocol.md §3.1), opens the listener and links up.
4. Messages sent to that listener are ACKed after the local commit (ackMode=fast) and reach the
   hub; while the hub is down they wait in the agent's queue and arrive once it is back.

Each test starts its own processes in their own process groups and stops them (SIGTERM, then
SIGKILL); every wait is bounded. Output of every child is collected by a reader thread, so the
tests can look for log lines (never for message bodies) and a full pipe never blocks a child.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from childproc import WAIT_S, MedagentChild
from serve_harness import MllpClient, ack_fields, child_env, hl7_message

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the harness uses POSIX process groups")

CLI_TIMEOUT_S = 60.0
_HUB_URL = re.compile(r"medagent hub listening on (http://127\.0\.0\.1:(\d+))")
_CHANNEL_LINE = re.compile(r"channel (\S+)\s+mllp://127\.0\.0\.1:(\d+)")


# ------------------------------------------------------------------------------------ children


class Child(MedagentChild):
    def __init__(self, args: list[str]) -> None:
        super().__init__(args, env=child_env())


@pytest.fixture
def spawn() -> Iterator[Callable[[list[str]], Child]]:
    """Start `medagent ARGS` children; every one still running is stopped at teardown."""
    children: list[Child] = []

    def start(args: list[str]) -> Child:
        child = Child(args)
        children.append(child)
        return child

    yield start
    for child in reversed(children):
        child.stop()


# ------------------------------------------------------------------------------------- helpers


def medagent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "medagent", *args], capture_output=True, text=True,
                         timeout=CLI_TIMEOUT_S, env=child_env(), stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"medagent {' '.join(args)} -> {out.returncode}\n{out.stderr}"
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True, slots=True)
class Deployment:
    """A hub data directory with one registered agent and one MLLP channel, plus agent files."""

    hub_dir: Path
    agent_dir: Path
    agent_id: str
    client_id: str
    client_secret: str
    channel_port: int
    tmp_path: Path

    def hub_args(self, port: int = 0) -> list[str]:
        return ["hub", "serve", "--data-dir", str(self.hub_dir), "--port", str(port)]

    def agent_config(self, hub_url: str, secret: str | None = None, name: str = "agent.toml") -> Path:
        """A config with the remote hub, the credentials (secret in a file) and no [[channel]]."""
        secret_file = self.tmp_path / f"{name}.secret"
        secret_file.write_text((self.client_secret if secret is None else secret) + "\n")
        secret_file.chmod(0o600)
        config = self.tmp_path / name
        config.write_text(
            "[agent]\n"
            f'hub = "{hub_url}"\n'
            f'client_id = "{self.client_id}"\n'
            f'client_secret_file = "{secret_file}"\n'
            f'agent_id = "{self.agent_id}"\n'
            f'data_dir = "{self.agent_dir}"\n'
            "heartbeat_s = 1.0\n"
            "reconnect_max_s = 1.0\n"
        )
        return config

    def stored_control_ids(self) -> list[str]:
        """MSH-10 of every original (not flagged duplicate) message the hub stored."""
        out = medagent_cli("hub", "messages", "--data-dir", str(self.hub_dir), "--json", "--limit", "1000")
        messages = json.loads(out.stdout)["messages"]
        return [m["control_id"] for m in messages if not m.get("duplicate_of")]

    def wait_for_stored(self, control_id: str, timeout: float = WAIT_S) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            stored = self.stored_control_ids()
            if control_id in stored or time.monotonic() > deadline:
                return stored
            time.sleep(0.3)


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    hub_dir = tmp_path / "hub"
    agent = json.loads(medagent_cli("hub", "add-agent", "lab-north", "--data-dir", str(hub_dir), "--json").stdout)
    assert set(agent) == {"agent_id", "client_id", "client_secret"}
    port = free_port()
    channel = json.loads(medagent_cli(
        "hub", "add-channel", "lab-north", "adt-in", f"mllp://127.0.0.1:{port}?ackMode=fast",
        "--data-dir", str(hub_dir), "--json").stdout)
    assert channel["agent_id"] == agent["agent_id"] and channel["status"] == "active"
    return Deployment(hub_dir, tmp_path / "agent-data", agent["agent_id"], agent["client_id"],
                      agent["client_secret"], port, tmp_path)


def start_hub(spawn: Callable[[list[str]], Child], deployment: Deployment, port: int = 0) -> tuple[Child, str]:
    hub = spawn(deployment.hub_args(port))
    return hub, hub.wait_for(_HUB_URL).group(1)


def start_agent(spawn: Callable[[list[str]], Child], config: Path) -> Child:
    agent = spawn(["serve", "--config", str(config)])
    agent.wait_for("Press Ctrl-C")
    return agent


def roundtrip(port: int, control_id: str) -> tuple[str, str]:
    client = MllpClient(port)
    try:
        return ack_fields(client.roundtrip(hl7_message(control_id)))[:2]
    finally:
        client.close()


def pending_rows(agent_dir: Path) -> int:
    """Rows the agent still owes the hub, read beside the running agent (`medagent queue stats`)."""
    states = json.loads(medagent_cli("queue", "stats", "--data-dir", str(agent_dir), "--json").stdout)["states"]
    return states["received"] + states["sent"]


# --------------------------------------------------------------------------------------- tests


def test_agent_takes_its_channels_from_the_hub_and_survives_a_hub_restart(spawn, deployment: Deployment) -> None:
    hub, hub_url = start_hub(spawn, deployment)
    hub_port = int(_HUB_URL.search(hub.output).group(2))  # type: ignore[union-attr]
    agent = start_agent(spawn, deployment.agent_config(hub_url))

    # the channel came from the hub, on the address given to `hub add-channel`
    channels = {m.group(1): int(m.group(2)) for m in _CHANNEL_LINE.finditer(agent.output)}
    assert channels == {"adt-in": deployment.channel_port}
    assert f"hub                  {hub_url}" in agent.output
    agent.wait_for("link live")

    assert roundtrip(deployment.channel_port, "REMOTE0001") == ("AA", "REMOTE0001")
    assert deployment.wait_for_stored("REMOTE0001") == ["REMOTE0001"]

    # hub down: the agent still ACKs (after its local commit) and keeps the message
    assert hub.stop() == 0
    agent.wait_for("link down")
    assert roundtrip(deployment.channel_port, "REMOTE0002") == ("AA", "REMOTE0002")
    assert pending_rows(deployment.agent_dir) == 1
    assert deployment.stored_control_ids() == ["REMOTE0001"]

    # hub back on the same port and data: the queued message arrives, once
    start_hub(spawn, deployment, port=hub_port)
    assert deployment.wait_for_stored("REMOTE0002") == ["REMOTE0001", "REMOTE0002"]
    assert agent.process.poll() is None
    assert agent.stop() == 0
    assert "DOE^JOHN" not in agent.output  # control ids may be logged, message bodies never


def test_wrong_secret_keeps_the_agent_running_and_logs_the_auth_error(spawn, deployment: Deployment) -> None:
    """Credentials revoked or mistyped after the agent has run once: it keeps its listeners (from
    the cached channel list), keeps accepting and queueing, and says why the link is down."""
    _, hub_url = start_hub(spawn, deployment)
    first = start_agent(spawn, deployment.agent_config(hub_url))
    first.wait_for("link live")
    assert first.stop() == 0

    wrong = "not-the-secret-" + deployment.client_secret[:4]
    agent = start_agent(spawn, deployment.agent_config(hub_url, secret=wrong, name="wrong.toml"))
    agent.wait_for(r"authentication failed: .*client_secret")
    assert roundtrip(deployment.channel_port, "NOAUTH001") == ("AA", "NOAUTH001")
    agent.wait_for(r"reconnecting in")  # it keeps trying, with backoff
    assert agent.process.poll() is None
    assert pending_rows(deployment.agent_dir) == 1
    assert "NOAUTH001" not in deployment.stored_control_ids()
    assert agent.stop() == 0
    assert wrong not in agent.output and deployment.client_secret not in agent.output


def test_wrong_secret_on_first_start_fails_with_a_clear_message(spawn, deployment: Deployment) -> None:
    """No cached channel list yet, so there is nothing to listen on: the agent stops at once and
    the message says which credentials the hub refused and what to check."""
    _, hub_url = start_hub(spawn, deployment)
    wrong = "not-the-secret"
    agent = spawn(["serve", "--config", str(deployment.agent_config(hub_url, secret=wrong))])
    agent.wait_for(r"medagent: cannot start: .*refused the client credentials")
    assert agent.process.wait(30) == 1  # it ends by itself (the message comes just before the exit)
    agent.stop()
    assert f"client_id '{deployment.client_id}'" in agent.output
    assert "check client_id and client_secret" in agent.output
    assert wrong not in agent.output
    assert "Press Ctrl-C" not in agent.output


def test_first_start_failure_prints_no_traceback(spawn, deployment: Deployment) -> None:
    _, hub_url = start_hub(spawn, deployment)
    agent = spawn(["serve", "--config", str(deployment.agent_config(hub_url, secret="not-the-secret"))])
    agent.wait_for("medagent: cannot start")
    agent.stop()
    assert "Traceback" not in agent.output
