"""`medagent doctor`: ports, data-directory permissions, hub reachability, TLS trust, clock skew;
and `medagent service install`'s unit. Real sockets, a real hub (plain and TLS), temp dirs."""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import io
import json
import os
import shutil
import socket
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from medagent import doctor_cli, service_cli
from medagent.config import load_config
from medagent.hub import HubServer, HubSettings
from medagent.ops.doctor import Finding, Status, _skew, check_data_dir, run_checks


def _config(tmp_path: Path, **agent: str) -> object:
    overrides = {"agent": {"data_dir": str(tmp_path / "data"), **agent}}
    return load_config(None, env={}, overrides=overrides)


def _by_check(findings: list[Finding], check: str) -> list[Finding]:
    return [f for f in findings if f.check == check]


def test_data_directory_permissions_are_flagged_with_the_fix(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "spool").mkdir(parents=True)
    os.chmod(data, 0o700)
    os.chmod(data / "spool", 0o755)
    (data / "queue.sqlite3").write_bytes(b"x")
    os.chmod(data / "queue.sqlite3", 0o644)
    [finding] = list(check_data_dir(data))
    assert finding.status is Status.FAIL
    assert "spool (0755, wanted 0700)" in finding.detail and "queue.sqlite3 (0644, wanted 0600)" in finding.detail
    assert finding.fix == f"chmod -R go-rwx {data}"
    subprocess.run(["chmod", "-R", "go-rwx", str(data)], check=True, timeout=30)
    assert [f.status for f in check_data_dir(data)] == [Status.OK]
    assert [f.status for f in check_data_dir(tmp_path / "missing")] == [Status.OK]


def test_ports_free_and_in_use(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        channels = [{"name": "busy", "endpoint": f"mllp://127.0.0.1:{busy}"},
                    {"name": "free", "endpoint": f"mllp://127.0.0.1:{free}"}]
        config = load_config(None, env={}, overrides={"agent": {"data_dir": str(tmp_path / "d")}, "channel": channels,
                                                     "hub": {"port": "0"}})
        ports = {f.detail.split(":")[0]: f for f in _by_check(run_checks(config, 1.0), "ports")}
    assert ports["channel busy"].status is Status.WARN and "in use" in ports["channel busy"].detail
    assert ports["channel free"].status is Status.OK


def test_clock_skew_thresholds() -> None:
    now = 1_800_000_000.0
    header = email.utils.formatdate(now, usegmt=True)
    assert [f.status for f in _skew(header, now + 1)] == [Status.OK]
    assert [f.status for f in _skew(header, now + 30)] == [Status.WARN]
    [far] = list(_skew(header, now - 600))
    assert far.status is Status.FAIL and "behind" in far.detail and "timedatectl" in far.fix
    assert [f.status for f in _skew(None, now)] == [Status.WARN]


async def test_remote_hub_reachable_then_unreachable_and_json_output(tmp_path: Path) -> None:
    hub = HubServer(HubSettings(data_dir=tmp_path / "hub", port=0))
    await hub.start()
    try:
        args = argparse.Namespace(config=None, json=True, timeout=5.0)
        config_file = tmp_path / "agent.toml"
        config_file.write_text(f'[agent]\ndata_dir = "{tmp_path / "data"}"\nhub = "{hub.url}"\n'
                               'client_id = "c"\nclient_secret = "s"\nagent_id = "a"\n')
        args.config = config_file
        out = io.StringIO()
        with redirect_stdout(out):
            code = await asyncio.to_thread(doctor_cli.run, args)
        document = json.loads(out.getvalue())
        checks = {c["check"]: c for c in document["checks"]}
        assert code == 0 and document["ok"] is True
        assert checks["hub"]["status"] == "ok" and checks["clock skew"]["status"] == "ok"
        port = hub.port
    finally:
        await hub.stop()
    config = _config(tmp_path, hub=f"http://127.0.0.1:{port}", client_id="c", client_secret="s", agent_id="a")
    [hub_finding] = _by_check(await asyncio.to_thread(run_checks, config, 2.0), "hub")
    assert hub_finding.status is Status.FAIL and "not reachable" in hub_finding.detail and "firewall" in hub_finding.fix


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a test certificate")
async def test_tls_trust_needs_the_ca_file(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(subprocess.run, ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    hub = HubServer(HubSettings(data_dir=tmp_path / "hub", port=0, tls_cert=cert, tls_key=key))
    await hub.start()
    try:
        base = {"hub": hub.url, "client_id": "c", "client_secret": "s", "agent_id": "a"}
        untrusted = await asyncio.to_thread(run_checks, _config(tmp_path, **base), 5.0)
        [trust] = _by_check(untrusted, "TLS trust")
        assert trust.status is Status.FAIL and "ca_file" in trust.fix
        trusted = await asyncio.to_thread(run_checks, _config(tmp_path, **base, ca_file=str(cert)), 5.0)
        assert [f.status for f in _by_check(trusted, "TLS trust")] == [Status.OK]
        assert [f.status for f in _by_check(trusted, "hub")] == [Status.OK]
    finally:
        await hub.stop()


def test_service_install_writes_a_systemd_unit(tmp_path: Path) -> None:
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'[agent]\ndata_dir = "{tmp_path / "data"}"\n')
    unit_path = tmp_path / "units" / "medagent.service"
    args = argparse.Namespace(config=config_file, user="medagent", output=unit_path, print_only=False,
                              privileged_ports=False)
    out = io.StringIO()
    with redirect_stdout(out):
        assert service_cli.run(args) == 0
    unit = unit_path.read_text()
    assert f"--config {config_file.resolve()}" in unit and "-m medagent serve" in unit
    assert f"ReadWritePaths={(tmp_path / 'data').resolve()}" in unit
    assert "User=medagent" in unit and "UMask=0077" in unit and "Restart=on-failure" in unit
    # an upgrade's switch changes the main PID: the new process says MAINPID= over $NOTIFY_SOCKET
    assert "Type=notify" in unit and "NotifyAccess=all" in unit and "KillMode=mixed" in unit
    assert "AmbientCapabilities" not in unit
    assert "systemctl daemon-reload" in out.getvalue()
    if shutil.which("systemd-analyze"):
        result = subprocess.run(["systemd-analyze", "verify", str(unit_path)], check=False, capture_output=True, text=True, timeout=60)
        assert "Unknown key" not in result.stderr and "Invalid" not in result.stderr, result.stderr
