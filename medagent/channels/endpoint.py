"""Endpoint URLs: what a channel listens on and how it acknowledges, parsed without any I/O.

Theory of operation
-------------------
A channel is described by one URL, the same string a Medplum ``Endpoint.address`` holds
(shared/medplum-protocol.md §3.1-§3.3)::

    mllp://0.0.0.0:2575?encoding=latin1&enhanced=aa
    tcp://127.0.0.1:9000?startChar=%02&endChar=%03
    dicom://0.0.0.0:11112?aet=MEDAGENT

:func:`parse_endpoint` splits it into an :class:`Endpoint` (scheme, host, port, raw query
parameters), finds the scheme's channel kind in the registry (``channels.base``), checks the
parameter names against the kind's list (with a "did you mean" hint) and every value with the
kind's ``parse_options``, so an :class:`Endpoint` that exists is usable. :func:`mllp_options`
is the ``mllp`` kind's ``parse_options``; other kinds parse their own options with the public
value parsers at the end of this module. :func:`parse_remote`
does the same for the *outbound* address of a device that a hub ``$push`` names (``agent:transmit:request.remote``,
medplum-protocol.md §6).

ACK mode (DESIGN.md "ACK modes and durability"; medplum-protocol.md §4.3) is decided by
Medplum's ``enhanced`` parameter or by medagent's ``ackMode``:

=================================================  ==========================
URL                                                :class:`AckMode`
=================================================  ==========================
neither                                            ``ORIGINAL``
``enhanced=true``  or ``ackMode=two-phase``        ``TWO_PHASE`` (CA, then app ACK)
``enhanced=aa``    or ``ackMode=fast``             ``FAST`` (AA after commit)
``ackMode=immediate``                              ``IMMEDIATE`` (AA before commit)
=================================================  ==========================

Both may be given only when they agree. Where Medplum logs a warning and falls back to a
default for a bad value, medagent refuses the URL: a typo in an ACK setting silently changes
what an ACK promises, which is exactly what must not happen with clinical data.

Invariants
----------
* Parameter *names* are case-sensitive (Medplum's camelCase); *values* of enumerated
  parameters are case-insensitive, as in Medplum (``enhanced=TRUE`` works).
* An unknown parameter, a repeated parameter, an unparsable value, credentials in the URL, a
  path, a fragment or a missing port is an :class:`EndpointError`. Its message names the URL
  (credentials masked) and the parameter, and lists what is accepted.
* Medplum parameters that medagent does not implement (``maxWorkers``,
  ``logicalChannelKey``) are rejected with the reason, never silently ignored.
* Unlike Medplum, which binds every interface and ignores the host, medagent binds the host
  given: ``0.0.0.0`` (or ``::``) means all interfaces. Port 0 asks the OS for a free port
  (tests use it). The port is required.
* Nothing here opens sockets, files or codecs' streams; :func:`codecs.lookup` is the only
  look-up made.
"""

from __future__ import annotations

import codecs
import difflib
import enum
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from medagent.channels.tls import TlsRemoteSettings
from urllib.parse import SplitResult, parse_qsl, urlsplit

# The ACK enums are protocol concepts (proto/ackpolicy.py decides with them); re-exported here
# because endpoint URLs are where users name them.
from medagent.proto.ackpolicy import AckMode, AppLevelAck, DuplicateBehavior

__all__ = [
    "ACCEPTED_PARAMETERS",
    "KNOWN_CHANNEL_KINDS",
    "MLLP_PARAMETERS",
    "SUPPORTED_CHANNEL_KINDS",
    "AckMode",
    "AppLevelAck",
    "ByteStreamOptions",
    "DicomOptions",
    "DuplicateBehavior",
    "Endpoint",
    "EndpointError",
    "MllpOptions",
    "RemoteTarget",
    "RetryMode",
    "ReturnAck",
    "bool_param",
    "bytestream_options",
    "choice_param",
    "decimal_param",
    "dicom_options",
    "encoding_param",
    "int_param",
    "mllp_options",
    "parse_endpoint",
    "parse_remote",
    "queue_duplicate_policy_name",
    "redact_url",
    "validate_encoding",
]


