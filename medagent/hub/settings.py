"""Settings of one hub process (all have defaults except the data directory)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medagent.hub.records import RetentionPolicy
from medagent.ops import time_slice

__all__ = ["DEFAULT_DATA_DIR", "DEFAULT_PORT", "HubSettings"]

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
    #: the store (medagent.hub.store.open_store): None = hub.sqlite3 in data_dir,
    #: sqlite:///path, or postgresql://user@host:port/db (docs/hub-store.md)
    store: str | None = None
    #: the bus between hub processes (medagent.hub.bus.make_bus): None/"local" = this process
    #: alone, redis://host:port/db = several processes sharing one store (docs/scale-out.md)
    bus: str | None = None
    #: serve on this inherited listening socket (file descriptor) instead of binding host:port
    listen_fd: int | None = None
    #: connections of a PostgreSQL store's pool (one is the hot path's writer at a time)
    store_pool_size: int = 10
    #: the CPU time slice asked for at start (medagent.ops.time_slice); 0: the kernel's default
    cpu_slice_ms: float = time_slice.DEFAULT_SLICE_MS
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
    #: /oauth2/token rate limits (token buckets: refill per minute, burst) per client id and address
    token_requests_per_client_per_min: float = 10.0
    token_burst_per_client: int = 10
    token_requests_per_address_per_min: float = 60.0
    token_burst_per_address: int = 60
    #: retention (medagent.hub.retention): hub-wide policy, per-channel overrides by channel name,
    #: and a budget for the live size of hub.sqlite3 (None = no size limit)
    retention: RetentionPolicy = RetentionPolicy()
    retention_channels: Mapping[str, RetentionPolicy] = field(default_factory=dict)
    retention_max_bytes: int | None = None
    retention_interval_s: float = 10.0
    retention_batch_rows: int = 200
    #: after an accepted $upgrade, ask the agent's $stats this often until the upgrade's outcome
    upgrade_poll_s: float = 5.0
    #: free-space watermark: intake is refused (agent:error, nothing stored) while the data
    #: directory's file system has less than max(min_free_bytes, min_free_percent of its size)
    min_free_bytes: int = 50 * 1024 * 1024
    min_free_percent: float = 2.0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the setting that is wrong."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if self.listen_fd is not None and self.listen_fd < 0:
            raise ValueError(f"listen_fd must be a file descriptor number (>= 0), not {self.listen_fd}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, not {self.port}")
        positives = {
            "token_ttl_s": self.token_ttl_s, "batch_max_messages": self.batch_max_messages,
            "bot_timeout_s": self.bot_timeout_s, "bot_workers": self.bot_workers,
            "heartbeat_interval_s": self.heartbeat_interval_s, "batch_max_bytes": self.batch_max_bytes,
            "max_frame_bytes": self.max_frame_bytes, "max_backlog_messages": self.max_backlog_messages,
            "token_requests_per_client_per_min": self.token_requests_per_client_per_min,
            "token_burst_per_client": self.token_burst_per_client,
            "token_requests_per_address_per_min": self.token_requests_per_address_per_min,
            "token_burst_per_address": self.token_burst_per_address,
            "retention_interval_s": self.retention_interval_s, "retention_batch_rows": self.retention_batch_rows,
            "store_pool_size": self.store_pool_size, "upgrade_poll_s": self.upgrade_poll_s,
        }
        for name, value in positives.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        self.retention.validate("retention")
        for channel, policy in self.retention_channels.items():
            policy.validate(f"retention_channels[{channel!r}]")
        if self.retention_max_bytes is not None and self.retention_max_bytes <= 0:
            raise ValueError(f"retention_max_bytes must be positive (or None), not {self.retention_max_bytes}")
        if self.min_free_bytes < 0 or not 0 <= self.min_free_percent < 100:
            raise ValueError("min_free_bytes must be >= 0 and min_free_percent in 0..100")
        if (problem := time_slice.setting_problem(self.cpu_slice_ms)) is not None:
            raise ValueError(f"cpu_slice_ms {problem}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("admin_token must be at least 16 characters")
