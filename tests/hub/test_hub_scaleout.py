"""Several `medagent hub` OS processes act as one hub (issue 20): one PostgreSQL store, one Redis
bus, each process with its own data directory, and a real agent (`medagent serve --config`)
reaching them through a TCP proxy that stands in for the load balancer.

* operations called on hub 2 reach the agent connected to hub 1 and answer (`$push` to a real
  MLLP peer, `$reload-config`); `$status` and `$bulk-status` on hub 2 see it connected;
* kill -9 of hub 1 while a lock-step MLLP sender feeds the agent: the proxy is pointed at hub 2,
  the agent reconnects there, every AA-answered message is stored exactly once in PostgreSQL,
  and presence (and routing) moves to hub 2.

Every wait is bounded; every process is stopped by its own process group id.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from engines.postgres import postgres_server, postgres_url  # noqa: F401 - fixtures
from engines.redis_server import redis_server  # noqa: F401 - fixture
from hubprocs import (
    WAIT_S,
    Child,
    MllpAckPeer,
    MllpSender,
    TcpProxy,
    child_env,
    free_port,
    start_hub,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")]

MESSAGES = 120
KILL_AFTER = 30
CLI_TIMEOUT_S = 60.0


def medagent_cli(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "medagent", *args, "--json"], capture_output=True, text=True,
                         timeout=CLI_TIMEOUT_S, env=child_env(), stdin=subprocess.DEVNULL, check=False)
    assert out.returncode == 0, f"medagent {' '.join(args)} -> {out.returncode}\n{out.stderr}"
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def http(base: str, token: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def eventually(check: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def children() -> Iterator[list[Any]]:
    """Processes, proxies and peers a test starts; each stopped at teardown, newest first."""
    started: list[Any] = []
    yield started
    for thing in reversed(started):
        thing.stop() if isinstance(thing, Child) else thing.close()


def stored_rows(postgres_url: str) -> dict[str, int]:  # noqa: F811
    """control id -> rows stored under it."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = conn.execute("SELECT control_id, count(*) FROM messages GROUP BY control_id").fetchall()
    return {control_id: int(count) for control_id, count in rows}


