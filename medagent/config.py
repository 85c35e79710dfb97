"""One typed configuration for medagent: TOML file + environment + command-line overrides.

Theory of operation
-------------------
Settings come in layers, highest first: command-line overrides (a mapping the CLI passes),
environment variables ``MEDAGENT_<SECTION>_<KEY>`` (``MEDAGENT_AGENT_DATA_DIR``,
``MEDAGENT_HUB_PORT``), the TOML file (``[agent]``, ``[hub]``, ``[[channel]]``), then the
built-in defaults (DESIGN.md "Configuration" and "Defaults and limits"). :func:`load_config`
gathers every layer as raw values tagged with where they came from, picks the highest layer per
key, converts and checks each value, then checks the rules that span keys (remote hub needs
credentials, channel names unique, no two listeners on one address, ...). The result is one
frozen :class:`Config`; nothing starts from a configuration that did not load.

Channels come from ``[[channel]]`` tables (or a ``channel`` override). With no file and the
embedded hub, the one channel :data:`DEFAULT_CHANNEL` is used, as is the case when a file has
no ``channel`` key at all; ``channel = []`` in a file means "no channels". With a remote hub
the channel list normally comes from the hub, so the file need not have any.

Invariants
----------
* Every failure is a :class:`ConfigError` whose text is ``<source>: <key path>: <problem>``;
  the source is the file path, ``environment`` or ``command line``; the key path is what the
  user wrote (``agent.data_dir``, ``channel[1].endpoint`` (0-based, in file order),
  ``MEDAGENT_HUB_PORT``).
* Unknown sections, keys and ``MEDAGENT_AGENT_*`` / ``MEDAGENT_HUB_*`` variables are errors,
  with the closest known name suggested (typo protection).
* Secret values (``client_secret``, ``admin_token``) never appear in an error message or a
  ``repr``; secret files are read once here and stripped.
* Relative paths written in a file are relative to that file's directory; relative paths from
  the environment, the command line or the defaults are relative to the working directory.
* Empty environment variables are treated as unset (container tooling often exports them).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from medagent.channels.base import UnknownChannelKind, channel_kind, known_schemes
from medagent.channels.endpoint import (
    Endpoint,
    EndpointError,
    MllpOptions,
    parse_endpoint,
    redact_url,
)
from medagent.ops import time_slice

__all__ = [
    "DEFAULT_BOT",
    "DEFAULT_CHANNEL",
    "EMBEDDED_HUB",
    "ENV_PREFIX",
    "AgentSection",
    "ChannelConfig",
    "Config",
    "ConfigError",
    "Durability",
    "HubSection",
    "KindUnavailable",
    "channel_options",
    "default_config_toml",
    "load_config",
]

EMBEDDED_HUB = "embedded"
DEFAULT_BOT = "medagent.hub.bots.ack:handler"
#: (name, endpoint URL, bot) of the channel `medagent serve` runs without a config file.
DEFAULT_CHANNEL: tuple[str, str, str] = (
    "adt-in",
    "mllp://127.0.0.1:2575?ackMode=fast",
    DEFAULT_BOT,
)
ENV_PREFIX = "MEDAGENT_"

_SOURCE_ENV = "environment"
_SOURCE_CLI = "command line"
_SOURCE_DEFAULTS = "defaults"
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9._-]+")
_BOT_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


class ConfigError(Exception):
    """A configuration that cannot be used: ``<source>: <key path>: <problem>``."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


class Durability(enum.StrEnum):
    """How hard the queue commits: NORMAL survives kill -9 (WAL), FSYNC also power loss."""

    NORMAL = "normal"
    FSYNC = "fsync"


def _masked_repr(obj: Any, secret_fields: Iterable[str]) -> str:
    hidden = frozenset(secret_fields)
    shown = []
    for spec in dataclasses.fields(obj):
        value = getattr(obj, spec.name)
        text = "'***'" if spec.name in hidden and value is not None else repr(value)
        shown.append(f"{spec.name}={text}")
    return f"{type(obj).__name__}({', '.join(shown)})"


