"""End-to-end harness: a real `medagent serve` process (with its embedded hub child) on 127.0.0.1.

`serve_factory(toml_text)` starts `python -m medagent serve --config <file>` in its own process
group, waits for its banner, and parses the real ports from it (channels and hub bind port 0).
Every process a test starts is stopped at teardown (SIGTERM to the group, then SIGKILL).
`MllpClient` is a deliberately simple blocking socket client: one frame out, one ACK frame in.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
TESTS_DIR = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0


def hl7_message(control_id: str, *, msh15: str = "", msh16: str = "", extra: str = "") -> bytes:
    msh = f"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1"
    if msh15 or msh16:
        msh += f"|||{msh15}|{msh16}"
    body = f"{msh}\rEVN|A01|20240101120000\rPID|1||{control_id}^^^HOSP^MR||DOE^JOHN||19700101|M{extra}\r"
    return body.encode("ascii")


def ack_fields(ack: bytes) -> tuple[str, str, str]:
    """(MSA-1, MSA-2, MSA-3) of an ACK."""
    for segment in ack.replace(b"\n", b"\r").split(b"\r"):
        if segment.startswith(b"MSA"):
            parts = segment.decode("latin-1").split("|") + ["", "", ""]
            return parts[1], parts[2], parts[3]
    raise AssertionError(f"no MSA segment in {ack!r}")


class MllpClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: bytes) -> None:
        self.sock.sendall(SB + message + EB + CR)

    def read_ack(self) -> bytes:
        while EB not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before an ACK arrived")
            self._buffer += chunk
        frame, _, rest = self._buffer.partition(EB)
        self._buffer = rest[1:] if rest.startswith(CR) else rest
        return frame[frame.index(SB) + 1 :]

    def roundtrip(self, message: bytes) -> bytes:
        self.send(message)
        return self.read_ack()

    def close(self) -> None:
        self.sock.close()


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    data_dir: Path
    channel_ports: dict[str, int] = field(default_factory=dict)
    hub_url: str = ""
    output: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return next(iter(self.channel_ports.values()))

    @property
    def hub_dir(self) -> Path:
        return self.data_dir / "hub"

    def admin_token(self) -> str:
        return (self.hub_dir / "admin-token").read_text().strip()

    def hub_messages(self, **filters: str) -> list[dict]:
        """Every message the hub stored (through the hub CLI, pages of 1000 followed by cursor)."""
        messages: list[dict] = []
        after = 0
        for _ in range(1000):  # bounded: a million messages at most
            args = [sys.executable, "-m", "medagent", "hub", "messages", "--data-dir", str(self.hub_dir),
                    "--json", "--limit", "1000", "--after", str(after)]
            for key, value in filters.items():
                args += [f"--{key.replace('_', '-')}", value]
            out = subprocess.run(args, capture_output=True, text=True, timeout=60, env=child_env())
            assert out.returncode == 0, out.stderr
            document = json.loads(out.stdout)
            if not isinstance(document, dict):
                return messages + document
            messages += document["messages"]
            if document.get("next") is None:
                return messages
            after = int(document["next"])
        raise AssertionError("too many pages of hub messages")

    def wait_for_hub_messages(self, count: int, timeout: float = 30.0) -> list[dict]:
        """All stored messages once `count` distinct originals (not flagged resends) are there."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.hub_messages()
            originals = [m for m in messages if not m.get("duplicate_of")]  # "duplicate" counts resends of a row
            if len(originals) >= count or time.monotonic() > deadline:
                return messages
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Test bots (tests/runtime/testbots.py) must be importable by the hub child.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR / "runtime"), env.get("PYTHONPATH", "")]))
    return env


_CHANNEL_LINE = re.compile(r"channel (\S+)\s+mllp://[\d.]+:(\d+)")
_HUB_LINE = re.compile(r"embedded hub\s+(http\S+)")


def start_serve(config_path: Path, data_dir: Path) -> ServeProcess:
    process = subprocess.Popen(
        [sys.executable, "-m", "medagent", "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True,
    )
    serve = ServeProcess(process, data_dir)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    assert process.stdout is not None
    os.set_blocking(process.stdout.fileno(), False)
    pending = b""
    while time.monotonic() < deadline:
        chunk = process.stdout.read() or b""
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            serve.output.append(line)
            if match := _CHANNEL_LINE.search(line):
                serve.channel_ports[match.group(1)] = int(match.group(2))
            if match := _HUB_LINE.search(line):
                serve.hub_url = match.group(1)
            if "Press Ctrl-C" in line:
                _drain_output_forever(process)
                return serve
        if process.poll() is not None:
            break
        time.sleep(0.05)
    serve.stop(signal.SIGKILL)
    raise AssertionError("medagent serve did not start:\n" + "\n".join(serve.output) + pending.decode(errors="replace"))


def _drain_output_forever(process: subprocess.Popen[bytes]) -> None:
    """Keep reading the child's output so a full pipe never blocks it."""
    import threading

    def drain() -> None:
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), True)
        for _ in iter(lambda: process.stdout.read(65536), b""):
            pass

    threading.Thread(target=drain, daemon=True).start()


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def factory(channels: str, *, extra: str = "", data_dir: Path | None = None) -> ServeProcess:
        data = data_dir or tmp_path / "data"
        config = tmp_path / f"medagent-{len(started)}.toml"
        config.write_text(
            f'[agent]\ndata_dir = "{data}"\nhub = "embedded"\nheartbeat_s = 1.0\n{extra}\n'
            f"[hub]\nport = 0\n\n{channels}\n"
        )
        serve = start_serve(config, data)
        started.append(serve)
        return serve

    yield factory
    for serve in started:
        serve.stop()


def channel_toml(name: str, query: str, bot: str = "medagent.hub.bots.ack:handler") -> str:
    return f'[[channel]]\nname = "{name}"\nendpoint = "mllp://127.0.0.1:0?{query}"\nbot = "{bot}"\n'
