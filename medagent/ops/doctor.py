"""`medagent doctor`: find what keeps an agent from running well, and say how to fix it.

Theory of operation
-------------------
Each check is a small function from the loaded configuration to one or more :class:`Finding`
(``ok``, ``warn`` or ``fail``, what was seen, and for anything but ``ok`` the fix in one line):

* **ports** — every channel's listening address (and the embedded hub's port) is bound for a
  moment with SO_REUSEADDR, as the channel would; "in use" is a warning, since a running
  `medagent serve` holds them legitimately;
* **data directory** — every directory looser than 0700 and every file looser than 0600
  (group or other bits) under ``agent.data_dir``; a file the agent cannot write is a failure;
* **hub** — for a remote hub, one HTTPS/HTTP GET of ``<hub>/healthcheck`` (Medplum) with the
  agent's CA bundle: an answer of any status means reachable; a certificate failure is the
  **TLS trust** finding (fix: ``[agent] ca_file``); the answer's ``Date`` header gives the
  **clock skew** (tokens are time-bound: more than ``MAX_SKEW_S`` fails, a few seconds warn).

Invariants: doctor changes nothing (it reads, binds and closes); every network wait is bounded
by ``timeout_s``; no secret is printed (URLs are redacted of credentials).
"""

from __future__ import annotations

import email.utils
import enum
import os
import socket
import ssl
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medagent.config import Config

__all__ = ["MAX_SKEW_S", "WARN_SKEW_S", "Finding", "Status", "run_checks"]

MAX_SKEW_S = 60.0  # beyond this, token validity windows (iat/exp) break
WARN_SKEW_S = 5.0
HEALTH_PATH = "/healthcheck"


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: Status
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


def run_checks(config: Config, timeout_s: float = 5.0) -> list[Finding]:
    findings = list(check_ports(config))
    findings.extend(check_data_dir(Path(config.agent.data_dir)))
    findings.extend(check_hub(config, timeout_s))
    return findings


# -- ports -----------------------------------------------------------------------------------------
def _addresses(config: Config) -> Iterable[tuple[str, str, int]]:
    for channel in config.channels:
        endpoint = channel.endpoint
        if endpoint.port:
            yield f"channel {channel.name}", endpoint.host or "0.0.0.0", endpoint.port
    if config.agent.uses_embedded_hub and config.hub.port:
        yield "embedded hub", config.hub.host, config.hub.port


def check_ports(config: Config) -> Iterable[Finding]:
    for label, host, port in _addresses(config):
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except PermissionError:
            yield Finding("ports", Status.FAIL, f"{label}: no permission to listen on {host}:{port}",
                          "use a port >= 1024, or grant CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE)")
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                yield Finding("ports", Status.WARN, f"{label}: {host}:{port} is in use",
                              f"expected while `medagent serve` runs; otherwise find the owner with `ss -ltnp 'sport = :{port}'`")
            else:
                yield Finding("ports", Status.FAIL, f"{label}: cannot listen on {host}:{port}: {exc.strerror or exc}",
                              "use an address of this machine (or 0.0.0.0) in the endpoint URL")
        else:
            yield Finding("ports", Status.OK, f"{label}: {host}:{port} is free")


# -- data directory --------------------------------------------------------------------------------
def check_data_dir(data_dir: Path) -> Iterable[Finding]:
    if not data_dir.exists():
        parent = data_dir.resolve().parent
        if os.access(parent, os.W_OK):
            yield Finding("data directory", Status.OK, f"{data_dir} does not exist yet; it will be created 0700")
        else:
            yield Finding("data directory", Status.FAIL, f"{data_dir} does not exist and {parent} is not writable",
                          f"create it for the service user: install -d -m 0700 -o <user> {data_dir}")
        return
    loose: list[str] = []
    for root, dirs, files in os.walk(data_dir):
        for name, wanted in [(root, 0o700), *[(os.path.join(root, f), 0o600) for f in files]]:
            try:
                st = os.lstat(name)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                loose.append(f"{name} ({mode:04o}, wanted {wanted:04o})")
            if not os.access(name, os.W_OK):
                yield Finding("data directory", Status.FAIL, f"{name} is not writable by this user",
                              f"run as the owner of {data_dir}, or chown -R <service user> {data_dir}")
        del dirs  # walked by os.walk itself
    if loose:
        shown = "; ".join(loose[:10]) + (f"; and {len(loose) - 10} more" if len(loose) > 10 else "")
        yield Finding("data directory", Status.FAIL, f"readable by others: {shown}",
                      f"chmod -R go-rwx {data_dir}")
    else:
        yield Finding("data directory", Status.OK, f"{data_dir}: directories 0700, files 0600")


# -- hub, TLS trust, clock skew --------------------------------------------------------------------
def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def check_hub(config: Config, timeout_s: float) -> Iterable[Finding]:
    agent = config.agent
    if agent.uses_embedded_hub:
        yield Finding("hub", Status.OK, "embedded hub (started by `medagent serve`); nothing to reach")
        return
    base = agent.hub.rstrip("/")
    url = base + HEALTH_PATH
    https = base.startswith("https://")
    try:
        context = _ssl_context(agent.ca_file) if https else None
    except (OSError, ssl.SSLError) as exc:
        yield Finding("TLS trust", Status.FAIL, f"cannot load ca_file {agent.ca_file}: {exc}",
                      "point [agent] ca_file at a PEM bundle holding the hub's CA certificate")
        return
    started = time.time()
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s, context=context)
        status, headers = response.status, response.headers
        response.close()
    except urllib.error.HTTPError as exc:  # any HTTP answer proves the hub is reachable
        status, headers = exc.code, exc.headers
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            yield Finding("TLS trust", Status.FAIL, f"the hub's certificate is not trusted: {reason.verify_message}",
                          "set [agent] ca_file to the CA bundle that signed the hub's certificate")
            return
        yield Finding("hub", Status.FAIL, f"{base} is not reachable: {reason}",
                      "check the URL, DNS, the proxy and the firewall (outbound HTTPS to the hub must be allowed)")
        return
    except (TimeoutError, OSError) as exc:
        yield Finding("hub", Status.FAIL, f"{base} is not reachable: {exc}",
                      "check the URL, DNS, the proxy and the firewall (outbound HTTPS to the hub must be allowed)")
        return
    finished = time.time()
    yield Finding("hub", Status.OK, f"{base} answered {status}")
    if https:
        yield Finding("TLS trust", Status.OK, "the hub's certificate is trusted")
    yield from _skew(headers.get("Date") if headers is not None else None, (started + finished) / 2)


def _skew(date_header: str | None, local: float) -> Iterable[Finding]:
    if not date_header:
        yield Finding("clock skew", Status.WARN, "the hub sent no Date header; skew unknown",
                      "keep the clock synchronised (chrony or systemd-timesyncd)")
        return
    try:
        remote = email.utils.parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError):
        yield Finding("clock skew", Status.WARN, f"unreadable Date header {date_header!r}", "")
        return
    skew = local - remote
    text = f"this clock is {abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} the hub's"
    fix = "synchronise the clock: timedatectl set-ntp true (or install chrony)"
    if abs(skew) > MAX_SKEW_S:
        yield Finding("clock skew", Status.FAIL, text + " (tokens will be refused)", fix)
    elif abs(skew) > WARN_SKEW_S:
        yield Finding("clock skew", Status.WARN, text, fix)
    else:
        yield Finding("clock skew", Status.OK, text)