class RetryMode(enum.Enum):
    """Delivery retry policy from the queue to the hub (Medplum ``retryMode``).

    NONE: one attempt, a failure is final. NORMAL: retry failures known not to have reached the
    hub. GUARANTEED: also retry outcomes left ambiguous by a disconnect (at-least-once).
    """

    NONE = "none"
    NORMAL = "normal"
    GUARANTEED = "guaranteed"


class ReturnAck(enum.Enum):
    """Which reply to an outbound message completes it (medplum-protocol.md §6)."""

    FIRST = "first"
    APPLICATION = "application"


class EndpointError(ValueError):
    """An endpoint or remote URL that cannot be used. ``url`` never holds credentials."""

    def __init__(self, url: str, parameter: str | None, problem: str) -> None:
        self.url = redact_url(url)
        self.parameter = parameter
        self.problem = problem
        where = f"endpoint {self.url!r}"
        if parameter is not None:
            where += f": parameter {parameter!r}"
        super().__init__(f"{where}: {problem}")


# DEPRECATED (issue 13): the per-scheme tables below predate the kind registry
# (channels/base.py). parse_endpoint takes accepted parameters and option checks from the
# registered kind; these tables serve only schemes whose kind module is not importable yet, and
# config code and tests that still import them. Delete them when dicom/astm/tcp are registered.
#: Every channel kind the URL syntax knows (medplum-protocol.md §3.1, §3.3).
KNOWN_CHANNEL_KINDS: frozenset[str] = frozenset({"mllp", "dicom", "astm", "tcp"})
#: The channel kinds this version can run; config validation rejects the others by name.
SUPPORTED_CHANNEL_KINDS: frozenset[str] = frozenset({"mllp"})

#: Query parameters of an ``mllp://`` listener (the ``mllp`` kind's ``parameters``).
MLLP_PARAMETERS: tuple[str, ...] = (
    # Medplum's names (medplum-protocol.md §3.2)
    "encoding",
    "enhanced",
    "appLevelAck",
    "assignSeqNo",
    "messagesPerMin",
    "duplicateBehavior",
    "retryMode",
    "autoRetryBaseDelayMs",
    "autoRetryMaxDelayMs",
    "autoRetryMaxAttempts",
    "autoRetryBackoffMultiplier",
    # medagent's
    "ackMode",
    "maxFrameSize",
    "maxConnections",
    "idleTimeoutMs",
    "responseTimeoutMs",
    "firstMessageTimeoutMs",
    "maxConnectionsPerAddress",
    # TLS (channels/tls.py, docs/tls.md)
    "tlsCert",
    "tlsKey",
    "tlsCa",
    "tlsClientAllow",
)

#: Accepted query parameter names per scheme.
ACCEPTED_PARAMETERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "mllp": MLLP_PARAMETERS,
        "dicom": ("aet",),
        "astm": (),
        "tcp": ("startChar", "endChar"),
    }
)

_REMOTE_PARAMETERS = ("encoding", "defaultReturnAck", "keepAlive", "tls", "tlsCa", "tlsCert", "tlsKey")

_UNSUPPORTED_MEDPLUM_PARAMETERS: Mapping[str, str] = MappingProxyType(
    {
        "maxWorkers": "Medplum's parallel delivery workers are not implemented by medagent "
        "(delivery is one FIFO per channel); remove the parameter",
        "logicalChannelKey": "Medplum's logical-channel partitioning is not implemented by "
        "medagent (delivery is one FIFO per channel); remove the parameter",
    }
)

_UNSIGNED_INT = re.compile(r"[0-9]+")
_UNSIGNED_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_FRAMING_PROBE = "MSH|^~\\&\x0b\x1c\r"
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # DICOM PS3.5 AE VR: no backslash

