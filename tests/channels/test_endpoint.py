"""Endpoint and remote URL parsing: every parameter, the ACK mode table, and every refusal."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from medagent.channels import base
from medagent.channels.endpoint import (
    ACCEPTED_PARAMETERS,
    MLLP_PARAMETERS,
    SUPPORTED_CHANNEL_KINDS,
    AckMode,
    AppLevelAck,
    DuplicateBehavior,
    Endpoint,
    EndpointError,
    MllpOptions,
    RetryMode,
    ReturnAck,
    bool_param,
    bytestream_options,
    choice_param,
    decimal_param,
    dicom_options,
    encoding_param,
    int_param,
    mllp_options,
    parse_endpoint,
    parse_remote,
    queue_duplicate_policy_name,
    redact_url,
    validate_encoding,
)

BASE = "mllp://127.0.0.1:2575"


def options(query: str = "") -> MllpOptions:
    return mllp_options(parse_endpoint(f"{BASE}?{query}" if query else BASE))


def refused(url: str) -> EndpointError:
    with pytest.raises(EndpointError) as info:
        endpoint = parse_endpoint(url)
        mllp_options(endpoint)
    return info.value


# --------------------------------------------------------------------------- address part


def test_plain_mllp_endpoint_has_the_documented_defaults() -> None:
    endpoint = parse_endpoint(BASE)
    assert (endpoint.scheme, endpoint.host, endpoint.port, dict(endpoint.params)) == (
        "mllp",
        "127.0.0.1",
        2575,
        {},
    )
    assert endpoint.url == BASE
    assert mllp_options(endpoint) == MllpOptions()
    defaults = MllpOptions()
    assert defaults.ack_mode is AckMode.ORIGINAL
    assert defaults.app_level_ack is AppLevelAck.AL
    assert defaults.encoding == "utf-8"
    assert defaults.assign_seq_no is False and defaults.messages_per_min is None
    assert defaults.duplicate_behavior is DuplicateBehavior.FLAG
    assert defaults.max_frame_size == 16 * 1024 * 1024
    assert defaults.max_connections == 100
    assert defaults.idle_timeout_s == 600.0 and defaults.response_timeout_s == 10.0
    assert (defaults.retry_base_delay_ms, defaults.retry_max_delay_ms) == (1000, 60_000)
    assert (defaults.retry_max_attempts, defaults.retry_backoff_multiplier) == (0, 2.0)
    assert defaults.retry_mode is RetryMode.GUARANTEED


def test_endpoint_is_immutable_and_hashable() -> None:
    endpoint = parse_endpoint(f"{BASE}?ackMode=fast")
    assert endpoint == parse_endpoint(f"{BASE}?ackMode=fast")
    assert hash(endpoint) == hash(parse_endpoint(f"{BASE}?ackMode=fast"))
    with pytest.raises(TypeError):
        endpoint.params["ackMode"] = "immediate"  # type: ignore[index]
    with pytest.raises(AttributeError):
        endpoint.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("url", "host", "port", "wildcard"),
    [
        ("mllp://0.0.0.0:2575", "0.0.0.0", 2575, True),
        ("mllp://[::]:2575", "::", 2575, True),
        ("mllp://[::1]:2575", "::1", 2575, False),
        ("mllp://Device.Example.org:65535", "device.example.org", 65535, False),
        ("mllp://127.0.0.1:0", "127.0.0.1", 0, False),
        ("MLLP://127.0.0.1:2575/", "127.0.0.1", 2575, False),
    ],
)
def test_host_and_port(url: str, host: str, port: int, wildcard: bool) -> None:
    endpoint = parse_endpoint(url)
    assert (endpoint.host, endpoint.port, endpoint.binds_all_interfaces) == (host, port, wildcard)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (" mllp://h:1", "whitespace"),
        ("mllp://h", "port is missing"),
        ("mllp://h:", "port is missing"),
        ("mllp://:2575", "host is missing"),
        ("mllp://h:65536", "0 to 65535"),
        ("mllp://h:-1", "0 to 65535"),
        ("mllp://h:abc", "0 to 65535"),
        ("mllp://h:1/path", "path"),
        ("mllp://h:1#frag", "fragment"),
        ("http://h:1", "unknown scheme 'http'"),
        ("h:1", "unknown scheme"),
        ("mllp://h:1?enhanced", "malformed"),
        ("mllp://h:1?&&", "malformed"),
    ],
)
def test_bad_addresses_are_refused(url: str, fragment: str) -> None:
    assert fragment in str(refused(url))


def test_credentials_are_refused_and_masked() -> None:
    error = refused("mllp://alice:s3cret@h:2575?ackMode=fast")
    assert "s3cret" not in str(error) and "alice" not in str(error)
    assert "***@h:2575" in str(error) and error.url == "mllp://***@h:2575?ackMode=fast"
    assert "credentials" in str(error)


def test_redact_url() -> None:
    assert redact_url("https://u:p@hub.example.org/x?y=1") == "https://***@hub.example.org/x?y=1"
    assert redact_url("https://hub.example.org/a@b") == "https://hub.example.org/a@b"
    assert redact_url("not a url") == "not a url"


# --------------------------------------------------------------------------- parameter names


def test_unknown_parameter_is_refused_with_the_accepted_list() -> None:
    error = refused(f"{BASE}?enhancd=true")
    assert error.parameter == "enhancd"
    assert "unknown parameter" in str(error)
    for name in ACCEPTED_PARAMETERS["mllp"]:
        assert name in str(error)
    assert BASE in str(error)


def test_parameter_names_are_case_sensitive() -> None:
    assert refused(f"{BASE}?Encoding=utf-8").parameter == "Encoding"


def test_repeated_parameter_is_refused() -> None:
    error = refused(f"{BASE}?encoding=utf-8&encoding=latin1")
    assert error.parameter == "encoding" and "more than once" in str(error)


@pytest.mark.parametrize("name", ["maxWorkers", "logicalChannelKey"])
def test_unimplemented_medplum_parameters_are_refused_with_a_reason(name: str) -> None:
    error = refused(f"{BASE}?{name}=1")
    assert error.parameter == name and "not implemented by medagent" in str(error)


# --------------------------------------------------------------------------- ACK mode table


@pytest.mark.parametrize(
    ("query", "mode"),
    [
        ("", AckMode.ORIGINAL),
        ("ackMode=original", AckMode.ORIGINAL),
        ("enhanced=true", AckMode.TWO_PHASE),
        ("enhanced=TRUE", AckMode.TWO_PHASE),
        ("ackMode=two-phase", AckMode.TWO_PHASE),
        ("enhanced=aa", AckMode.FAST),
        ("enhanced=AA", AckMode.FAST),
        ("ackMode=fast", AckMode.FAST),
        ("ackMode=FAST", AckMode.FAST),
        ("ackMode=immediate", AckMode.IMMEDIATE),
        ("enhanced=true&ackMode=two-phase", AckMode.TWO_PHASE),
        ("enhanced=aa&ackMode=fast", AckMode.FAST),
    ],
)
def test_ack_mode_table(query: str, mode: AckMode) -> None:
    assert options(query).ack_mode is mode


@pytest.mark.parametrize(
    "query",
    [
        "enhanced=true&ackMode=fast",
        "enhanced=aa&ackMode=two-phase",
        "enhanced=aa&ackMode=immediate",
        "enhanced=true&ackMode=original",
        "enhanced=aa&ackMode=original",
    ],
)
def test_conflicting_enhanced_and_ack_mode_are_refused(query: str) -> None:
    error = refused(f"{BASE}?{query}")
    assert error.parameter == "ackMode" and "conflicts with enhanced" in str(error)


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("enhanced=false", "enhanced"),
        ("enhanced=", "enhanced"),
        ("enhanced=yes", "enhanced"),
        ("ackMode=twophase", "ackMode"),
        ("ackMode=", "ackMode"),
    ],
)
def test_bad_mode_values_are_refused(query: str, parameter: str) -> None:
    assert refused(f"{BASE}?{query}").parameter == parameter


# --------------------------------------------------------------------------- every other parameter


@pytest.mark.parametrize(
    ("query", "attribute", "expected"),
    [
        ("appLevelAck=AL", "app_level_ack", AppLevelAck.AL),
        ("appLevelAck=ne", "app_level_ack", AppLevelAck.NE),
        ("appLevelAck=ER", "app_level_ack", AppLevelAck.ER),
        ("appLevelAck=Su", "app_level_ack", AppLevelAck.SU),
        ("assignSeqNo=true", "assign_seq_no", True),
        ("assignSeqNo=TRUE", "assign_seq_no", True),
        ("assignSeqNo=false", "assign_seq_no", False),
        ("messagesPerMin=1", "messages_per_min", 1),
        ("messagesPerMin=600", "messages_per_min", 600),
        ("duplicateBehavior=idempotent", "duplicate_behavior", DuplicateBehavior.FLAG),
        ("duplicateBehavior=flag", "duplicate_behavior", DuplicateBehavior.FLAG),
        ("duplicateBehavior=reject", "duplicate_behavior", DuplicateBehavior.REJECT),
        ("duplicateBehavior=drop", "duplicate_behavior", DuplicateBehavior.DROP),
        ("duplicateBehavior=OFF", "duplicate_behavior", DuplicateBehavior.OFF),
        ("retryMode=none", "retry_mode", RetryMode.NONE),
        ("retryMode=normal", "retry_mode", RetryMode.NORMAL),
        ("retryMode=guaranteed", "retry_mode", RetryMode.GUARANTEED),
        ("autoRetryBaseDelayMs=0", "retry_base_delay_ms", 0),
        ("autoRetryBaseDelayMs=250", "retry_base_delay_ms", 250),
        ("autoRetryMaxDelayMs=5000", "retry_max_delay_ms", 5000),
        ("autoRetryMaxAttempts=0", "retry_max_attempts", 0),
        ("autoRetryMaxAttempts=5", "retry_max_attempts", 5),
        ("autoRetryBackoffMultiplier=1", "retry_backoff_multiplier", 1.0),
        ("autoRetryBackoffMultiplier=1.5", "retry_backoff_multiplier", 1.5),
        ("maxFrameSize=1048576", "max_frame_size", 1048576),
        ("maxConnections=1", "max_connections", 1),
        ("idleTimeoutMs=0", "idle_timeout_s", 0.0),
        ("idleTimeoutMs=1500", "idle_timeout_s", 1.5),
        ("responseTimeoutMs=250", "response_timeout_s", 0.25),
    ],
)
def test_each_mllp_parameter(query: str, attribute: str, expected: object) -> None:
    assert getattr(options(query), attribute) == expected


def test_max_delay_defaults_up_to_a_larger_base_delay() -> None:
    opts = options("autoRetryBaseDelayMs=90000")
    assert (opts.retry_base_delay_ms, opts.retry_max_delay_ms) == (90000, 90000)


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("appLevelAck=XX", "appLevelAck"),
        ("assignSeqNo=1", "assignSeqNo"),
        ("assignSeqNo=", "assignSeqNo"),
        ("messagesPerMin=0", "messagesPerMin"),
        ("messagesPerMin=-5", "messagesPerMin"),
        ("messagesPerMin=1.5", "messagesPerMin"),
        ("messagesPerMin=1_000", "messagesPerMin"),
        ("duplicateBehavior=ignore", "duplicateBehavior"),
        ("retryMode=always", "retryMode"),
        ("autoRetryBaseDelayMs=abc", "autoRetryBaseDelayMs"),
        ("autoRetryMaxDelayMs=10&autoRetryBaseDelayMs=20", "autoRetryMaxDelayMs"),
        ("autoRetryMaxAttempts=-1", "autoRetryMaxAttempts"),
        ("autoRetryBackoffMultiplier=0.5", "autoRetryBackoffMultiplier"),
        ("autoRetryBackoffMultiplier=nan", "autoRetryBackoffMultiplier"),
        ("maxFrameSize=0", "maxFrameSize"),
        ("maxConnections=0", "maxConnections"),
        ("idleTimeoutMs=1.5", "idleTimeoutMs"),
        ("responseTimeoutMs=0", "responseTimeoutMs"),
    ],
)
def test_bad_parameter_values_are_refused_by_name(query: str, parameter: str) -> None:
    error = refused(f"{BASE}?{query}")
    assert error.parameter == parameter
    assert f"parameter {parameter!r}" in str(error) and BASE in str(error)


# --------------------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("utf-8", "utf-8"),
        ("UTF-8", "utf-8"),
        ("utf8", "utf-8"),
        ("latin1", "iso8859-1"),
        ("ISO-8859-1", "iso8859-1"),
        ("iso-8859-15", "iso8859-15"),
        ("windows-1252", "cp1252"),
        ("us-ascii", "ascii"),
        ("shift_jis", "shift_jis"),
        ("gb18030", "gb18030"),
    ],
)
def test_medplum_encoding_names_map_to_python_codecs(name: str, codec: str) -> None:
    assert options(f"encoding={name}").encoding == codec
    assert validate_encoding(name) == codec


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("no-such-charset", "not a known text encoding"),
        ("base64", "not a known text encoding"),
        ("rot13", "not a known text encoding"),
        ("utf-16", "not ASCII-compatible"),
        ("utf-32", "not ASCII-compatible"),
        ("cp500", "not ASCII-compatible"),
        ("", "not a known text encoding"),
    ],
)
def test_unusable_encodings_are_refused(name: str, fragment: str) -> None:
    error = refused(f"{BASE}?encoding={name}")
    assert error.parameter == "encoding" and fragment in str(error)


# --------------------------------------------------------------------------- other channel kinds


def test_only_mllp_is_supported_in_this_version() -> None:
    assert SUPPORTED_CHANNEL_KINDS == {"mllp"}  # deprecated table, kept for its importers


# The dicom/tcp/astm options below are the DEPRECATED fallback of parse_endpoint for schemes whose
# kind module is not importable; `legacy` makes a scheme's module absent to exercise it. The
# kinds' own options are tested with their modules (tests/dicom, tests/astm, ...).


@pytest.fixture
def legacy(monkeypatch: pytest.MonkeyPatch) -> None:
    for scheme in ("dicom", "tcp", "astm"):
        monkeypatch.setitem(base.BUILTIN_KIND_MODULES, scheme, f"medagent.channels._absent_{scheme}")  # type: ignore[index]
        monkeypatch.delitem(base._KINDS, scheme, raising=False)


def test_dicom_endpoint(legacy: None) -> None:
    endpoint = parse_endpoint("dicom://0.0.0.0:11112?aet=MEDAGENT")
    assert endpoint.scheme == "dicom" and dicom_options(endpoint).ae_title == "MEDAGENT"
    assert dicom_options(parse_endpoint("dicom://0.0.0.0:11112")).ae_title == "MEDAGENT"
    assert dicom_options(parse_endpoint("dicom://h:1?aet=PACS_1")).ae_title == "PACS_1"
    for bad in ("SEVENTEEN_CHARS_XX", "A%5CB", "%20%20"):
        with pytest.raises(EndpointError, match="'aet'"):
            parse_endpoint(f"dicom://h:1?aet={bad}")
    with pytest.raises(EndpointError, match="'encoding'"):
        parse_endpoint("dicom://h:1?encoding=utf-8")


def test_tcp_bytestream_endpoint_decodes_framing_characters(legacy: None) -> None:
    endpoint = parse_endpoint("tcp://0.0.0.0:9000?startChar=%02&endChar=%03")
    framing = bytestream_options(endpoint)
    assert (framing.start_byte, framing.end_byte) == (0x02, 0x03)
    assert bytestream_options(
        parse_endpoint("tcp://h:1?startChar=%3C&endChar=%3E")
    ).end_byte == ord(">")


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("endChar=%03", "startChar"),
        ("startChar=%02", "endChar"),
        ("startChar=ab&endChar=%03", "startChar"),
        ("startChar=&endChar=%03", "startChar"),
        ("startChar=%E2%82%AC&endChar=%03", "startChar"),
        ("startChar=%02&endChar=%02", "endChar"),
        ("startChar=%02&endChar=%03&encoding=utf-8", "encoding"),
    ],
)
def test_bad_tcp_framing_is_refused(legacy: None, query: str, parameter: str) -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint(f"tcp://h:1?{query}")
    assert info.value.parameter == parameter


def test_astm_endpoint_takes_no_parameters(legacy: None) -> None:
    assert parse_endpoint("astm://0.0.0.0:5000").scheme == "astm"
    with pytest.raises(EndpointError, match="accepted parameters are: none"):
        parse_endpoint("astm://0.0.0.0:5000?encoding=latin1")


def test_options_functions_check_the_scheme(legacy: None) -> None:
    with pytest.raises(EndpointError, match="mllp://"):
        mllp_options(parse_endpoint("astm://h:1"))
    with pytest.raises(EndpointError, match="dicom://"):
        dicom_options(parse_endpoint(BASE))


# --------------------------------------------------------------------------- the kind registry


@dataclass(frozen=True)
class _ProbeOptions:
    level: int


def _probe_options(endpoint: Endpoint) -> _ProbeOptions:
    return _ProbeOptions(int_param(endpoint, "level", 1, minimum=1))


@pytest.fixture
def probe_kind(monkeypatch: pytest.MonkeyPatch) -> base.ChannelKind:
    """A plug-in kind registered for the test (the registry's documented use), removed after."""
    kind = base.ChannelKind(scheme="x-probe", parameters=("level", "deviceName"), parse_options=_probe_options,
                            create=lambda *args: None)  # type: ignore[arg-type,return-value]
    monkeypatch.setitem(base._KINDS, "x-probe", kind)
    serial = base.ChannelKind(scheme="x-serial", parameters=("baud",), parse_options=lambda e: None,
                              create=lambda *args: None, needs_port=False)  # type: ignore[arg-type,return-value]
    monkeypatch.setitem(base._KINDS, "x-serial", serial)
    return kind


def test_parse_endpoint_takes_names_and_checks_from_the_registered_kind(probe_kind: base.ChannelKind) -> None:
    endpoint = parse_endpoint("x-probe://h:7?level=3")
    assert (endpoint.scheme, endpoint.host, endpoint.port, dict(endpoint.params)) == ("x-probe", "h", 7, {"level": "3"})
    with pytest.raises(EndpointError) as info:  # the kind's parse_options checks the value
        parse_endpoint("x-probe://h:7?level=0")
    assert info.value.parameter == "level"
    with pytest.raises(EndpointError) as info:  # names come from kind.parameters
        parse_endpoint("x-probe://h:7?encoding=utf-8")
    assert info.value.parameter == "encoding" and "level, deviceName" in str(info.value)


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        (f"{BASE}?ackmode=fast", "did you mean 'ackMode'?"),
        (f"{BASE}?enhancd=true", "did you mean 'enhanced'?"),
        (f"{BASE}?maxFrameSise=10", "did you mean 'maxFrameSize'?"),
        ("x-probe://h:1?devicename=a", "did you mean 'deviceName'?"),
        ("x-probe://h:1?lvl=2", "did you mean 'level'?"),
    ],
)
def test_unknown_parameter_gets_a_did_you_mean_hint(probe_kind: base.ChannelKind, url: str, hint: str) -> None:
    with pytest.raises(EndpointError) as info:
        parse_endpoint(url)
    assert hint in str(info.value) and "unknown parameter" in str(info.value)


