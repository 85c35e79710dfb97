"""MLLP framing: encode, and the decoder's rules (both twins, via the `impl` fixture)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from testsupport import pick

from medagent import _compat
from medagent.proto import mllp
from medagent.proto.mllp import FrameTooLarge, MllpError, encode

ADT = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ADT^A01|MSG00001|P|2.5\rPID|1||12345^^^HOSP||DOE^JOHN\r"
SB, EB, CR = b"\x0b", b"\x1c", b"\r"


@pytest.fixture
def decoder_cls(impl: str) -> Any:
    return pick(mllp, "MllpDecoder", impl)


def counters(decoder: Any) -> dict[str, int]:
    return {
        "discarded_bytes": decoder.discarded_bytes,
        "missing_cr": decoder.missing_cr,
        "truncated_frames": decoder.truncated_frames,
        "frames_decoded": decoder.frames_decoded,
        "pending_bytes": decoder.pending_bytes,
    }


def clean(frames_decoded: int, **overrides: int) -> dict[str, int]:
    expected = {"discarded_bytes": 0, "missing_cr": 0, "truncated_frames": 0, "pending_bytes": 0}
    expected.update(overrides)
    expected["frames_decoded"] = frames_decoded
    return expected


# --- encode -------------------------------------------------------------------------------


def test_constants() -> None:
    assert (mllp.START_BLOCK, mllp.END_BLOCK, mllp.CARRIAGE_RETURN) == (0x0B, 0x1C, 0x0D)
    assert mllp.DEFAULT_MAX_FRAME_SIZE == 16 * 1024 * 1024


def test_encode_wraps_payload() -> None:
    assert encode(b"abc") == b"\x0babc\x1c\r"
    assert encode(b"") == b"\x0b\x1c\r"
    assert encode(bytearray(b"x")) == encode(memoryview(b"x")) == b"\x0bx\x1c\r"


@pytest.mark.parametrize("payload", [b"a\x0bb", b"a\x1cb", b"\x1c", b"\x0b"])
def test_encode_rejects_framing_bytes_in_payload(payload: bytes) -> None:
    with pytest.raises(mllp.InvalidPayload):
        encode(payload)


def test_selector_uses_extension_unless_pure_mode() -> None:
    if _compat.NO_EXTENSIONS:
        assert mllp.MllpDecoderC is None and mllp.MllpDecoder is mllp.MllpDecoderPy
    else:
        assert mllp.MllpDecoderC is not None and mllp.MllpDecoder is mllp.MllpDecoderC


# --- decoding valid streams ----------------------------------------------------------------


def test_round_trip(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    assert decoder.feed(encode(ADT)) == [ADT]
    assert counters(decoder) == clean(1)
    assert decoder.max_frame_size == mllp.DEFAULT_MAX_FRAME_SIZE


def test_frames_are_bytes(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    frames = decoder.feed(bytearray(encode(b"a") + SB + b"b"))
    frames += decoder.feed(bytearray(EB + CR))
    assert frames == [b"a", b"b"]
    assert all(type(f) is bytes for f in frames)


def test_several_frames_in_one_chunk(decoder_cls: Any) -> None:
    payloads = [ADT, b"", b"second", ADT.replace(b"MSG00001", b"MSG00002")]
    decoder = decoder_cls()
    assert decoder.feed(b"".join(encode(p) for p in payloads)) == payloads
    assert counters(decoder) == clean(len(payloads))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_frames_split_across_chunks(decoder_cls: Any, size: int) -> None:
    stream = encode(ADT) * 3
    decoder = decoder_cls()
    frames: list[bytes] = []
    for i in range(0, len(stream), size):
        frames += decoder.feed(stream[i : i + size])
    assert frames == [ADT] * 3
    assert counters(decoder) == clean(3)


def test_pending_bytes_counts_partial_payload(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    assert decoder.feed(b"junk" + SB + b"MSH|") == []
    assert decoder.pending_bytes == 4
    assert decoder.feed(b"^~") == []
    assert decoder.pending_bytes == 6
    assert decoder.feed(EB) == [b"MSH|^~"]
    assert decoder.pending_bytes == 0


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda w: w.__name__)
def test_buffer_inputs(decoder_cls: Any, wrap: Any) -> None:
    decoder = decoder_cls()
    stream = encode(b"one") + SB + b"tw"
    assert decoder.feed(wrap(stream)) == [b"one"]
    assert decoder.feed(wrap(b"o" + EB + CR)) == [b"two"]
    assert decoder.feed(wrap(b"")) == []
    assert counters(decoder) == clean(2)


def test_unusual_memoryviews(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    strided = memoryview(b"\x0b-a-b-c-\x1c-\r")[::2]  # non-contiguous: b"\x0babc\x1c\r"
    assert decoder.feed(strided) == [b"abc"]
    signed = memoryview(bytearray(encode(b"def"))).cast("b")
    assert decoder.feed(signed) == [b"def"]
    assert counters(decoder) == clean(2)


def test_non_buffer_input_is_rejected(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    with pytest.raises(TypeError):
        decoder.feed("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decoder.feed(5)  # type: ignore[arg-type]


def test_five_mib_frame(decoder_cls: Any) -> None:
    payload = (ADT * (5 * 1024 * 1024 // len(ADT) + 1))[: 5 * 1024 * 1024]
    stream = encode(payload)
    assert decoder_cls().feed(stream) == [payload]
    decoder = decoder_cls()
    frames: list[bytes] = []
    for i in range(0, len(stream), 65536):
        frames += decoder.feed(memoryview(stream)[i : i + 65536])
    assert frames == [payload]
    assert counters(decoder) == clean(1)


# --- tolerated defects ----------------------------------------------------------------------


def test_junk_before_and_between_frames_is_counted(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    junk = b"\x00\x00 \t\r\ngarbage\x1c"
    assert decoder.feed(junk + encode(b"a") + b"\n\x00" + encode(b"b") + b"  ") == [b"a", b"b"]
    assert counters(decoder) == clean(2, discarded_bytes=len(junk) + 2 + 2)


def test_end_block_without_cr_is_counted(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    stream = SB + b"a" + EB + b"\n" + SB + b"b" + EB + SB + b"c" + EB + CR
    assert decoder.feed(stream) == [b"a", b"b", b"c"]
    assert counters(decoder) == clean(3, missing_cr=2, discarded_bytes=1)


def test_frame_emitted_at_end_block_and_cr_consumed_from_next_chunk(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    assert decoder.feed(SB + ADT + EB) == [ADT]
    assert decoder.feed(CR) == []
    assert decoder.feed(encode(b"next")) == [b"next"]
    assert counters(decoder) == clean(2)


def test_start_block_mid_frame_restarts(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    assert decoder.feed(SB + b"MSH|partial" + SB + b"MSH|whole" + EB + CR) == [b"MSH|whole"]
    assert decoder.feed(SB + b"held") == []
    assert decoder.feed(b"more" + SB + b"fresh" + EB + CR) == [b"fresh"]
    assert counters(decoder) == clean(2, truncated_frames=2)


def test_reset_drops_partial_and_keeps_counters(decoder_cls: Any) -> None:
    decoder = decoder_cls()
    assert decoder.feed(encode(b"a") + SB + b"partial") == [b"a"]
    decoder.reset()
    assert decoder.pending_bytes == 0
    assert decoder.feed(b"rest" + EB + CR + encode(b"b")) == [b"b"]
    assert counters(decoder) == clean(2, discarded_bytes=len(b"rest") + 2)


# --- oversize frames ---------------------------------------------------------------------------


def test_frame_of_exactly_max_size_is_accepted(decoder_cls: Any) -> None:
    decoder = decoder_cls(max_frame_size=8)
    assert decoder.feed(encode(b"12345678")) == [b"12345678"]
    decoder.feed(SB + b"1234")
    assert decoder.feed(b"5678" + EB) == [b"12345678"]


def test_oversize_keeps_earlier_frames_and_resyncs(decoder_cls: Any) -> None:
    decoder = decoder_cls(max_frame_size=8)
    stream = encode(b"ok1") + encode(b"MSH|too-long-frame") + encode(b"ok2")
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(stream)
    exc = info.value
    assert isinstance(exc, MllpError)
    assert exc.limit == 8
    assert exc.frames == [b"ok1"]
    assert exc.head == b"MSH|too-l"  # the max_frame_size + 1 bytes read before the overflow
    assert decoder.pending_bytes == 0
    # The rest of the chunk was kept: feed(b"") resumes after the overflow point.
    assert decoder.feed(b"") == [b"ok2"]
    rest_of_rejected = len(b"ong-frame") + 2  # its remaining payload, EB and CR
    assert counters(decoder) == clean(2, discarded_bytes=rest_of_rejected)


def test_oversize_remainder_is_processed_before_next_chunk(decoder_cls: Any) -> None:
    decoder = decoder_cls(max_frame_size=4)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(SB + b"abcdefg" + EB + CR + SB + b"x")
    assert info.value.frames == [] and info.value.head == b"abcde"
    assert decoder.feed(b"y" + EB + CR) == [b"xy"]
    assert counters(decoder) == clean(1, discarded_bytes=4)


def test_oversize_across_chunks(decoder_cls: Any) -> None:
    decoder = decoder_cls(max_frame_size=10)
    assert decoder.feed(encode(b"a") + SB + b"0123456") == [b"a"]
    assert decoder.pending_bytes == 7
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"789ABC" + EB + CR + encode(b"b"))
    assert info.value.frames == []
    assert info.value.head == b"0123456789A"
    assert decoder.pending_bytes == 0
    assert decoder.feed(encode(b"c")) == [b"b", b"c"]
    assert counters(decoder) == clean(3, discarded_bytes=len(b"BC") + 2)


def test_oversize_then_new_start_block_resyncs(decoder_cls: Any) -> None:
    decoder = decoder_cls(max_frame_size=3)
    with pytest.raises(FrameTooLarge):
        decoder.feed(SB + b"abcdef" + SB + b"new" + EB + CR)
    assert decoder.feed(b"") == [b"new"]
    assert counters(decoder) == clean(1, discarded_bytes=2)


def test_two_oversize_frames_in_one_chunk(decoder_cls: Any) -> None:
    decoder = decoder_cls(max_frame_size=2)
    stream = encode(b"aaaa") + encode(b"ok") + encode(b"bbbb") + encode(b"z")
    heads, frames = [], []
    for _ in range(5):
        try:
            frames += decoder.feed(b"" if heads else stream)
            break
        except FrameTooLarge as exc:
            heads.append(exc.head)
            frames += exc.frames
    assert heads == [b"aaa", b"bbb"]
    assert frames == [b"ok", b"z"]
    assert counters(decoder) == clean(2, discarded_bytes=2 * (1 + 2))


def test_oversize_head_is_capped(decoder_cls: Any) -> None:
    payload = bytes(range(32, 127)) * 200  # 19,000 bytes
    decoder = decoder_cls(max_frame_size=10_000)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(encode(payload))
    assert info.value.head == payload[: mllp.FRAME_HEAD_LIMIT]
    decoder = decoder_cls(max_frame_size=10_000)
    decoder.feed(SB + payload[:5000])
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(payload[5000:])
    assert info.value.head == payload[: mllp.FRAME_HEAD_LIMIT]


def test_oversize_error_message_holds_no_payload(decoder_cls: Any) -> None:
    decoder = decoder_cls(max_frame_size=4)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(encode(b"SECRET-PATIENT"))
    assert b"SECRET" not in str(info.value).encode() and "SECRET" not in repr(info.value)
    assert "max_frame_size" in str(info.value)
    clone = pickle.loads(pickle.dumps(info.value))
    assert (clone.limit, clone.frames, clone.head) == (4, [], b"SECRE")


@pytest.mark.parametrize("bad", [0, -1])
def test_invalid_max_frame_size(decoder_cls: Any, bad: int) -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        decoder_cls(max_frame_size=bad)


def test_non_int_max_frame_size(decoder_cls: Any) -> None:
    with pytest.raises(TypeError, match="max_frame_size"):
        decoder_cls(max_frame_size=1.5)