def test_two_hub_processes_act_as_one_and_survive_a_kill(tmp_path: Path, postgres_url: str,  # noqa: F811
                                                          redis_server: Any, children: list[Any]) -> None:  # noqa: F811
    bus = f"{redis_server.url}?cluster={uuid.uuid4().hex}&presence_ttl=3"
    store = ["--store", postgres_url]
    agent = medagent_cli("hub", "add-agent", "lab", "--data-dir", str(tmp_path / "h1"), *store)
    channel_port = free_port()
    medagent_cli("hub", "add-channel", "lab", "adt-in", f"mllp://127.0.0.1:{channel_port}?ackMode=fast",
                 "--data-dir", str(tmp_path / "h1"), *store)

    hubs: list[tuple[Child, str]] = []
    for name in ("h1", "h2"):
        hub, url = start_hub(["--data-dir", str(tmp_path / name), *store, "--bus", bus, "--port", "0"])
        children.append(hub)
        hubs.append((hub, url))
    (hub1, url1), (hub2, url2) = hubs
    token = (tmp_path / "h2" / "admin-token").read_text().strip()
    assert token == (tmp_path / "h1" / "admin-token").read_text().strip()  # one hub, one admin token

    proxy = TcpProxy(int(url1.rsplit(":", 1)[1]))
    children.append(proxy)
    secret = tmp_path / "agent.secret"
    secret.write_text(agent["client_secret"])
    secret.chmod(0o600)
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nhub = "http://127.0.0.1:{proxy.port}"\nclient_id = "{agent["client_id"]}"\n'
                      f'client_secret_file = "{secret}"\nagent_id = "{agent["agent_id"]}"\n'
                      f'data_dir = "{tmp_path / "agent"}"\nheartbeat_s = 1.0\nreconnect_max_s = 1.0\n')
    serve = Child(["serve", "--config", str(config)])
    children.append(serve)
    serve.wait_for("link live")
    agent_id = agent["agent_id"]

    # hub 2 sees the agent that hub 1 holds, and reaches it
    eventually(lambda: '"connected"' in http(url2, token, "GET", f"/Agent/{agent_id}/$status")[1], "$status")
    status, text = http(url2, token, "GET", "/Agent/$bulk-status")
    assert status == 200 and '"connected"' in text
    peer = MllpAckPeer()
    children.append(peer)
    push = {"destination": f"mllp://127.0.0.1:{peer.port}", "contentType": "x-application/hl7-v2+er7",
            "body": "MSH|^~\\&|HUB|FAC|LAB|FAC|20240101120000||ADT^A01|PUSH0001|P|2.5.1\rPID|1||1\r",
            "waitForResponse": True, "waitTimeout": 10000}
    status, text = http(url2, token, "POST", f"/Agent/{agent_id}/$push", push)
    assert status == 200 and "MSA|AA|PUSH0001" in text, text
    status, text = http(url2, token, "POST", f"/Agent/{agent_id}/$reload-config")
    assert status == 200, text
    assert json.loads(http(url1, token, "GET", "/healthz")[1])["agents_connected"] == 1
    assert json.loads(http(url2, token, "GET", "/healthz")[1])["agents_connected"] == 0

    # load through the agent; hub 1 dies under it; the balancer sends the agent to hub 2
    answered: list[str] = []
    failures: list[BaseException] = []
    killed = threading.Event()

    def send_all() -> None:
        sender = MllpSender(channel_port)
        try:
            for i in range(MESSAGES):
                control_id = f"LOAD{i:04d}"
                if sender.roundtrip(control_id) == ("AA", control_id):
                    answered.append(control_id)
                if i == KILL_AFTER:
                    killed.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failures.append(exc)
        finally:
            sender.close()

    load = threading.Thread(target=send_all, daemon=True)
    load.start()
    assert killed.wait(WAIT_S)
    hub1.kill()
    proxy.point_at(int(url2.rsplit(":", 1)[1]))
    load.join(WAIT_S * 2)
    assert not load.is_alive() and not failures, failures
    assert len(answered) == MESSAGES

    eventually(lambda: set(answered) <= set(stored_rows(postgres_url)), "every answered message stored", 60)
    rows = stored_rows(postgres_url)
    assert {c: rows[c] for c in answered} == {c: 1 for c in answered}  # exactly once each

    # presence and routing moved to hub 2
    eventually(lambda: json.loads(http(url2, token, "GET", "/healthz")[1])["agents_connected"] == 1, "reconnect")
    assert '"connected"' in http(url2, token, "GET", f"/Agent/{agent_id}/$status")[1]
    status, text = http(url2, token, "POST", f"/Agent/{agent_id}/$push", {**push, "body": push["body"].replace(
        "PUSH0001", "PUSH0002")})
    assert status == 200 and "MSA|AA|PUSH0002" in text, text
    assert serve.process.poll() is None and hub2.process.poll() is None
    assert "DOE^JOHN" not in serve.output + hub2.output  # bodies are never logged


def test_hub_serves_on_an_inherited_listening_socket(tmp_path: Path, children: list[Any]) -> None:
    """`medagent hub serve --fd N`: the parent bound the port (an agent handing its embedded hub's
    port to a new process); the child answers on it without binding anything itself."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    hub, url = start_hub(["--data-dir", str(tmp_path / "hub"), "--fd", str(listener.fileno())],
                         pass_fds=(listener.fileno(),))
    children.append(hub)
    listener.close()  # the child holds its own copy
    assert url == f"http://127.0.0.1:{port}"
    token = (tmp_path / "hub" / "admin-token").read_text().strip()
    status, text = http(url, token, "GET", "/healthz")
    assert status == 200 and json.loads(text)["bus"] == "ok"
    assert hub.stop() == 0


def test_a_bad_bus_url_stops_the_hub_before_it_starts(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "medagent", "hub", "serve", "--data-dir", str(tmp_path / "hub"),
                          "--port", "0", "--bus", "http://redis.internal:6379"], capture_output=True, text=True,
                         timeout=CLI_TIMEOUT_S, env=child_env(), stdin=subprocess.DEVNULL, check=False)
    assert out.returncode == 2, out.stderr
    assert "hub bus 'http://redis.internal:6379': expected 'local' or a Redis URL" in out.stderr
    assert "listening" not in out.stdout