def test_no_hint_for_a_name_far_from_every_parameter() -> None:
    assert "did you mean" not in str(refused(f"{BASE}?zzz=1"))


def test_kinds_addressed_by_a_device_path(probe_kind: base.ChannelKind) -> None:
    endpoint = parse_endpoint("x-serial:///dev/ttyUSB0?baud=9600")
    assert (endpoint.host, endpoint.port, endpoint.path) == ("", 0, "/dev/ttyUSB0")
    with pytest.raises(EndpointError, match="device is missing"):
        parse_endpoint("x-serial://")
    assert parse_endpoint(BASE).path == ""


def test_mllp_is_the_registered_kind_and_mllps_is_not_available() -> None:
    kind = base.channel_kind("mllp")
    assert kind.parameters == MLLP_PARAMETERS and kind.parse_options is mllp_options
    with pytest.raises(EndpointError, match="not available in this version"):
        parse_endpoint("mllps://h:1")
    with pytest.raises(EndpointError, match="unknown scheme 'gopher'; expected one of: .*mllp"):
        parse_endpoint("gopher://h:1")


def test_public_value_parsers_name_the_url_and_parameter() -> None:
    endpoint = parse_endpoint(f"{BASE}?encoding=latin1&assignSeqNo=true")
    assert bool_param(endpoint, "assignSeqNo", False) is True
    assert int_param(endpoint, "missing", 5) == 5 and decimal_param(endpoint, "missing", 1.5) == 1.5
    assert choice_param(endpoint, "missing", AckMode, AckMode.FAST) is AckMode.FAST
    assert encoding_param(endpoint) == "iso8859-1"
    with pytest.raises(EndpointError) as info:
        bool_param(endpoint, "encoding", False)
    assert info.value.parameter == "encoding" and BASE in str(info.value)


