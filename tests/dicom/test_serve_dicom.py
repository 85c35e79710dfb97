"""End to end: a modality (pynetdicom SCU) stores to `medagent serve` with a dicom channel; the
instance reaches the embedded hub's DICOMweb store and the channel's bot. Link loss and kill -9
after Success lose nothing and duplicate nothing (the hub keeps one copy per SOP Instance UID)."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dicomtest import ct_dataset, scu_store

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))
from serve_harness import ServeProcess, child_env, start_serve

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the hub child through /proc")]

HERE = Path(__file__).resolve().parent
_DICOM_LINE = re.compile(r"channel (\S+)\s+dicom://[\d.]+:(\d+)")


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", str(HERE))  # the hub child imports dicombots
    started: list[ServeProcess] = []

    def factory(data_dir: Path | None = None) -> tuple[ServeProcess, int]:
        data = data_dir or tmp_path / "data"
        config = tmp_path / f"medagent-{len(started)}.toml"
        config.write_text(
            f'[agent]\ndata_dir = "{data}"\nhub = "embedded"\nheartbeat_s = 1.0\n\n[hub]\nport = 0\n\n'
            '[[channel]]\nname = "pacs"\nendpoint = "dicom://127.0.0.1:0?aet=MEDAGENT"\n'
            'bot = "dicombots:instance_seen"\n')
        process = start_serve(config, data)
        started.append(process)
        ports = [int(m.group(2)) for line in process.output if (m := _DICOM_LINE.search(line))]
        assert ports, "\n".join(process.output)
        return process, ports[0]

    yield factory
    for process in started:
        process.stop()


def hub_instances(process: ServeProcess) -> list[str]:
    db = process.hub_dir / "dicom.sqlite3"
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return [row[0] for row in conn.execute("SELECT sop_uid FROM instances")]


def wait_for_instances(process: ServeProcess, count: int, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = hub_instances(process)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def bot_documents(process: ServeProcess) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "medagent", "hub", "messages", "--data-dir", str(process.hub_dir),
                          "--json", "--limit", "1000", "--body", "--channel", "pacs"],
                         capture_output=True, text=True, timeout=60, env=child_env(), check=False)
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)
    messages = document["messages"] if isinstance(document, dict) else document
    return [m for m in messages if not m.get("duplicate_of")]  # "duplicate" counts resends of a row


def kill_hub_child(process: ServeProcess) -> None:
    wanted = f"medagent\0hub\0serve\0--data-dir\0{process.hub_dir}\0".encode()
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, wanted)]
    assert pids, "hub child not found"
    for pid in pids:
        import os

        os.kill(pid, signal.SIGKILL)


def _cmdline_has(proc: Path, wanted: bytes) -> bool:
    try:
        return wanted in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_modality_to_hub_dicomweb_and_bot_through_link_loss(serve) -> None:
    process, port = serve()
    first = [ct_dataset(seed=i) for i in range(2)]
    assert scu_store(port, first, called="MEDAGENT") == [0, 0]
    assert sorted(wait_for_instances(process, 2)) == sorted(d.SOPInstanceUID for d in first)

    kill_hub_child(process)  # link down: stores still answer Success once committed locally
    during = [ct_dataset(seed=10 + i) for i in range(2)]
    assert scu_store(port, during, called="MEDAGENT") == [0, 0]
    everything = sorted(d.SOPInstanceUID for d in first + during)
    assert sorted(wait_for_instances(process, 4, timeout=90)) == everything

    deadline = time.monotonic() + 60
    while len(documents := bot_documents(process)) < 4 and time.monotonic() < deadline:
        time.sleep(0.3)
    seen = sorted(json.loads(m["body"])["instance"]["sopInstanceUid"] for m in documents)
    assert seen == everything  # each transmit once (resends are flagged duplicates)
    for message in documents:
        body = json.loads(message["body"])
        assert body["instance"]["retrieveUrl"].endswith(body["instance"]["sopInstanceUid"])
        assert "7FE00010" not in body["dataset"]
        # listed like other messages: SOP Instance UID as the control id, modality as the type
        assert message["control_id"] == body["instance"]["sopInstanceUid"]
        assert message["message_type"] == body["dataset"]["00080060"]["Value"][0]


def test_kill_9_after_success_reaches_the_hub_exactly_once(serve, tmp_path: Path) -> None:
    process, port = serve()
    datasets = [ct_dataset(seed=i) for i in range(3)]
    assert scu_store(port, datasets, called="MEDAGENT") == [0, 0, 0]
    process.stop(signal.SIGKILL)  # agent and hub, no clean shutdown, right after the Successes
    restarted, _ = serve(process.data_dir)
    found = wait_for_instances(restarted, 3, timeout=90)
    assert sorted(found) == sorted(d.SOPInstanceUID for d in datasets)
    files = list((restarted.hub_dir / "dicom").rglob("*.dcm"))
    assert len(files) == 3  # one copy each, whatever was re-sent after the restart


def workstation_scp() -> tuple[Any, list[str]]:
    """A pynetdicom storage SCP (AE WORKSTATION) on a free port, and the SOP UIDs it receives."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import AE, evt

    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    scp_ae = AE(ae_title="WORKSTATION")
    scp_ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    return scp_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]), received


