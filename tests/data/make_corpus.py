"""Generate the HL7 v2 test corpus in tests/data/ (run: python tests/data/make_corpus.py).

Each entry of `CORPUS` is a file name and the exact bytes it holds; the files are committed and
tests/proto/test_hl7.py checks that they still equal what this script produces. The 5 MiB
MDM^T02 case is not stored: tests build it with `mdm_t02(size)`.

Segments end with CR unless the case is about terminators. Patient data is invented.
"""

from __future__ import annotations

import base64
import random
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The MLLP-framed 625-byte ADT^A01 that the C load tools send (SB + payload + EB CR).
FRAMED_ADT = Path("/work/shared/tools/msg.bin")
ADT_SIZE = 625


def _message(*segments: str, terminator: str = "\r", encoding: str = "ascii") -> bytes:
    return "".join(segment + terminator for segment in segments).encode(encoding)


def adt_a01() -> bytes:
    """The load tools' ADT^A01 without MLLP framing, padded to 625 bytes via MSH-10."""
    framed = FRAMED_ADT.read_bytes()
    payload = framed[1:-2]
    assert framed[:1] == b"\x0b" and framed[-2:] == b"\x1c\r", "msg.bin is not MLLP-framed"
    missing = ADT_SIZE - len(payload)
    payload = payload.replace(b"|MSG000000001|", b"|MSG" + b"0" * missing + b"000000001|", 1)
    assert len(payload) == ADT_SIZE, len(payload)
    return payload


def oru_r01_200_obx() -> bytes:
    rng = random.Random(201)
    obx = [
        f"OBX|{i}|NM|{1000 + i}-{i % 10}^ANALYTE {i}^LN||{rng.randint(1, 999) / 10}|mg/dL|"
        f"1.0-99.9|N|||F|||20240315091000"
        for i in range(1, 201)
    ]
    return _message(
        "MSH|^~\\&|LAB|GOOD HEALTH HOSPITAL|EHR|GOOD HEALTH HOSPITAL|20240315091500||"
        "ORU^R01^ORU_R01|ORU0000201|P|2.5.1|||AL|NE",
        "PID|1||PATID5678^^^GOOD HEALTH HOSPITAL^MR||DOE^JANE^Q||19800101|F",
        "OBR|1|ORD448811|FIL99881|24331-1^LIPID PANEL^LN|||20240315080000",
        *obx,
    )


def orm_o01() -> bytes:
    """v2.3 style: MSH-9 has two components (the ACK gets ACK^O01)."""
    return _message(
        "MSH|^~\\&|CPOE|WARD 5|LIS|CORE LAB|20240315101500||ORM^O01|ORM0000042|P|2.3",
        "PID|1||PATID4242^^^HOSP^MR||ROE^RICHARD||19700202|M",
        "PV1|1|I|W5^501^1",
        "ORC|NW|ORD4242|||SC||^^^20240315110000^^R",
        "OBR|1|ORD4242||CBC^COMPLETE BLOOD COUNT^L|||20240315101000",
    )


def siu_s12() -> bytes:
    return _message(
        "MSH|^~\\&|SCHED|CLINIC|EHR|HOSP|20240315120000||SIU^S12^SIU_S12|SIU0000007|P|2.5.1",
        "SCH|APPT77|APPT77||||ROUTINE^Routine|CHECKUP^Yearly checkup||30|min|"
        "^^30^20240320090000^20240320093000",
        "PID|1||PATID7777^^^HOSP^MR||SMITH^ANNA||19900909|F",
        "RGS|1|A",
        "AIS|1|A|CHECKUP^Yearly checkup|20240320090000|||30|min",
        "AIP|1|A|1234^WELBY^MARCUS^^^DR|MD",
    )


