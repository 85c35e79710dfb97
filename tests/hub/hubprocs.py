"""Helpers of the multi-process hub tests and benchmark: `medagent` child processes, a TCP proxy
that can be pointed at another hub (a stand-in for the load balancer), and an MLLP peer that
ACKs what a `$push` sends it.

Every child runs in its own session and is stopped by its own process group id; every thread
here is a daemon bounded by socket timeouts; nothing reads or logs message bodies.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

from childproc import MedagentChild

WAIT_S = 30.0
SB, EB, CR = b"\x0b", b"\x1c", b"\r"
HUB_URL = re.compile(r"medagent hub listening on (http://127\.0\.0\.1:(\d+))")
TESTS_DIR = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR / "hub"), env.get("PYTHONPATH", "")]))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Child(MedagentChild):
    """A `python -m medagent ...` child with the hub tests' bots on its PYTHONPATH."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()) -> None:
        super().__init__(args, env=env or child_env(), pass_fds=pass_fds)


def start_hub(args: list[str], **kwargs: object) -> tuple[Child, str]:
    hub = Child(["hub", "serve", *args], **kwargs)  # type: ignore[arg-type]
    return hub, hub.wait_for(HUB_URL).group(1)


class TcpProxy:
    """Forwards every connection to ``target`` (a port on 127.0.0.1); :meth:`point_at` moves new
    connections elsewhere and cuts the open ones, as a load balancer does when a backend dies."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def point_at(self, target: int) -> None:
        self.target = target
        with self._lock:
            opened, self._open = self._open, set()
        for sock in opened:
            _shut(sock)

    def close(self) -> None:
        self._closed.set()
        self.point_at(self.target)
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(None)
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        for sock in (source, sink):
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class MllpAckPeer:
    """A remote MLLP system: answers every framed message with an AA ACK naming its MSH-10."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.received = 0
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT_S)
        buffer = b""
        with conn:
            try:
                while chunk := conn.recv(65536):
                    buffer += chunk
                    while EB in buffer:
                        frame, _, buffer = buffer.partition(EB)
                        buffer = buffer.removeprefix(CR)
                        self.received += 1
                        conn.sendall(SB + ack_for(frame.removeprefix(SB)) + EB + CR)
            except OSError:
                return


def hl7_message(control_id: str) -> bytes:
    return (f"MSH|^~\\&|SENDAPP|SENDFAC|RECVAPP|RECVFAC|20240101120000||ADT^A01^ADT_A01|{control_id}|P|2.5.1\r"
            f"EVN|A01|20240101120000\rPID|1||{control_id}^^^HOSP^MR||DOE^JOHN||19700101|M\r").encode()


def ack_for(message: bytes) -> bytes:
    control_id = message.split(b"\r", 1)[0].split(b"|")[9]
    return b"MSH|^~\\&|RECVAPP|RECVFAC|SENDAPP|SENDFAC|20240101120000||ACK|" + control_id + b"|P|2.5.1\rMSA|AA|" + control_id + b"\r"


class MllpSender:
    """Lock-step MLLP client: one message out, its ACK in; (MSA-1, MSA-2) of each ACK."""

    def __init__(self, port: int, timeout: float = WAIT_S) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def roundtrip(self, control_id: str) -> tuple[str, str]:
        self.sock.sendall(SB + hl7_message(control_id) + EB + CR)
        while EB not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before an ACK arrived")
            self._buffer += chunk
        frame, _, rest = self._buffer.partition(EB)
        self._buffer = rest.removeprefix(CR)
        for segment in frame.split(b"\r"):
            if segment.startswith(b"MSA|"):
                fields = segment.decode().split("|") + ["", ""]
                return fields[1], fields[2]
        raise AssertionError("an ACK without an MSA segment")

    def close(self) -> None:
        self.sock.close()
