"""`medagent serve` end to end: real MLLP senders -> agent process -> embedded hub process -> bot.

Each test starts its own agent (and hub child) on free ports with a temporary data directory
and stops them itself. These are the slowest tests of the suite; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from serve_harness import MllpClient, ack_fields, channel_toml, child_env, hl7_message

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the harness uses POSIX process groups")


def test_fast_mode_ack_and_message_reaches_hub(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "ackMode=fast"))
    client = MllpClient(serve.port)
    code, control_id, _ = ack_fields(client.roundtrip(hl7_message("FAST0001")))
    client.close()
    assert (code, control_id) == ("AA", "FAST0001")
    messages = serve.wait_for_hub_messages(1)
    assert [m["control_id"] for m in messages] == ["FAST0001"]
    dashboard = [line for line in serve.output if line.strip().startswith("dashboard")]
    assert dashboard and f"{serve.hub_url.rstrip('/')}/dashboard/" in dashboard[0]


def test_send_command_prints_the_ack(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "enhanced=aa"))
    out = subprocess.run(
        [sys.executable, "-m", "medagent", "send", "--to", f"mllp://127.0.0.1:{serve.port}", "--example", "--json"],
        capture_output=True, text=True, timeout=60, env=child_env(),
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)["results"][0]
    assert result["ack_code"] == "AA"
    assert serve.wait_for_hub_messages(1)[0]["control_id"] == result["control_id"]


def test_immediate_mode(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "ackMode=immediate"))
    client = MllpClient(serve.port)
    assert ack_fields(client.roundtrip(hl7_message("IMM1")))[:2] == ("AA", "IMM1")
    client.close()
    assert serve.wait_for_hub_messages(1)[0]["control_id"] == "IMM1"


def test_two_phase_sends_ca_then_the_bot_ack(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "enhanced=true"))
    client = MllpClient(serve.port)
    client.send(hl7_message("TWO1"))
    first, second = ack_fields(client.read_ack()), ack_fields(client.read_ack())
    client.close()
    assert first[:2] == ("CA", "TWO1")
    assert second[:2] == ("AA", "TWO1")


def test_original_mode_returns_the_bot_reply(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "ackMode=original"))
    client = MllpClient(serve.port)
    assert ack_fields(client.roundtrip(hl7_message("ORIG1")))[:2] == ("AA", "ORIG1")
    client.close()


def test_original_mode_bot_failure_is_an_ae_with_the_reason(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "ackMode=original", bot="testbots:failing"))
    client = MllpClient(serve.port)
    code, control_id, text = ack_fields(client.roundtrip(hl7_message("FAIL1")))
    client.close()
    assert (code, control_id) == ("AE", "FAIL1")
    assert "could not file" in text


def test_original_mode_timeout_is_answered(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "ackMode=original&responseTimeoutMs=1000", bot="testbots:slow"))
    client = MllpClient(serve.port)
    code, control_id, text = ack_fields(client.roundtrip(hl7_message("SLOW1")))
    client.close()
    assert code in ("AE", "AR") and control_id == "SLOW1"


def test_msh15_ne_suppresses_the_commit_ack(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "enhanced=true"))
    client = MllpClient(serve.port)
    client.send(hl7_message("NE1", msh15="NE", msh16="AL"))
    assert ack_fields(client.read_ack())[:2] == ("AA", "NE1")  # no CA first, straight to the bot's AA
    client.close()


def test_junk_and_split_frames_over_a_real_socket(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "ackMode=fast"))
    client = MllpClient(serve.port)
    framed = b"\x0b" + hl7_message("SPLIT1") + b"\x1c\r"
    client.send_raw(b"\x00\x00junk\r\n")
    for i in range(len(framed)):
        client.send_raw(framed[i : i + 1])
    assert ack_fields(client.read_ack())[:2] == ("AA", "SPLIT1")
    client.close()


def test_hundred_concurrent_senders(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "ackMode=fast"))
    per_sender, senders = 5, 100
    failures: list[str] = []

    def sender(index: int) -> None:
        try:
            client = MllpClient(serve.port)
            for n in range(per_sender):
                control_id = f"C{index:03d}N{n}"
                code, echoed, _ = ack_fields(client.roundtrip(hl7_message(control_id)))
                if (code, echoed) != ("AA", control_id):
                    failures.append(f"{control_id}: {code} {echoed}")
            client.close()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(f"sender {index}: {exc!r}")

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures
    messages = serve.wait_for_hub_messages(senders * per_sender, timeout=60)
    assert len({m["control_id"] for m in messages}) == senders * per_sender


def test_kill_9_after_acks_loses_nothing(serve_factory, tmp_path) -> None:
    channels = channel_toml("adt-in", "ackMode=fast")
    serve = serve_factory(channels)
    client = MllpClient(serve.port)
    acked = []
    for n in range(300):
        control_id = f"K{n:04d}"
        if ack_fields(client.roundtrip(hl7_message(control_id)))[0] == "AA":
            acked.append(control_id)
    client.close()
    serve.stop(signal.SIGKILL)  # the whole process group: agent and hub, no clean shutdown
    restarted = serve_factory(channels, data_dir=serve.data_dir)
    messages = restarted.wait_for_hub_messages(len(acked), timeout=60)
    assert set(acked) <= {m["control_id"] for m in messages}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the hub child through /proc")
def test_hub_loss_mid_load_delivers_everything_once(serve_factory) -> None:
    serve = serve_factory(channel_toml("adt-in", "ackMode=fast"))
    client = MllpClient(serve.port)
    sent = []
    for n in range(400):
        control_id = f"L{n:04d}"
        assert ack_fields(client.roundtrip(hl7_message(control_id)))[0] == "AA"
        sent.append(control_id)
        if n == 150:
            _kill_hub_child(serve)
    client.close()
    messages = serve.wait_for_hub_messages(len(sent), timeout=90)
    delivered = [m["control_id"] for m in messages if not m.get("duplicate_of")]
    assert sorted(delivered) == sorted(sent)  # each exactly once; resends are flagged duplicates


def _kill_hub_child(serve) -> None:
    """kill -9 the embedded hub child of this agent (found by its command line in /proc)."""
    wanted = f"medagent\0hub\0serve\0--data-dir\0{serve.hub_dir}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    assert pids, "hub child not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_outbound_push_through_the_agent(serve_factory) -> None:
    import socketserver

    class EchoAck(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data = b""
            while b"\x1c" not in data:
                chunk = self.request.recv(65536)
                if not chunk:
                    return
                data += chunk
            message = data[data.index(b"\x0b") + 1 : data.index(b"\x1c")]
            control_id = message.split(b"\r")[0].split(b"|")[9]
            ack = b"MSH|^~\\&|DEV|X|MEDAGENT|Y|20240101||ACK|A1|P|2.5.1\rMSA|AA|" + control_id + b"|device ok\r"
            self.request.sendall(b"\x0b" + ack + b"\x1c\r")

    device = socketserver.TCPServer(("127.0.0.1", 0), EchoAck)
    threading.Thread(target=device.serve_forever, daemon=True).start()
    try:
        serve = serve_factory(channel_toml("adt-in", "ackMode=fast"))
        agent_id = json.loads((serve.hub_dir / "embedded-agent.json").read_text())["agent_id"]
        body = json.dumps({
            "destination": f"mllp://127.0.0.1:{device.server_address[1]}",
            "contentType": "x-application/hl7-v2+er7",
            "body": hl7_message("PUSH1").decode(),
            "waitForResponse": True,
            "waitTimeout": 20000,
        }).encode()
        request = urllib.request.Request(
            f"{serve.hub_url}/fhir/R4/Agent/{agent_id}/$push", data=body, method="POST",
            headers={"Authorization": f"Bearer {serve.admin_token()}", "Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 20
        while True:  # the link may still be connecting right after start
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    reply = response.read().decode()
                break
            except urllib.error.HTTPError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(exc.read().decode()) from None
                time.sleep(0.3)
        assert "MSA|AA|PUSH1|device ok" in reply
    finally:
        device.shutdown()
        device.server_close()


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[agent]\nhub = "ftp://nope"\n', "agent.hub"),
        ('[agent]\ndata_dri = "x"\n', "data_dri"),
        ('[[channel]]\nname = "a"\nendpoint = "mllp://127.0.0.1:2575?ackMode=sometimes"\n', "ackMode"),
    ],
)
def test_config_errors_name_the_key_and_exit_2(tmp_path, toml, expected) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    out = subprocess.run([sys.executable, "-m", "medagent", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, env=child_env())
    assert out.returncode == 2
    assert expected in out.stderr and str(config) in out.stderr


def test_a_second_agent_on_the_same_data_is_refused_in_one_line(serve_factory, tmp_path) -> None:
    first = serve_factory(channel_toml("adt-in", "ackMode=fast"))
    config = tmp_path / "second.toml"
    config.write_text(f'[agent]\ndata_dir = "{first.data_dir}"\n\n[hub]\nport = 0\n\n'
                      + channel_toml("adt-in", "ackMode=fast"))
    second = subprocess.run([sys.executable, "-m", "medagent", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=120, env=child_env())
    assert second.returncode == 1
    assert "Traceback" not in second.stdout + second.stderr
    [line] = [x for x in second.stderr.splitlines() if x.startswith("medagent: cannot start:")]
    assert f"pid {first.process.pid}" in line and "stop that process" in line
