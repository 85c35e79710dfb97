"""HL7 v2 header scan, segments, charsets and ACKs over the corpus in tests/data (both twins)."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from testsupport import DATA_DIR, pick

from medagent.proto import _hl7_py, hl7
from medagent.proto.hl7 import Hl7Error


def _load_corpus_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hl7_corpus", DATA_DIR / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


corpus = _load_corpus_module()
TS = "20240102030405"
CID = "CTRL0001"


def data(name: str) -> bytes:
    return (DATA_DIR / name).read_bytes()


@pytest.fixture(scope="module")
def big_mdm() -> bytes:
    """MDM^T02 with a 5 MiB base64 OBX-5 (generated, not stored)."""
    return corpus.mdm_t02(5 * 1024 * 1024)


@pytest.fixture
def parse_header(impl: str) -> Callable[[bytes], Any]:
    return pick(hl7, "parse_header", impl)


@pytest.fixture
def build_ack(impl: str) -> Callable[..., bytes]:
    return pick(hl7, "build_ack", impl)


@pytest.fixture
def split_segments(impl: str) -> Callable[[bytes], list[bytes]]:
    return pick(hl7, "split_segments", impl)


@pytest.fixture
def decode(impl: str) -> Callable[..., str]:
    return pick(hl7, "decode", impl)


def ack_segments(ack: bytes, separator: str = "|", encoding: str = "latin-1") -> list[list[str]]:
    text = ack.decode(encoding)
    assert text.endswith("\r") and "\n" not in text
    return [segment.split(separator) for segment in text[:-1].split("\r")]


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(corpus.CORPUS))
def test_corpus_files_match_generator(name: str) -> None:
    try:
        expected = corpus.CORPUS[name]()
    except FileNotFoundError:
        pytest.skip("the load tools' msg.bin is not available here")
    assert data(name) == expected


def test_adt_is_the_625_byte_benchmark_message() -> None:
    message = data("adt_a01.hl7")
    assert len(message) == 625
    assert message.startswith(b"MSH|^~\\&|ADT1|") and message.endswith(b"\r")


# --------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------

EXPECTED_HEADERS: dict[str, dict[str, str]] = {
    "adt_a01.hl7": dict(
        field_separator="|", encoding_characters="^~\\&", sending_application="ADT1",
        sending_facility="GOOD HEALTH HOSPITAL", receiving_application="GHH LAB, INC.",
        receiving_facility="GOOD HEALTH HOSPITAL", timestamp="20240315083000",
        message_type="ADT^A01^ADT_A01", control_id="MSG000000000001", processing_id="P",
        version="2.5.1", accept_ack_type="", app_ack_type="", charset="", message_code="ADT",
        trigger_event="A01",
    ),
    "oru_r01_200obx.hl7": dict(
        message_type="ORU^R01^ORU_R01", control_id="ORU0000201", accept_ack_type="AL",
        app_ack_type="NE", message_code="ORU", trigger_event="R01",
    ),
    "orm_o01.hl7": dict(message_type="ORM^O01", version="2.3", trigger_event="O01"),
    "siu_s12.hl7": dict(message_type="SIU^S12^SIU_S12", control_id="SIU0000007"),
    "custom_separators.hl7": dict(
        field_separator="^", encoding_characters="~|\\&", sending_application="CUSTOMAPP",
        receiving_facility="RECVFAC", message_type="ADT~A04~ADT_A01", control_id="CUST0000001",
        processing_id="T", version="2.4", message_code="ADT", trigger_event="A04",
    ),
    "escapes.hl7": dict(
        sending_application="ESC\\F\\APP", sending_facility="FAC\\T\\1", control_id="ESC\\E\\0001"
    ),
    "utf8.hl7": dict(
        sending_application="SENDÉR".encode().decode("latin-1"),
        sending_facility="Hôpital Zürich".encode().decode("latin-1"),
        charset="UNICODE UTF-8",
    ),
    "latin1.hl7": dict(sending_facility="Hôpital", charset="8859/1", control_id="LAT10000001"),
    "utf16le_bom.hl7": dict(
        sending_facility="Klinik Köln", charset="UNICODE UTF-16", control_id="U16LE000001",
        trigger_event="A01",
    ),
    "lf_terminators.hl7": dict(control_id="LF000000001", version="2.5.1"),
    "crlf_terminators.hl7": dict(control_id="CRLF0000001", version="2.5.1"),
    "truncated_msh.hl7": dict(
        message_type="ADT^A08", control_id="TRUNC000001", processing_id="", version="",
        charset="", accept_ack_type="",
    ),
    "unknown_charset.hl7": dict(charset="KLINGON-8"),
    "iso2022_jp.hl7": dict(charset="", version="2.5"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_HEADERS))
def test_header_fields(parse_header: Callable[[bytes], Any], name: str) -> None:
    header = parse_header(data(name))
    fields = header.as_dict()
    for key, value in EXPECTED_HEADERS[name].items():
        assert getattr(header, key) == value, key
        assert fields[key] == value, key


def test_header_attributes_are_complete(parse_header: Callable[[bytes], Any]) -> None:
    header = parse_header(data("adt_a01.hl7"))
    assert set(header.as_dict()) == set(EXPECTED_HEADERS["adt_a01.hl7"])


def test_utf8_header_values_are_raw_bytes_as_latin1(parse_header: Callable[[bytes], Any]) -> None:
    header = parse_header(data("utf8.hl7"))
    assert header.sending_facility.encode("latin-1").decode("utf-8") == "Hôpital Zürich"


@pytest.mark.parametrize("name", sorted(corpus.CORPUS.keys() - {"no_msh.hl7"}))
def test_twins_give_equal_headers(name: str) -> None:
    if hl7.parse_headerC is None:
        pytest.skip("pure mode")
    py, c = hl7.parse_headerPy(data(name)), hl7.parse_headerC(data(name))
    assert py == c and c == py and not (c != py)
    assert py.as_dict() == c.as_dict()
    assert hash(py) == hash(c)


def test_header_c_is_not_constructible_and_pickles_as_header() -> None:
    import pickle

    if hl7.HeaderC is None:
        pytest.skip("pure mode")
    with pytest.raises(TypeError):
        hl7.HeaderC()
    header = hl7.parse_headerC(data("adt_a01.hl7"))
    assert isinstance(header, hl7.HeaderC)
    restored = pickle.loads(pickle.dumps(header))
    assert type(restored) is hl7.Header and restored == header
    assert "HeaderC(" in repr(header) and "MSG000000000001" in repr(header)


@pytest.mark.parametrize(
    "prefix", [b"", b"\r\n", b"\n\n  \t", b"\xef\xbb\xbf", b"\xef\xbb\xbf\r\n", b"\x0b"]
)
def test_header_after_bom_and_whitespace(parse_header: Callable[[bytes], Any], prefix: bytes) -> None:
    header = parse_header(prefix + data("adt_a01.hl7"))
    assert header.control_id == "MSG000000000001"


@pytest.mark.parametrize(
    "encode",
    [
        lambda t: b"\xff\xfe" + t.encode("utf-16-le"),
        lambda t: b"\xfe\xff" + t.encode("utf-16-be"),
        lambda t: t.encode("utf-16-le"),  # no BOM: detected by its bytes (MSH-18 says UTF-16)
        lambda t: t.encode("utf-16-be"),
        lambda t: b"\xff\xfe\x00\x00" + t.encode("utf-32-le"),
    ],
    ids=["le-bom", "be-bom", "le", "be", "utf32-le-bom"],
)
def test_wide_headers(parse_header: Callable[[bytes], Any], encode: Callable[[str], bytes]) -> None:
    text = data("utf16le_bom.hl7")[2:].decode("utf-16-le")
    header = parse_header(encode(text))
    assert header.sending_facility == "Klinik Köln"
    assert header.charset == "UNICODE UTF-16"


def test_minimal_msh_has_empty_fields(parse_header: Callable[[bytes], Any]) -> None:
    header = parse_header(b"MSH|")
    assert header.field_separator == "|"
    assert all(value == "" for key, value in header.as_dict().items() if key != "field_separator")
    assert parse_header(b"MSH|^~\\&|A\rPID|1").sending_application == "A"


@pytest.mark.parametrize(
    "message",
    [b"", b"MSH", b"MSH\r|^~\\&|", b"MSHA^~\\&|", b"MSH ^~\\&|", b"MSA|AA|1\r", b" \r\n\t",
     b"msh|^~\\&|", b"\xef\xbb\xbfPID|1", b"\xff\xfe" + "PID|1".encode("utf-16-le"),
     b"\x00\x00\xfe\xff" + "PID|1".encode("utf-32-be"), b"MSH\x00|"],
)
def test_no_readable_msh(parse_header: Callable[[bytes], Any], build_ack: Callable[..., bytes],
                         message: bytes) -> None:
    with pytest.raises(Hl7Error):
        parse_header(message)
    with pytest.raises(Hl7Error):
        build_ack(message)


def test_errors_name_no_message_text(parse_header: Callable[[bytes], Any]) -> None:
    with pytest.raises(Hl7Error) as info:
        parse_header(data("no_msh.hl7"))
    assert isinstance(info.value, ValueError)
    assert "NOHEADER" not in str(info.value) and "62 bytes" in str(info.value)


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------


def test_segments_of_corpus(split_segments: Callable[[bytes], list[bytes]]) -> None:
    names = [segment[:3] for segment in split_segments(data("adt_a01.hl7"))]
    assert names == [b"MSH", b"EVN", b"PID", b"NK1", b"PV1", b"AL1", b"DG1"]
    oru = split_segments(data("oru_r01_200obx.hl7"))
    assert len(oru) == 203 and sum(s.startswith(b"OBX|") for s in oru) == 200
    assert [s[:3] for s in split_segments(data("lf_terminators.hl7"))] == [b"MSH", b"EVN", b"PID"]
    assert [s[:3] for s in split_segments(data("crlf_terminators.hl7"))] == [b"MSH", b"EVN", b"PID"]
    assert all(b"\r" not in s and b"\n" not in s for s in oru)


@pytest.mark.parametrize("terminator", [b"\r", b"\n", b"\r\n", b"\n\r", b"\r\r\n\n"])
@pytest.mark.parametrize("trailing", [True, False])
def test_segment_terminators(split_segments: Callable[[bytes], list[bytes]], terminator: bytes,
                             trailing: bool) -> None:
    segments = [b"MSH|^~\\&|A", b"PID|1||X", b"OBX|1|ST|||a b"]
    message = terminator.join(segments) + (terminator if trailing else b"")
    assert split_segments(message) == segments
    assert split_segments(b"\r\n\r\n" + message + b"\n\n\r") == segments
    assert split_segments(b"\xef\xbb\xbf  " + message) == segments


def test_segments_edge_cases(split_segments: Callable[[bytes], list[bytes]]) -> None:
    assert split_segments(b"") == []
    assert split_segments(b"\r\n\r") == []
    assert split_segments(b"MSH|1") == [b"MSH|1"]
    assert split_segments(b"A\rB\n\nC\r\n") == [b"A", b"B", b"C"]
    assert split_segments(bytearray(b"A\rB")) == [b"A", b"B"]


def test_segments_of_utf16(split_segments: Callable[[bytes], list[bytes]]) -> None:
    segments = split_segments(data("utf16le_bom.hl7"))
    assert [s.decode("utf-16-le")[:3] for s in segments] == ["MSH", "PID"]
    assert "GRÜN" in segments[1].decode("utf-16-le")
    with pytest.raises(Hl7Error):
        split_segments(data("utf16le_bom.hl7")[:-1])  # odd length: not UTF-16


def test_big_attachment(big_mdm: bytes, parse_header: Callable[[bytes], Any],
                        split_segments: Callable[[bytes], list[bytes]],
                        build_ack: Callable[..., bytes]) -> None:
    assert len(big_mdm) > 5 * 1024 * 1024
    segments = split_segments(big_mdm)
    assert [s[:3] for s in segments] == [b"MSH", b"EVN", b"PID", b"PV1", b"TXA", b"OBX"]
    assert len(segments[-1]) > 5 * 1024 * 1024
    assert parse_header(big_mdm).message_type == "MDM^T02^MDM_T02"
    ack = build_ack(big_mdm, timestamp=TS, control_id=CID)
    assert ack_segments(ack)[1] == ["MSA", "AA", "MDM0000001", "OK"]
    lf_message = big_mdm.replace(b"\r", b"\n")
    assert len(split_segments(lf_message)) == 6
    assert parse_header(lf_message).control_id == "MDM0000001"


# --------------------------------------------------------------------------------------------
# Character sets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("utf8.hl7", ["MÜLLER^ZOË", "山田^太郎", "Hôpital Zürich"]),
        ("latin1.hl7", ["MÜLLER^FRANÇOIS", "Hôpital"]),
        ("utf16le_bom.hl7", ["GRÜN^ÅSA", "Klinik Köln"]),
        ("iso2022_jp.hl7", ["山田^太郎"]),
        ("adt_a01.hl7", ["EVERYMAN^ADAM"]),
        ("no_msh.hl7", ["NOHEADER^NORA"]),
    ],
)
def test_decode_corpus(decode: Callable[..., str], name: str, expected: list[str]) -> None:
    text = decode(data(name))
    assert text.startswith(("MSH|", "PID|"))
    for value in expected:
        assert value in text


SAMPLES: list[tuple[str, str]] = [
    ("ASCII", "plain"),
    ("ISO IR6", "plain"),
    ("8859/1", "Müller"),
    ("8859/2", "Łódź"),
    ("8859/5", "Москва"),
    ("8859/7", "Αθήνα"),
    ("8859/8", "שלום"),
    ("8859/9", "İstanbul"),
    ("8859/15", "€uro"),
    ("UNICODE", "Zoë 山"),
    ("UNICODE UTF-8", "Zoë 山"),
    ("UTF-8", "Zoë"),
    ("UTF8", "Zoë"),
    ("utf-8", "Zoë"),
    ("ISO-8859-1", "Müller"),
    ("GB 18030", "北京"),
    ("GB 18030-2000", "北京"),
    ("KS X 1001", "서울"),
    ("BIG-5", "台北"),
    ("ISO IR87", "東京"),
    ("ISO IR159", "東京"),
    ("ISO IR14", "plain"),
]


@pytest.mark.parametrize(("charset", "sample"), SAMPLES)
def test_decode_by_msh18(decode: Callable[..., str], charset: str, sample: str) -> None:
    codec = hl7.codec_for_charset(charset)
    head = f"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|X1|P|2.5.1||||||{charset}\r".encode("ascii")
    message = head + f"PID|1||1||{sample}\r".encode(codec)
    assert decode(message) == head.decode("ascii") + f"PID|1||1||{sample}\r"


def test_codec_table() -> None:
    assert hl7.codec_for_charset("8859/1") == "iso8859-1"
    assert hl7.codec_for_charset("8859/15") == "iso8859-15"
    assert hl7.codec_for_charset("UNICODE UTF-16") == "utf-16"
    assert hl7.codec_for_charset("UNICODE UTF-32") == "utf-32"
    assert hl7.codec_for_charset("ISO IR87") == "iso2022_jp"
    assert hl7.codec_for_charset("KS X 1001") == "euc_kr"
    assert hl7.codec_for_charset(" unicode utf-8 ") == "utf-8"
    for bad in ("", "KLINGON-8", "8859/12", "UTF-7"):
        with pytest.raises(Hl7Error):
            hl7.codec_for_charset(bad)
    with pytest.raises(Hl7Error, match="no codec"):
        hl7.codec_for_charset("CNS 11643-1992")


def test_decode_errors(decode: Callable[..., str]) -> None:
    with pytest.raises(Hl7Error, match="KLINGON-8"):
        decode(data("unknown_charset.hl7"))
    bad_utf8 = data("utf8.hl7").replace("ZOË".encode(), b"ZO\xff")
    with pytest.raises(Hl7Error, match="UNICODE UTF-8"):
        decode(bad_utf8)
    declared_wide = data("adt_a01.hl7").replace(b"|2.5.1\r", b"|2.5.1||||||UNICODE UTF-16\r", 1)
    with pytest.raises(Hl7Error, match="UTF-16"):
        decode(declared_wide)
    with pytest.raises(Hl7Error, match="utf-16"):
        decode(data("utf16le_bom.hl7")[:-1])


def test_decode_bom_and_defaults(decode: Callable[..., str]) -> None:
    assert decode(b"\xef\xbb\xbfMSH|^~\\&|\xc3\xbc\r") == "MSH|^~\\&|ü\r"
    assert decode(b"MSH|^~\\&|\xfc\r") == "MSH|^~\\&|ü\r"  # default latin-1
    assert decode(b"MSH|^~\\&|\xc3\xbc\r", "utf-8") == "MSH|^~\\&|ü\r"
    assert decode(b"\xfc no header") == "ü no header"
    with pytest.raises(Hl7Error):
        decode(b"MSH|^~\\&|\xfc\r", "ascii")
    utf32 = "MSH|^~\\&|Zoë\r".encode("utf-32-be")
    assert decode(b"\x00\x00\xfe\xff" + utf32) == "MSH|^~\\&|Zoë\r"
    # ISO 2022 code extension: first repetition ASCII, JIS set in the second
    message = ("MSH|^~\\&|A" + "|" * 15 + "ASCII~ISO IR87\rPID|東京\r").encode("iso2022_jp")
    assert decode(message).endswith("PID|東京\r")


# --------------------------------------------------------------------------------------------
# ACK
# --------------------------------------------------------------------------------------------


def test_ack_structure(build_ack: Callable[..., bytes]) -> None:
    ack = build_ack(data("adt_a01.hl7"), timestamp=TS, control_id=CID)
    assert ack == (
        b"MSH|^~\\&|GHH LAB, INC.|GOOD HEALTH HOSPITAL|ADT1|GOOD HEALTH HOSPITAL|"
        b"20240102030405||ACK^A01^ACK|CTRL0001|P|2.5.1\r"
        b"MSA|AA|MSG000000000001|OK\r"
    )


def test_ack_matches_medplum_example(build_ack: Callable[..., bytes]) -> None:
    message = (b"MSH|^~\\&|ADT1|HOSP|MEDPLUM|CLOUD|20240101120000||ADT^A01^ADT_A01|MSG00001|P|"
               b"2.5.1\rPID|1||123")
    ack = build_ack(message, timestamp="20240101120001", control_id="1704110401000")
    assert ack == (b"MSH|^~\\&|MEDPLUM|CLOUD|ADT1|HOSP|20240101120001||ACK^A01^ACK|1704110401000|"
                   b"P|2.5.1\rMSA|AA|MSG00001|OK\r")


@pytest.mark.parametrize("name", sorted(corpus.CORPUS.keys() - {"no_msh.hl7"}))
def test_ack_swaps_and_copies(build_ack: Callable[..., bytes], name: str) -> None:
    message = data(name)
    header = hl7.parse_headerPy(message)
    ack = build_ack(message, timestamp=TS, control_id=CID)
    wide = message.startswith(b"\xff\xfe")
    text = ack[2:].decode("utf-16-le") if wide else ack.decode("latin-1")
    msh, msa = [segment.split(header.field_separator) for segment in text[:-1].split("\r")]
    assert msh[1] == header.encoding_characters
    assert msh[2:6] == [header.receiving_application, header.receiving_facility,
                        header.sending_application, header.sending_facility]
    assert msh[6] == TS and msh[9] == CID
    assert msh[10] == (header.processing_id or "P")
    assert msh[11] == (header.version or "2.5.1")
    assert msa == ["MSA", "AA", header.control_id, "OK"]
    charset_field = _hl7_py.read_msh(message).get(18)  # MSH-18 with all its repetitions
    if charset_field:
        assert len(msh) == 18 and msh[17] == charset_field
        assert msh[17].startswith(header.charset)
    else:
        assert len(msh) == 12


@pytest.mark.parametrize(("code", "words"), list(hl7.ACK_CODES.items()))
def test_ack_codes_and_default_text(build_ack: Callable[..., bytes], code: str, words: str) -> None:
    ack = build_ack(data("orm_o01.hl7"), code, timestamp=TS, control_id=CID)
    assert ack_segments(ack)[1] == ["MSA", code, "ORM0000042", words]


@pytest.mark.parametrize("code", ["", "aa", "AX", "NAK", None])
def test_ack_bad_code(build_ack: Callable[..., bytes], code: Any) -> None:
    with pytest.raises(ValueError, match="AA, AE, AR, CA, CE, CR") as info:
        build_ack(data("adt_a01.hl7"), code)
    assert not isinstance(info.value, Hl7Error)


@pytest.mark.parametrize(
    ("message_type", "ack_type"),
    [
        ("ADT^A01^ADT_A01", "ACK^A01^ACK"),
        ("ORM^O01", "ACK^O01"),
        ("ADT", "ACK"),
        ("", "ACK"),
        ("ADT^A01^", "ACK^A01"),
        ("ADT^^ADT_A01", "ACK"),
        ("ADT^A01^ADT_A01^EXTRA", "ACK^A01^ACK"),
    ],
)
def test_ack_message_type_rule(build_ack: Callable[..., bytes], message_type: str,
                               ack_type: str) -> None:
    message = f"MSH|^~\\&|A|B|C|D|20240101||{message_type}|ID1|P|2.5\r".encode("ascii")
    assert ack_segments(build_ack(message, timestamp=TS, control_id=CID))[0][8] == ack_type


def test_ack_escapes_text(build_ack: Callable[..., bytes]) -> None:
    ack = build_ack(data("adt_a01.hl7"), "AE", "a|b^c~d\\e&f\rg\nh", timestamp=TS,
                    control_id=CID)
    assert ack.split(b"\r")[1] == b"MSA|AE|MSG000000000001|a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f\\X0D\\g\\X0A\\h"


def test_ack_err_segment(build_ack: Callable[..., bytes]) -> None:
    ack = build_ack(data("adt_a01.hl7"), "CE", "Storage failed", "disk full | retry later",
                    timestamp=TS, control_id=CID)
    segments = ack.split(b"\r")
    assert segments[1] == b"MSA|CE|MSG000000000001|Storage failed"
    assert segments[2] == (b"ERR|||207^Application internal error^HL70357|E||||"
                           b"disk full \\F\\ retry later")
    assert segments[3] == b""
    other = build_ack(data("adt_a01.hl7"), "AR", None, "dup", error_code="205", timestamp=TS,
                      control_id=CID)
    assert other.split(b"\r")[2] == b"ERR|||205^Duplicate key identifier^HL70357|E||||dup"
    local = build_ack(data("adt_a01.hl7"), "AE", error="x", error_code="9^9", timestamp=TS,
                      control_id=CID)
    assert local.split(b"\r")[2] == b"ERR|||9\\S\\9^^HL70357|E||||x"


def test_ack_keeps_version_charset_and_defaults(build_ack: Callable[..., bytes]) -> None:
    orm = ack_segments(build_ack(data("orm_o01.hl7"), timestamp=TS, control_id=CID))
    assert orm[0][11] == "2.3" and orm[0][8] == "ACK^O01"
    utf8 = ack_segments(build_ack(data("utf8.hl7"), timestamp=TS, control_id=CID))
    assert utf8[0][11:] == ["2.5.1", "", "", "", "", "", "UNICODE UTF-8"]
    jis = ack_segments(build_ack(data("iso2022_jp.hl7"), timestamp=TS, control_id=CID))
    assert jis[0][17] == "~ISO IR87"
    truncated = ack_segments(build_ack(data("truncated_msh.hl7"), timestamp=TS, control_id=CID))
    assert truncated[0][8:] == ["ACK^A08", CID, "P", "2.5.1"]
    assert truncated[1] == ["MSA", "AA", "TRUNC000001", "OK"]
    assert build_ack(data("custom_separators.hl7"), timestamp=TS, control_id=CID) == (
        b"MSH^~|\\&^RECVAPP^RECVFAC^CUSTOMAPP^CUSTFAC^20240102030405^^ACK~A04~ACK^CTRL0001^T^2.4\r"
        b"MSA^AA^CUST0000001^OK\r"
    )


def test_ack_custom_separators_escape(build_ack: Callable[..., bytes]) -> None:
    ack = build_ack(data("custom_separators.hl7"), "AE", "x^y~z|w", timestamp=TS, control_id=CID)
    assert ack.split(b"\r")[1] == b"MSA^AE^CUST0000001^x\\F\\y\\S\\z\\R\\w"


def test_ack_caller_text_uses_message_charset(build_ack: Callable[..., bytes]) -> None:
    text = "Prüfung fehlgeschlagen"
    utf8 = build_ack(data("utf8.hl7"), "AE", text, timestamp=TS, control_id=CID)
    assert utf8.split(b"\r")[1].endswith(text.encode("utf-8"))
    latin = build_ack(data("latin1.hl7"), "AE", text, timestamp=TS, control_id=CID)
    assert latin.split(b"\r")[1].endswith(text.encode("latin-1"))
    plain = build_ack(data("adt_a01.hl7"), "AE", text, timestamp=TS, control_id=CID)
    assert plain.split(b"\r")[1].endswith(text.encode("latin-1"))  # no MSH-18: latin-1
    unknown = build_ack(data("unknown_charset.hl7"), "AR", text, "Zoë", timestamp=TS,
                        control_id=CID)
    assert unknown.split(b"\r")[1].endswith(b"Pr?fung fehlgeschlagen")
    assert unknown.split(b"\r")[2].endswith(b"|Zo?")
    jis = build_ack(data("iso2022_jp.hl7"), "AE", "東京", timestamp=TS, control_id=CID)
    assert jis.split(b"\r")[1].endswith("東京".encode("iso2022_jp_2"))


def test_ack_utf16_round_trip(build_ack: Callable[..., bytes]) -> None:
    message = data("utf16le_bom.hl7")
    ack = build_ack(message, "AE", "Fehler ü|1", "Zoë", timestamp=TS, control_id=CID)
    assert ack.startswith(b"\xff\xfe")
    text = ack[2:].decode("utf-16-le")
    assert text.split("\r")[:3] == [
        "MSH|^~\\&|RECV|RFAC|SENDER|Klinik Köln|20240102030405||ACK^A01^ACK|CTRL0001|P|2.5.1"
        "||||||UNICODE UTF-16",
        "MSA|AE|U16LE000001|Fehler ü\\F\\1",
        "ERR|||207^Application internal error^HL70357|E||||Zoë",
    ]
    header = hl7.parse_headerPy(ack)
    assert header.message_type == "ACK^A01^ACK" and header.control_id == CID
    big_endian = b"\xfe\xff" + message[2:].decode("utf-16-le").encode("utf-16-be")
    be_ack = build_ack(big_endian, timestamp=TS, control_id=CID)
    assert be_ack.startswith(b"\xfe\xff")
    assert be_ack[2:].decode("utf-16-be") == text.split("\r")[0] + "\rMSA|AA|U16LE000001|OK\r"
    no_bom = message[2:]
    assert build_ack(no_bom, timestamp=TS, control_id=CID).startswith(b"\xff\xfe")


def test_ack_is_itself_parseable(build_ack: Callable[..., bytes],
                                 parse_header: Callable[[bytes], Any]) -> None:
    ack = build_ack(data("siu_s12.hl7"), "CA")
    header = parse_header(ack)
    assert header.message_type == "ACK^S12^ACK"
    assert header.receiving_application == "SCHED" and header.sending_application == "EHR"
    assert len(header.timestamp) == 14 and header.timestamp.isdigit()
    assert 0 < len(header.control_id) <= 20 and header.control_id.isalnum()


def test_ack_defaults_are_fresh(build_ack: Callable[..., bytes],
                                parse_header: Callable[[bytes], Any]) -> None:
    ids = {parse_header(build_ack(data("adt_a01.hl7"))).control_id for _ in range(200)}
    assert len(ids) == 200


# --------------------------------------------------------------------------------------------
# Control ids
# --------------------------------------------------------------------------------------------


def test_control_ids_unique_and_short(impl: str) -> None:
    make = pick(hl7, "make_control_id", impl)
    ids = [make() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(0 < len(value) <= 20 and value.isalnum() for value in ids)


def test_twin_generators_do_not_collide() -> None:
    if hl7.make_control_idC is None:
        pytest.skip("pure mode")
    py = {hl7.make_control_idPy() for _ in range(5000)}
    c = {hl7.make_control_idC() for _ in range(5000)}
    assert not py & c


def test_control_id_counter_rollover() -> None:
    generator = _hl7_py.ControlIdGenerator("T")
    prefix, second, _ = generator._state
    generator._state = (prefix, second, itertools.count(_hl7_py.CONTROL_ID_COUNTER_LIMIT - 2))
    ids = [generator() for _ in range(4)]
    assert len(set(ids)) == 4 and all(len(value) <= 20 for value in ids)
    assert ids[0].startswith(prefix) and not ids[-1].startswith(prefix)


def test_control_ids_differ_between_processes() -> None:
    code = "from medagent.proto import hl7; print(hl7.make_control_id(), hl7.make_control_idPy())"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=60).stdout.split() for _ in range(2)]
    assert set(runs[0]).isdisjoint(runs[1])


def test_control_ids_after_fork() -> None:
    import os

    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    read_end, write_end = os.pipe()
    before = {hl7.make_control_idPy(), hl7.make_control_id()}
    pid = os.fork()
    if pid == 0:  # child: report two ids and leave at once
        os.close(read_end)
        os.write(write_end, f"{hl7.make_control_idPy()} {hl7.make_control_id()}".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = set(pipe.read().decode().split())
    os.waitpid(pid, 0)
    parent = {hl7.make_control_idPy(), hl7.make_control_id()}
    assert len(child) == 2 and child.isdisjoint(parent | before)


def test_timestamp_cache() -> None:
    first = _hl7_py.current_timestamp()
    assert len(first) == 14 and first.isdigit()
    assert _hl7_py.format_timestamp(0).startswith(("1970", "1969"))


def test_selector_exports() -> None:
    for name in hl7.__all__:
        assert hasattr(hl7, name), name
    if hl7.parse_headerC is not None:
        assert hl7.parse_header is hl7.parse_headerC and hl7.build_ack is hl7.build_ackC
    else:
        assert hl7.parse_header is hl7.parse_headerPy and hl7.build_ack is hl7.build_ackPy
    assert issubclass(Hl7Error, ValueError)
    assert Path(hl7.__file__).name == "hl7.py"
