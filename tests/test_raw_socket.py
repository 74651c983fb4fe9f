"""A raw-socket client, framed by hand from DESIGN.md section 2, against a real Server.

Nothing here encodes with bitchat: the ``RawPeer`` of conftest packs the 14-byte
header with ``struct`` and the body with orjson / msgpack.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from bitchat import Packet, Server, Session, Settings

PING, PONG, ERROR = 1, 2, 3
POOL, RESPONSE, ERR = 1, 2, 4


class Add(Packet, type=61200, register=False):
    a: int
    b: int


class Sum(Packet, type=61201, register=False):
    total: int


class Secret(Packet, type=61202, register=False):
    pass


class Orphan(Packet, type=61203, register=False):
    """Known to the registry but without a handler."""


@pytest.fixture
async def server(settings: Settings, registry_of: Any) -> AsyncIterator[Server]:
    srv = Server(
        "127.0.0.1", 0, settings.replace(max_frame_size=1024), registry=registry_of(Orphan)
    )

    @srv.handler(Add)
    def add(session: Session, p: Add) -> Sum:
        return Sum(p.a + p.b)

    @srv.handler(Secret, login_required=True)
    async def secret(session: Session, p: Secret) -> Sum:
        return Sum(42)

    closed: asyncio.Queue[Session] = asyncio.Queue()
    srv.on_session_close.append(closed.put_nowait)
    srv.closed_sessions = closed  # type: ignore[attr-defined]
    async with srv:
        yield srv


@pytest.fixture
def port(server: Server) -> int:
    return server.address[1]


@pytest.mark.parametrize("ser", [1, 2])
async def test_ping_pong(port: int, raw_connect: Any, ser: int) -> None:
    peer = await raw_connect(port)
    assert await peer.request(PING, rid=77, ser=ser) == (ser, RESPONSE, PONG, 77, {})
    # A one-way Ping (request id 0) is answered too: it is the heartbeat.
    assert await peer.request(PING, rid=0, ser=ser) == (ser, RESPONSE, PONG, 0, {})
    assert await peer.request(PING, rid=0xFFFFFFFF, ser=ser) == (
        ser,
        RESPONSE,
        PONG,
        0xFFFFFFFF,
        {},
    )


@pytest.mark.parametrize("ser", [1, 2])
async def test_request_response(port: int, raw_connect: Any, ser: int) -> None:
    peer = await raw_connect(port)
    assert await peer.request(61200, {"a": 2, "b": 3}, rid=5, ser=ser) == (
        ser,
        RESPONSE,
        61201,
        5,
        {"total": 5},
    )


async def test_pipelined_requests_in_one_write_are_answered_in_order(
    port: int, raw_connect: Any
) -> None:
    peer = await raw_connect(port)
    peer.send(
        b"".join(peer.frame(61200, {"a": i, "b": 1}, rid=i + 1, ser=1 + i % 2) for i in range(50))
    )
    for i in range(50):
        assert await peer.read_frame() == (1 + i % 2, RESPONSE, 61201, i + 1, {"total": i + 1})


async def test_frames_split_across_writes(port: int, raw_connect: Any) -> None:
    peer = await raw_connect(port)
    data = peer.frame(61200, {"a": 1, "b": 1}, rid=9)
    for i in range(len(data)):
        peer.send(data[i : i + 1])
        await peer.writer.drain()
    assert await peer.read_frame() == (1, RESPONSE, 61201, 9, {"total": 2})


async def error(peer: Any, *, rid: int, ser: int = 1) -> str:
    got_ser, flags, type_, got_rid, body = await peer.read_frame()
    assert (got_ser, flags, type_, got_rid) == (ser, RESPONSE | ERR, ERROR, rid)
    assert isinstance(body["message"], str) and body["message"]
    return str(body["code"])


async def still_open(peer: Any) -> None:
    assert await peer.request(PING, rid=1234) == (1, RESPONSE, PONG, 1234, {})


@pytest.mark.parametrize("ser", [1, 2])
async def test_unknown_type_keeps_the_connection(port: int, raw_connect: Any, ser: int) -> None:
    peer = await raw_connect(port)
    peer.send_frame(60999, {"x": 1}, rid=3, ser=ser)
    assert await error(peer, rid=3, ser=ser) == "unknown_type"
    peer.send_frame(61203, {}, rid=4, ser=ser)
    assert await error(peer, rid=4, ser=ser) == "no_handler"
    await still_open(peer)


@pytest.mark.parametrize(
    ("ser", "raw"),
    [(1, b"{oops"), (1, b""), (1, b"\xff\xfe"), (2, b"\xc1"), (2, b"\x82\xa1a"), (2, b"")],
)
async def test_body_that_does_not_deserialize(
    port: int, raw_connect: Any, ser: int, raw: bytes
) -> None:
    peer = await raw_connect(port)
    peer.send_frame(61200, raw=raw, rid=8, ser=ser)
    assert await error(peer, rid=8, ser=ser) == "bad_body"
    await still_open(peer)


@pytest.mark.parametrize(
    "body",
    [{"a": 1}, {"a": 1, "b": "2"}, {"a": True, "b": 1}, {"a": 1.5, "b": 1}, [1, 2], "x", None],
)
async def test_invalid_packet(port: int, raw_connect: Any, body: Any) -> None:
    peer = await raw_connect(port)
    peer.send_frame(61200, raw=orjson.dumps(body), rid=11)
    assert await error(peer, rid=11) == "invalid_packet"
    await still_open(peer)


async def test_login_required(port: int, raw_connect: Any, server: Server) -> None:
    peer = await raw_connect(port)
    peer.send_frame(61202, rid=12)
    assert await error(peer, rid=12) == "unauthenticated"
    # Refused before its body is even looked at.
    peer.send_frame(61202, raw=b"{garbage", rid=13)
    assert await error(peer, rid=13) == "unauthenticated"
    (session,) = server.sessions.values()
    session.user_id = 7
    assert await peer.request(61202, rid=14) == (1, RESPONSE, 61201, 14, {"total": 42})


H = struct.Struct(">BBBBHII")

FATAL = [
    (H.pack(0x00, 1, 1, 0, PING, 1, 0), "bad_magic"),
    (b"GARBAGE-GARBAGE", "bad_magic"),
    (H.pack(0xBC, 2, 1, 0, PING, 1, 0), "bad_version"),
    (H.pack(0xBC, 1, 9, 0, PING, 1, 0), "bad_serializer"),
    (H.pack(0xBC, 1, 1, 0x40, PING, 1, 0), "bad_flags"),
    (H.pack(0xBC, 1, 1, 0, 61200, 1, 1025), "frame_too_large"),
    (H.pack(0xBC, 1, 1, 0, 61200, 1, 0xFFFFFFFF), "frame_too_large"),
]


@pytest.mark.parametrize(("data", "code"), FATAL)
async def test_fatal_errors_send_error_then_close(
    port: int, raw_connect: Any, server: Server, wait: Any, data: bytes, code: str
) -> None:
    good = await raw_connect(port)
    await still_open(good)
    peer = await raw_connect(port)
    await still_open(peer)  # a bitchat connection first, then the bad frame
    peer.send(data)
    rest = await peer.read_to_eof()
    magic, version, ser, flags, type_, rid, n = H.unpack(rest[:14])
    assert (magic, version, ser, flags, type_, rid) == (0xBC, 1, 1, RESPONSE | ERR, ERROR, 0)
    body = orjson.loads(rest[14 : 14 + n])
    assert body["code"] == code
    assert len(rest) == 14 + n  # nothing after the Error: the connection is closed
    # The other client keeps being served, and so do new ones.
    await still_open(good)
    await still_open(await raw_connect(port))
    gone = await wait(server.closed_sessions.get())  # type: ignore[attr-defined]
    assert gone.closed and gone.id not in server.sessions


async def test_oversized_length_fails_before_the_body_is_sent(port: int, raw_connect: Any) -> None:
    peer = await raw_connect(port)
    peer.send(H.pack(0xBC, 1, 2, 0, 61200, 1, 10_000_000))  # and never a body byte
    rest = await peer.read_to_eof()
    assert rest[14:] and b"frame_too_large" in rest


async def test_first_byte_not_bitchat_is_closed(
    port: int, raw_connect: Any, server: Server
) -> None:
    peer = await raw_connect(port)
    peer.send(b"\x00\x01\x02")
    with contextlib.suppress(ConnectionResetError):
        assert await peer.read_to_eof() == b""
    assert not server.sessions


async def test_stray_responses_from_the_client_are_ignored(port: int, raw_connect: Any) -> None:
    peer = await raw_connect(port)
    peer.send_frame(61201, {"total": 1}, rid=5, flags=RESPONSE)
    peer.send_frame(PONG, {}, rid=6, flags=RESPONSE)
    await still_open(peer)


async def test_one_way_request_gets_no_answer(port: int, raw_connect: Any) -> None:
    peer = await raw_connect(port)
    peer.send_frame(61200, {"a": 1, "b": 2}, rid=0)
    await still_open(peer)  # the next frame read is the Pong, not a Sum


async def test_many_clients_at_once(port: int, raw_connect: Any) -> None:
    peers = [await raw_connect(port) for _ in range(20)]
    for i, p in enumerate(peers):
        p.send_frame(61200, {"a": i, "b": i}, rid=i + 1, ser=2)
    for i, p in enumerate(peers):
        assert await p.read_frame() == (2, RESPONSE, 61201, i + 1, {"total": 2 * i})


@pytest.mark.parametrize(("data", "code"), FATAL[:1] + FATAL[-2:-1])
async def test_frames_before_the_bad_bytes_are_still_answered(
    port: int, raw_connect: Any, data: bytes, code: str
) -> None:
    # Whatever the segmentation, every complete frame before the bad bytes is handled.
    peer = await raw_connect(port)
    peer.send(peer.frame(PING, rid=1) + peer.frame(61200, {"a": 1, "b": 2}, rid=2) + data)
    assert await peer.read_frame() == (1, RESPONSE, PONG, 1, {})
    assert await peer.read_frame() == (1, RESPONSE, 61201, 2, {"total": 3})
    assert await error(peer, rid=0) == code
    assert await peer.read_to_eof() == b""
