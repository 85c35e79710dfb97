"""A real PostgreSQL for tests: initdb in a temporary directory, a free port, stopped by PID.

``PostgresServer().start()`` runs ``initdb`` (trust authentication, user ``postgres``) and then
the ``postgres`` server itself as a child process — listening on 127.0.0.1 at a free port and on
a unix socket in the same temporary directory — and waits until it accepts connections;
:meth:`PostgresServer.stop` ends exactly that process (SIGINT: PostgreSQL's fast shutdown,
SIGKILL if it lingers) and removes the directory. ``initdb`` refuses to run as root, so as root
both run as the ``postgres`` system user (the directory is created in /tmp and handed to it,
since pytest's own temporary directories are private to root).

Fixtures: ``postgres_server`` is one server per session (per xdist worker); ``postgres_url`` is
a fresh, empty database on it for one test (``CREATE DATABASE``, dropped afterwards);
``store_url`` parametrizes a hub test by store engine (None: SQLite in the data directory, or a
``postgres_url``). Tests
run with ``fsync=off`` (a test never survives a power cut); the benchmark starts its own server
with fsync on. Without the binaries the fixtures skip, except under ``CI=true``, where they
fail: CI installs PostgreSQL (``apt-get install postgresql``) and a silent skip would hide the
PostgreSQL half of the hub suite.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from engines import await_ready, engine_missing, free_port

__all__ = ["STORES", "PostgresServer", "postgres_binaries", "postgres_server", "postgres_url", "store_url"]

#: the hub store engines a hub test runs on (``store_url``)
STORES = ["sqlite", "postgresql"]

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_PORT_ATTEMPTS = 5
SYSTEM_USER = "postgres"


def postgres_binaries() -> Path:
    """The directory holding initdb and postgres (Debian's /usr/lib/postgresql/<v>/bin, or PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    found = Path(candidates[-1]).parent if candidates else None
    if found is None and shutil.which("initdb"):
        found = Path(shutil.which("initdb")).parent  # type: ignore[arg-type]
    if found is None:
        engine_missing("PostgreSQL is not installed (apt-get install postgresql)")
    return found


class PostgresServer:
    """One PostgreSQL cluster in its own directory; ``url(db)`` names a database on it."""

    def __init__(self, bindir: Path | None = None, *, fsync: bool = False) -> None:
        self.bindir = bindir or postgres_binaries()
        self.fsync = fsync
        self.port = 0
        self.workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._as_user: dict[str, Any] = {}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SYSTEM_USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="medagent-pg-"))
        if os.geteuid() == 0:  # initdb and postgres refuse root
            user = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.workdir, user.pw_uid, user.pw_gid)
            self._as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        data = self.workdir / "data"
        subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", SYSTEM_USER, "-E", "UTF8",
                        "--no-sync"], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.workdir, **self._as_user)
        for _attempt in range(_PORT_ATTEMPTS):
            port = free_port()
            if self._launch(data, port):
                self.port = port
                return
        raise RuntimeError(f"postgres did not start; see {self.workdir / 'postgres.log'}")

    def _launch(self, data: Path, port: int) -> bool:
        assert self.workdir is not None
        log = open(self.workdir / "postgres.log", "ab")  # noqa: SIM115 - the child keeps writing to it
        args = [str(self.bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(self.workdir),
                "-c", "listen_addresses=127.0.0.1", "-c", f"fsync={'on' if self.fsync else 'off'}",
                "-c", "max_connections=200", "-c", "shared_buffers=64MB"]
        if not self.fsync:
            args += ["-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir,
                                   **self._as_user)
        log.close()
        if not await_ready(process, partial(_accepts, port), START_TIMEOUT_S, 0.05,
                           f"postgres on port {port} did not accept connections"):
            return False
        self._process = process
        return True

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, checkpoint, exit
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _accepts(port: int) -> bool:
    try:
        import psycopg

        with psycopg.connect(f"postgresql://{SYSTEM_USER}@127.0.0.1:{port}/postgres", connect_timeout=2):
            return True
    except Exception:  # noqa: BLE001 - not up yet (or starting: "the database system is starting up")
        return False


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest) -> str | None:
    """The hub store under test: None (hub.sqlite3 in the data dir) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))
