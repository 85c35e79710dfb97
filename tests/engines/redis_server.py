"""A real ``redis-server`` for tests: its own temporary directory, a free port, stopped by PID.

``RedisServer(workdir).start()`` runs ``redis-server --port N --bind 127.0.0.1 --save ""
--appendonly no`` (nothing persisted: a restart starts empty, like a Redis that lost its data),
waits until it answers PING, and :meth:`RedisServer.stop` / :meth:`RedisServer.kill` end exactly
that process. :meth:`RedisServer.restart` brings it back on the same port (clients reconnect to
the same URL). A port taken between the free-port probe and the bind is retried with another.

Fixtures: ``redis_server`` is shared by the tests of one session (one per xdist worker; give
each test its own key namespace), ``own_redis_server`` is per test, for tests that stop it.
Without the ``redis-server`` binary the fixtures skip, except under ``CI=true``, where they fail:
CI installs it (``apt-get install redis-server``) and a silent skip there would hide the suite.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from engines import await_ready, engine_missing, free_port

__all__ = ["RedisServer", "own_redis_server", "redis_server", "redis_server_binary"]

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
_PORT_ATTEMPTS = 5


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        engine_missing("redis-server is not installed (apt-get install redis-server)")
    return binary


class RedisServer:
    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        self.workdir = workdir
        self.binary = binary or redis_server_binary()
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start on a free port (or on the previous one after a stop); wait until it answers."""
        if self._process is not None:
            raise RuntimeError("redis-server is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(_PORT_ATTEMPTS if self.port == 0 else 1):
            port = self.port or free_port()
            if self._launch(port):
                self.port = port
                return
        raise RuntimeError(f"redis-server did not start; see {self.workdir / 'redis.log'}")

    def _launch(self, port: int) -> bool:
        log = self.workdir / "redis.log"
        args = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no", "--logfile", str(log)]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not await_ready(process, partial(_answers_ping, port), START_TIMEOUT_S, 0.02,
                           f"redis-server on port {port} did not answer PING"):
            return False
        self._process = process
        return True

    def stop(self) -> None:
        """SIGTERM (Redis shuts down cleanly, saving nothing), SIGKILL if it lingers."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _end(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
