"""The dashboard in a real headless Chromium, against a real ``medagent serve`` (agent + embedded hub).

Chromium is Debian's ``chromium`` package, driven by Playwright launched on that executable
(nothing downloads a browser). These tests skip only where no browser binary (or no Playwright)
exists AND the environment is not CI; with ``CI=true`` a missing browser is a failure.

One ``medagent serve`` process (two MLLP channels: ``adt-in`` with the ACK bot, ``flaky`` with a
bot that fails while a marker file exists) and one browser serve the module; every test opens
its own browser context (own cookies). Screenshots go to ``screenshots/`` (git-ignored).
Every wait has a bound (Playwright timeouts, bounded loops).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS_DIR / "runtime"))
from dashbots import FAIL_WHILE_ENV
from serve_harness import MllpClient, ServeProcess, ack_fields, hl7_message, start_serve

CHROMIUM = os.environ.get("MEDAGENT_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
IN_CI = os.environ.get("CI", "").lower() == "true"
SCREENSHOTS = TESTS_DIR.parent / "screenshots"
WAIT_MS = 20_000

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None  # type: ignore[assignment]

if sync_playwright is not None:
    expect.set_options(timeout=WAIT_MS)

if (CHROMIUM is None or sync_playwright is None) and not IN_CI:
    pytest.skip("no Chromium binary or no Playwright on this machine (CI installs both)", allow_module_level=True)


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flaky") / "downstream-down"
    path.write_text("down")
    return path


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, marker: Path) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("serve")
    data = root / "data"
    config = root / "medagent.toml"
    config.write_text(
        f'[agent]\ndata_dir = "{data}"\nhub = "embedded"\nheartbeat_s = 1.0\n\n[hub]\nport = 0\n\n'
        '[[channel]]\nname = "adt-in"\nendpoint = "mllp://127.0.0.1:0?ackMode=fast"\n'
        'bot = "medagent.hub.bots.ack:handler"\n\n'
        '[[channel]]\nname = "flaky"\nendpoint = "mllp://127.0.0.1:0?ackMode=fast"\nbot = "dashbots:flaky"\n'
    )
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", FAIL_WHILE_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), saved["PYTHONPATH"]]))
    os.environ[FAIL_WHILE_ENV] = str(marker)
    try:
        process = start_serve(config, data)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        assert process.hub_url and set(process.channel_ports) == {"adt-in", "flaky"}
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM is not None and sync_playwright is not None, "CI must install chromium and playwright"
    with sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    ctx.set_default_timeout(WAIT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the operator confirms every action
    return page


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"dashboard-{name}.png"), full_page=True)


def login(page: Page, serve: ServeProcess, next_path: str = "/dashboard/") -> None:
    page.goto(serve.hub_url + next_path)
    expect(page).to_have_url(re.compile(r"/dashboard/login"))
    page.fill("input[name=password]", serve.admin_token())
    page.click("form.login button[type=submit]")
    expect(page.locator("header .who")).to_have_text("admin-token")


def send(serve: ServeProcess, channel: str, control_ids: list[str]) -> None:
    client = MllpClient(serve.channel_ports[channel])
    try:
        for control_id in control_ids:
            code, echoed, _ = ack_fields(client.roundtrip(hl7_message(control_id)))
            assert (code, echoed) == ("AA", control_id)
    finally:
        client.close()


def send_until(serve: ServeProcess, channel: str, stop: threading.Event) -> int:
    """Send one message every 50 ms until ``stop`` is set (at most 1,000); returns how many."""
    client = MllpClient(serve.channel_ports[channel])
    try:
        for n in range(1000):
            if stop.wait(0.05):
                return n
            assert ack_fields(client.roundtrip(hl7_message(f"BUSY{n:04d}")))[0] == "AA"
        return 1000
    finally:
        client.close()


def test_refused_without_login(serve: ServeProcess, page: Page) -> None:
    page.goto(serve.hub_url + "/")
    expect(page).to_have_url(re.compile(r"/dashboard/login\?next=/dashboard/$"))
    expect(page.locator("h1")).to_have_text("Log in")
    assert page.request.get(serve.hub_url + "/dashboard/events").status == 401
    page.fill("input[name=password]", "wrong-token-wrong-token")
    page.click("form.login button[type=submit]")
    expect(page.locator("p.error")).to_contain_text("Wrong name, password or token")
    shot(page, "login-refused")


def test_login_and_see_the_embedded_agent_online(serve: ServeProcess, page: Page) -> None:
    login(page, serve)
    row = page.locator("table.agents tbody tr").first
    expect(row.locator(".badge")).to_have_text("online")
    expect(page.locator("main")).to_have_attribute("data-updated", re.compile(r"^\d+$"))  # the live stream runs
    cookies = page.context.cookies()
    session = next(c for c in cookies if c["name"] == "medagent_dashboard")
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # script cannot read the session
    shot(page, "agents")


def test_message_count_rises_live_while_a_sender_sends(serve: ServeProcess, page: Page) -> None:
    login(page, serve)
    cell = page.locator("table.agents tbody tr").first.locator("td[data-live$='.hour']")
    expect(cell).to_have_text(re.compile(r"^\d+$"))
    start = int(cell.inner_text())
    page.evaluate("window.__noReload = true")
    sender = threading.Thread(target=send, args=(serve, "adt-in", [f"LIVE{n:04d}" for n in range(40)]))
    sender.start()
    try:
        seen: list[int] = []
        for _ in range(200):  # bounded: up to 200 polls of 100 ms
            value = int(cell.inner_text())
            if not seen or value != seen[-1]:
                seen.append(value)
            if value >= start + 40:
                break
            page.wait_for_timeout(100)
    finally:
        sender.join(60)
    assert seen[-1] >= start + 40, seen
    assert page.evaluate("window.__noReload") is True  # the same document: updated without a reload
    shot(page, "count-risen")


def test_open_a_message_and_show_its_body_on_click(serve: ServeProcess, page: Page) -> None:
    send(serve, "adt-in", ["OPEN0001"])
    login(page, serve, "/dashboard/messages?control_id=OPEN0001")
    link = page.locator("table.messages tbody tr a").first
    expect(link).to_be_visible()
    link.click()
    expect(page.locator("h1")).to_have_text(re.compile(r"^Message \d+$"))
    expect(page.locator("table.detail")).to_contain_text("OPEN0001")
    expect(page.locator("#message-body")).to_have_count(0)  # PHI only after the click
    page.click("#show-body")
    expect(page.locator("#message-body")).to_contain_text("PID|1||OPEN0001")
    expect(page.locator("#reply-body")).to_contain_text("MSA|AA|OPEN0001")
    shot(page, "message")
    page.goto(serve.hub_url + "/dashboard/audit")
    expect(page.locator("table.audit tbody tr").first).to_contain_text("view-body")


def test_retry_a_failed_message(serve: ServeProcess, page: Page, marker: Path) -> None:
    send(serve, "flaky", ["FAIL0001"])
    login(page, serve, "/dashboard/messages?status=error&control_id=FAIL0001")
    link = page.locator("table.messages tbody tr a").first
    for _ in range(50):  # bounded: the hub stores the failure right after the agent forwards it
        if link.count():
            break
        page.wait_for_timeout(200)
        page.reload()
    link.click()
    expect(page.locator("#message-status")).to_have_text("error")
    expect(page.locator("table.detail")).to_contain_text("downstream system is unavailable")
    marker.unlink()  # the downstream system is back
    page.click("#retry")
    expect(page.locator("#result")).to_contain_text("Retry done: processed")
    expect(page.locator("#message-status")).to_have_text("processed")
    shot(page, "retried")


def test_reload_the_agent_and_see_the_result(serve: ServeProcess, page: Page) -> None:
    login(page, serve)
    page.locator("table.agents tbody tr a").first.click()
    expect(page.locator("h1")).to_have_text(re.compile(r"^Agent "))
    expect(page.locator("[data-live='stats.implementation']")).not_to_have_text("—")  # live $stats arrived
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        sent = pool.submit(send_until, serve, "adt-in", stop)
        try:  # a sender keeps the agent busy while the ACK-latency chart gets three 5 s points
            expect(page.locator("[data-live='channels.adt-in.lastMinute']")).to_have_text(re.compile(r"^[1-9]\d*$"))
            expect(page.locator("#ack-chart")).to_have_attribute("data-points", re.compile(r"^([3-9]|\d\d+)$"))
        finally:
            stop.set()
        assert sent.result(30) > 0
    shot(page, "agent-live")
    page.click("#op-reload")
    expect(page.locator("#result")).to_contain_text("Reload done")
    expect(page.locator("#op-upgrade")).to_be_disabled()
    page.click("#op-logs")
    expect(page.locator("#result")).to_contain_text("log lines")
    shot(page, "agent")


def test_forged_csrf_token_is_refused(serve: ServeProcess, page: Page) -> None:
    login(page, serve)
    page.locator("table.agents tbody tr a").first.click()
    page.evaluate("document.querySelectorAll('input[name=csrf]').forEach(i => { i.value = 'forged' })")
    page.click("#op-reload")
    expect(page.locator("body")).to_contain_text("Missing or wrong CSRF token")
    response: Any = page.request.post(serve.hub_url + "/dashboard/logout", form={"csrf": "forged"})
    assert response.status == 403
    page.goto(serve.hub_url + "/dashboard/audit")
    expect(page.locator("table.audit")).to_contain_text("csrf-refused")
    shot(page, "audit")