# --------------------------------------------------------------------------- remotes


def test_parse_remote_defaults() -> None:
    target = parse_remote("mllp://10.1.2.50:2575")
    assert (target.host, target.port, target.encoding) == ("10.1.2.50", 2575, "utf-8")
    assert target.default_return_ack is ReturnAck.FIRST and target.keep_alive is None
    assert target.url == "mllp://10.1.2.50:2575"


def test_parse_remote_parameters() -> None:
    target = parse_remote(
        "mllp://lab.local:2575?encoding=latin1&defaultReturnAck=application&keepAlive=true"
    )
    assert (target.host, target.encoding) == ("lab.local", "iso8859-1")
    assert target.default_return_ack is ReturnAck.APPLICATION and target.keep_alive is True
    assert parse_remote("mllp://h:1?keepAlive=false").keep_alive is False
    assert parse_remote("mllp://h:1?defaultReturnAck=FIRST").default_return_ack is ReturnAck.FIRST


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mllp://h:1?defaultReturnAck=last", "'defaultReturnAck'"),
        ("mllp://h:1?encoding=utf-16", "'encoding'"),
        ("mllp://h:1?keepAlive=maybe", "'keepAlive'"),
        ("mllp://h:1?enhanced=aa", "unknown parameter"),
        ("mllp://h", "port is missing"),
        ("mllp://h:0", "1 to 65535"),
        ("mllp://0.0.0.0:2575", "listen address"),
        ("tcp://h:1", "must be mllp://"),
        ("mllp://u:pw@h:1", "credentials"),
    ],
)
def test_bad_remotes_are_refused(url: str, fragment: str) -> None:
    with pytest.raises(EndpointError) as info:
        parse_remote(url)
    assert fragment in str(info.value) and "pw@" not in str(info.value)


# --------------------------------------------------------------------------- queue mapping


@pytest.mark.parametrize(
    ("behavior", "policy"),
    [
        (DuplicateBehavior.FLAG, "FLAG"),
        (DuplicateBehavior.REJECT, "FLAG"),
        (DuplicateBehavior.DROP, "DROP"),
        (DuplicateBehavior.OFF, "OFF"),
    ],
)
def test_queue_duplicate_policy_name(behavior: DuplicateBehavior, policy: str) -> None:
    assert queue_duplicate_policy_name(behavior) == policy


def test_idempotent_is_an_alias_of_flag() -> None:
    assert DuplicateBehavior("idempotent") is DuplicateBehavior.FLAG
    assert isinstance(parse_endpoint(BASE), Endpoint)