def test_push_to_a_dicom_remote_through_the_agent(serve) -> None:
    import base64
    import io
    import urllib.error
    import urllib.request

    scp, received = workstation_scp()
    try:
        process, _ = serve()
        ds = ct_dataset()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        agent_id = json.loads((process.hub_dir / "embedded-agent.json").read_text())["agent_id"]
        request = urllib.request.Request(
            f"{process.hub_url}/fhir/R4/Agent/{agent_id}/$push", method="POST",
            data=json.dumps({"destination": f"dicom://WORKSTATION@127.0.0.1:{scp.server_address[1]}",
                             "contentType": "application/dicom",
                             "body": base64.b64encode(buffer.getvalue()).decode(),
                             "waitForResponse": True, "waitTimeout": 30000}).encode(),
            headers={"Authorization": f"Bearer {process.admin_token()}", "Content-Type": "application/json"})
        deadline = time.monotonic() + 30
        while True:  # the link may still be connecting right after start
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    reply = response.read().decode()
                break
            except urllib.error.HTTPError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(exc.read().decode()) from None
                time.sleep(0.3)
    finally:
        scp.shutdown()
    assert received == [ds.SOPInstanceUID]
    assert ds.SOPInstanceUID in reply and "0x0000" in reply


def test_push_of_hub_wado_urls_fetches_through_the_agents_hub_client(serve) -> None:
    """A push naming instances already in the hub: the agent's DICOM sender fetches them over
    WADO-RS with its own hub credentials (the runtime hands its HubClient to outbound senders)."""
    import urllib.error
    import urllib.request

    scp, received = workstation_scp()
    try:
        process, port = serve()
        ds = ct_dataset(seed=77)
        assert scu_store(port, [ds], called="MEDAGENT") == [0]
        assert wait_for_instances(process, 1) == [ds.SOPInstanceUID]
        retrieve = (f"{process.hub_url}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                    f"/instances/{ds.SOPInstanceUID}")
        agent_id = json.loads((process.hub_dir / "embedded-agent.json").read_text())["agent_id"]
        request = urllib.request.Request(
            f"{process.hub_url}/fhir/R4/Agent/{agent_id}/$push", method="POST",
            data=json.dumps({"destination": f"dicom://WORKSTATION@127.0.0.1:{scp.server_address[1]}",
                             "contentType": "application/json", "body": json.dumps({"retrieveUrls": [retrieve]}),
                             "waitForResponse": True, "waitTimeout": 30000}).encode(),
            headers={"Authorization": f"Bearer {process.admin_token()}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                reply = response.read().decode()
        except urllib.error.HTTPError as exc:
            raise AssertionError(exc.read().decode()) from None
    finally:
        scp.shutdown()
    assert received == [ds.SOPInstanceUID]
    assert ds.SOPInstanceUID in reply and "0x0000" in reply
