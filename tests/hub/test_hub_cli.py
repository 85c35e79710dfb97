"""`medagent hub ...` through medagent.hub.cli.main (and once as a real subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from medagent.hub.cli import main

T = TypeVar("T")
from medagent.hub.store import HubStore, open_store


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(["hub", *argv])
    except SystemExit as exc:  # argparse usage errors
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def data(tmp_path: Path, store_url: str | None) -> list[str]:
    """The options naming the hub's data: --data-dir, and --store on PostgreSQL."""
    return ["--data-dir", str(tmp_path)] + (["--store", store_url] if store_url else [])


def read_store(data: list[str], read: Callable[[HubStore], Awaitable[T]]) -> T:
    """``read`` on the store the CLI options name (as a separate process would open it)."""
    url = data[data.index("--store") + 1] if "--store" in data else None

    async def session() -> T:
        store = await open_store(url, Path(data[1]))
        try:
            return await read(store)
        finally:
            await store.close()

    return asyncio.run(session())


def test_add_agent_json_prints_one_document(data: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "add-agent", "lab", "--json", *data)
    assert status == 0
    credentials = json.loads(out)
    assert set(credentials) == {"agent_id", "client_id", "client_secret"}
    assert read_store(data, lambda store: store.get_agent(credentials["agent_id"])).name == "lab"

    status, _, err = run_cli(capsys, *data, "add-agent", "lab")
    assert status == 1 and "already exists" in err


def test_channels_listing_and_messages(data: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(capsys, "add-agent", "lab", *data)
    status, out, _ = run_cli(capsys, "add-channel", "lab", "adt", "mllp://0.0.0.0:2575", "--json", *data)
    assert status == 0 and json.loads(out)["address"] == "mllp://0.0.0.0:2575"
    status, _, err = run_cli(capsys, "add-channel", "lab", "web", "http://x", *data)
    assert status == 2 and "scheme" in err
    status, _, err = run_cli(capsys, "add-channel", "nobody", "adt", "mllp://0.0.0.0:1", *data)
    assert status == 1 and "no agent" in err
    status, out, _ = run_cli(capsys, "list-agents", "--json", *data)
    [agent] = json.loads(out)["agents"]
    assert agent["name"] == "lab" and [c["name"] for c in agent["channels"]] == ["adt"]
    status, out, _ = run_cli(capsys, "messages", "--agent", "lab", "--json", *data)
    assert status == 0 and json.loads(out) == {"messages": [], "next": None}
    status, _, err = run_cli(capsys, "messages", "--since", "soon", *data)
    assert status == 2 and "--since" in err


def test_usage_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, _ = run_cli(capsys, "add-agent")
    assert status == 2
    status, _, err = run_cli(capsys, "serve", "--data-dir", str(tmp_path), "--tls-cert", str(tmp_path / "missing.pem"))
    assert status == 2 and "tls" in err.lower()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery to a child differs on Windows")
def test_serve_prints_where_it_is_and_stops_on_sigint(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "medagent.hub.cli", "hub", "serve", "--port", "0", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        assert lines[0].startswith("medagent hub listening on http://127.0.0.1:")
        assert str(tmp_path / "admin-token") in lines[3]
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=15)
        assert process.returncode == 0, err
        assert "stopped" in out
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)


def test_reading_commands_refuse_a_directory_without_a_hub(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "not-a-hub"
    for command in (["messages"], ["list-agents"], ["add-channel", "lab", "adt", "mllp://0.0.0.0:2575"]):
        status, out, err = run_cli(capsys, *command, "--data-dir", str(wrong))
        assert status == 1 and out == ""
        assert f"no hub data in {wrong}" in err and "--data-dir" in err
    assert not wrong.exists()  # nothing was created in the wrong place


def test_reading_commands_take_no_listen_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(capsys, "add-agent", "lab", "--data-dir", str(tmp_path))
    for option in ("--port", "--host", "--tls-cert", "--tls-key"):
        status, _, err = run_cli(capsys, "messages", "--data-dir", str(tmp_path), option, "1")
        assert status == 2 and "unrecognized arguments" in err


def test_add_channel_validates_endpoint_and_bot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    run_cli(capsys, "add-agent", "lab", *data)
    status, _, err = run_cli(capsys, "add-channel", "lab", "adt", "mllp://0.0.0.0:2575?ackmode=fast", *data)
    assert status == 2 and "ackMode" in err  # a "did you mean", not a silent accept
    status, _, err = run_cli(capsys, "add-channel", "lab", "adt", "mllp://0.0.0.0:2575", "--bot", "no_such_module:handler", *data)
    assert status == 2 and "cannot import no_such_module" in err
    status, _, err = run_cli(capsys, "add-channel", "lab", "adt", "mllp://0.0.0.0:2575", "--bot", "medagent.hub.bots.ack:nope", *data)
    assert status == 2 and "has no nope" in err
    status, out, _ = run_cli(capsys, "list-agents", "--json", *data)
    assert json.loads(out)["agents"][0]["channels"] == []  # nothing invalid was stored


def test_out_of_range_numbers_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(capsys, "add-agent", "lab", "--data-dir", str(tmp_path))
    for argv in (["--after", "99999999999999999999"], ["--limit", "0"], ["--after", "-1"]):
        status, _, err = run_cli(capsys, "messages", "--data-dir", str(tmp_path), *argv)
        assert status == 2 and "out of range" in err and "Traceback" not in err


def test_listings_are_tables_with_headers(data: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(capsys, "add-agent", "lab", *data)
    run_cli(capsys, "add-channel", "lab", "adt", "mllp://0.0.0.0:2575", *data)
    status, out, _ = run_cli(capsys, "list-agents", *data)
    header, rule, row = out.splitlines()[:3]
    assert status == 0 and header.split()[:3] == ["AGENT", "ID", "STATUS"] and set(rule) <= {"-", " "}
    assert row.startswith("lab ") and "mllp://0.0.0.0:2575" in row and "{" not in out
    status, out, _ = run_cli(capsys, "messages", *data)
    assert status == 0 and out.strip() == "no messages match"


def test_revoke_tokens_and_rotate_secret(data: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_cli(capsys, "add-agent", "lab", "--json", *data)
    first = json.loads(out)
    status, out, _ = run_cli(capsys, "revoke-tokens", "lab", "--json", *data)
    assert status == 0 and json.loads(out)["token_generation"] >= 1
    generation = read_store(data, lambda store: store.token_generation(first["agent_id"]))
    status, out, _ = run_cli(capsys, "rotate-secret", "lab", "--json", *data)
    second = json.loads(out)
    assert status == 0 and second["client_id"] == first["client_id"]
    assert second["client_secret"] != first["client_secret"]
    assert read_store(data, lambda store: store.token_generation(first["agent_id"])) > generation  # rotation revokes too
    status, _, err = run_cli(capsys, "revoke-tokens", "nobody", *data)
    assert status == 1 and "no agent" in err
