"""Issue 13, defect 5: a hub ``$push`` to ``mllp://host:port?encoding=windows-1252`` is sent and its
reply read in windows-1252, not UTF-8.

Real `medagent serve` (embedded hub child), the hub's ``$push`` over HTTP, and an MLLP device in
the test (a socketserver thread) that records the exact bytes it received and answers with a
windows-1252 ACK carrying non-ASCII text.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
import urllib.error
import urllib.request

from serve_harness import channel_toml

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
PATIENT = "MÜLLER^JÜRGEN"  # not ASCII; encodable in windows-1252
DEVICE_TEXT = "Befund übermittelt – Grüße"  # the device's reply text (windows-1252, incl. an en dash)


def pushed_message(control_id: str) -> str:
    return (f"MSH|^~\\&|HUB|X|DEV|Y|20240101120000||ORU^R01|{control_id}|P|2.5.1\r"
            f"PID|1||123^^^HOSP^MR||{PATIENT}||19700101|M\r")


class Device(socketserver.BaseRequestHandler):
    received: list[bytes] = []

    def handle(self) -> None:
        data = b""
        while EB not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        message = data[data.index(SB) + 1 : data.index(EB)]
        type(self).received.append(message)
        control_id = message.split(b"\r")[0].split(b"|")[9]
        ack = (b"MSH|^~\\&|DEV|Y|HUB|X|20240101120001||ACK|A1|P|2.5.1\rMSA|AA|" + control_id + b"|"
               + DEVICE_TEXT.encode("windows-1252") + b"\r")
        self.request.sendall(SB + ack + EB + CR)


def push(serve, destination: str, body: str) -> str:
    agent_id = json.loads((serve.hub_dir / "embedded-agent.json").read_text())["agent_id"]
    document = json.dumps({"destination": destination, "contentType": "x-application/hl7-v2+er7", "body": body,
                           "waitForResponse": True, "waitTimeout": 20000}).encode()
    request = urllib.request.Request(
        f"{serve.hub_url}/fhir/R4/Agent/{agent_id}/$push", data=document, method="POST",
        headers={"Authorization": f"Bearer {serve.admin_token()}", "Content-Type": "application/json"},
    )
    deadline = time.monotonic() + 20
    while True:  # the link may still be connecting right after start
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(exc.read().decode()) from None
            time.sleep(0.3)


def test_push_uses_the_remote_encoding_both_ways(serve_factory) -> None:
    Device.received = []
    device = socketserver.TCPServer(("127.0.0.1", 0), Device)
    threading.Thread(target=device.serve_forever, daemon=True).start()
    try:
        serve = serve_factory(channel_toml("adt-in", "ackMode=fast"))
        port = device.server_address[1]
        reply = push(serve, f"mllp://127.0.0.1:{port}?encoding=windows-1252", pushed_message("PUSH-1252"))
        assert Device.received[-1] == pushed_message("PUSH-1252").encode("windows-1252")
        assert f"MSA|AA|PUSH-1252|{DEVICE_TEXT}" in reply

        # Without an encoding parameter the remote is UTF-8 (Medplum's default) both ways.
        reply = push(serve, f"mllp://127.0.0.1:{port}", pushed_message("PUSH-UTF8"))
        assert Device.received[-1] == pushed_message("PUSH-UTF8").encode("utf-8")
        assert "MSA|AA|PUSH-UTF8|" in reply
    finally:
        device.shutdown()
        device.server_close()
