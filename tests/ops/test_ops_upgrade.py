"""Remote upgrade: Medplum's decision rules, the hub's release registry, the pipeline (fetch,
sha256, side-by-side install, self-check, health check, roll back) and the switch to the new
version's process (sockets and queue lease handed over, post-switch health check, switch-back)
against real wheels built from this tree, with a sender running through the agent the whole time.

The pipeline tests run the agent in the test process (it cannot be replaced by a process there,
so the pipeline ends at ``staged``); the switch tests run `medagent serve` as a process (its PID
changes) against a hub in the test process."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import stat
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import aiohttp
import orjson
import pytest
from opstest import OpsSite, Sender, assert_nothing_lost, http, send_messages, stored_control_ids
from served import ServedAgent, serve_agent
from wheelbuild import finish_build, start_build

from medagent import __version__
from medagent.hub import HubServer, HubSettings
from medagent.hub.releases import ReleaseRegistry, run_release_command, sha256_file
from medagent.ops.upgrade import State, UpgradeRefused, decide

PIPELINE_WAIT_S = 240.0  # install + self-check + a full serve start-up of the new version on a busy 2-core box
BUMPED = "0.1.1"


# -- decisions ----------------------------------------------------------------------------------------
def test_decisions_follow_medplum_and_the_site_veto() -> None:
    assert decide("0.1.0", False, "0.1.0", False, True).noop
    assert not decide("0.1.0", True, "0.1.0", False, True).noop  # forced reinstall
    assert decide("0.2.0", False, "0.1.0", False, True).target == "0.2.0"
    assert decide(None, False, "0.1.0", False, True).target is None  # latest
    with pytest.raises(UpgradeRefused, match="already in progress"):
        decide("0.2.0", False, "0.1.0", True, True)
    assert decide("0.2.0", True, "0.1.0", True, True).cancel_running
    with pytest.raises(UpgradeRefused, match="downgrade needs force"):
        decide("0.0.9", False, "0.1.0", False, True)
    assert decide("0.0.9", True, "0.1.0", False, True).target == "0.0.9"
    assert decide("0.10.0", False, "0.9.0", False, True).target == "0.10.0"  # numeric, not text, order
    with pytest.raises(UpgradeRefused, match="not a valid version"):
        decide("../../etc", False, "0.1.0", False, True)
    with pytest.raises(UpgradeRefused, match="allow_remote_upgrade"):
        decide("0.2.0", True, "0.1.0", False, False)


# -- wheels (built once for the module, in parallel) -----------------------------------------------------
@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("wheels")
    builds = {
        "good": start_build(BUMPED, root / "good"),
        # self-check fails: the CLI cannot even print its version
        "broken-cli": start_build("0.1.2", root / "broken-cli", {
            "medagent/__main__.py": ("sys.exit(main())", "raise SystemExit('broken release')")}),
        # self-check passes, health check fails: the ACK bot of the new version refuses everything
        "bad-ack": start_build("0.1.3", root / "bad-ack", {
            "medagent/hub/bots/ack.py": ('return hl7text.ack_text(event.input, event.header, "AA")',
                                         'return hl7text.ack_text(event.input, event.header, "AE")')}),
        # everything passes until the switch; the post-switch health check then never sees its AA
        "bad-post-switch": start_build("0.1.4", root / "bad-post-switch", {
            "medagent/ops/post_switch.py": ('if b"MSA|AA|" not in ack:', 'if b"MSA|ZZ|" not in ack:')}),
    }
    yield {name: finish_build(proc, root / name) for name, proc in builds.items()}


def _add(hub_dir: Path, wheel: Path) -> dict[str, object]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert run_release_command(argparse.Namespace(release_command="add", wheel=wheel, json=True), hub_dir) == 0
    return json.loads(out.getvalue())


# -- the release registry ----------------------------------------------------------------------------------
async def test_release_registry_serves_wheels_and_digests_to_agents(site: OpsSite, wheels: dict[str, Path]) -> None:
    hub_dir = site.hub.data_dir
    record = _add(hub_dir, wheels["good"])
    assert record["version"] == BUMPED and record["sha256"] == sha256_file(wheels["good"])
    stored = ReleaseRegistry(hub_dir).directory
    assert stat.S_IMODE(os.stat(stored).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in stored.iterdir())
    status, text = await http(site.hub, "GET", "/releases/latest")
    assert status == 200 and orjson.loads(text)["url"] == f"/releases/{BUMPED}/wheel"
    token = await site.runtime.link.tokens.get_token()  # an agent's token is enough
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.get(f"{site.hub.url}/releases/{BUMPED}/wheel") as response:
            assert response.status == 200 and sha256_file(wheels["good"]) == __import__("hashlib").sha256(
                await response.read()).hexdigest()
        async with session.get(f"{site.hub.url}/releases/9.9.9") as response:
            assert response.status == 404
    async with aiohttp.ClientSession() as session, session.get(f"{site.hub.url}/releases") as response:
        assert response.status == 401
    bad = wheels["good"].with_name("notmedagent-1.0-py3-none-any.whl")
    bad.write_bytes(b"x")
    out = io.StringIO()
    with redirect_stdout(out):
        assert run_release_command(argparse.Namespace(release_command="add", wheel=bad, json=True), hub_dir) == 1


# -- refusals over the hub's $upgrade -------------------------------------------------------------------------
async def test_upgrade_refusals_and_no_op(site: OpsSite) -> None:
    path = f"/fhir/R4/Agent/{site.credentials.agent_id}/$upgrade"
    status, text = await http(site.hub, "POST", path, json={"version": __version__})
    assert status == 200 and "All OK" in text  # same version: no-op
    assert site.runtime.upgrader.state is State.IDLE
    status, text = await http(site.hub, "POST", path, json={"version": "0.0.1"})
    assert status == 400 and "downgrade needs force" in text
    site.runtime.upgrader.allowed = False  # the site's `[agent] allow_remote_upgrade = false`
    status, text = await http(site.hub, "POST", path, json={"version": BUMPED, "force": True})
    assert status == 400 and "allow_remote_upgrade" in text
    assert site.runtime.upgrader.state is State.IDLE


# -- the pipeline, with traffic ---------------------------------------------------------------------------------
async def _upgrade_with_traffic(site: OpsSite, version: str) -> tuple[dict[str, object], Sender]:
    sender = Sender(site.port)
    try:
        status, text = await http(site.hub, "POST", f"/fhir/R4/Agent/{site.credentials.agent_id}/$upgrade",
                                  json={"version": version})
        assert status == 200 and "All OK" in text  # accepted at once
        final = await asyncio.wait_for(site.runtime.upgrader.wait(), PIPELINE_WAIT_S)
    finally:
        await sender.stop()
    return final, sender


async def _stats_upgrade(site: OpsSite) -> dict[str, object]:
    status, text = await http(site.hub, "GET", f"/fhir/R4/Agent/{site.credentials.agent_id}/$stats")
    assert status == 200
    return json.loads(orjson.loads(text)["parameter"][0]["valueString"])["upgrade"]


async def test_upgrade_to_a_bumped_wheel_is_staged_with_traffic_flowing(site: OpsSite, wheels: dict[str, Path]) -> None:
    _add(site.hub.data_dir, wheels["good"])
    final, sender = await _upgrade_with_traffic(site, BUMPED)
    assert final["state"] == State.STAGED.value, final
    environment = Path(str(final["environment"]))
    assert (environment / "pyvenv.cfg").exists()
    await assert_nothing_lost(site, sender)
    assert (await _stats_upgrade(site))["state"] == "staged"
    state_file = site.runtime.data_dir / "upgrade.json"
    assert stat.S_IMODE(os.stat(state_file).st_mode) == 0o600
    print(f"\nupgrade to {BUMPED} staged: {len(sender.acked)} messages ACKed meanwhile, "
          f"longest ACK gap {sender.longest_gap_s * 1000:.1f} ms")


@pytest.mark.parametrize(("wheel", "version", "reason"), [("broken-cli", "0.1.2", "self-check"),
                                                           ("bad-ack", "0.1.3", "health check")])
async def test_a_failing_release_is_rolled_back_and_the_old_version_keeps_serving(
        site: OpsSite, wheels: dict[str, Path], wheel: str, version: str, reason: str) -> None:
    _add(site.hub.data_dir, wheels[wheel])
    final, sender = await _upgrade_with_traffic(site, version)
    assert final["state"] == State.ROLLED_BACK.value and reason in str(final["error"]), final
    assert not (site.runtime.data_dir / "versions" / version).exists()
    await assert_nothing_lost(site, sender)
    [ack] = await send_messages(site.port, ["AFTER"])
    assert b"MSA|AA|AFTER" in ack
    upgrade = await _stats_upgrade(site)
    assert upgrade["state"] == "rolled-back" and upgrade["runningVersion"] == __version__
    _, text = await http(site.hub, "GET", f"/fhir/R4/Agent/{site.credentials.agent_id}/$fetch-logs",
                              params={"limit": "100"})
    assert "rolled back" in text


async def test_a_wheel_whose_digest_differs_from_the_record_is_refused(site: OpsSite, wheels: dict[str, Path]) -> None:
    record = _add(site.hub.data_dir, wheels["good"])
    registry = ReleaseRegistry(site.hub.data_dir)
    wheel_file = registry.directory / str(record["filename"])
    wheel_file.write_bytes(wheel_file.read_bytes() + b"tampered")
    status, _ = await http(site.hub, "POST", f"/fhir/R4/Agent/{site.credentials.agent_id}/$upgrade", json={"version": BUMPED})
    assert status == 200
    final = await asyncio.wait_for(site.runtime.upgrader.wait(), PIPELINE_WAIT_S)
    assert final["state"] == "rolled-back" and "sha256 mismatch" in str(final["error"])


# -- the switch to the new version's process (`medagent serve` as a process) -------------------------------
SWITCH_WAIT_S = 300.0


async def _switch_with_traffic(tmp_path: Path, wheel: Path, version: str) -> tuple[ServedAgent, Sender, dict, int]:
    """Agent process + hub; an upgrade to ``version`` with a sender running through it. Returns the
    agent, the (stopped) sender, the final $stats and the old PID. The caller stops the agent."""
    # the hub's heartbeat tells it the agent's version ($status): often, to see the new one soon
    hub = HubServer(HubSettings(data_dir=tmp_path / "hub", port=0, heartbeat_interval_s=0.5))
    await hub.start()
    _add(hub.data_dir, wheel)
    agent = await serve_agent(hub, tmp_path / "agent")
    old_pid = agent.process.pid
    sender = Sender(agent.port)
    try:
        status, text = await http(hub, "POST", f"/fhir/R4/Agent/{agent.agent_id}/$upgrade", json={"version": version})
        assert status == 200 and "All OK" in text, text  # accepted at once
        final = await agent.wait_upgrade(SWITCH_WAIT_S)
        await asyncio.sleep(1.0)  # traffic keeps flowing after the switch
    except BaseException:
        await agent.stop()
        await hub.stop()
        raise
    finally:
        await sender.stop()
    return agent, sender, final, old_pid


async def _nothing_lost(agent: ServedAgent, sender: Sender) -> list[str]:
    ids = await stored_control_ids(agent.hub, agent.agent_id, len(sender.acked), "adt-in")
    assert sorted(ids) == sorted(sender.acked), "every ACKed message at the hub exactly once"
    return ids


def _report(what: str, sender: Sender, final: dict) -> None:
    upgrade = final["upgrade"]
    print(f"\n{what}: {len(sender.acked)} messages ACKed, {sender.resent} resent by the sender, "
          f"{final['durableQueue']['duplicates_flagged']} flagged as duplicates; longest ACK gap "
          f"{sender.longest_gap_s * 1000:.1f} ms; intake pause {upgrade.get('intakePauseS')} s")


def test_the_switch_hands_sockets_and_queue_to_the_new_version(tmp_path: Path, wheels: dict[str, Path]) -> None:
    async def scenario() -> None:
        agent, sender, final, old_pid = await _switch_with_traffic(tmp_path, wheels["good"], BUMPED)
        try:
            upgrade = final["upgrade"]
            assert upgrade["state"] == "completed", (upgrade, agent.output.read_text()[-3000:])
            assert final["version"] == BUMPED and final["pid"] != old_pid
            assert await agent.status_version(BUMPED) == BUMPED
            assert upgrade["fromVersion"] == __version__ and upgrade["targetVersion"] == BUMPED
            assert upgrade["intakePauseS"] >= 0 and upgrade["switchedAt"] > 0
            assert await asyncio.wait_for(agent.process.wait(), 30) == 0  # the old process exited cleanly
            await _nothing_lost(agent, sender)
            [ack] = await send_messages(agent.port, ["AFTER"])  # the same port, the new process
            assert b"MSA|AA|AFTER" in ack
            state = json.loads((tmp_path / "agent" / "data" / "upgrade.json").read_text())
            assert state["state"] == "completed" and state["targetVersion"] == BUMPED
            _report(f"switch {__version__} -> {BUMPED}", sender, final)
        finally:
            await agent.stop()
            await agent.hub.stop()

    asyncio.run(scenario())


def test_a_failing_post_switch_health_check_switches_back_to_the_old_process(
        tmp_path: Path, wheels: dict[str, Path]) -> None:
    async def scenario() -> None:
        agent, sender, final, old_pid = await _switch_with_traffic(tmp_path, wheels["bad-post-switch"], "0.1.4")
        try:
            upgrade = final["upgrade"]
            assert upgrade["state"] == "rolled-back", (upgrade, agent.output.read_text()[-3000:])
            assert "post-switch health check" in upgrade["error"]
            assert final["pid"] == old_pid and final["version"] == __version__ and agent.process.returncode is None
            assert await agent.status_version(__version__) == __version__
            assert not (tmp_path / "agent" / "data" / "versions" / "0.1.4").exists()
            await _nothing_lost(agent, sender)
            [ack] = await send_messages(agent.port, ["AFTER"])
            assert b"MSA|AA|AFTER" in ack
            _report("switch to 0.1.4 rolled back", sender, final)
        finally:
            await agent.stop()
            await agent.hub.stop()

    asyncio.run(scenario())
