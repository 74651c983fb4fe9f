"""The WebSocket transport, with a real client library (``websockets``) on loopback.

Each binary message carries exactly one frame of DESIGN.md section 2, packed by
hand here. A WebSocket session is a first-class connection: login, pushes,
heartbeats, the idle timeout and the limits are the TCP session's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from wsproto.frame_protocol import FrameProtocol

from bitchat import Server, Session
from bitchat.im.client import IMClient
from im_helpers import pending_of
from web_helpers import (
    ACK,
    CHAT,
    ERR,
    ERROR,
    LOGIN,
    LOGIN_OK,
    PING,
    PONG,
    RESPONSE,
    SEND_ACK,
    SEND_P2P,
    WAIT,
    frame,
    running_server,
    server_fixture,  # noqa: F401 (fixture)
    unframe,
)


def ws_url(server: Server, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{server.address[1]}{path}"


async def recv(ws: ClientConnection) -> tuple[int, int, int, Any]:
    data = await asyncio.wait_for(ws.recv(), WAIT)
    assert isinstance(data, bytes), "the server sends binary messages only"
    return unframe(data)


async def request(ws: ClientConnection, type_: int, body: Any = None, rid: int = 1) -> Any:
    await ws.send(frame(type_, body, rid=rid))
    return await recv(ws)


async def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    """The close code and reason the server sent."""
    await asyncio.wait_for(ws.wait_closed(), WAIT)
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason


def session_closes(server: Server) -> asyncio.Queue[Session]:
    q: asyncio.Queue[Session] = asyncio.Queue()
    server.on_session_close.append(q.put_nowait)
    return q


async def test_ping_login_and_chat_with_a_tcp_client(server: Server) -> None:
    port = server.address[1]
    async with connect(ws_url(server)) as ws, IMClient("127.0.0.1", port) as tcp:
        assert await request(ws, PING, rid=7) == (RESPONSE, PONG, 7, {})
        flags, type_, rid, ok = await request(ws, LOGIN, {"name": "wendy", "password": "pw"}, 8)
        assert (flags, type_, rid, ok["name"]) == (RESPONSE, LOGIN_OK, 8, "wendy")
        me = await tcp.login("tom", "pw")
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        tcp.on_message(inbox.put_nowait)

        # TCP -> WebSocket: a push, request id 0.
        ack = await tcp.send_p2p(ok["user_id"], "over the bridge")
        flags, type_, rid, body = await recv(ws)
        assert (flags, type_, rid) == (0, CHAT, 0)
        assert (body["msg_id"], body["text"], body["sender_name"]) == (
            ack.msg_id,
            "over the bridge",
            "tom",
        )
        # The ack clears it: nothing is pending for the WebSocket user any more.
        await ws.send(frame(ACK, {"msg_ids": [body["msg_id"]]}, rid=9))
        assert (await recv(ws))[:3] == (RESPONSE, 100, 9)
        assert await pending_of(server.data["im"], ok["user_id"], ok["device"]) == 0

        # WebSocket -> TCP.
        _, type_, _, sent = await request(ws, SEND_P2P, {"to": me.user_id, "text": "and back"}, 10)
        assert type_ == SEND_ACK
        got = await asyncio.wait_for(inbox.get(), WAIT)
        assert (got.msg_id, got.text, got.sender_name) == (sent["msg_id"], "and back", "wendy")


async def test_requests_before_login_are_refused(server: Server) -> None:
    async with connect(ws_url(server)) as ws:
        flags, type_, rid, body = await request(ws, SEND_P2P, {"to": 1, "text": "x"}, 3)
        assert (flags, type_, rid, body["code"]) == (RESPONSE | ERROR, ERR, 3, "unauthenticated")
        assert await request(ws, PING, rid=4) == (RESPONSE, PONG, 4, {})


async def test_websocket_ping_is_answered(server: Server) -> None:
    async with connect(ws_url(server)) as ws:
        pong = await ws.ping(b"are you there")
        latency = await asyncio.wait_for(pong, WAIT)
        assert latency >= 0


async def test_fragmented_message_is_joined(server: Server) -> None:
    data = frame(PING, rid=21)
    async with connect(ws_url(server)) as ws:
        # One message in three WebSocket frames, split inside the bitchat header and body.
        await ws.send([data[:3], data[3:15], data[15:]])
        assert await recv(ws) == (RESPONSE, PONG, 21, {})


async def test_many_answers_leave_as_one_message_each(server: Server) -> None:
    async with connect(ws_url(server)) as ws:
        for rid in range(1, 51):
            await ws.send(frame(PING, rid=rid))
        for rid in range(1, 51):
            assert await recv(ws) == (RESPONSE, PONG, rid, {})


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (frame(PING, rid=1) + frame(PING, rid=2), "bad_message"),  # two frames
        (frame(PING, rid=1)[:10], "bad_message"),  # part of a header
        (frame(PING, {"x": 1}, rid=1)[:-2], "bad_message"),  # a header without all its body
        (b"", "bad_message"),
        (frame(PING, magic=0xAB), "bad_magic"),
        (frame(PING, version=9), "bad_version"),
        (frame(PING, ser=7), "bad_serializer"),
        (frame(PING, flags=0x80), "bad_flags"),
        (frame(PING, length=(1 << 20) + 1, raw=b""), "frame_too_large"),
    ],
)
async def test_a_message_that_is_not_one_good_frame_is_a_protocol_error(
    server: Server, message: bytes, code: str
) -> None:
    gone = session_closes(server)
    async with connect(ws_url(server)) as ws:
        await ws.send(message)
        flags, type_, rid, body = await recv(ws)
        assert (flags, type_, rid, body["code"]) == (RESPONSE | ERROR, ERR, 0, code)
        assert await closed(ws) == (1002, code)
    assert (await asyncio.wait_for(gone.get(), WAIT)).transport_name == "ws"


async def test_message_over_the_size_limit_is_closed_with_1009(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, max_ws_message_size=1024) as server,
        connect(ws_url(server)) as ws,
    ):
        assert await request(ws, PING, rid=1) == (RESPONSE, PONG, 1, {})
        # Two fragments under the limit each: the limit counts the whole message.
        big = frame(PING, raw=b" " * 1500, rid=2)
        await ws.send([big[:800], big[800:]])
        code, reason = await closed(ws)
        assert code == 1009 and reason is not None and "1024" in reason


async def test_text_message_is_closed_with_1003(server: Server) -> None:
    async with connect(ws_url(server)) as ws:
        await ws.send('{"type": 1}')
        assert (await closed(ws))[0] == 1003


async def test_client_close_handshake(server: Server) -> None:
    gone = session_closes(server)
    async with connect(ws_url(server)) as ws:
        await request(ws, LOGIN, {"name": "cleo", "password": "pw"})
        assert [s.transport_name for s in server.sessions.values()] == ["ws"]
        await ws.close(1000, "bye")
        # The server answered with the same code: a clean close on both sides.
        assert ws.close_code == 1000
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
    session = await asyncio.wait_for(gone.get(), WAIT)
    assert session.transport_name == "ws" and session.closed
    assert server.sessions == {}


async def test_idle_websocket_is_closed(tmp_path: Path) -> None:
    async with running_server(tmp_path, read_idle_timeout=0.6) as server:
        gone = session_closes(server)
        async with connect(ws_url(server), ping_interval=None) as ws:
            assert await request(ws, PING, rid=1) == (RESPONSE, PONG, 1, {})
            assert await closed(ws) == (1000, "")
        await asyncio.wait_for(gone.get(), WAIT)


async def test_rate_limit_applies_to_websocket_sessions(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, rate_limit=0.001, rate_burst=3) as server,
        connect(ws_url(server)) as ws,
    ):
        codes = []
        for rid in range(1, 6):
            _, _, _, body = await request(ws, LOGIN, {"name": "", "password": ""}, rid)
            codes.append(body["code"])
        assert codes == ["invalid_packet"] * 3 + ["rate_limited"] * 2


async def test_server_stop_closes_websockets(tmp_path: Path) -> None:
    async with running_server(tmp_path, shutdown_grace=2.0) as server:
        ws = await connect(ws_url(server))
        await request(ws, PING)
        await asyncio.wait_for(server.stop(), WAIT)
        assert ws.close_code == 1001  # going away
        assert ws.close_reason == "server shutting down"
        await ws.close()


async def test_frames_right_after_the_handshake_are_read(server: Server) -> None:
    """A client may send a message in the same packet as its upgrade request."""
    port = server.address[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    masked = FrameProtocol(client=True, extensions=[]).send_data(frame(PING, rid=5), True)
    writer.write(handshake + masked)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head  # RFC 6455 1.3
    # An unmasked server frame: FIN+binary, 7-bit length, then the bitchat frame.
    first = await asyncio.wait_for(reader.readexactly(2), WAIT)
    assert first[0] == 0x82
    payload = await asyncio.wait_for(reader.readexactly(first[1]), WAIT)
    assert unframe(payload) == (RESPONSE, PONG, 5, {})
    writer.close()


async def test_handshake_errors(server: Server) -> None:
    base = f"http://127.0.0.1:{server.address[1]}"
    async with httpx.AsyncClient(base_url=base) as http:
        plain = await http.get("/ws")
        assert plain.status_code == 426 and plain.headers["upgrade"] == "websocket"
        bad_version = await http.get(
            "/ws",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "8",
            },
        )
        assert bad_version.status_code == 426
        assert bad_version.headers["sec-websocket-version"] == "13"
        no_key = await http.get(
            "/ws",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
            },
        )
        assert no_key.status_code == 400
    with pytest.raises(InvalidStatus) as info:
        await connect(ws_url(server, "/elsewhere"))
    assert info.value.response.status_code == 404
    assert server.sessions == {}


async def test_a_broken_websocket_frame_closes_only_that_connection(server: Server) -> None:
    port = server.address[1]
    async with connect(ws_url(server)) as good:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        writer.write(b"\x82\x05hello")  # a client frame without a mask: not allowed
        rest = await asyncio.wait_for(reader.read(), WAIT)
        assert rest[:1] == b"\x88"  # a close frame, then EOF
        assert int.from_bytes(rest[2:4], "big") == 1002
        writer.close()
        assert await request(good, PING, rid=3) == (RESPONSE, PONG, 3, {})


def test_the_web_side_on_uvloop(tmp_path: Path) -> None:
    """``bitchat server`` runs on uvloop: the HTTP and WebSocket take-over works there too."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async with running_server(tmp_path, max_ws_message_size=512) as server:
            port = server.address[1]
            assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                assert (await http.get("/")).status_code == 200
                async with connect(ws_url(server)) as ws:
                    assert await request(ws, PING, rid=1) == (RESPONSE, PONG, 1, {})
                    _, type_, _, _ = await request(ws, LOGIN, {"name": "uv", "password": "pw"}, 2)
                    assert type_ == LOGIN_OK
                    channels = (await http.get("/status/channels")).json()["channels"]
                    assert [(c["transport"], c["user_name"]) for c in channels] == [("ws", "uv")]
                    await ws.send(frame(PING, raw=b" " * 600, rid=3))
                    assert (await closed(ws))[0] == 1009
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost x\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(), WAIT)).startswith(b"HTTP/1.1 400 ")
            writer.close()

    uvloop.run(scenario())
