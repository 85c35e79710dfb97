"""Settings of one hub process (all have defaults except the data directory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["HubSettings", "DEFAULT_PORT", "DEFAULT_DATA_DIR"]

DEFAULT_PORT = 8103
DEFAULT_DATA_DIR = Path("medagent-data") / "hub"


@dataclass(frozen=True, slots=True)
class HubSettings:
    """Where the hub keeps its data, where it listens, and its limits.

    ``port=0`` binds a free port (read it back from ``HubServer.port``). ``tls_cert`` and
    ``tls_key`` (PEM files) switch the listener to HTTPS/WSS. ``admin_token=None`` means "use the
    one in ``<data_dir>/admin-token``, generating it on first start".
    """

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_ttl_s: int = 3600
    admin_token: str | None = None
    batch_max_messages: int = 1000
    bot_timeout_s: float = 10.0
    bot_workers: int = 4
    #: medagent additions
    heartbeat_interval_s: float = 10.0
    batch_max_bytes: int = 8 * 1024 * 1024
    max_frame_bytes: int = 16 * 1024 * 1024
    #: unanswered inbound messages per agent before the hub stops reading its socket
    max_backlog_messages: int = 10_000

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting that is wrong."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, not {self.port}")
        positives = {
            "token_ttl_s": self.token_ttl_s, "batch_max_messages": self.batch_max_messages,
            "bot_timeout_s": self.bot_timeout_s, "bot_workers": self.bot_workers,
            "heartbeat_interval_s": self.heartbeat_interval_s, "batch_max_bytes": self.batch_max_bytes,
            "max_frame_bytes": self.max_frame_bytes, "max_backlog_messages": self.max_backlog_messages,
        }
        for name, value in positives.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("admin_token must be at least 16 characters")