_E = TypeVar("_E", bound=enum.Enum)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed endpoint URL. ``params`` is read-only; ``url`` is the string as given.

    ``path`` is set only for kinds addressed by a device path (``needs_port=False``, e.g.
    ``serial:///dev/ttyUSB0``: host "", port 0, path "/dev/ttyUSB0").
    """

    scheme: str
    host: str
    port: int
    params: Mapping[str, str] = field(hash=False)
    url: str
    path: str = ""

    @property
    def binds_all_interfaces(self) -> bool:
        """True for 0.0.0.0 / :: (every interface of that address family)."""
        return self.host in _WILDCARD_HOSTS


@dataclass(frozen=True, slots=True)
class MllpOptions:
    """Typed settings of an MLLP listener channel; the defaults are DESIGN.md's."""

    ack_mode: AckMode = AckMode.ORIGINAL
    app_level_ack: AppLevelAck = AppLevelAck.AL
    encoding: str = "utf-8"
    assign_seq_no: bool = False
    messages_per_min: int | None = None
    duplicate_behavior: DuplicateBehavior = DuplicateBehavior.FLAG
    max_frame_size: int = 16 * 1024 * 1024
    max_connections: int = 100
    idle_timeout_s: float = 600.0
    response_timeout_s: float = 10.0
    first_message_timeout_s: float = 30.0  # 0: never (defect 3)
    max_connections_per_address: int = 0  # 0: no per-address limit
    retry_base_delay_ms: int = 1000
    retry_max_delay_ms: int = 60_000
    retry_max_attempts: int = 0
    retry_backoff_multiplier: float = 2.0
    retry_mode: RetryMode = RetryMode.GUARANTEED


@dataclass(frozen=True, slots=True)  # DEPRECATED: the dicom kind (channels/dicom.py) owns its options
class DicomOptions:
    """Typed settings of a DICOM listener channel (not runnable in this version)."""

    ae_title: str = "MEDAGENT"


@dataclass(frozen=True, slots=True)  # DEPRECATED: the tcp kind (channels/bytestream.py) owns its options
class ByteStreamOptions:
    """Start/end framing bytes of a ``tcp://`` byte-stream channel (not runnable yet)."""

    start_byte: int
    end_byte: int


@dataclass(frozen=True, slots=True)
class RemoteTarget:
    """An outbound MLLP destination named by ``agent:transmit:request.remote``.

    ``keep_alive`` None means "use the agent-wide setting".
    """

    host: str
    port: int
    encoding: str
    default_return_ack: ReturnAck
    keep_alive: bool | None
    url: str
    tls: TlsRemoteSettings | None = None


# --------------------------------------------------------------------------- URL helpers


def redact_url(url: str) -> str:
    """The URL with any ``user:password@`` replaced by ``***@`` (safe for messages and logs)."""
    scheme_end = url.find("://")
    if scheme_end < 0:
        return url
    authority_start = scheme_end + 3
    authority_end = len(url)
    for stop in "/?#":
        index = url.find(stop, authority_start)
        if index >= 0:
            authority_end = min(authority_end, index)
    at = url.rfind("@", authority_start, authority_end)
    if at < 0:
        return url
    return url[:authority_start] + "***@" + url[at + 1 :]


def _split(url: str, *, allow_path: bool = False) -> SplitResult:
    if not isinstance(url, str) or not url.strip():
        raise EndpointError(str(url), None, "the address is empty")
    if url != url.strip():
        raise EndpointError(url, None, "the address has leading or trailing whitespace")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise EndpointError(url, None, f"not a valid URL ({exc})") from None
    if not parts.scheme or "://" not in url:
        raise EndpointError(
            url, None, "not a URL of the form scheme://host:port?params (unknown scheme)"
        )
    if parts.username is not None or parts.password is not None:
        raise EndpointError(url, None, "credentials are not allowed in this address")
    if parts.path not in ("", "/") and not allow_path:
        raise EndpointError(
            url, None, f"a path ({parts.path!r}) is not allowed; use scheme://host:port?params"
        )
    if parts.fragment:
        raise EndpointError(url, None, "a '#' fragment is not allowed")
    return parts


def _host_and_port(url: str, parts: SplitResult, *, allow_port_zero: bool) -> tuple[str, int]:
    host = parts.hostname
    if not host:
        raise EndpointError(
            url, None, "the host is missing (use 0.0.0.0 to listen on every interface)"
        )
    lowest = 0 if allow_port_zero else 1
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and port < lowest:
        zero_note = " (0 = any free port)" if allow_port_zero else ""
        raise EndpointError(
            url, None, f"the port must be a number from {lowest} to 65535{zero_note}"
        )
    if port is None:
        raise EndpointError(url, None, "the port is missing (e.g. mllp://0.0.0.0:2575)")
    return host, port


def _query(url: str, parts: SplitResult, accepted: tuple[str, ...]) -> dict[str, str]:
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise EndpointError(
            url, None, "the query string is malformed (expected name=value&...)"
        ) from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in _UNSUPPORTED_MEDPLUM_PARAMETERS:
            raise EndpointError(url, name, _UNSUPPORTED_MEDPLUM_PARAMETERS[name])
        if name not in accepted:
            listed = ", ".join(accepted) if accepted else "none"
            raise EndpointError(url, name, f"unknown parameter{_did_you_mean(name, accepted)}; "
                                           f"accepted parameters are: {listed}")
        if name in params:
            raise EndpointError(url, name, "given more than once")
        params[name] = value
    return params


def _did_you_mean(name: str, accepted: tuple[str, ...]) -> str:
    """' (did you mean 'ackMode'?)' for a near miss (case first, then difflib), else ''."""
    for candidate in accepted:
        if candidate.lower() == name.lower():
            return f" (did you mean {candidate!r}?)"
    close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- value parsers


def _choice(url: str, params: Mapping[str, str], name: str, enum_type: type[_E], default: _E) -> _E:
    raw = params.get(name)
    if raw is None:
        return default
    for member in enum_type:
        if raw.lower() == str(member.value).lower():
            return member
    try:
        return enum_type(raw.lower())  # aliases via _missing_
    except ValueError:
        pass
    allowed = ", ".join(str(member.value) for member in enum_type)
    raise EndpointError(url, name, f"{raw!r} is not one of: {allowed}")


def _boolean(url: str, params: Mapping[str, str], name: str, default: bool) -> bool:
    raw = params.get(name)
    if raw is None:
        return default
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise EndpointError(url, name, f"{raw!r} is not true or false")


def _integer(url: str, params: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not _UNSIGNED_INT.fullmatch(raw) or int(raw) < minimum:
        raise EndpointError(url, name, f"{raw!r} is not a whole number >= {minimum}")
    return int(raw)


def _decimal(
    url: str, params: Mapping[str, str], name: str, default: float, minimum: float
) -> float:
    raw = params.get(name)
    if raw is None:
        return default
    if (
        not _UNSIGNED_DECIMAL.fullmatch(raw)
        or not math.isfinite(float(raw))
        or float(raw) < minimum
    ):
        raise EndpointError(url, name, f"{raw!r} is not a number >= {minimum:g}")
    return float(raw)


def validate_encoding(name: str) -> str:
    """The Python codec name for a Medplum/iconv charset name; ValueError if unusable.

    The codec must be a text encoding that keeps ASCII (and so the MLLP framing bytes
    VT/FS/CR and the HL7 delimiters) byte-for-byte: UTF-16/32 and EBCDIC are refused.
    """
    try:
        info = codecs.lookup(name)
        probe = _FRAMING_PROBE.encode(info.name)
    except LookupError:
        raise ValueError(
            f"{name!r} is not a known text encoding (e.g. utf-8, latin1, windows-1252)"
        ) from None
    if probe != _FRAMING_PROBE.encode("ascii"):
        raise ValueError(
            f"{name!r} is not ASCII-compatible; MLLP framing needs an ASCII-compatible encoding"
        )
    return info.name


def _encoding(url: str, params: Mapping[str, str]) -> str:
    raw = params.get("encoding")
    if raw is None:
        return "utf-8"
    try:
        return validate_encoding(raw)
    except ValueError as exc:
        raise EndpointError(url, "encoding", str(exc)) from None


_ENHANCED_MODES: Mapping[str, AckMode] = MappingProxyType(
    {"true": AckMode.TWO_PHASE, "aa": AckMode.FAST}
)


def _ack_mode(url: str, params: Mapping[str, str]) -> AckMode:
    enhanced_raw = params.get("enhanced")
    enhanced: AckMode | None = None
    if enhanced_raw is not None:
        enhanced = _ENHANCED_MODES.get(enhanced_raw.lower())
        if enhanced is None:
            raise EndpointError(
                url,
                "enhanced",
                f"{enhanced_raw!r} is not 'true' (two-phase) or 'aa' (fast); "
                "omit it for original mode",
            )
    explicit = (
        _choice(url, params, "ackMode", AckMode, AckMode.ORIGINAL) if "ackMode" in params else None
    )
    if enhanced is not None and explicit is not None and enhanced is not explicit:
        raise EndpointError(
            url,
            "ackMode",
            f"ackMode={explicit.value} conflicts with enhanced={enhanced_raw} "
            f"(which means {enhanced.value}); give one",
        )
    return explicit or enhanced or AckMode.ORIGINAL


# --------------------------------------------------------------------------- public parsers


def parse_endpoint(url: str) -> Endpoint:
    """Parse a listener URL; check scheme, host, port, parameter names and values.

    The scheme's kind comes from the registry (``channels.base.channel_kind``): its
    ``parameters`` are the accepted names (an unknown one gets a "did you mean" hint) and its
    ``parse_options`` checks every value, so building the options later cannot fail. Raises
    EndpointError. Schemes whose kind module does not exist yet fall back to the deprecated
    tables above.
    """
    from medagent.channels.base import (
        BUILTIN_KIND_MODULES,
        UnknownChannelKind,
        channel_kind,
        known_schemes,
    )

    parts = _split(url, allow_path=True)
    scheme = parts.scheme
    try:
        kind = channel_kind(scheme)
    except UnknownChannelKind:
        kind = None
    except ModuleNotFoundError as exc:
        if exc.name != BUILTIN_KIND_MODULES.get(scheme):
            raise  # the kind's module exists but cannot import a dependency: a real error
        kind = None
    if kind is None:
        if scheme in ACCEPTED_PARAMETERS:
            return _parse_legacy(url, parts)
        if scheme in BUILTIN_KIND_MODULES:
            raise EndpointError(url, None, f"{scheme}:// channels are not available in this version")
        known = ", ".join(sorted(set(known_schemes()) | set(ACCEPTED_PARAMETERS)))
        raise EndpointError(url, None, f"unknown scheme {scheme!r}; expected one of: {known}")
    if kind.needs_port:
        if parts.path not in ("", "/"):
            raise EndpointError(url, None, f"a path ({parts.path!r}) is not allowed; use scheme://host:port?params")
        host, port = _host_and_port(url, parts, allow_port_zero=True)
        path = ""
    else:
        host, port, path = parts.hostname or "", _optional_port(url, parts), parts.path
        if not path and not host:
            raise EndpointError(url, None, f"the device is missing (e.g. {scheme}:///dev/ttyUSB0)")
    params = _query(url, parts, tuple(kind.parameters))
    endpoint = Endpoint(scheme=scheme, host=host, port=port, params=MappingProxyType(params), url=url, path=path)
    kind.parse_options(endpoint)
    return endpoint


def _optional_port(url: str, parts: SplitResult) -> int:
    try:
        return parts.port or 0
    except ValueError:
        raise EndpointError(url, None, "the port must be a number from 0 to 65535") from None


def _parse_legacy(url: str, parts: SplitResult) -> Endpoint:
    """DEPRECATED: parse with this module's own per-scheme tables (kinds not registered yet)."""
    scheme = parts.scheme
    if parts.path not in ("", "/"):
        raise EndpointError(url, None, f"a path ({parts.path!r}) is not allowed; use scheme://host:port?params")
    host, port = _host_and_port(url, parts, allow_port_zero=True)
    params = _query(url, parts, ACCEPTED_PARAMETERS[scheme])
    endpoint = Endpoint(
        scheme=scheme, host=host, port=port, params=MappingProxyType(params), url=url
    )
    _SCHEME_CHECKS.get(scheme, _no_check)(endpoint)
    return endpoint


def _require_scheme(endpoint: Endpoint, scheme: str) -> None:
    if endpoint.scheme != scheme:
        raise EndpointError(
            endpoint.url,
            None,
            f"expected an endpoint with scheme {scheme}://, got {endpoint.scheme}://",
        )


def mllp_options(endpoint: Endpoint) -> MllpOptions:
    """Typed options of an ``mllp://`` endpoint; every value is checked (EndpointError)."""
    _require_scheme(endpoint, "mllp")
    from medagent.channels.tls import listener_tls  # tls imports this module

    listener_tls(endpoint)  # shape checks of the tls* parameters (files are read at start)
    url, params = endpoint.url, endpoint.params
    defaults = MllpOptions()
    messages_per_min = (
        _integer(url, params, "messagesPerMin", 0, 1) if "messagesPerMin" in params else None
    )
    base_delay = _integer(url, params, "autoRetryBaseDelayMs", defaults.retry_base_delay_ms, 0)
    max_delay = _integer(
        url, params, "autoRetryMaxDelayMs", max(defaults.retry_max_delay_ms, base_delay), 0
    )
    if max_delay < base_delay:
        raise EndpointError(
            url, "autoRetryMaxDelayMs", f"{max_delay} is below autoRetryBaseDelayMs ({base_delay})"
        )
    return MllpOptions(
        ack_mode=_ack_mode(url, params),
        app_level_ack=_choice(url, params, "appLevelAck", AppLevelAck, defaults.app_level_ack),
        encoding=_encoding(url, params),
        assign_seq_no=_boolean(url, params, "assignSeqNo", defaults.assign_seq_no),
        messages_per_min=messages_per_min,
        duplicate_behavior=_choice(
            url, params, "duplicateBehavior", DuplicateBehavior, defaults.duplicate_behavior
        ),
        max_frame_size=_integer(url, params, "maxFrameSize", defaults.max_frame_size, 1),
        max_connections=_integer(url, params, "maxConnections", defaults.max_connections, 1),
        idle_timeout_s=_integer(
            url, params, "idleTimeoutMs", int(defaults.idle_timeout_s * 1000), 0
        )
        / 1000,
        response_timeout_s=_integer(
            url, params, "responseTimeoutMs", int(defaults.response_timeout_s * 1000), 1
        )
        / 1000,
        first_message_timeout_s=_integer(
            url, params, "firstMessageTimeoutMs", int(defaults.first_message_timeout_s * 1000), 0
        )
        / 1000,
        max_connections_per_address=_integer(
            url, params, "maxConnectionsPerAddress", defaults.max_connections_per_address, 0
        ),
        retry_base_delay_ms=base_delay,
        retry_max_delay_ms=max_delay,
        retry_max_attempts=_integer(
            url, params, "autoRetryMaxAttempts", defaults.retry_max_attempts, 0
        ),
        retry_backoff_multiplier=_decimal(
            url, params, "autoRetryBackoffMultiplier", defaults.retry_backoff_multiplier, 1.0
        ),
        retry_mode=_choice(url, params, "retryMode", RetryMode, defaults.retry_mode),
    )


def dicom_options(endpoint: Endpoint) -> DicomOptions:  # DEPRECATED (see ACCEPTED_PARAMETERS)
    """Typed options of a ``dicom://`` endpoint (``aet``: our AE title, 1-16 chars)."""
    _require_scheme(endpoint, "dicom")
    ae_title = endpoint.params.get("aet", DicomOptions().ae_title)
    if not _AE_TITLE.fullmatch(ae_title) or not ae_title.strip():
        raise EndpointError(
            endpoint.url,
            "aet",
            f"{ae_title!r} is not a DICOM AE title (1-16 printable chars, no '\\')",
        )
    return DicomOptions(ae_title=ae_title.strip())


def _framing_byte(endpoint: Endpoint, name: str) -> int:
    raw = endpoint.params.get(name)
    if raw is None:
        raise EndpointError(
            endpoint.url,
            name,
            "required for tcp:// endpoints (URL-encode control characters, e.g. %02)",
        )
    if len(raw) != 1 or ord(raw) > 0xFF:
        raise EndpointError(
            endpoint.url, name, f"{raw!r} is not a single character with a byte value (0-255)"
        )
    return ord(raw)


def bytestream_options(endpoint: Endpoint) -> ByteStreamOptions:  # DEPRECATED (see ACCEPTED_PARAMETERS)
    """Start/end framing bytes of a ``tcp://`` endpoint (both required, and different)."""
    _require_scheme(endpoint, "tcp")
    start, end = _framing_byte(endpoint, "startChar"), _framing_byte(endpoint, "endChar")
    if start == end:
        raise EndpointError(endpoint.url, "endChar", "must differ from startChar")
    return ByteStreamOptions(start_byte=start, end_byte=end)


def _no_check(endpoint: Endpoint) -> None:
    return None


_SCHEME_CHECKS: Mapping[str, Callable[[Endpoint], object]] = MappingProxyType(
    {"mllp": mllp_options, "tcp": bytestream_options, "dicom": dicom_options}
)


def parse_remote(url: str) -> RemoteTarget:
    """Parse an outbound ``mllp://host:port?encoding=...&defaultReturnAck=first|application``.

    ``keepAlive=true|false`` overrides the agent-wide keep-alive for this remote. Medplum falls
    back to ``first`` on a bad ``defaultReturnAck``; medagent raises EndpointError instead.
    """
    parts = _split(url)
    if parts.scheme != "mllp":
        raise EndpointError(
            url,
            None,
            f"outbound remotes must be mllp:// addresses, not {parts.scheme or '(none)'}://",
        )
    host, port = _host_and_port(url, parts, allow_port_zero=False)
    if host in _WILDCARD_HOSTS:
        raise EndpointError(url, None, f"{host} is a listen address, not a destination host")
    params = _query(url, parts, _REMOTE_PARAMETERS)
    keep_alive = _boolean(url, params, "keepAlive", False) if "keepAlive" in params else None
    from medagent.channels.tls import remote_tls  # tls imports this module

    return RemoteTarget(
        host=host,
        port=port,
        encoding=_encoding(url, params),
        default_return_ack=_choice(url, params, "defaultReturnAck", ReturnAck, ReturnAck.FIRST),
        keep_alive=keep_alive,
        url=url,
        tls=remote_tls(url, MappingProxyType(params)),
    )


_QUEUE_POLICY_FOR: Mapping[DuplicateBehavior, str] = MappingProxyType(
    {
        DuplicateBehavior.FLAG: "FLAG",
        DuplicateBehavior.REJECT: "FLAG",
        DuplicateBehavior.DROP: "DROP",
        DuplicateBehavior.OFF: "OFF",
    }
)


def queue_duplicate_policy_name(behavior: DuplicateBehavior) -> str:
    """Name of the queue's ``DuplicatePolicy`` member (OFF/FLAG/DROP) for a channel behaviour.

    The queue only detects; the channel decides the reply. FLAG and REJECT both need the queue
    to flag duplicates (the channel then replays the stored ACK or rejects); DROP lets the
    queue discard them; OFF disables detection. Use as ``DuplicatePolicy[name]``.
    """
    return _QUEUE_POLICY_FOR[behavior]


# --------------------------------------------------------------------------- for channel kinds
# Public value parsers for the kinds' own ``parse_options`` (channels/base.py ChannelKind): every
# error names the URL and the parameter, like the MLLP options above.


def bool_param(endpoint: Endpoint, name: str, default: bool) -> bool:
    return _boolean(endpoint.url, endpoint.params, name, default)


def int_param(endpoint: Endpoint, name: str, default: int, minimum: int = 0) -> int:
    return _integer(endpoint.url, endpoint.params, name, default, minimum)


def decimal_param(endpoint: Endpoint, name: str, default: float, minimum: float = 0.0) -> float:
    return _decimal(endpoint.url, endpoint.params, name, default, minimum)


def choice_param(endpoint: Endpoint, name: str, enum_type: type[_E], default: _E) -> _E:
    return _choice(endpoint.url, endpoint.params, name, enum_type, default)


def encoding_param(endpoint: Endpoint) -> str:
    """The ``encoding`` parameter as a Python codec name (ASCII-compatible), default utf-8."""
    return _encoding(endpoint.url, endpoint.params)
