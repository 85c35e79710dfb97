"""The dashboard's own database: operator accounts, login sessions and the audit log.

Theory of operation
-------------------
``<hub data dir>/dashboard.sqlite3`` (created 0600, WAL) is separate from the hub's database,
so the dashboard never writes to the hub's schema and the hub's migrations never see these
tables. Three tables:

* ``users``: operator name -> scrypt hash of the password (:func:`medagent.hub.auth.hash_secret`,
  the same salted scrypt as agent secrets); passwords are never stored or logged in clear.
* ``sessions``: SHA-256 of the session cookie value (the cookie itself is never stored, so a
  leaked database grants no session), the user, the CSRF token of the session, creation and
  last-use times. A session ends after ``IDLE_S`` without use or ``MAX_AGE_S`` in total, or at
  logout.
* ``audit``: one row per operator action (login ok/failed, logout, body viewed, retry, reload,
  logs, push …) with the time, the user, the client address, the target and the outcome.
  Rows are only ever inserted.

One connection guarded by a lock serves every thread (statements here take microseconds; the
scrypt work in :meth:`DashboardDB.check_password` is done outside the lock).

Invariants: the file and its WAL/SHM companions are 0600; a user name is 1-64 printable
characters; a password is at least ``MIN_PASSWORD`` characters.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from medagent.hub.auth import hash_secret, verify_secret

__all__ = [
    "ADMIN_USER",
    "DB_FILE",
    "IDLE_S",
    "MAX_AGE_S",
    "MIN_PASSWORD",
    "AccountError",
    "AuditEntry",
    "DashboardDB",
    "Session",
]

DB_FILE = "dashboard.sqlite3"
MIN_PASSWORD = 12
#: the name shown for a login made with the hub's admin token
ADMIN_USER = "admin-token"
IDLE_S = 3600
MAX_AGE_S = 12 * 3600
#: a session's last-use time is written at most this often (saves a write per request)
_TOUCH_EVERY_S = 60

_SCHEMA = (
    (
        "CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, password_hash TEXT NOT NULL,"
        " created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL)"
    ),
    (
        "CREATE TABLE IF NOT EXISTS sessions (token_hash TEXT PRIMARY KEY, user TEXT NOT NULL,"
        " csrf TEXT NOT NULL, created_at REAL NOT NULL, last_used REAL NOT NULL)"
    ),
    (
        "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY, at REAL NOT NULL, user TEXT NOT NULL,"
        " remote TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, outcome TEXT NOT NULL)"
    ),
)


class AccountError(ValueError):
    """A user name or password that cannot be used (the message says why, never the password)."""


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    csrf: str
    created_at: float


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    user: str
    remote: str
    action: str
    target: str
    outcome: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_user_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise AccountError("a user name must be 1 to 64 printable characters")
    if name == ADMIN_USER:
        raise AccountError(f"{ADMIN_USER!r} is reserved for logins with the hub's admin token")
    return name


class DashboardDB:
    def __init__(self, data_dir: Path) -> None:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = data_dir / DB_FILE
        # Create the file 0600 before SQLite opens it, whatever the umask.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            for statement in _SCHEMA:
                self._conn.execute(statement)
        for suffix in ("-wal", "-shm"):
            companion = self.path.with_name(self.path.name + suffix)
            if companion.exists():
                os.chmod(companion, 0o600)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- users ----------------------------------------------------------------------------

    def set_user(self, name: str, password: str, *, replace: bool = False) -> bool:
        """Create (or with ``replace`` update) an operator; True when the user was new."""
        name = check_user_name(name)
        if len(password) < MIN_PASSWORD:
            raise AccountError(f"a password must have at least {MIN_PASSWORD} characters")
        password_hash = hash_secret(password)
        now = int(time.time())
        with self._lock:
            exists = self._conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is not None
            if exists and not replace:
                raise AccountError(f"a user named {name!r} already exists (use --replace to set a new password)")
            self._conn.execute(
                "INSERT INTO users (name, password_hash, created_at, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,"
                " updated_at = excluded.updated_at",
                (name, password_hash, now, now),
            )
            if exists:  # a new password ends the user's open sessions
                self._conn.execute("DELETE FROM sessions WHERE user = ?", (name,))
        return not exists

    def check_password(self, name: str, password: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            # Same scrypt cost for an unknown user, so timing does not tell which names exist.
            verify_secret(password, _dummy_hash())
            return False
        return verify_secret(password, row[0])

    def users(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT name FROM users ORDER BY name")]

    # -- sessions -------------------------------------------------------------------------

    def open_session(self, user: str) -> tuple[str, Session]:
        """A new session for ``user``: ``(cookie value, session)``."""
        token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
        with self._lock:
            self._conn.execute("DELETE FROM sessions WHERE last_used < ? OR created_at < ?",
                               (now - IDLE_S, now - MAX_AGE_S))
            self._conn.execute("INSERT INTO sessions (token_hash, user, csrf, created_at, last_used) VALUES (?, ?, ?, ?, ?)",
                               (_digest(token), user, csrf, now, now))
        return token, Session(user, csrf, now)

    def session(self, token: str) -> Session | None:
        """The live session of a cookie value (its last use refreshed), or ``None``."""
        now = time.time()
        key = _digest(token)
        with self._lock:
            row = self._conn.execute("SELECT user, csrf, created_at, last_used FROM sessions WHERE token_hash = ?",
                                     (key,)).fetchone()
            if row is None:
                return None
            user, csrf, created_at, last_used = row
            if now - last_used > IDLE_S or now - created_at > MAX_AGE_S:
                self._conn.execute("DELETE FROM sessions WHERE token_hash = ?", (key,))
                return None
            if now - last_used > _TOUCH_EVERY_S:
                self._conn.execute("UPDATE sessions SET last_used = ? WHERE token_hash = ?", (now, key))
        return Session(user, csrf, created_at)

    def close_session(self, token: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM sessions WHERE token_hash = ?", (_digest(token),))

    # -- audit ----------------------------------------------------------------------------

    def audit(self, user: str, remote: str, action: str, target: str, outcome: str) -> None:
        with self._lock:
            self._conn.execute("INSERT INTO audit (at, user, remote, action, target, outcome) VALUES (?, ?, ?, ?, ?, ?)",
                               (time.time(), user, remote, action, target[:500], outcome[:500]))

    def audit_entries(self, limit: int = 200, before: int | None = None) -> list[AuditEntry]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, at, user, remote, action, target, outcome FROM audit WHERE id < ? ORDER BY id DESC LIMIT ?",
                (before if before is not None else 2**62, max(1, min(limit, 1000))),
            ).fetchall()
        return [AuditEntry(*r) for r in rows]


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@functools.cache
def _dummy_hash() -> str:
    return hash_secret(secrets.token_urlsafe(16))
