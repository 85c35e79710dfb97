"""The agent's operations side, owned by the runtime: stats document, rate sampling, metrics port.

Theory of operation
-------------------
The runtime creates one :class:`AgentOps` with a provider of its own ``stats()`` and its data
directory, routes the link through :attr:`rtt` (see :class:`~medagent.ops.stats.RttTracker`),
answers ``agent:stats:request`` with :meth:`stats`, and calls :meth:`start` / :meth:`stop`
around serving. :meth:`start` runs one background task that samples the channel counters every
``RateMeter.interval_s`` (so 1/5/15-minute rates exist without anyone asking) and measures the
data directory every ``DISK_EVERY_S`` in a worker thread (a walk of a large spool must not
block the loop); with a ``metrics_port`` it also serves ``GET /metrics``; with ``log_file`` it
writes the main log ``<data_dir>/medagent.log`` (text or JSON lines, rotated, 0600) while it runs.

Invariants: a failing sample is logged once per kind and the task goes on; stop() ends the task
and the metrics server, and is safe to call twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medagent.ops.logs import LOG_RING, RateLimitedLog, add_file_log
from medagent.ops.metrics import MetricsServer
from medagent.ops.stats import (
    RateMeter,
    RttTracker,
    build_stats,
    channel_counters,
    directory_usage,
    event_loop_name,
)

__all__ = ["AgentOps"]

log = logging.getLogger("medagent.ops")
DISK_EVERY_S = 60.0


class AgentOps:
    def __init__(self, base_stats: Callable[[], Mapping[str, Any]], data_dir: Path,
                 metrics_port: int | None = None, metrics_host: str = "127.0.0.1",
                 sample_interval_s: float = 5.0, log_file: bool = True, log_json: bool = False) -> None:
        self._base_stats = base_stats
        self._data_dir = data_dir
        self.rtt = RttTracker()
        self.rates = RateMeter(sample_interval_s)
        self._disk: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._problems = RateLimitedLog(log, interval_s=300.0)
        self._sections: dict[str, Callable[[], Any]] = {}
        self._log_file, self._log_json = log_file, log_json
        self._log_handler: logging.Handler | None = None
        self.metrics = MetricsServer(self.stats, metrics_port, metrics_host) if metrics_port is not None else None

    def add_section(self, name: str, provider: Callable[[], Any]) -> None:
        """One more top-level key of the stats document (e.g. ``upgrade``)."""
        self._sections[name] = provider

    def stats(self) -> dict[str, Any]:
        """The full stats document (``agent:stats:response``, ``$stats``, ``/metrics``)."""
        stats = build_stats(self._base_stats(), self.rtt, self.rates, self._disk, event_loop_name())
        for name, provider in self._sections.items():
            stats[name] = provider()
        return stats

    async def start(self) -> None:
        root = logging.getLogger()
        if LOG_RING not in root.handlers:  # `agent:logs:request` answers from it (also without the CLI)
            root.addHandler(LOG_RING)
        if self._log_file and self._log_handler is None:
            self._log_handler = add_file_log(self._data_dir, json_lines=self._log_json)
        self._disk = await asyncio.to_thread(directory_usage, self._data_dir)
        if self.metrics is not None:
            await self.metrics.start()
        self._task = asyncio.get_running_loop().create_task(self._sampler(), name="medagent-ops-sampler")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.metrics is not None:
            await self.metrics.stop()
        handler, self._log_handler = self._log_handler, None
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()

    async def _sampler(self) -> None:
        since_disk = 0.0
        while True:
            try:
                self.rates.sample(channel_counters(self._base_stats().get("channelStats") or {}))
                since_disk += self.rates.interval_s
                if since_disk >= DISK_EVERY_S:
                    since_disk = 0.0
                    self._disk = await asyncio.to_thread(directory_usage, self._data_dir)
            except Exception as exc:  # noqa: BLE001 - stats must never stop the agent
                self._problems.warning("sample", "stats sampling failed: %s", exc)
            await asyncio.sleep(self.rates.interval_s)
