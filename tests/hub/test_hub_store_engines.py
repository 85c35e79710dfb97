"""What only a choice of store engines brings: schema migrations on each engine (fresh, and from
the previous version), ``medagent hub migrate-store`` from SQLite to PostgreSQL, deduplication
when several hub processes share one PostgreSQL, and the errors for a store that cannot be used."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from engines.postgres import PostgresServer

from medagent.hub.cli import main
from medagent.hub.records import (
    IncomingMessage,
    IntakeKind,
    MessageQuery,
    MessageResult,
    MessageStatus,
    StoredReply,
)
from medagent.hub.schema import MIGRATIONS, SCHEMA_VERSION, SchemaError, migrate
from medagent.hub.store import DB_FILE, StoreUnavailable, open_store
from medagent.hub.store.common import TABLES
from medagent.hub.store.postgres import PostgresHubStore
from medagent.hub.store.sqlite import SqliteCore


def message(i: int, body: str = "MSH|^~\\&|A|B\rPID|1||X", agent: str = "agent-1") -> IncomingMessage:
    return IncomingMessage(agent_id=agent, channel="adt", remote="10.0.0.1:1", callback=f"cb-{i}",
                           content_type="x-application/hl7-v2+er7", body=body, received_at=1_000 + i,
                           control_id=f"C{i}", message_type="ADT^A01")


# -- migrations ---------------------------------------------------------------------------------


def test_sqlite_upgrade_from_the_previous_version_keeps_rows(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    migrate(conn, 1)
    conn.execute("INSERT INTO agents (id, name, client_id, secret_hash, created_at, updated_at)"
                 " VALUES ('a1', 'lab', 'c1', 'h', 1, 1)")
    conn.close()
    core = SqliteCore(tmp_path)
    try:
        assert core.token_generation("a1") == 0  # the v2 column, with its default
        assert sqlite3.connect(core.path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        core.close()


async def test_postgres_fresh_schema_and_upgrade_from_the_previous_version(
        postgres_server: PostgresServer, postgres_url: str) -> None:
    assert len(MIGRATIONS) == SCHEMA_VERSION  # one list of migrations for both engines
    old = await PostgresHubStore.open(postgres_url, migrate_to=SCHEMA_VERSION - 1)
    try:
        await old.add_agent("lab")
    finally:
        await old.close()
    database = postgres_url.rsplit("/", 1)[1]
    assert postgres_server.sql("SELECT version FROM medagent_schema_version", database) == [(SCHEMA_VERSION - 1,)]
    store = await PostgresHubStore.open(postgres_url)  # upgrades
    try:
        [agent] = await store.list_agents()
        assert await store.token_generation(agent.id) == 0
        assert postgres_server.sql("SELECT version FROM medagent_schema_version", database) == [(SCHEMA_VERSION,)]
        indexes = {r[0] for r in postgres_server.sql("SELECT indexname FROM pg_indexes WHERE tablename = 'messages'",
                                                       database)}
        assert "messages_retention" in indexes and "messages_channel_age" not in indexes
    finally:
        await store.close()
    again = await PostgresHubStore.open(postgres_url)  # a second process: nothing to do, nothing lost
    await again.close()
    assert postgres_server.sql("SELECT count(*) FROM agents", database) == [(1,)]


async def test_postgres_newer_schema_is_refused(postgres_server: PostgresServer, postgres_url: str) -> None:
    store = await PostgresHubStore.open(postgres_url)
    await store.close()
    postgres_server.sql(f"UPDATE medagent_schema_version SET version = {SCHEMA_VERSION + 1}",
                        postgres_url.rsplit("/", 1)[1])
    with pytest.raises(SchemaError, match="newer"):  # as on SQLite
        await PostgresHubStore.open(postgres_url)


async def test_concurrent_first_starts_migrate_once(postgres_url: str) -> None:
    stores = await asyncio.gather(*(PostgresHubStore.open(postgres_url) for _ in range(4)))
    try:
        assert [await s.count_rows("messages") for s in stores] == [0] * 4
    finally:
        await asyncio.gather(*(s.close() for s in stores))


# -- several hub processes on one PostgreSQL ----------------------------------------------------


async def test_two_hub_processes_taking_the_same_resends_store_each_message_once(postgres_url: str) -> None:
    """Two stores (as two hub processes) write rounds holding the same callbacks at the same
    time: every callback is stored once, every other copy is answered as a duplicate."""
    first, second = await PostgresHubStore.open(postgres_url), await PostgresHubStore.open(postgres_url)
    try:
        for attempt in range(20):
            batch = [message(attempt * 100 + i) for i in range(30)]
            results = await asyncio.gather(*(s.write_round([batch], ()) for s in (first, second, first, second)))
            kinds = [[r.kind for r in rounds[0]] for rounds in results]
            for i in range(30):
                assert sorted(k[i] for k in kinds) == [IntakeKind.NEW] + [IntakeKind.DUPLICATE] * 3
        assert await first.count_rows("messages") == 20 * 30
        assert (await second.get_message("cb-1905")).duplicate == 3
    finally:
        await first.close()
        await second.close()


async def test_a_resend_after_the_reply_gets_the_stored_reply_from_another_process(postgres_url: str) -> None:
    first, second = await PostgresHubStore.open(postgres_url), await PostgresHubStore.open(postgres_url)
    try:
        await first.store_incoming([message(1)])
        reply = StoredReply("MSH|ACK", "x-application/hl7-v2+er7", 200)
        await first.record_results([MessageResult("cb-1", MessageStatus.PROCESSED, reply, None, 2_000)])
        [again] = await second.store_incoming([message(1)])
        assert again.kind is IntakeKind.DUPLICATE and again.reply == reply
    finally:
        await first.close()
        await second.close()


# -- migrate-store ------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["hub", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_migrate_store_copies_sqlite_to_postgres_and_is_resumable(
        tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    body = "MSH|^~\\&|LAB|HOSP|||20240101||ORU^R01|X|P|2.5.1\rOBX|1|ST|é€😀||\\F\\ 'quoted' \x01\r"

    async def fill() -> tuple[str, int]:
        store = await open_store(None, tmp_path)
        try:
            credentials = await store.add_agent("lab")
            await store.add_channel(credentials.agent_id, "adt", "mllp://0.0.0.0:2575")
            await store.write_round([[message(i, body, credentials.agent_id) for i in range(2500)]], ())
            await store.upsert_resource("Patient", "sys|1", {"gender": "female"})
            await store.record_results([MessageResult("cb-7", MessageStatus.PROCESSED,
                                                      StoredReply("ACK", "text/plain", 200), None, 5)])
            return credentials.agent_id, (await store.get_message("cb-2499")).id
        finally:
            await store.close()

    agent_id, last_id = asyncio.run(fill())
    source = f"sqlite://{tmp_path / DB_FILE}"
    status, out, err = run_cli(capsys, "migrate-store", source, postgres_url, "--batch", "1000")
    assert status == 0, err
    assert "messages: done, 2500 rows read, 2500 new in the target" in out
    assert "verified messages: 2500 in the source, 2500 in the target" in out

    async def check() -> None:
        target = await open_store(postgres_url, tmp_path / "unused")
        try:
            copied = await target.get_message("cb-2499")
            assert copied.body == body and copied.body.encode() == body.encode()  # byte-equal
            assert copied.id == last_id and copied.agent_id == agent_id
            assert (await target.get_message("cb-7")).reply_body == "ACK"
            assert [c.name for c in await target.list_channels(agent_id)] == ["adt"]
            assert (await target.find_resources("Patient"))[0].resource["gender"] == "female"
            [new] = await target.store_incoming([message(9999)])  # ids continue after the copied ones
            assert new.kind is IntakeKind.NEW and (await target.get_message("cb-9999")).id > last_id
            page = await target.query_messages(MessageQuery(agent_id=agent_id, limit=1000))
            assert len(page.messages) == 1000 and page.next_after_id is not None
        finally:
            await target.close()

    asyncio.run(check())
    # again: nothing new is copied, and the target's extra row shows up in the verification
    status, out, err = run_cli(capsys, "migrate-store", source, postgres_url)
    assert status == 1 and "messages: done, 2500 rows read, 0 new in the target" in out
    assert "messages: 2500 in the source, 2501 in the target" in err
    for table in TABLES:
        assert f"verified {table}:" in out


def test_migrate_store_refuses_a_missing_source_and_the_same_store(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run_cli(capsys, "migrate-store", str(tmp_path / "nothing"), "sqlite:///tmp/x.sqlite3")
    assert status == 2 and "no hub store" in err
    status, _, err = run_cli(capsys, "migrate-store", "sqlite:///a/hub.sqlite3", "sqlite:///a/hub.sqlite3")
    assert status == 2 and "same store" in err


# -- errors -------------------------------------------------------------------------------------


async def test_unreachable_postgres_names_host_port_and_the_fix() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        await open_store("postgresql://medagent@127.0.0.1:1/hub", Path("."))
    assert "127.0.0.1:1" in str(caught.value) and "check that the server runs" in str(caught.value)


async def test_bad_store_urls_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="unknown hub store 'mysql://x'.*postgresql://"):
        await open_store("mysql://x", tmp_path)
    with pytest.raises(StoreUnavailable, match="bad PostgreSQL URL"):
        await open_store("postgresql://u@h/db?nosuchoption=1", tmp_path)


def test_missing_driver_says_which_extra_to_install(tmp_path: Path) -> None:
    code = ("import sys, asyncio; sys.modules['psycopg'] = None\n"
            "from medagent.hub.store import open_store\n"
            "asyncio.run(open_store('postgresql://u@127.0.0.1:5/db', None))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert result.returncode != 0 and "pip install 'medagent[scale]'" in result.stderr


def test_the_agent_process_does_not_import_the_store() -> None:
    code = ("import sys\nimport medagent.runtime.agent, medagent.serve_cli, medagent.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith(('medagent.hub.store', 'psycopg'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_hub_store_key_of_the_configuration(tmp_path: Path) -> None:
    from medagent.config import ConfigError, load_config

    path = tmp_path / "medagent.toml"
    path.write_text("[hub]\nstore = 'postgresql://medagent:pw@db.example:5432/hub'\n")
    config = load_config(path, env={})
    assert config.hub.store == "postgresql://medagent:pw@db.example:5432/hub"
    assert "pw" not in repr(config.hub)  # a store URL may carry a password
    assert load_config(path, env={"MEDAGENT_HUB_STORE": "sqlite:///var/lib/hub.sqlite3"}).hub.store == \
        "sqlite:///var/lib/hub.sqlite3"
    path.write_text("[hub]\nstore = 'mysql://db/hub'\n")
    with pytest.raises(ConfigError, match="postgresql://user@host:port/database"):
        load_config(path, env={})


@pytest.mark.skipif(sys.platform == "win32", reason="the serve harness uses POSIX process groups")
def test_medagent_serve_with_its_embedded_hub_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """``[hub] store`` reaches the embedded hub (provisioning and the hub child): an MLLP message
    sent to the agent is acknowledged and stored in PostgreSQL, not in a hub.sqlite3."""
    runtime_tests = str(Path(__file__).resolve().parents[1] / "runtime")
    sys.path.insert(0, runtime_tests)
    try:
        from serve_harness import MllpClient, ack_fields, channel_toml, hl7_message, start_serve
    finally:
        sys.path.remove(runtime_tests)

    data = tmp_path / "data"
    config = tmp_path / "medagent.toml"
    config.write_text(f'[agent]\ndata_dir = "{data}"\nhub = "embedded"\nheartbeat_s = 1.0\n'
                      f'[hub]\nport = 0\nstore = "{postgres_url}"\n\n{channel_toml("adt-in", "ackMode=fast")}\n')
    serve = start_serve(config, data)
    try:
        client = MllpClient(serve.port)
        assert ack_fields(client.roundtrip(hl7_message("PGE00001")))[:2] == ("AA", "PGE00001")
        client.close()

        async def stored() -> list[str]:
            store = await open_store(postgres_url, tmp_path)
            try:
                for _ in range(300):  # bounded: 30 s
                    page = await store.query_messages(MessageQuery(control_id="PGE00001"))
                    if page.messages:
                        return [m.channel for m in page.messages]
                    await asyncio.sleep(0.1)
                return []
            finally:
                await store.close()

        assert asyncio.run(stored()) == ["adt-in"]
        assert not (serve.hub_dir / DB_FILE).exists()
    finally:
        serve.stop()
