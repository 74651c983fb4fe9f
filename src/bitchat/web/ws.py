"""A bitchat session over a WebSocket (wsproto), a first-class connection like a TCP one.

Each binary message carries exactly one frame of the wire protocol (DESIGN.md
section 2). The frame is checked with the session's own ``FrameDecoder`` as its
bytes arrive (the header, the length against ``max_frame_size`` included,
before the body is buffered), then handed to ``Session._frame_received``: login,
pushes, heartbeats, the idle timeout, the rate limit and flow control are the
very code a TCP session runs.

Close codes the server sends::

    1000  normal close (idle timeout, logout)
    1001  going away: the server is shutting down
    1002  protocol error: a bad frame header, or a message that is not exactly
          one frame (an Error packet goes first, as on TCP)
    1003  a text message (the protocol is binary)
    1009  a message over ``Settings.max_ws_message_size``

WebSocket pings are answered with pongs; fragmented messages are joined; the
close handshake is done both ways (a peer that never answers the server's
close is dropped after ``Settings.ws_close_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from wsproto import WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from bitchat.connection import Session
from bitchat.errors import ProtocolError, codes
from bitchat.protocol.frame import HEADER_SIZE, Frame

if TYPE_CHECKING:
    from bitchat.server import Server

log = logging.getLogger("bitchat.web.ws")

BAD_MESSAGE = codes.BAD_MESSAGE
"""Error code: a WebSocket message did not hold exactly one frame."""

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_MESSAGE_TOO_BIG = 1009


class WsSession(Session, asyncio.Protocol):
    """A session whose transport is a WebSocket; ``transport_name`` is ``"ws"``."""

    transport_name = "ws"

    def __init__(
        self, server: Server, transport: asyncio.Transport, remote: str, ws: WSConnection
    ) -> None:
        Session.__init__(self, server, remote)
        self.transport = transport
        self._ws = ws
        self._max_message = server.settings.max_ws_message_size
        self._message_size = 0
        self._message_frames: list[Frame] = []
        self._close_code = CLOSE_NORMAL
        self._close_reason = ""
        self._close_timer: asyncio.TimerHandle | None = None

    def start(self, handshake: bytes, trailing: bytes) -> None:
        """Send the 101 answer, register the session and read what followed the request."""
        self.transport.write(handshake)
        self.bytes_out += len(handshake)
        self._opened()
        if trailing:
            self.data_received(trailing)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._last_read = self._loop.time()
        ws = self._ws
        try:
            ws.receive_data(data)
        except LocalProtocolError:
            return  # after the close handshake: nothing more is read
        for event in ws.events():
            if isinstance(event, BytesMessage):
                if ws.state is ConnectionState.OPEN and not self._message_part(
                    bytes(event.data), event.message_finished
                ):
                    return
            elif isinstance(event, Ping):
                self._send_control(event.response())
            elif isinstance(event, Pong):
                pass  # any input counts for the idle timeout
            elif isinstance(event, CloseConnection):
                self._close_received(event)
                return
            elif isinstance(event, TextMessage):
                self._fail(CLOSE_UNSUPPORTED_DATA, "bitchat speaks binary messages only")
                return

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._closed()

    def pause_writing(self) -> None:
        self._pause(1)

    def resume_writing(self) -> None:
        self._resume(1)

    # -- messages -----------------------------------------------------------------------------

    def _message_part(self, data: bytes, finished: bool) -> bool:
        """Feed one piece of a binary message; False when the session is failing."""
        self._message_size += len(data)
        if self._message_size > self._max_message:
            self._fail(CLOSE_MESSAGE_TOO_BIG, f"a message is limited to {self._max_message} bytes")
            return False
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self._fatal(exc)
            return False
        if frames:
            self._message_frames.extend(frames)
        extra = len(self._message_frames) > 1 or (self._message_frames and self._decoder.buffered)
        if extra or (finished and not self._message_frames):
            self._fatal(
                ProtocolError(
                    BAD_MESSAGE,
                    "a WebSocket message must hold exactly one frame "
                    f"({HEADER_SIZE}-byte header and its body)",
                )
            )
            return False
        if finished:
            frame = self._message_frames.pop()
            self._message_size = 0
            self._frame_received(frame)
        return True

    def _fatal(self, exc: ProtocolError) -> None:
        self._close_code = CLOSE_PROTOCOL_ERROR
        self._close_reason = exc.code
        super()._fatal(exc)

    def _fail(self, code: int, reason: str) -> None:
        log.info("closing WebSocket %s (%s): %s", self.id, self.remote, reason)
        self._close_code = code
        self._close_reason = reason
        self.close()

    def _close_received(self, event: CloseConnection) -> None:
        ws = self._ws
        if ws.state is ConnectionState.REMOTE_CLOSING:
            # The peer closes: answer with its code, then end the TCP connection.
            self._send_control(event.response())
        elif ws.state is ConnectionState.OPEN:
            # wsproto found a broken WebSocket frame: close with its code.
            self._close_code = event.code
            self._send_control(CloseConnection(event.code, (event.reason or "")[:100]))
        self.transport.close()

    # -- Session's transport adapter ----------------------------------------------------------

    def _write(self, data: bytes) -> None:
        ws = self._ws
        if ws.state is not ConnectionState.OPEN:
            return  # closing: nothing but the close frame may follow it
        # Session coalesces frames into one write; each frame gets a message of its own.
        n = len(data)
        end = HEADER_SIZE + int.from_bytes(data[10:HEADER_SIZE], "big")
        if end == n:
            out = ws.send(BytesMessage(data=data))
        else:
            parts = []
            pos = 0
            while pos < n:
                end = pos + HEADER_SIZE + int.from_bytes(data[pos + 10 : pos + HEADER_SIZE], "big")
                parts.append(ws.send(BytesMessage(data=data[pos:end])))
                pos = end
            out = b"".join(parts)
        self.bytes_out += len(out) - n  # Session counted the frames; add the WebSocket framing
        self.transport.write(out)

    def _send_control(self, event: Ping | Pong | CloseConnection) -> None:
        try:
            out = self._ws.send(event)
        except LocalProtocolError:
            return
        self.bytes_out += len(out)
        self.transport.write(out)

    def _write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def _abort(self) -> None:
        self.transport.abort()

    def _close_transport(self) -> None:
        if self.transport.is_closing():
            return
        if self._ws.state is ConnectionState.OPEN:
            if self._close_code == CLOSE_NORMAL and self.server.stopping:
                self._close_code, self._close_reason = CLOSE_GOING_AWAY, "server shutting down"
            self._send_control(CloseConnection(self._close_code, self._close_reason))
            # Wait for the peer's close frame (it ends the connection), but not forever.
            timeout = self.server.settings.ws_close_timeout
            self._close_timer = self._loop.call_later(timeout, self._abort)
            if self._read_paused:
                self._resume_reading()  # the answer to the close must be read
        else:
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()
