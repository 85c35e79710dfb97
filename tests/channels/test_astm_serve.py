"""End to end: an analyzer played by this test talks ASTM to a real ``medagent serve``.

``medagent serve`` (with its embedded hub child) runs an ``astm://`` channel whose bot is
``test_astm_bots:lab_results``. The analyzer (a blocking socket here) sends a 5-record result:
it reaches the bot as records (the bot's JSON summary is read back from the hub). Then the hub
``$push``es an order to ``astm://<the analyzer's ip:port>``: the channel sends it on the
analyzer's own connection, in E1381 frames, and the push answers "ACK".
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
from serve_harness import ServeProcess, serve_factory  # noqa: F401  (fixture)
from test_astm_peers import ACK, ENQ, EOT, RESULT, frames

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="process groups")]

ORDER = ["H|\\^&|||LIS", "P|1||PID001", "O|1|S0001||^^^GLU|R", "L|1|N"]
_ASTM_LINE = re.compile(r"channel (\S+)\s+astm://[\d.]+:(\d+)")


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def hub_messages(serve: ServeProcess, count: int, timeout: float = 30.0) -> list[dict]:
    """The hub's stored messages with bodies (``medagent hub messages --json --body``), once
    ``count`` are there and processed (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run([sys.executable, "-m", "medagent", "hub", "messages", "--data-dir", str(serve.hub_dir),
                              "--json", "--body", "--limit", "100"],
                             capture_output=True, text=True, timeout=60, env=dict(os.environ), check=False)
        assert out.returncode == 0, out.stderr
        document = json.loads(out.stdout)
        messages = document["messages"] if isinstance(document, dict) else document
        done = [m for m in messages if m.get("status") != "received"]
        if len(done) >= count or time.monotonic() > deadline:
            return messages
        time.sleep(0.2)


def push(serve: ServeProcess, destination: str, body: str) -> tuple[int, str]:
    agent_id = json.loads((serve.hub_dir / "embedded-agent.json").read_text())["agent_id"]
    document = json.dumps({"destination": destination, "contentType": "x-application/astm-e1394", "body": body,
                           "waitForResponse": True, "waitTimeout": 20000}).encode()
    request = urllib.request.Request(
        f"{serve.hub_url}/fhir/R4/Agent/{agent_id}/$push", data=document, method="POST",
        headers={"Authorization": f"Bearer {serve.admin_token()}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def test_analyzer_results_reach_bot_and_orders_reach_analyzer(serve_factory, monkeypatch) -> None:  # noqa: F811
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH", "")])))
    serve = serve_factory('[[channel]]\nname = "lab"\nendpoint = "astm://127.0.0.1:0"\n'
                          'bot = "test_astm_bots:lab_results"\n')
    port = next(int(m.group(2)) for line in serve.output if (m := _ASTM_LINE.search(line)))
    analyzer = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        # results: ENQ, 5 frames, EOT -- every answer ACK, the last one after the commit
        analyzer.sendall(ENQ)
        assert read_exactly(analyzer, 1) == ACK
        for data in frames(RESULT):
            analyzer.sendall(data)
            assert read_exactly(analyzer, 1) == ACK
        analyzer.sendall(EOT)
        messages = hub_messages(serve, 1)
        assert len(messages) == 1, messages
        text = json.dumps(messages[0])
        assert "x-application/astm-e1394" in text and "R|1|^^^GLU|5.4" in text
        summary = {"types": "HPORL", "sender": "Analyzer", "controlId": "CTL1",
                   "results": [{"test": "GLU", "value": "5.4", "units": "mmol/L"}]}
        assert json.dumps(summary) in text or json.dumps(json.dumps(summary)) in text, messages[0]

        # an order pushed by the hub goes out on the analyzer's own connection
        host, local_port = analyzer.getsockname()
        local = f"{host}:{local_port}"
        outcome: list[tuple[int, str]] = []
        pusher = threading.Thread(target=lambda: outcome.append(push(serve, f"astm://{local}", "\n".join(ORDER))))
        pusher.start()
        try:
            deadline = time.monotonic() + 30
            while True:  # the link may still be starting: a failed push is retried by the thread below
                analyzer.settimeout(max(0.1, deadline - time.monotonic()))
                assert read_exactly(analyzer, 1) == ENQ
                break
            analyzer.sendall(ACK)
            got = []
            for expected in frames(ORDER):
                got.append(read_exactly(analyzer, len(expected)))
                analyzer.sendall(ACK)
            assert got == frames(ORDER)
            assert read_exactly(analyzer, 1) == EOT
        finally:
            pusher.join(40)
        assert outcome and outcome[0][0] == 200, outcome
        assert "ACK" in outcome[0][1]
    finally:
        analyzer.close()


def _pty_read(master: int, n: int, timeout: float = 20.0) -> bytes:
    import select

    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < n:
        ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"pty: wanted {n} bytes, have {data!r}")
        data += os.read(master, n - len(data))
    return data


def test_analyzer_on_a_serial_port_reaches_bot(serve_factory, monkeypatch) -> None:  # noqa: F811
    """The same analyzer on a pseudo-terminal: ``astm+serial://`` through ``medagent serve``."""
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH", "")])))
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    try:
        serve = serve_factory(f'[[channel]]\nname = "lab-serial"\nendpoint = "astm+serial://{path}?baud=9600"\n'
                              'bot = "test_astm_bots:lab_results"\n')
        os.write(master, ENQ)
        assert _pty_read(master, 1) == ACK
        for data in frames(RESULT):
            os.write(master, data)
            assert _pty_read(master, 1) == ACK
        os.write(master, EOT)
        messages = hub_messages(serve, 1)
        assert len(messages) == 1 and "R|1|^^^GLU|5.4" in json.dumps(messages[0]), messages
        assert '\\"value\\": \\"5.4\\"' in json.dumps(messages[0]) or '"value": "5.4"' in json.dumps(messages[0])
    finally:
        os.close(master)


def test_byte_stream_frame_reaches_hub_as_hex_and_bot_reply_returns(serve_factory, monkeypatch) -> None:  # noqa: F811
    """Medplum's tcp:// semantics end to end: the frame travels as hex, the bot's hex reply is
    written back to the device's connection."""
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH", "")])))
    serve = serve_factory('[[channel]]\nname = "meters"\nendpoint = "tcp://127.0.0.1:0?startChar=%02&endChar=%03"\n'
                          'bot = "test_astm_bots:reading_ack"\n')
    port = next(int(m.group(1)) for line in serve.output
                if (m := re.search(r"channel meters\s+tcp://[\d.]+:(\d+)", line)))
    device = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        device.sendall(b"noise\x02T=37.2\x03")
        assert read_exactly(device, 2) == b"\x068"  # the bot's reply: ACK + len(frame)
        messages = hub_messages(serve, 1)
        assert len(messages) == 1 and b"\x02T=37.2\x03".hex() in json.dumps(messages[0]), messages
    finally:
        device.close()
