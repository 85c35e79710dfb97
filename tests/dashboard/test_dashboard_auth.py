"""Who gets in: login (admin token, operator accounts), sessions, CSRF, headers, rate limit, CLI.

Real HubServer on 127.0.0.1:0 in a temp dir; requests over real sockets with aiohttp.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from dashsupport import DashboardClient

from medagent.hub import HubServer
from medagent.hub.dashboard.accounts import DB_FILE, AccountError, DashboardDB
from medagent.hub.dashboard.security import MAX_FAILURES, LoginLimiter

PASSWORD = "correct horse battery staple"


async def test_pages_redirect_to_login_and_api_refuses_without_session(hub: HubServer, client: DashboardClient) -> None:
    for path in ("/dashboard/", "/dashboard/messages", "/dashboard/audit", "/dashboard/messages/1"):
        response = await client.get(path)
        assert response.status == 303
        assert response.headers["Location"].startswith("/dashboard/login?next=/dashboard")
    assert (await client.get("/")).headers["Location"] == "/dashboard/"
    assert (await client.get("/dashboard/events")).status == 401
    refused = await client.post("/dashboard/messages/1/retry", csrf="anything")
    assert refused.status == 401
    login = await client.get("/dashboard/login")
    assert login.status == 200 and "Log in" in await login.text()


async def test_admin_token_login_sets_a_strict_httponly_cookie_and_security_headers(hub: HubServer,
                                                                                  client: DashboardClient) -> None:
    response = await client.login()
    assert response.status == 303 and response.headers["Location"] == "/dashboard/"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP hub; TLS hubs set it
    page = await client.get("/dashboard/")
    assert page.status == 200
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Cache-Control"] == "no-store"
    assert "<script>" not in await page.text()  # no inline script, only <script src=...>
    audit = await client.page("/dashboard/audit")  # the login is in the audit log
    assert "<td>admin-token</td>" in audit and "<td>login</td>" in audit and "<td>ok</td>" in audit


async def test_wrong_secret_is_refused_and_audited(hub: HubServer, client: DashboardClient) -> None:
    response = await client.login(password="not-the-token-at-all")
    assert response.status == 401
    assert "Wrong name, password or token" in await response.text()
    assert "medagent_dashboard" not in response.headers.get("Set-Cookie", "")
    db = DashboardDB(hub.data_dir)
    try:
        assert [(e.user, e.action, e.outcome) for e in db.audit_entries()] == [("admin-token", "login", "failed")]
    finally:
        db.close()


async def test_logins_are_rate_limited_even_with_the_right_secret(hub: HubServer, client: DashboardClient) -> None:
    for _ in range(MAX_FAILURES):
        assert (await client.login(password="wrong-wrong-wrong")).status == 401
    limited = await client.login()  # the right token, but too late
    assert limited.status == 429
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    assert (await client.get("/dashboard/")).status == 303  # still not logged in


def test_login_limiter_window_slides() -> None:
    now = [0.0]
    limiter = LoginLimiter(max_failures=2, window_s=10.0, clock=lambda: now[0])
    limiter.failed("addr:a")
    assert limiter.retry_after("addr:a") == 0
    limiter.failed("addr:a")
    assert limiter.retry_after("addr:a", "user:x") == 10.0
    now[0] = 4.0
    assert limiter.retry_after("addr:a") == 6.0
    now[0] = 10.0
    assert limiter.retry_after("addr:a") == 0
    limiter.failed("addr:b")
    limiter.failed("addr:b")
    limiter.succeeded("addr:b")
    assert limiter.retry_after("addr:b") == 0


async def test_operator_account_login_logout_and_session_end(hub: HubServer, client: DashboardClient) -> None:
    db = DashboardDB(hub.data_dir)
    try:
        assert db.set_user("alice", PASSWORD)
        with pytest.raises(AccountError):
            db.set_user("alice", PASSWORD)
        with pytest.raises(AccountError):
            db.set_user("bob", "short")
        with pytest.raises(AccountError):
            db.set_user("admin-token", PASSWORD)
    finally:
        db.close()
    assert (await client.login("alice", "wrong password here")).status == 401
    assert (await client.login("nobody", PASSWORD)).status == 401
    assert (await client.login("alice", PASSWORD)).status == 303
    page = await client.page("/dashboard/")
    assert '<span class="who">alice</span>' in page
    logout = await client.post("/dashboard/logout")
    assert logout.status == 303 and logout.headers["Location"] == "/dashboard/login"
    assert (await client.get("/dashboard/")).status == 303


async def test_a_stolen_cookie_value_is_useless_after_logout(hub: HubServer, admin: DashboardClient) -> None:
    cookie = next(c.value for c in admin.http.cookie_jar if c.key == "medagent_dashboard")
    await admin.post("/dashboard/logout")
    async with aiohttp.ClientSession() as other, other.get(
        hub.url + "/dashboard/", headers={"Cookie": f"medagent_dashboard={cookie}"}, allow_redirects=False
    ) as response:
        assert response.status == 303


async def test_posts_need_the_session_csrf_token(hub: HubServer, agent: object, admin: DashboardClient) -> None:
    agent_id = (await hub.store.list_agents())[0].id
    for forged in ("", "forged-token", admin.csrf[:-1]):
        response = await admin.post(f"/dashboard/agents/{agent_id}/reload", csrf=forged)
        assert response.status == 403, forged
        assert "CSRF" in await response.text()
        assert response.headers["X-Frame-Options"] == "DENY"
    for origin in ("https://evil.example", "null"):
        cross = await admin.post(f"/dashboard/agents/{agent_id}/reload", headers={"Origin": origin})
        assert cross.status == 403 and "Cross-origin" in await cross.text()
    same = await admin.post(f"/dashboard/agents/{agent_id}/reload", headers={"Origin": hub.url})
    assert same.status == 502  # the right origin and token: accepted (the agent is not connected)
    login_cross = await admin.http.post(hub.url + "/dashboard/login", data={"password": hub.admin_token},
                                        headers={"Origin": "https://evil.example"}, allow_redirects=False)
    assert login_cross.status == 403
    audit = await admin.page("/dashboard/audit")
    assert audit.count("csrf-refused") == 3
    header_ok = await admin.http.post(hub.url + f"/dashboard/agents/{agent_id}/reload",
                                      headers={"X-CSRF-Token": admin.csrf}, allow_redirects=False)
    assert header_ok.status == 502  # accepted; the agent is not connected, and the page says so
    assert "Agent not connected" in await header_ok.text()


def test_dashboard_database_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        db = DashboardDB(tmp_path / "hub")
        db.set_user("carol", PASSWORD)
        db.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hub" / DB_FILE).stat().st_mode) == 0o600
    raw = (tmp_path / "hub" / DB_FILE).read_bytes()
    assert PASSWORD.encode() not in raw and b"scrypt$" in raw


def test_add_user_cli(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    base = [sys.executable, "-m", "medagent.hub.dashboard.cli", "add-user"]
    run = subprocess.run([*base, "dave", "--password-stdin", "--data-dir", str(data_dir), "--json"],
                         input=PASSWORD + "\n", capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == '{"user":"dave","created":true}'
    again = subprocess.run([*base, "dave", "--password-stdin", "--data-dir", str(data_dir)],
                           input=PASSWORD + "\n", capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    weak = subprocess.run([*base, "erin", "--password-stdin", "--data-dir", str(data_dir)],
                          input="short\n", capture_output=True, text=True, timeout=60, check=False)
    assert weak.returncode == 1 and "at least 12" in weak.stderr
    replaced = subprocess.run([*base, "dave", "--password-stdin", "--replace", "--data-dir", str(data_dir)],
                              input="another long password\n", capture_output=True, text=True, timeout=60, check=False)
    assert replaced.returncode == 0 and "updated" in replaced.stdout
    db = DashboardDB(data_dir)
    try:
        assert db.check_password("dave", "another long password")
        assert not db.check_password("dave", PASSWORD)
    finally:
        db.close()
    no_tty = subprocess.run([*base, "frank", "--data-dir", str(data_dir)], input="", capture_output=True,
                            text=True, timeout=60, check=False)
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr
