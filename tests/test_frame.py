"""The sans-I/O frame codec: fed bytes, no sockets, no sleeps."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitchat.errors import ProtocolError, codes
from bitchat.protocol import (
    FLAG_ERROR,
    FLAG_POOL,
    FLAG_RESPONSE,
    HEADER_SIZE,
    JSON,
    MAGIC,
    MSGPACK,
    VERSION,
    Frame,
    FrameDecoder,
    Packet,
    decode_body,
    encode_body,
    encode_frame,
    encode_header,
)

# The header as DESIGN.md section 2 draws it, independent of the code under test.
HEADER = struct.Struct(">BBBBHII")

FRAMES = [
    Frame(JSON, 0, 1, 0, b"{}"),
    Frame(MSGPACK, FLAG_POOL, 1000, 7, b"\x81\xa1a\x01"),
    Frame(JSON, FLAG_RESPONSE | FLAG_ERROR, 3, 0xFFFFFFFF, b'{"code":"x","message":""}'),
    Frame(MSGPACK, FLAG_RESPONSE, 0xFFFF, 1, b""),
    Frame(JSON, 0, 5000, 42, b"x" * 300),
]


def wire(f: Frame) -> bytes:
    return encode_frame(f.serializer, f.flags, f.type, f.request_id, f.body)


STREAM = b"".join(wire(f) for f in FRAMES)


def test_header_layout_matches_the_design() -> None:
    data = encode_frame(MSGPACK, FLAG_POOL | FLAG_RESPONSE, 0x1234, 0xDEADBEEF, b"abc")
    assert HEADER_SIZE == 14 and MAGIC == 0xBC and VERSION == 1
    assert data[:14] == HEADER.pack(0xBC, 1, 2, 0b011, 0x1234, 0xDEADBEEF, 3)
    assert data[14:] == b"abc"
    assert encode_header(JSON, 0, 1, 2, 3) == HEADER.pack(0xBC, 1, 1, 0, 1, 2, 3)
    assert (FLAG_POOL, FLAG_RESPONSE, FLAG_ERROR) == (1, 2, 4)


def test_whole_stream_in_one_chunk() -> None:
    d = FrameDecoder()
    assert d.feed(STREAM) == FRAMES
    assert d.buffered == 0


def test_byte_by_byte() -> None:
    d = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(STREAM)):
        out += d.feed(STREAM[i : i + 1])
    assert out == FRAMES
    assert d.buffered == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_buffer_type(kind: Any) -> None:
    d = FrameDecoder()
    half = len(STREAM) // 2
    assert d.feed(kind(STREAM[:half])) + d.feed(kind(STREAM[half:])) == FRAMES


def test_frame_split_at_every_byte() -> None:
    for cut in range(len(STREAM) + 1):
        d = FrameDecoder()
        assert d.feed(STREAM[:cut]) + d.feed(STREAM[cut:]) == FRAMES, cut
        assert d.buffered == 0


def test_split_at_every_pair_of_bytes_of_one_frame() -> None:
    data = wire(FRAMES[2])
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            d = FrameDecoder()
            got = d.feed(data[:i]) + d.feed(data[i:j]) + d.feed(data[j:])
            assert got == [FRAMES[2]], (i, j)


def test_buffers_only_the_incomplete_tail() -> None:
    d = FrameDecoder()
    assert d.feed(STREAM + wire(FRAMES[0])[:5]) == FRAMES
    assert d.buffered == 5
    assert d.feed(wire(FRAMES[0])[5:]) == [FRAMES[0]]
    assert d.buffered == 0
    assert d.feed(b"") == []


def test_returned_bodies_do_not_alias_the_input() -> None:
    data = bytearray(wire(FRAMES[4]))
    (frame,) = FrameDecoder().feed(data)
    data[20:30] = b"y" * 10
    assert frame.body == b"x" * 300


def test_body_at_the_limit_is_accepted() -> None:
    d = FrameDecoder(max_body=10)
    assert d.feed(encode_frame(JSON, 0, 1, 0, b"0123456789")) == [
        Frame(JSON, 0, 1, 0, b"0123456789")
    ]


# -- hypothesis round trips ---------------------------------------------------------------


frames = st.builds(
    Frame,
    serializer=st.sampled_from([JSON, MSGPACK]),
    flags=st.integers(0, 7),
    type=st.integers(0, 0xFFFF),
    request_id=st.integers(0, 0xFFFFFFFF),
    body=st.binary(max_size=300),
)


@given(st.lists(frames, max_size=6), st.lists(st.integers(0, 2000), max_size=6))
def test_frames_round_trip_whatever_the_chunking(fs: list[Frame], cuts: list[int]) -> None:
    data = b"".join(wire(f) for f in fs)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    d = FrameDecoder()
    out: list[Frame] = []
    for a, b in itertools.pairwise(points):
        out += d.feed(data[a:b])
    assert out == fs
    assert d.buffered == 0


class Everything(Packet, type=61000, register=False):
    i: int
    f: float
    b: bool
    s: str
    raw: bytes
    anything: Any
    maybe: int | None
    ints: list[int]
    names: dict[str, str]
    nested: list[dict[str, list[float]]]
    defaulted: str = "d"
    opt: str | None = None


class NoBytes(Packet, type=61001, register=False):
    i: int
    f: float
    b: bool
    s: str
    anything: Any
    maybe: int | None
    ints: list[int]
    names: dict[str, str]
    nested: list[dict[str, list[float]]]
    defaulted: str = "d"
    opt: str | None = None


int64 = st.integers(-(2**63), 2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | int64 | finite | st.text(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
    max_leaves=10,
)
common = dict(
    i=int64,
    f=finite,
    b=st.booleans(),
    s=st.text(),
    anything=json_values,
    maybe=st.none() | int64,
    ints=st.lists(int64, max_size=5),
    names=st.dictionaries(st.text(), st.text(), max_size=5),
    nested=st.lists(st.dictionaries(st.text(), st.lists(finite, max_size=3)), max_size=3),
    defaulted=st.text(),
    opt=st.none() | st.text(),
)


@given(st.builds(Everything, raw=st.binary(), **common))
def test_every_field_type_round_trips_in_msgpack(p: Everything) -> None:
    body = encode_body(p, MSGPACK)
    assert decode_body(Everything, MSGPACK, body) == p
    (frame,) = FrameDecoder().feed(encode_frame(MSGPACK, 0, p.TYPE, 9, body))
    assert decode_body(Everything, frame.serializer, frame.body) == p


@given(st.builds(NoBytes, **common))
@pytest.mark.parametrize("ser", [JSON, MSGPACK])
def test_every_json_field_type_round_trips(ser: int, p: NoBytes) -> None:
    body = encode_body(p, ser)
    assert decode_body(NoBytes, ser, body) == p
    (frame,) = FrameDecoder().feed(encode_frame(ser, FLAG_RESPONSE, p.TYPE, 9, body))
    assert decode_body(NoBytes, frame.serializer, frame.body) == p


def test_defaults_fill_missing_optional_fields() -> None:
    p = decode_body(
        NoBytes,
        JSON,
        b'{"i":1,"f":2,"b":true,"s":"","anything":null,"maybe":null,"ints":[],'
        b'"names":{},"nested":[]}',
    )
    assert (p.defaulted, p.opt, p.f) == ("d", None, 2.0)
    assert type(p.f) is float


# -- bad headers ------------------------------------------------------------------------------

BAD_HEADERS = [
    (HEADER.pack(0x00, 1, 1, 0, 1, 0, 0), codes.BAD_MAGIC),
    (HEADER.pack(0x47, 1, 1, 0, 1, 0, 0), codes.BAD_MAGIC),
    (HEADER.pack(0xBC, 0, 1, 0, 1, 0, 0), codes.BAD_VERSION),
    (HEADER.pack(0xBC, 2, 1, 0, 1, 0, 0), codes.BAD_VERSION),
    (HEADER.pack(0xBC, 1, 0, 0, 1, 0, 0), codes.BAD_SERIALIZER),
    (HEADER.pack(0xBC, 1, 3, 0, 1, 0, 0), codes.BAD_SERIALIZER),
    (HEADER.pack(0xBC, 1, 255, 0, 1, 0, 0), codes.BAD_SERIALIZER),
    (HEADER.pack(0xBC, 1, 1, 0x08, 1, 0, 0), codes.BAD_FLAGS),
    (HEADER.pack(0xBC, 1, 1, 0x80, 1, 0, 0), codes.BAD_FLAGS),
    (HEADER.pack(0xBC, 1, 2, 0xFF, 1, 0, 0), codes.BAD_FLAGS),
    (HEADER.pack(0xBC, 1, 1, 0, 1, 0, 1024 + 1), codes.FRAME_TOO_LARGE),
    (HEADER.pack(0xBC, 1, 1, 0, 1, 0, 0xFFFFFFFF), codes.FRAME_TOO_LARGE),
]


def _decoder() -> FrameDecoder:
    return FrameDecoder(max_body=1024)


@pytest.mark.parametrize(("header", "code"), BAD_HEADERS)
def test_bad_header_whole(header: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        _decoder().feed(header + b"\0" * 16)
    assert info.value.code == code
    assert info.value.fatal


@pytest.mark.parametrize(("header", "code"), BAD_HEADERS)
def test_bad_header_byte_by_byte_fails_without_the_body(header: bytes, code: str) -> None:
    # The error comes with the header's bytes: no body is needed (or buffered).
    d = _decoder()
    with pytest.raises(ProtocolError) as info:
        for i in range(len(header)):
            d.feed(header[i : i + 1])
    assert info.value.code == code


@pytest.mark.parametrize(("header", "code"), BAD_HEADERS)
def test_bad_header_after_good_frames(header: bytes, code: str) -> None:
    d = _decoder()
    good = wire(FRAMES[0])
    assert d.feed(good) == [FRAMES[0]]
    with pytest.raises(ProtocolError) as info:
        d.feed(good[:3] + good[3:] + header)
    assert info.value.code == code


def test_bad_field_is_reported_by_the_first_byte_that_shows_it() -> None:
    # A wrong peer is told at once, not after it sends a full header.
    for prefix, code in [
        (b"\x00", codes.BAD_MAGIC),
        (b"\xbc\x02", codes.BAD_VERSION),
        (b"\xbc\x01\x09", codes.BAD_SERIALIZER),
        (b"\xbc\x01\x01\x10", codes.BAD_FLAGS),
    ]:
        with pytest.raises(ProtocolError) as info:
            FrameDecoder().feed(prefix)
        assert info.value.code == code


def test_length_is_checked_before_the_body_arrives() -> None:
    d = FrameDecoder(max_body=100)
    header = HEADER.pack(0xBC, 1, 1, 0, 1000, 1, 101)
    with pytest.raises(ProtocolError) as info:
        d.feed(header)  # no body byte sent at all
    assert info.value.code == codes.FRAME_TOO_LARGE
    assert d.buffered == 0


def test_only_known_serializers_are_accepted() -> None:
    d = FrameDecoder(serializers=frozenset({MSGPACK}))
    with pytest.raises(ProtocolError) as info:
        d.feed(encode_frame(JSON, 0, 1, 0, b"{}"))
    assert info.value.code == codes.BAD_SERIALIZER


@pytest.mark.parametrize(("header", "code"), BAD_HEADERS[:1] + BAD_HEADERS[-2:-1])
def test_decoder_refuses_input_after_a_fatal_error(header: bytes, code: str) -> None:
    d = _decoder()
    with pytest.raises(ProtocolError):
        d.feed(header)
    assert d.buffered == 0
    for data in (wire(FRAMES[0]), b"", b"\xbc"):
        with pytest.raises(ProtocolError) as info:
            d.feed(data)
        assert info.value.fatal


@given(st.binary(max_size=64))
def test_garbage_never_escapes_as_another_exception(data: bytes) -> None:
    d = FrameDecoder(max_body=16)
    try:
        for i in range(0, len(data), 3):
            for f in d.feed(data[i : i + 3]):
                assert isinstance(f, Frame)
    except ProtocolError as exc:
        assert exc.fatal
        assert exc.code in {
            codes.BAD_MAGIC,
            codes.BAD_VERSION,
            codes.BAD_SERIALIZER,
            codes.BAD_FLAGS,
            codes.FRAME_TOO_LARGE,
        }


@pytest.mark.parametrize(("header", "code"), BAD_HEADERS)
def test_receive_returns_the_frames_before_the_error(header: bytes, code: str) -> None:
    d = _decoder()
    frames, error = d.receive(STREAM[: len(wire(FRAMES[0]))] + wire(FRAMES[1]) + header)
    assert frames == FRAMES[:2]
    assert error is not None and error.code == code and error.fatal
    assert d.buffered == 0
    frames, error = d.receive(wire(FRAMES[0]))  # refused from now on
    assert frames == [] and error is not None and error.fatal


def test_receive_without_an_error() -> None:
    d = FrameDecoder()
    assert d.receive(STREAM[:20]) == (FRAMES[:1], None)
    assert d.receive(STREAM[20:]) == (FRAMES[1:], None)
