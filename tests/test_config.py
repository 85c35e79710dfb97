"""medagent.config: defaults, layers (CLI > env > file > defaults), and every kind of refusal."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from medagent.channels.endpoint import AckMode, AppLevelAck, Endpoint
from medagent.config import (
    DEFAULT_BOT,
    DEFAULT_CHANNEL,
    AgentSection,
    Config,
    ConfigError,
    Durability,
    HubSection,
    KindUnavailable,
    channel_options,
    default_config_toml,
    load_config,
)

DESIGN_EXAMPLE = """\
[agent]
data_dir = "./medagent-data"      # queue database, received files, logs
hub = "embedded"                   # or a base URL: https://api.medplum.com/ , https://hub.example.org/
# client_id = "..."  client_secret_file = "/etc/medagent/secret"  agent_id = "..."   (remote hub)

[[channel]]                        # used with the embedded hub; a remote hub sends the channel list
name = "adt-in"
endpoint = "mllp://127.0.0.1:2575?ackMode=fast"
bot = "medagent.hub.bots.ack:handler"

[[channel]]
name = "pacs-in"
endpoint = "dicom://127.0.0.1:11112?aet=MEDAGENT"
"""

REMOTE = """\
[agent]
hub = "https://api.medplum.com/"
client_id = "cid"
agent_id = "aid"
"""


def write(tmp_path: Path, text: str, name: str = "medagent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(
    tmp_path: Path, text: str | None = None, env: dict[str, str] | None = None, **overrides: Any
) -> Config:
    path = write(tmp_path, text) if text is not None else None
    return load_config(path, env=env or {}, overrides=overrides or None)


def fails(
    tmp_path: Path, text: str | None = None, env: dict[str, str] | None = None, **overrides: Any
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env, **overrides)
    return info.value


def file_error(tmp_path: Path, text: str, key: str) -> str:
    """Load text as a file, expect a ConfigError at key, return its problem text."""
    error = fails(tmp_path, text)
    assert (error.source, error.key) == (str(tmp_path / "medagent.toml"), key), str(error)
    assert str(error).startswith(f"{tmp_path / 'medagent.toml'}: {key}: ")
    return error.problem


# --------------------------------------------------------------------------- defaults


def test_no_file_gives_the_defaults_and_the_default_channel() -> None:
    config = load_config(env={})
    assert config.source == "defaults"
    assert config.agent == AgentSection()
    assert config.agent.data_dir == Path("medagent-data") and config.agent.hub == "embedded"
    assert config.agent.durability is Durability.NORMAL
    assert config.hub == HubSection(data_dir=Path("medagent-data/hub"))
    assert (config.hub.host, config.hub.port, config.hub.token_ttl_s) == ("127.0.0.1", 8103, 3600)
    (channel,) = config.channels
    assert (channel.name, channel.endpoint.url, channel.bot) == DEFAULT_CHANNEL
    assert channel.mllp is not None and channel.mllp.ack_mode is AckMode.FAST


def test_agent_defaults_match_the_brief() -> None:
    agent = AgentSection()
    assert (agent.client_id, agent.client_secret, agent.agent_id, agent.ca_file) == (
        None,
        None,
        None,
        None,
    )
    assert (agent.log_level, agent.log_phi, agent.heartbeat_s) == ("INFO", False, 10.0)
    assert (agent.reconnect_min_s, agent.reconnect_max_s, agent.dedup_window_s) == (
        0.1,
        30.0,
        3600.0,
    )
    assert (agent.retention_days, agent.retention_max_mb, agent.failed_retention_days) == (
        7,
        512,
        90,
    )
    assert agent.batching is True and agent.durability == "normal"


def test_default_example_file_loads_to_the_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, default_config_toml())
    defaults = load_config(env={})
    assert config.channels == defaults.channels
    assert config.agent.data_dir == tmp_path / "medagent-data"  # relative to the file
    assert config.hub.data_dir == tmp_path / "medagent-data" / "hub"
    strip = {"data_dir": Path(".")}
    assert AgentSection(**{**_fields(config.agent), **strip}) == AgentSection(
        **{**_fields(defaults.agent), **strip}
    )
    assert HubSection(**{**_fields(config.hub), **strip}) == HubSection(
        **{**_fields(defaults.hub), **strip}
    )


def _fields(section: Any) -> dict[str, Any]:
    return {name: getattr(section, name) for name in section.__dataclass_fields__}


# --------------------------------------------------------------------------- TOML parsing


def test_design_example_loads_every_channel_kind_through_the_registry(tmp_path: Path) -> None:
    config = load(tmp_path, DESIGN_EXAMPLE)
    assert [(c.name, c.endpoint.scheme) for c in config.channels] == [("adt-in", "mllp"), ("pacs-in", "dicom")]
    # Options are the kind's own typed options (channel_kind(scheme).parse_options).
    assert config.channels[1].options.aet == "MEDAGENT" and config.channels[1].mllp is None
    assert config.channels[0].options is config.channels[0].mllp


def test_a_kind_without_a_registration_is_named_as_unavailable() -> None:
    # E.g. a built-in kind whose optional dependency is missing: nothing registers the scheme.
    endpoint = Endpoint(scheme="nokind", host="127.0.0.1", port=1, params=MappingProxyType({}), url="nokind://127.0.0.1:1")
    with pytest.raises(KindUnavailable, match="nokind channels are not available in this version .supported: .*mllp"):
        channel_options(endpoint)


def test_design_example_without_dicom_loads(tmp_path: Path) -> None:
    text = DESIGN_EXAMPLE.split('[[channel]]\nname = "pacs-in"')[0]
    config = load(tmp_path, text)
    assert [c.name for c in config.channels] == ["adt-in"]
    assert config.channels[0].bot == DEFAULT_BOT and config.channels[0].endpoint.port == 2575


def test_full_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "hub.crt").write_text("x")
    (tmp_path / "hub.key").write_text("x")
    config = load(
        tmp_path,
        """
        [agent]
        data_dir = "data"
        ca_file = "ca.pem"
        durability = "FSYNC"
        log_level = "debug"
        log_phi = true
        heartbeat_s = 5
        reconnect_min_s = 0.5
        reconnect_max_s = 10
        dedup_window_s = 0
        retention_days = 1
        retention_max_mb = 64
        failed_retention_days = 30
        batching = false

        [hub]
        host = "0.0.0.0"
        port = 0
        data_dir = "/srv/hub"
        admin_token = "tok"
        tls_cert = "hub.crt"
        tls_key = "hub.key"
        token_ttl_s = 60

        [[channel]]
        name = "lab.in_1"
        endpoint = "mllp://0.0.0.0:2576?encoding=latin1&enhanced=true&appLevelAck=ER"
        bot = "my_bots.lab:on_message"
        """,
    )
    agent, hub = config.agent, config.hub
    assert agent.data_dir == tmp_path / "data" and agent.ca_file == tmp_path / "ca.pem"
    assert (
        agent.durability is Durability.FSYNC
        and agent.log_level == "DEBUG"
        and agent.log_phi is True
    )
    assert (agent.heartbeat_s, agent.reconnect_min_s, agent.reconnect_max_s) == (5.0, 0.5, 10.0)
    assert isinstance(agent.heartbeat_s, float)
    assert (agent.dedup_window_s, agent.retention_days, agent.retention_max_mb) == (0.0, 1, 64)
    assert (agent.failed_retention_days, agent.batching) == (30, False)
    assert (hub.host, hub.port, hub.data_dir, hub.admin_token, hub.token_ttl_s) == (
        "0.0.0.0",
        0,
        Path("/srv/hub"),
        "tok",
        60,
    )
    assert (hub.tls_cert, hub.tls_key) == (tmp_path / "hub.crt", tmp_path / "hub.key")
    (channel,) = config.channels
    assert channel.name == "lab.in_1" and channel.bot == "my_bots.lab:on_message"
    assert channel.mllp is not None
    assert (channel.mllp.ack_mode, channel.mllp.app_level_ack, channel.mllp.encoding) == (
        AckMode.TWO_PHASE,
        AppLevelAck.ER,
        "iso8859-1",
    )


def test_file_without_channels_gets_the_default_channel_and_empty_list_means_none(
    tmp_path: Path,
) -> None:
    assert [c.name for c in load(tmp_path, "[agent]\nlog_level = 'INFO'\n").channels] == ["adt-in"]
    assert load(tmp_path, "channel = []\n").channels == ()


def test_remote_hub_needs_no_channels(tmp_path: Path) -> None:
    config = load(tmp_path, REMOTE, env={"MEDAGENT_AGENT_CLIENT_SECRET": "s"})
    assert config.channels == () and config.agent.hub == "https://api.medplum.com/"
    assert not config.agent.uses_embedded_hub


# --------------------------------------------------------------------------- layers


def test_env_overrides_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "[agent]\ndata_dir = 'from-file'\nheartbeat_s = 3\n[hub]\nport = 9000\n",
        env={
            "MEDAGENT_AGENT_DATA_DIR": "/from/env",
            "MEDAGENT_HUB_PORT": "9100",
            "MEDAGENT_AGENT_LOG_PHI": "yes",
            "MEDAGENT_AGENT_BATCHING": "0",
            "MEDAGENT_AGENT_RECONNECT_MAX_S": " 2.5 ",
            "MEDAGENT_AGENT_AGENT_ID": "",  # empty = unset
            "MEDAGENT_NO_EXTENSIONS": "1",  # other MEDAGENT_ variables are not config
            "PATH": "/usr/bin",
        },
    )
    assert config.agent.data_dir == Path("/from/env") and config.hub.port == 9100
    assert config.agent.heartbeat_s == 3.0  # file value kept where env is silent
    assert config.agent.log_phi is True and config.agent.batching is False
    assert config.agent.reconnect_max_s == 2.5 and config.agent.agent_id is None


def test_env_relative_paths_are_relative_to_the_working_directory(tmp_path: Path) -> None:
    config = load(tmp_path, "", env={"MEDAGENT_AGENT_DATA_DIR": "rel"})
    assert config.agent.data_dir == Path("rel")


def test_cli_overrides_beat_env_and_file(tmp_path: Path) -> None:
    text = "[agent]\nlog_level = 'ERROR'\nheartbeat_s = 3\n[hub]\nport = 9000\nhost = '127.0.0.2'\n"
    env = {"MEDAGENT_AGENT_LOG_LEVEL": "WARNING", "MEDAGENT_HUB_PORT": "9100"}
    config = load(
        tmp_path, text, env, **{"agent.log_level": "debug", "hub.port": 9200, "hub.host": None}
    )
    assert config.agent.log_level == "DEBUG" and config.hub.port == 9200
    assert config.hub.host == "127.0.0.2"  # None override = not given
    assert config.agent.heartbeat_s == 3.0
    nested = load(tmp_path, text, env, hub={"port": "9300"}, agent={"data_dir": tmp_path / "d"})
    assert nested.hub.port == 9300 and nested.agent.data_dir == tmp_path / "d"


def test_cli_channel_list_replaces_the_file_channels(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        DESIGN_EXAMPLE,
        channel=[{"name": "x", "endpoint": "mllp://127.0.0.1:0?ackMode=immediate"}],
    )
    (channel,) = config.channels
    assert (
        channel.name == "x"
        and channel.mllp is not None
        and channel.mllp.ack_mode is AckMode.IMMEDIATE
    )


# --------------------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config(tmp_path / "nope.toml", env={})
    assert info.value.source == str(tmp_path / "nope.toml")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, env={})


def test_toml_syntax_error(tmp_path: Path) -> None:
    error = fails(tmp_path, "[agent]\ndata_dir = \n")
    assert error.source == str(tmp_path / "medagent.toml") and "not valid TOML" in str(error)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[agnet]\n", "agnet", "did you mean 'agent'"),
        ("[channels]\n", "channels", "did you mean 'channel'"),
        ("agent = 1\n", "agent", "must be a table"),
        ("[agent]\ndatadir = 'x'\n", "agent.datadir", "did you mean 'data_dir'"),
        ("[hub]\nprot = 1\n", "hub.prot", "did you mean 'port'"),
        ("channel = 'x'\n", "channel", "array of tables"),
        ("channel = [1]\n", "channel[0]", "must be a table"),
    ],
)
def test_unknown_or_misshapen_sections_and_keys(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    assert fragment in file_error(tmp_path, text, key)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[hub]\nport = '8103'\n", "hub.port", "expected an integer, got '8103'"),
        ("[hub]\nport = 70000\n", "hub.port", "0..65535"),
        ("[hub]\nport = true\n", "hub.port", "expected an integer"),
        ("[hub]\ntoken_ttl_s = 0\n", "hub.token_ttl_s", ">= 1"),
        ("[hub]\ncpu_slice_ms = 200\n", "hub.cpu_slice_ms", "0.1..100 ms"),
        ("[hub]\ncpu_slice_ms = 0.01\n", "hub.cpu_slice_ms", "0 (the kernel's default)"),
        ("[hub]\nhost = ''\n", "hub.host", "must not be empty"),
        ("[agent]\nheartbeat_s = 'ten'\n", "agent.heartbeat_s", "expected a number"),
        ("[agent]\nheartbeat_s = 0\n", "agent.heartbeat_s", "must be > 0"),
        ("[agent]\nheartbeat_s = inf\n", "agent.heartbeat_s", "finite"),
        ("[agent]\nlog_phi = 'yes'\n", "agent.log_phi", "expected a boolean"),
        ("[agent]\nretention_days = 1.5\n", "agent.retention_days", "expected an integer"),
        ("[agent]\nretention_max_mb = 0\n", "agent.retention_max_mb", ">= 1"),
        ("[agent]\ndata_dir = 5\n", "agent.data_dir", "expected a path"),
        ("[agent]\ndata_dir = ''\n", "agent.data_dir", "the path is empty"),
        ("[agent]\ndurability = 'always'\n", "agent.durability", "normal, fsync"),
        ("[agent]\nlog_level = 'LOUD'\n", "agent.log_level", "DEBUG, INFO"),
        ("[agent]\nca_file = 'missing.pem'\n", "agent.ca_file", "file not found"),
        (
            "[agent]\nreconnect_min_s = 5\nreconnect_max_s = 1\n",
            "agent.reconnect_max_s",
            "reconnect_min_s",
        ),
        ("[agent]\nhub = 'ftp://hub.example.org'\n", "agent.hub", "http(s)://"),
        ("[agent]\nhub = 'hub.example.org'\n", "agent.hub", "http(s)://"),
        ("[agent]\nhub = 'https://hub.example.org/?x=1'\n", "agent.hub", "query"),
        ("[agent]\nhub = 'https://hub.example.org:99999/'\n", "agent.hub", "not a valid URL"),
    ],
)
def test_type_and_value_errors_name_the_key(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    assert fragment in file_error(tmp_path, text, key)


def test_tls_cert_without_key(tmp_path: Path) -> None:
    (tmp_path / "hub.crt").write_text("x")
    assert "hub.tls_cert is set" in file_error(
        tmp_path, "[hub]\ntls_cert = 'hub.crt'\n", "hub.tls_key"
    )


@pytest.mark.parametrize("missing", ["client_id", "client_secret", "agent_id"])
def test_remote_hub_requires_credentials(tmp_path: Path, missing: str) -> None:
    values = {"client_id": "cid", "client_secret": "sec", "agent_id": "aid"}
    del values[missing]
    text = "[agent]\nhub = 'https://hub.example.org/'\n" + "".join(
        f"{k} = '{v}'\n" for k, v in values.items()
    )
    problem = file_error(tmp_path, text, f"agent.{missing}")
    assert "remote hub" in problem and f"MEDAGENT_AGENT_{missing.upper()}" in problem


def test_remote_hub_error_from_the_environment_names_the_environment(tmp_path: Path) -> None:
    error = fails(tmp_path, None, env={"MEDAGENT_AGENT_HUB": "https://hub.example.org"})
    assert (error.source, error.key) == ("environment", "agent.client_id")


# --------------------------------------------------------------------------- env / CLI errors


@pytest.mark.parametrize(
    ("env", "key", "fragment"),
    [
        (
            {"MEDAGENT_AGENT_DATADIR": "x"},
            "MEDAGENT_AGENT_DATADIR",
            "did you mean 'MEDAGENT_AGENT_DATA_DIR'",
        ),
        ({"MEDAGENT_HUB_PROT": "1"}, "MEDAGENT_HUB_PROT", "MEDAGENT_HUB_PORT"),
        ({"MEDAGENT_HUB_PORT": "eighty"}, "MEDAGENT_HUB_PORT", "expected an integer, got 'eighty'"),
        ({"MEDAGENT_HUB_PORT": "-1"}, "MEDAGENT_HUB_PORT", "0..65535"),
        ({"MEDAGENT_AGENT_LOG_PHI": "perhaps"}, "MEDAGENT_AGENT_LOG_PHI", "expected a boolean"),
        ({"MEDAGENT_AGENT_HEARTBEAT_S": "nan"}, "MEDAGENT_AGENT_HEARTBEAT_S", "finite"),
    ],
)
def test_environment_errors_name_the_variable(
    tmp_path: Path, env: dict[str, str], key: str, fragment: str
) -> None:
    error = fails(tmp_path, None, env)
    assert (error.source, error.key) == ("environment", key)
    assert str(error).startswith(f"environment: {key}: ") and fragment in error.problem


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"agent.nope": 1}, "agent.nope", "unknown key"),
        ({"hubb.port": 1}, "hubb.port", "unknown section"),
        ({"hub.port": "x"}, "hub.port", "expected an integer"),
        ({"hub.port": 1.5}, "hub.port", "expected an integer"),
    ],
)
def test_command_line_errors(
    tmp_path: Path, overrides: dict[str, Any], key: str, fragment: str
) -> None:
    error = fails(tmp_path, None, None, **overrides)
    assert (error.source, error.key) == ("command line", key) and fragment in error.problem


# --------------------------------------------------------------------------- channel errors


def channel_file(*tables: str) -> str:
    return "".join(f"[[channel]]\n{table}\n" for table in tables)


@pytest.mark.parametrize(
    ("tables", "key", "fragment"),
    [
        (["endpoint = 'mllp://127.0.0.1:1'"], "channel[0].name", "required"),
        (["name = 'a'"], "channel[0].endpoint", "required"),
        (["name = 'a'\nendpoint = 5"], "channel[0].endpoint", "expected a string"),
        (["name = ''\nendpoint = 'mllp://127.0.0.1:1'"], "channel[0].name", "may use only"),
        (["name = 'a b'\nendpoint = 'mllp://127.0.0.1:1'"], "channel[0].name", "may use only"),
        (
            ["name = 'a'\nendpoint = 'mllp://127.0.0.1:1'\nbott = 'x:y'"],
            "channel[0].bott",
            "did you mean 'bot'",
        ),
        (
            ["name = 'a'\nendpoint = 'mllp://127.0.0.1:1'\nbot = 'no_function'"],
            "channel[0].bot",
            "module",
        ),
        (
            ["name = 'a'\nendpoint = 'mllp://127.0.0.1:1'\nbot = 'a-b:c'"],
            "channel[0].bot",
            "module",
        ),
        (
            [
                "name = 'a'\nendpoint = 'mllp://127.0.0.1:1'",
                "name = 'a'\nendpoint = 'mllp://127.0.0.1:2'",
            ],
            "channel[1].name",
            "already used by channel[0]",
        ),
        (
            [
                "name = 'a'\nendpoint = 'mllp://127.0.0.1:2575'",
                "name = 'b'\nendpoint = 'mllp://127.0.0.1:2575'",
            ],
            "channel[1].endpoint",
            "already used by channel 'a'",
        ),
        (
            [
                "name = 'a'\nendpoint = 'mllp://0.0.0.0:2575'",
                "name = 'b'\nendpoint = 'mllp://10.0.0.1:2575'",
            ],
            "channel[1].endpoint",
            "already used by channel 'a'",
        ),
        (["name = 'a'\nendpoint = 'mllp://127.0.0.1:8103'"], "channel[0].endpoint", "embedded hub"),
        (
            ["name = 'a'\nendpoint = 'tcp://127.0.0.1:9'"],
            "channel[0].endpoint",
            "channel 'a': endpoint 'tcp://127.0.0.1:9': parameter 'startChar': required",
        ),
        (
            ["name = 'a'\nendpoint = 'astm://127.0.0.1:9?nonsense=1'"],
            "channel[0].endpoint",
            "parameter 'nonsense': unknown parameter",
        ),
        (
            [
                "name = 'a'\nendpoint = 'serial:///dev/ttyUSB0?startChar=%02&endChar=%03'",
                "name = 'b'\nendpoint = 'astm+serial:///dev/ttyUSB0'",
            ],
            "channel[1].endpoint",
            "channel 'b' uses /dev/ttyUSB0, already used by channel 'a'",
        ),
    ],
)
def test_channel_errors_name_the_channel_key(
    tmp_path: Path, tables: list[str], key: str, fragment: str
) -> None:
    assert fragment in file_error(tmp_path, channel_file(*tables), key)


def test_bad_endpoint_parameter_is_reported_with_channel_and_parameter(tmp_path: Path) -> None:
    text = channel_file(
        "name = 'a'\nendpoint = 'mllp://127.0.0.1:1'",
        "name = 'b'\nendpoint = 'mllp://127.0.0.1:2?enhanced=maybe'",
    )
    problem = file_error(tmp_path, text, "channel[1].endpoint")
    assert (
        "channel 'b'" in problem
        and "parameter 'enhanced'" in problem
        and "mllp://127.0.0.1:2" in problem
    )


def test_channels_that_do_not_collide(tmp_path: Path) -> None:
    text = channel_file(
        "name = 'a'\nendpoint = 'mllp://127.0.0.1:0'",
        "name = 'b'\nendpoint = 'mllp://127.0.0.1:0'",
        "name = 'c'\nendpoint = 'mllp://127.0.0.1:2575'",
        "name = 'd'\nendpoint = 'mllp://127.0.0.2:2575'",
    )
    assert [c.name for c in load(tmp_path, text).channels] == ["a", "b", "c", "d"]


def test_hub_port_only_collides_with_an_embedded_hub(tmp_path: Path) -> None:
    text = REMOTE + channel_file("name = 'a'\nendpoint = 'mllp://127.0.0.1:8103'")
    config = load(tmp_path, text, env={"MEDAGENT_AGENT_CLIENT_SECRET": "s"})
    assert config.channels[0].endpoint.port == 8103


# --------------------------------------------------------------------------- secrets


def test_client_secret_file_is_read_and_stripped_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("  s3cret-value\n")
    config = load(tmp_path, REMOTE + "client_secret_file = 'secret'\n")
    assert config.agent.client_secret == "s3cret-value"


def test_secret_precedence_env_value_beats_file_secret_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("from-file")
    config = load(
        tmp_path,
        REMOTE + "client_secret_file = 'secret'\n",
        env={"MEDAGENT_AGENT_CLIENT_SECRET": "from-env"},
    )
    assert config.agent.client_secret == "from-env"
    (tmp_path / "other").write_text("from-env-file\n")
    config = load(
        tmp_path,
        REMOTE + "client_secret = 'inline'\n",
        env={"MEDAGENT_AGENT_CLIENT_SECRET_FILE": str(tmp_path / "other")},
    )
    assert config.agent.client_secret == "from-env-file"


def test_secret_and_secret_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("x")
    problem = file_error(
        tmp_path,
        REMOTE + "client_secret = 'a'\nclient_secret_file = 'secret'\n",
        "agent.client_secret_file",
    )
    assert "not both" in problem


def test_unreadable_secret_file_names_the_path(tmp_path: Path) -> None:
    problem = file_error(
        tmp_path, REMOTE + "client_secret_file = 'absent'\n", "agent.client_secret_file"
    )
    assert str(tmp_path / "absent") in problem and "cannot read secret file" in problem
    (tmp_path / "empty").write_text("\n")
    assert "is empty" in file_error(
        tmp_path, REMOTE + "client_secret_file = 'empty'\n", "agent.client_secret_file"
    )


def test_admin_token_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("admin-tok\n")
    assert load(tmp_path, "[hub]\nadmin_token_file = 'token'\n").hub.admin_token == "admin-tok"


def test_secrets_are_masked_in_repr(tmp_path: Path) -> None:
    config = load(
        tmp_path, REMOTE + "client_secret = 'TOPSECRET-1'\n[hub]\nadmin_token = 'TOPSECRET-2'\n"
    )
    assert config.agent.client_secret == "TOPSECRET-1" and config.hub.admin_token == "TOPSECRET-2"
    for text in (repr(config), str(config), repr(config.agent), repr(config.hub)):
        assert "TOPSECRET" not in text
    assert "client_secret='***'" in repr(config.agent) and "admin_token='***'" in repr(config.hub)
    assert "client_secret=None" in repr(AgentSection())


def test_secrets_never_appear_in_errors(tmp_path: Path) -> None:
    error = fails(tmp_path, "[agent]\nclient_secret = 12345678\n")
    assert (
        error.key == "agent.client_secret"
        and "12345678" not in str(error)
        and "value hidden" in str(error)
    )
    error = fails(tmp_path, None, None, **{"hub.admin_token": 987654321})
    assert "987654321" not in str(error) and "value hidden" in str(error)
    error = fails(tmp_path, "[agent]\nhub = 'https://user:PASSWORD@hub.example.org/'\n")
    assert "PASSWORD" not in str(error) and "credentials" in str(error)
