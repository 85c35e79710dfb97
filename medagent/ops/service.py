"""Service definitions for running `medagent serve` unattended.

:func:`systemd_unit` writes the unit `medagent service install` installs: `Type=notify` with
`NotifyAccess=all` (the agent sends `READY=1` once it serves; after an upgrade's switch the new
version's process, started by the old one and so in the same cgroup, sends `MAINPID=<pid>`
before the old process exits 0, so systemd follows the process that serves and does not
count the old one's exit as the service ending: medagent.ops.sdnotify, medagent.ops.switch),
`KillMode=mixed` (`systemctl stop` sends SIGTERM to the main process only, which stops its
channels, queue and embedded hub in order; anything left gets SIGKILL after it exited), restart on
failure with a 2 s pause, `KillSignal=SIGTERM` and a stop timeout long enough for the channels to
drain and the queue to flush (the runtime's stop order, medagent.runtime.agent), the data
directory as the only writable path (`ProtectSystem=strict`, `ReadWritePaths=`), private /tmp,
no new privileges, and `UMask=0077` (files are also created 0600 by the code itself, DESIGN).
Ports below 1024 need `AmbientCapabilities=CAP_NET_BIND_SERVICE` (`--privileged-ports`).

Windows has no unit files; docs/operations.md gives the recipe (a service wrapper such as
WinSW or NSSM around the same command line, restart on failure).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_UNIT_PATH", "ServiceSpec", "systemd_unit"]

DEFAULT_UNIT_PATH = Path("/etc/systemd/system/medagent.service")
STOP_TIMEOUT_S = 60


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    config: Path
    data_dir: Path
    user: str | None = None
    python: str = sys.executable
    privileged_ports: bool = False
    description: str = "medagent healthcare integration agent"


def systemd_unit(spec: ServiceSpec) -> str:
    command = " ".join(shlex.quote(part) for part in
                       (spec.python, "-P", "-m", "medagent", "serve", "--config", str(spec.config.resolve())))
    lines = [
        "[Unit]",
        f"Description={spec.description}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=all",
        f"ExecStart={command}",
        "KillMode=mixed",
        "Restart=on-failure",
        "RestartSec=2",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        f"ReadWritePaths={spec.data_dir.resolve()}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if spec.user:
        lines.insert(lines.index("Restart=on-failure"), f"User={spec.user}")
    if spec.privileged_ports:
        lines.append("AmbientCapabilities=CAP_NET_BIND_SERVICE")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)