class KindUnavailable(ValueError):
    """An endpoint whose scheme no channel kind in this installation can run."""


def channel_options(endpoint: Endpoint) -> Any:
    """The kind's typed options for ``endpoint`` (through the registry in ``channels.base``).

    Raises :class:`KindUnavailable` when no kind is registered for the scheme (or its module
    is not part of this version) and EndpointError for a bad parameter value.
    """
    try:
        kind = channel_kind(endpoint.scheme)
    except (UnknownChannelKind, ImportError):
        supported = ", ".join(s for s in known_schemes() if _kind_available(s))
        raise KindUnavailable(
            f"{endpoint.scheme} channels are not available in this version (supported: {supported})"
        ) from None
    return kind.parse_options(endpoint)


def _kind_available(scheme: str) -> bool:
    try:
        channel_kind(scheme)
    except (UnknownChannelKind, ImportError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """One listener: its name, endpoint, the bot the embedded hub runs, and the kind's typed
    options (built by :func:`channel_options`; ``MllpOptions`` for ``mllp://``)."""

    name: str
    endpoint: Endpoint
    bot: str = DEFAULT_BOT
    options: Any = None

    @property
    def mllp(self) -> MllpOptions | None:
        """The options when they are MLLP options (compatibility with callers of the HL7 era)."""
        return self.options if isinstance(self.options, MllpOptions) else None


@dataclass(frozen=True, slots=True, repr=False)
class AgentSection:
    """``[agent]``: the on-premise side. ``client_secret`` is masked in repr."""

    data_dir: Path = Path("./medagent-data")
    hub: str = EMBEDDED_HUB
    client_id: str | None = None
    client_secret: str | None = None
    agent_id: str | None = None
    ca_file: Path | None = None
    durability: Durability = Durability.NORMAL
    intake_journal: bool = True
    log_level: str = "INFO"
    log_phi: bool = False
    heartbeat_s: float = 10.0
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 30.0
    dedup_window_s: float = 3600.0
    dedup_filter_mb: float = 32.0
    retention_days: int = 7
    retention_max_mb: int = 512
    failed_retention_days: int = 90
    min_free_mb: float = 50.0
    min_free_percent: float = 2.0
    storage_reserve_mb: float = 8.0
    batching: bool = True
    metrics_port: int | None = None
    log_format: str = "text"
    allow_remote_upgrade: bool = True

    @property
    def uses_embedded_hub(self) -> bool:
        return self.hub == EMBEDDED_HUB

    def __repr__(self) -> str:
        return _masked_repr(self, ("client_secret",))


@dataclass(frozen=True, slots=True, repr=False)
class HubSection:
    """``[hub]``: medagent's own hub. ``data_dir`` None means ``<agent.data_dir>/hub``
    (:func:`load_config` always fills it in). ``admin_token`` is masked in repr."""

    host: str = "127.0.0.1"
    port: int = 8103
    data_dir: Path | None = None
    admin_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_ttl_s: int = 3600
    #: the hub store URL (postgresql://… or sqlite:///…); None: hub.sqlite3 in data_dir
    store: str | None = None
    #: the bus between hub processes (redis://host:port/db) or None: this hub alone
    bus: str | None = None
    #: the CPU time slice the hub asks the kernel for (medagent.ops.time_slice); 0: the kernel's
    cpu_slice_ms: float = time_slice.DEFAULT_SLICE_MS

    def __repr__(self) -> str:
        return _masked_repr(self, ("admin_token", "store", "bus"))  # a store or bus URL may carry a password


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``source`` is the file path, or "defaults" without a file."""

    agent: AgentSection
    hub: HubSection
    channels: tuple[ChannelConfig, ...]
    source: str


# --------------------------------------------------------------------------- key table


class _Kind(enum.Enum):
    STR = "a string"
    PATH = "a path (string)"
    INT = "an integer"
    FLOAT = "a number"
    BOOL = "a boolean (true/false)"


_Check = Callable[[Any], "str | None"]


@dataclass(frozen=True, slots=True)
class _Key:
    kind: _Kind
    default: Any
    check: _Check | None = None
    secret: bool = False


def _at_least(minimum: float) -> _Check:
    return lambda value: None if value >= minimum else f"must be >= {minimum:g}, got {value!r}"


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value!r}"


def _port_number(value: int) -> str | None:
    return (
        None
        if 0 <= value <= 65535
        else f"must be a port number 0..65535 (0 = any free port), got {value}"
    )


def _one_of(*choices: str) -> _Check:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"

    return check


def _not_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _hub_store(value: str) -> str | None:
    """The hub store URL: checked here for its form only (the hub reports an unreachable server)."""
    if value.startswith(("postgresql://", "postgres://")) or value.startswith("sqlite:///"):
        return None
    return "must be postgresql://user@host:port/database or sqlite:///path/to/hub.sqlite3"


def _hub_bus(value: str) -> str | None:
    """The hub bus URL: its form only (the hub reports an unreachable Redis)."""
    if value == "local" or value.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "must be 'local' or a Redis URL: redis://host:port/db, rediss://... or unix:///path.sock"


def _existing_file(value: Path) -> str | None:
    return None if value.is_file() else f"file not found: {value}"


def _hub_address(value: str) -> str | None:
    if value == EMBEDDED_HUB:
        return None
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError:
        return f"{redact_url(value)!r} is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be 'embedded' or an http(s):// base URL, got {redact_url(value)!r}"
    if parts.username is not None or parts.password is not None:
        return "credentials are not allowed in the hub URL; use client_id and client_secret"
    if parts.query or parts.fragment:
        return f"the hub base URL may not have a query or fragment: {redact_url(value)!r}"
    return None


_SECTIONS: Mapping[str, Mapping[str, _Key]] = {
    "agent": {
        "data_dir": _Key(_Kind.PATH, Path("./medagent-data")),
        "hub": _Key(_Kind.STR, EMBEDDED_HUB, _hub_address),
        "client_id": _Key(_Kind.STR, None, _not_empty),
        "client_secret": _Key(_Kind.STR, None, _not_empty, secret=True),
        "client_secret_file": _Key(_Kind.PATH, None),
        "agent_id": _Key(_Kind.STR, None, _not_empty),
        "ca_file": _Key(_Kind.PATH, None, _existing_file),
        "durability": _Key(_Kind.STR, "normal", _one_of(*(d.value for d in Durability))),
        "intake_journal": _Key(_Kind.BOOL, True),
        "log_level": _Key(_Kind.STR, "INFO", _one_of(*_LOG_LEVELS)),
        "log_phi": _Key(_Kind.BOOL, False),
        "heartbeat_s": _Key(_Kind.FLOAT, 10.0, _positive),
        "reconnect_min_s": _Key(_Kind.FLOAT, 0.1, _positive),
        "reconnect_max_s": _Key(_Kind.FLOAT, 30.0, _positive),
        "dedup_window_s": _Key(_Kind.FLOAT, 3600.0, _at_least(0)),
        "dedup_filter_mb": _Key(_Kind.FLOAT, 32.0, _at_least(0)),
        "retention_days": _Key(_Kind.INT, 7, _at_least(0)),
        "retention_max_mb": _Key(_Kind.INT, 512, _at_least(1)),
        "failed_retention_days": _Key(_Kind.INT, 90, _at_least(0)),
        "min_free_mb": _Key(_Kind.FLOAT, 50.0, _at_least(0)),
        "min_free_percent": _Key(_Kind.FLOAT, 2.0, _at_least(0)),
        "storage_reserve_mb": _Key(_Kind.FLOAT, 8.0, _at_least(0)),
        "batching": _Key(_Kind.BOOL, True),
        "metrics_port": _Key(_Kind.INT, None, _port_number),
        "log_format": _Key(_Kind.STR, "text", _one_of("text", "json")),
        "allow_remote_upgrade": _Key(_Kind.BOOL, True),
    },
    "hub": {
        "host": _Key(_Kind.STR, "127.0.0.1", _not_empty),
        "port": _Key(_Kind.INT, 8103, _port_number),
        "data_dir": _Key(_Kind.PATH, None),
        "admin_token": _Key(_Kind.STR, None, _not_empty, secret=True),
        "admin_token_file": _Key(_Kind.PATH, None),
        "tls_cert": _Key(_Kind.PATH, None, _existing_file),
        "tls_key": _Key(_Kind.PATH, None, _existing_file),
        "token_ttl_s": _Key(_Kind.INT, 3600, _at_least(1)),
        "store": _Key(_Kind.STR, None, _hub_store),
        "bus": _Key(_Kind.STR, None, _hub_bus),
        "cpu_slice_ms": _Key(_Kind.FLOAT, time_slice.DEFAULT_SLICE_MS, time_slice.setting_problem),
    },
}
_CHANNEL_SECTION = "channel"
_CHANNEL_KEYS = ("name", "endpoint", "bot")
#: (section, inline secret key, secret file key): one of the two per layer, the file is read.
_SECRET_PAIRS = (
    ("agent", "client_secret", "client_secret_file"),
    ("hub", "admin_token", "admin_token_file"),
)
#: Keys whose text value is case-normalised before checking.
_NORMALISE: Mapping[tuple[str, str], Callable[[str], str]] = {
    ("agent", "durability"): str.lower,
    ("agent", "log_level"): str.upper,
}


# --------------------------------------------------------------------------- raw layers


@dataclass(frozen=True, slots=True)
class _Raw:
    """One setting as found, before conversion, with where it was found."""

    value: Any
    source: str
    label: str
    textual: bool  # True: a string to be parsed (environment, CLI); False: a typed TOML value
    base_dir: Path | None = None  # relative paths from a file are resolved against it


_Layer = dict[tuple[str, str], _Raw]


def _suggest(name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}known: {', '.join(known)}"


def _read_toml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(source, "", "config file not found") from None
    except IsADirectoryError:
        raise ConfigError(source, "", "is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read the config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None


def _file_layer(document: Mapping[str, Any], source: str, base_dir: Path) -> _Layer:
    layer: _Layer = {}
    for section, table in document.items():
        if section == _CHANNEL_SECTION:
            continue
        if section not in _SECTIONS:
            raise ConfigError(
                source,
                section,
                f"unknown section; {_suggest(section, [*_SECTIONS, _CHANNEL_SECTION])}",
            )
        if not isinstance(table, dict):
            raise ConfigError(source, section, f"must be a table ([{section}]), not a single value")
        for key, value in table.items():
            label = f"{section}.{key}"
            if key not in _SECTIONS[section]:
                raise ConfigError(
                    source, label, f"unknown key; {_suggest(key, _SECTIONS[section])}"
                )
            layer[(section, key)] = _Raw(value, source, label, textual=False, base_dir=base_dir)
    return layer


def _env_layer(env: Mapping[str, str]) -> _Layer:
    layer: _Layer = {}
    for name, value in env.items():
        for section, keys in _SECTIONS.items():
            prefix = f"{ENV_PREFIX}{section.upper()}_"
            if not name.startswith(prefix):
                continue
            key = name[len(prefix) :].lower()
            if key not in keys:
                known = [f"{prefix}{k.upper()}" for k in keys]
                raise ConfigError(_SOURCE_ENV, name, f"unknown setting; {_suggest(name, known)}")
            if value != "":
                layer[(section, key)] = _Raw(value, _SOURCE_ENV, name, textual=True)
    return layer


def _flatten_overrides(overrides: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    for name, value in overrides.items():
        if name in _SECTIONS and isinstance(value, Mapping):
            yield from ((f"{name}.{key}", inner) for key, inner in value.items())
        else:
            yield name, value


def _override_layer(overrides: Mapping[str, Any]) -> _Layer:
    layer: _Layer = {}
    for name, value in _flatten_overrides(overrides):
        if name == _CHANNEL_SECTION or value is None:
            continue
        section, _, key = name.partition(".")
        if section not in _SECTIONS:
            raise ConfigError(_SOURCE_CLI, name, f"unknown section; {_suggest(section, _SECTIONS)}")
        if key not in _SECTIONS[section]:
            raise ConfigError(
                _SOURCE_CLI, name, f"unknown key; {_suggest(key, _SECTIONS[section])}"
            )
        layer[(section, key)] = _Raw(value, _SOURCE_CLI, name, textual=isinstance(value, str))
    return layer


def _merge(layers: Iterable[_Layer]) -> _Layer:
    """Later layers win, key by key; a secret and its file count as one key."""
    merged: _Layer = {}
    for layer in layers:
        for section, inline_key, file_key in _SECRET_PAIRS:
            inline, from_file = layer.get((section, inline_key)), layer.get((section, file_key))
            if inline is not None and from_file is not None:
                raise ConfigError(
                    from_file.source, from_file.label, f"give {inline_key} or {file_key}, not both"
                )
            if inline is not None or from_file is not None:
                merged.pop((section, inline_key), None)
                merged.pop((section, file_key), None)
        merged.update(layer)
    return merged


# --------------------------------------------------------------------------- conversion


def _describe(value: Any, key: _Key) -> str:
    if key.secret:
        return f"a {type(value).__name__} (value hidden)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _from_text(key: _Key, text: str) -> Any:
    """Parse an environment/CLI string; ValueError on failure."""
    stripped = text.strip()
    if key.kind is _Kind.INT:
        return int(stripped, 10)
    if key.kind is _Kind.FLOAT:
        return float(stripped)
    if key.kind is _Kind.BOOL:
        if stripped.lower() in _TRUE_WORDS:
            return True
        if stripped.lower() in _FALSE_WORDS:
            return False
        raise ValueError(text)
    return text


def _typed(key: _Key, value: Any) -> Any:
    """Check a TOML/typed value's type; ValueError on mismatch."""
    kind = key.kind
    if kind is _Kind.BOOL and isinstance(value, bool):
        return value
    if kind is _Kind.INT and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is _Kind.FLOAT and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is _Kind.STR and isinstance(value, str):
        return value
    if kind is _Kind.PATH and isinstance(value, (str, os.PathLike)):
        return value
    raise ValueError(value)


def _convert(section: str, name: str, raw: _Raw) -> Any:
    key = _SECTIONS[section][name]
    try:
        value = _from_text(key, raw.value) if raw.textual else _typed(key, raw.value)
    except ValueError:
        raise ConfigError(
            raw.source, raw.label, f"expected {key.kind.value}, got {_describe(raw.value, key)}"
        ) from None
    if key.kind is _Kind.FLOAT and not math.isfinite(value):
        raise ConfigError(raw.source, raw.label, f"expected a finite number, got {value!r}")
    if key.kind is _Kind.PATH:
        value = _to_path(raw, value)
    normalise = _NORMALISE.get((section, name))
    if normalise is not None:
        value = normalise(value)
    problem = key.check(value) if key.check is not None else None
    if problem is not None:
        raise ConfigError(raw.source, raw.label, problem)  # checks never echo secret values
    return value


def _to_path(raw: _Raw, value: str | os.PathLike[str]) -> Path:
    text = os.fspath(value)
    if not text.strip():
        raise ConfigError(raw.source, raw.label, "the path is empty")
    path = Path(text).expanduser()
    if raw.base_dir is not None and not path.is_absolute():
        path = raw.base_dir / path
    return path


def _read_secret_file(raw: _Raw, path: Path) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            raw.source, raw.label, f"cannot read secret file {path}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(raw.source, raw.label, f"secret file {path} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(raw.source, raw.label, f"secret file {path} is empty")
    return secret


def _resolve_values(merged: _Layer) -> dict[tuple[str, str], Any]:
    values = {
        (section, name): key.default
        for section, keys in _SECTIONS.items()
        for name, key in keys.items()
    }
    for (section, name), raw in merged.items():
        values[(section, name)] = _convert(section, name, raw)
    for section, inline_key, file_key in _SECRET_PAIRS:
        secret_path = values.pop((section, file_key))
        if secret_path is not None:
            values[(section, inline_key)] = _read_secret_file(
                merged[(section, file_key)], secret_path
            )
    return values


def _source_of(merged: _Layer, section: str, name: str, fallback: str) -> str:
    raw = merged.get((section, name))
    return raw.source if raw is not None else fallback


# --------------------------------------------------------------------------- sections


def _section_values(values: Mapping[tuple[str, str], Any], section: str) -> dict[str, Any]:
    return {name: value for (sec, name), value in values.items() if sec == section}


def _build_agent(
    values: Mapping[tuple[str, str], Any], merged: _Layer, fallback: str
) -> AgentSection:
    fields = _section_values(values, "agent")
    fields["durability"] = Durability(fields["durability"])
    agent = AgentSection(**fields)
    if agent.reconnect_max_s < agent.reconnect_min_s:
        source = _source_of(merged, "agent", "reconnect_max_s", fallback)
        raise ConfigError(
            source,
            "agent.reconnect_max_s",
            f"must be >= agent.reconnect_min_s ({agent.reconnect_min_s:g})",
        )
    if not agent.uses_embedded_hub:
        source = _source_of(merged, "agent", "hub", fallback)
        for required in ("client_id", "client_secret", "agent_id"):
            if getattr(agent, required) is None:
                env_name = f"{ENV_PREFIX}AGENT_{required.upper()}"
                raise ConfigError(
                    source,
                    f"agent.{required}",
                    f"required when agent.hub is a remote hub ({redact_url(agent.hub)}); "
                    f"set it in [agent] or {env_name}",
                )
    return agent


def _build_hub(
    values: Mapping[tuple[str, str], Any], merged: _Layer, agent: AgentSection, fallback: str
) -> HubSection:
    fields = _section_values(values, "hub")
    if fields["data_dir"] is None:
        fields["data_dir"] = agent.data_dir / "hub"
    hub = HubSection(**fields)
    if (hub.tls_cert is None) != (hub.tls_key is None):
        missing = "tls_key" if hub.tls_key is None else "tls_cert"
        present = "tls_cert" if missing == "tls_key" else "tls_key"
        source = _source_of(merged, "hub", present, fallback)
        raise ConfigError(
            source, f"hub.{missing}", f"hub.{present} is set, so hub.{missing} is required too"
        )
    return hub


# --------------------------------------------------------------------------- channels


def _channel_tables(
    document: Mapping[str, Any], overrides: Mapping[str, Any], source: str
) -> tuple[Any, str] | None:
    if overrides.get(_CHANNEL_SECTION) is not None:
        return overrides[_CHANNEL_SECTION], _SOURCE_CLI
    if _CHANNEL_SECTION in document:
        return document[_CHANNEL_SECTION], source
    return None


def _text_field(
    table: Mapping[str, Any], name: str, label: str, source: str, default: str | None = None
) -> str:
    value = table.get(name, default)
    if value is None:
        raise ConfigError(source, label, "required")
    if not isinstance(value, str):
        raise ConfigError(source, label, f"expected a string, got {value!r}")
    return value


def _build_channel(table: Any, index: int, source: str) -> ChannelConfig:
    path = f"channel[{index}]"
    if not isinstance(table, Mapping):
        raise ConfigError(
            source, path, "must be a table ([[channel]] with name = ..., endpoint = ...)"
        )
    for key in table:
        if key not in _CHANNEL_KEYS:
            raise ConfigError(
                source, f"{path}.{key}", f"unknown key; {_suggest(key, _CHANNEL_KEYS)}"
            )
    name = _text_field(table, "name", f"{path}.name", source)
    if not _CHANNEL_NAME.fullmatch(name):
        raise ConfigError(
            source, f"{path}.name", f"{name!r} may use only letters, digits, '.', '_' and '-'"
        )
    url = _text_field(table, "endpoint", f"{path}.endpoint", source)
    try:
        endpoint = parse_endpoint(url)
    except EndpointError as exc:
        raise ConfigError(source, f"{path}.endpoint", f"channel {name!r}: {exc}") from None
    try:
        options = channel_options(endpoint)
    except (KindUnavailable, EndpointError) as exc:
        raise ConfigError(source, f"{path}.endpoint", f"channel {name!r}: {exc}") from None
    bot = _text_field(table, "bot", f"{path}.bot", source, DEFAULT_BOT)
    if not _BOT_REFERENCE.fullmatch(bot):
        raise ConfigError(
            source, f"{path}.bot", f"{bot!r} is not a 'package.module:function' reference"
        )
    return ChannelConfig(name=name, endpoint=endpoint, bot=bot, options=options)


def _addresses_overlap(first: tuple[str, int], second: tuple[str, int]) -> bool:
    (host_a, port_a), (host_b, port_b) = first, second
    if port_a != port_b or port_a == 0:
        return False
    return host_a == host_b or host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS


def _check_channel_set(
    channels: Iterable[ChannelConfig], source: str, hub: HubSection | None
) -> None:
    seen_names: dict[str, int] = {}
    seen_devices: dict[str, str] = {}  # serial device path -> channel name
    seen_addresses: list[tuple[str, tuple[str, int]]] = []
    if hub is not None:
        seen_addresses.append(("the embedded hub (hub.host/hub.port)", (hub.host, hub.port)))
    for index, channel in enumerate(channels):
        if channel.name in seen_names:
            raise ConfigError(
                source,
                f"channel[{index}].name",
                f"{channel.name!r} is already used by channel[{seen_names[channel.name]}]",
            )
        seen_names[channel.name] = index
        device = getattr(channel.endpoint, "path", "")
        if device:  # a device-path kind (serial): one channel per device
            if device in seen_devices:
                raise ConfigError(
                    source,
                    f"channel[{index}].endpoint",
                    f"channel {channel.name!r} uses {device}, already used by channel {seen_devices[device]!r}",
                )
            seen_devices[device] = channel.name
            continue
        address = (channel.endpoint.host, channel.endpoint.port)
        for owner, other in seen_addresses:
            if _addresses_overlap(address, other):
                raise ConfigError(
                    source,
                    f"channel[{index}].endpoint",
                    f"channel {channel.name!r} listens on {address[0]}:{address[1]}, "
                    f"already used by {owner}",
                )
        seen_addresses.append((f"channel {channel.name!r}", address))


def _build_channels(
    document: Mapping[str, Any],
    overrides: Mapping[str, Any],
    source: str,
    agent: AgentSection,
    hub: HubSection,
) -> tuple[ChannelConfig, ...]:
    found = _channel_tables(document, overrides, source)
    if found is None:
        if not agent.uses_embedded_hub:
            return ()
        name, endpoint, bot = DEFAULT_CHANNEL
        tables: Any = [{"name": name, "endpoint": endpoint, "bot": bot}]
        channel_source = _SOURCE_DEFAULTS
    else:
        tables, channel_source = found
    if not isinstance(tables, (list, tuple)):
        raise ConfigError(
            channel_source, _CHANNEL_SECTION, "must be an array of tables ([[channel]])"
        )
    channels = tuple(
        _build_channel(table, index, channel_source) for index, table in enumerate(tables)
    )
    _check_channel_set(channels, channel_source, hub if agent.uses_embedded_hub else None)
    return channels


# --------------------------------------------------------------------------- public API


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load, merge (CLI > env > file > defaults) and validate; raise ConfigError on any problem.

    ``env`` defaults to ``os.environ``. ``overrides`` keys are ``"section.key"`` (or a nested
    ``{"section": {...}}``) plus ``"channel"``: a list of channel tables replacing the file's;
    None values are ignored, strings are parsed like environment values.
    """
    environment = os.environ if env is None else env
    extra = overrides or {}
    document: Mapping[str, Any] = {}
    file_layer: _Layer = {}
    source = _SOURCE_DEFAULTS
    if path is not None:
        path = Path(path)
        source = str(path)
        document = _read_toml(path)
        file_layer = _file_layer(document, source, path.resolve().parent)
    merged = _merge((file_layer, _env_layer(environment), _override_layer(extra)))
    values = _resolve_values(merged)
    agent = _build_agent(values, merged, source)
    hub = _build_hub(values, merged, agent, source)
    channels = _build_channels(document, extra, source, agent, hub)
    return Config(agent=agent, hub=hub, channels=channels, source=source)


_EXAMPLE_TOML = f'''\
# medagent configuration (TOML). Every key is optional; the values shown are the defaults.
# Any [agent]/[hub] key can also be set as MEDAGENT_<SECTION>_<KEY>, e.g. MEDAGENT_AGENT_DATA_DIR,
# MEDAGENT_HUB_PORT. Precedence: command line > environment > this file > defaults.
# Relative paths in this file are relative to this file's directory.

[agent]
data_dir = "./medagent-data"          # queue database, received files, logs
hub = "embedded"                      # or a base URL: "https://api.medplum.com/"
# Remote hub credentials (all three required when hub is a URL):
# client_id = "..."
# client_secret_file = "/etc/medagent/client-secret"
#   (or client_secret = "...", or the environment variable MEDAGENT_AGENT_CLIENT_SECRET)
# agent_id = "..."
# ca_file = "/etc/medagent/ca.pem"    # extra CA bundle for the hub's TLS certificate
durability = "normal"                 # "fsync": ACKed messages also survive power loss
intake_journal = true                 # "normal" only: a lone message is committed by one append (docs/intake-journal.md)
log_level = "INFO"                    # DEBUG, INFO, WARNING, ERROR, CRITICAL
log_phi = false                       # true: message bodies may appear in logs (PHI!)
heartbeat_s = 10.0
reconnect_min_s = 0.1                 # reconnect backoff (jittered, exponential)
reconnect_max_s = 30.0
dedup_window_s = 3600.0               # duplicate detection window per (channel, sender, MSH-10)
dedup_filter_mb = 32.0                # memory for the in-memory filter that spares new keys the SQLite lookup (0: off)
retention_days = 7                    # keep delivered messages this long
retention_max_mb = 512                # soft cap on the queue database
failed_retention_days = 90            # keep failed/rejected messages this long
min_free_mb = 50.0                    # refuse new messages (CE) below max(min_free_mb,
min_free_percent = 2.0                #   min_free_percent of the disk) free, so confirmations fit
storage_reserve_mb = 8.0              # emergency file given back when the disk fills (recovery room)
batching = true                       # use the hub's batching extension when it offers it
# metrics_port = 9464                 # Prometheus /metrics on 127.0.0.1 (unset: off; 0 = any free port)
log_format = "text"                   # "json": one JSON object per line in <data_dir>/medagent.log
allow_remote_upgrade = true           # false: refuse the hub's $upgrade (the site decides)

[hub]                                 # medagent's own hub (hub = "embedded" or `medagent hub`)
host = "127.0.0.1"
port = 8103
# data_dir = "./medagent-data/hub"    # default: <agent.data_dir>/hub
# admin_token_file = "/etc/medagent/admin-token"       # or admin_token = "..."
# tls_cert = "/etc/medagent/hub.crt"  # both or neither
# tls_key = "/etc/medagent/hub.key"
token_ttl_s = 3600
cpu_slice_ms = 20.0                   # a long CPU time slice: agent and devices preempt the hub (0: kernel default)

# Channels: with the embedded hub, listed here; a remote hub sends its own channel list.
# Without any [[channel]] table the one below is used; `channel = []` means no channels.
[[channel]]
name = "{DEFAULT_CHANNEL[0]}"
endpoint = "{DEFAULT_CHANNEL[1]}"   # see docs/configuration.md for URL parameters
bot = "{DEFAULT_CHANNEL[2]}"

# [[channel]]
# name = "lab-in"
# endpoint = "mllp://0.0.0.0:2576?encoding=latin1&enhanced=true&appLevelAck=ER"
'''


def default_config_toml() -> str:
    """A commented example file equal to the defaults (``medagent config example`` prints it)."""
    return _EXAMPLE_TOML