def mdm_t02(attachment_size: int = 5 * 1024 * 1024) -> bytes:
    """MDM^T02 whose OBX-5 is an ED attachment of `attachment_size` base64 characters."""
    raw = random.Random(2).randbytes(attachment_size * 3 // 4 + 3)
    encoded = base64.b64encode(raw)[:attachment_size].decode("ascii")
    return _message(
        "MSH|^~\\&|DOCS|HOSP|ARCHIVE|HOSP|20240315130000||MDM^T02^MDM_T02|MDM0000001|P|2.5.1",
        "EVN|T02|20240315130000",
        "PID|1||PATID1111^^^HOSP^MR||BLACK^BOB||19650505|M",
        "PV1|1|O",
        "TXA|1|CN|AP|20240315125900|||||||DOC0001||||||AU",
        f"OBX|1|ED|PDF^Report^L||^AP^PDF^Base64^{encoded}||||||F",
    )


def custom_separators() -> bytes:
    """MSH-1 '^', MSH-2 '~|\\&': component '~', repetition '|', escape '\\', subcomponent '&'."""
    return _message(
        "MSH^~|\\&^CUSTOMAPP^CUSTFAC^RECVAPP^RECVFAC^20240315140000^^ADT~A04~ADT_A01^CUST0000001^T^2.4",
        "EVN^A04^20240315140000",
        "PID^1^^PATID3333~~~HOSP~MR|ALT3333~~~OTHER~PI^^LEE~CHRIS^^19851212^U",
    )


def escapes() -> bytes:
    """Escape sequences in fields (HL7 v2 ch. 2.7): raw values keep them."""
    return _message(
        "MSH|^~\\&|ESC\\F\\APP|FAC\\T\\1|RECV|RFAC|20240315150000||ADT^A08^ADT_A01|ESC\\E\\0001|P|2.5.1",
        "PID|1||PATID4444^^^HOSP^MR||O\\S\\BRIEN^MARY\\R\\ANN||19750303|F",
        "NTE|1||Line one\\.br\\line two \\X0D\\ and a pipe \\F\\ here",
    )


def utf8_body() -> bytes:
    return _message(
        "MSH|^~\\&|SENDÉR|Hôpital Zürich|RECV|RFAC|20240315160000||ADT^A01^ADT_A01|UTF80000001|P|"
        "2.5.1||||||UNICODE UTF-8",
        "PID|1||PATID5555^^^HOSP^MR||MÜLLER^ZOË||19880808|F",
        "NK1|1|山田^太郎|SPO",
        encoding="utf-8",
    )


def latin1_body() -> bytes:
    return _message(
        "MSH|^~\\&|SENDER|Hôpital|RECV|RFAC|20240315161000||ADT^A01^ADT_A01|LAT10000001|P|2.5.1|"
        "|||||8859/1",
        "PID|1||PATID6666^^^HOSP^MR||MÜLLER^FRANÇOIS||19880808|M",
        encoding="latin-1",
    )


def utf16le_bom() -> bytes:
    text = _message(
        "MSH|^~\\&|SENDER|Klinik Köln|RECV|RFAC|20240315162000||ADT^A01^ADT_A01|U16LE000001|P|"
        "2.5.1||||||UNICODE UTF-16",
        "PID|1||PATID7777^^^HOSP^MR||GRÜN^ÅSA||19920202|F",
        encoding="utf-8",
    ).decode("utf-8")
    return b"\xff\xfe" + text.encode("utf-16-le")


def lf_terminators() -> bytes:
    return _message(
        "MSH|^~\\&|LFAPP|LFFAC|RECV|RFAC|20240315170000||ADT^A03^ADT_A03|LF000000001|P|2.5.1",
        "EVN|A03|20240315170000",
        "PID|1||PATID8888^^^HOSP^MR||GREY^GARY||19600606|M",
        terminator="\n",
    )


def crlf_terminators() -> bytes:
    return _message(
        "MSH|^~\\&|CRLFAPP|CRLFFAC|RECV|RFAC|20240315171000||ADT^A02^ADT_A02|CRLF0000001|P|2.5.1",
        "EVN|A02|20240315171000",
        "PID|1||PATID9999^^^HOSP^MR||WHITE^WALTER||19550505|M",
        terminator="\r\n",
    )


def truncated_msh() -> bytes:
    """MSH ends after MSH-10: MSH-11 and later are absent."""
    return _message(
        "MSH|^~\\&|TRUNCAPP|TRUNCFAC|RECV|RFAC|20240315172000||ADT^A08|TRUNC000001",
        "PID|1||PATID1212^^^HOSP^MR||BROWN^BETTY||19770707|F",
    )


def no_msh() -> bytes:
    return _message(
        "PID|1||PATID1313^^^HOSP^MR||NOHEADER^NORA||19770707|F",
        "PV1|1|O",
    )


def unknown_charset() -> bytes:
    return _message(
        "MSH|^~\\&|APP|FAC|RECV|RFAC|20240315173000||ADT^A01^ADT_A01|UNKCS000001|P|2.5.1||||||"
        "KLINGON-8",
        "PID|1||PATID1414^^^HOSP^MR||WORF^SON||23400101|M",
    )


def iso2022_jp() -> bytes:
    """Japanese ISO 2022 code extension (MSH-18 '~ISO IR87', JAHIS style)."""
    return _message(
        "MSH|^~\\&|JPAPP|JPFAC|RECV|RFAC|20240315174000||ADT^A01^ADT_A01|JIS00000001|P|2.5||||||"
        "~ISO IR87||ISO 2022-1994",
        "PID|1||PATID1515^^^HOSP^MR||山田^太郎||19700101|M",
        encoding="iso2022_jp",
    )


CORPUS: dict[str, Callable[[], bytes]] = {
    "adt_a01.hl7": adt_a01,
    "oru_r01_200obx.hl7": oru_r01_200_obx,
    "orm_o01.hl7": orm_o01,
    "siu_s12.hl7": siu_s12,
    "custom_separators.hl7": custom_separators,
    "escapes.hl7": escapes,
    "utf8.hl7": utf8_body,
    "latin1.hl7": latin1_body,
    "utf16le_bom.hl7": utf16le_bom,
    "lf_terminators.hl7": lf_terminators,
    "crlf_terminators.hl7": crlf_terminators,
    "truncated_msh.hl7": truncated_msh,
    "no_msh.hl7": no_msh,
    "unknown_charset.hl7": unknown_charset,
    "iso2022_jp.hl7": iso2022_jp,
}


def main() -> int:
    for name, build in CORPUS.items():
        (HERE / name).write_bytes(build())
        print(f"{name}: {len(build())} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
