"""A bitchat session over a WebSocket (wsproto), a first-class connection like a TCP one.

Each binary message carries exactly one frame of the wire protocol (DESIGN.md
section 2). The frame is checked with the session's own ``FrameDecoder`` as its
bytes arrive (the header, the length against ``max_frame_size`` included,
before the body is buffered), by the session's own connection core: login,
pushes, heartbeats, the idle timeout, the rate limit and flow control are the
very code a TCP session runs. Going out, the core hands over one ``bytes`` per
frame, and each becomes one message.

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

from bitchat.errors import ProtocolError, codes
from bitchat.protocol.frame import HEADER_SIZE
from bitchat.session import Session

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


class WsConnection(asyncio.Protocol):
    """The :class:`~bitchat.session.Link` of a session over a WebSocket
    (``transport_name`` is ``"ws"``)."""

    transport_name = "ws"

    def __init__(
        self, server: Server, transport: asyncio.Transport, remote: str, ws: WSConnection
    ) -> None:
        self.server = server
        self.transport = transport
        self.remote = remote
        self._ws = ws
        self.session = Session(server, remote, self)
        self._max_message = server.settings.max_ws_message_size
        self._message_size = 0
        self._message_frames = 0  # frames completed in the message being received
        self._close_code = CLOSE_NORMAL
        self._close_reason = ""
        self._close_timer: asyncio.TimerHandle | None = None
        self._reported = False  # the server's write budget holds a size for this link

    def start(self, handshake: bytes, trailing: bytes) -> None:
        """Send the 101 answer, register the session and read what followed the request."""
        self.transport.write(handshake)
        self.session.core.bytes_out += len(handshake)
        self.session.opened()
        if trailing:
            self.data_received(trailing)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        session = self.session
        core = session.core
        ws = self._ws
        try:
            ws.receive_data(data)
        except LocalProtocolError:
            return  # after the close handshake: nothing more is read
        # Any input counts for the idle timeout, WebSocket control frames included.
        now = core.last_received = core.clock()
        whole = False
        for event in ws.events():
            whole = True
            if isinstance(event, BytesMessage):
                if ws.state is ConnectionState.OPEN and not self._message_part(
                    bytes(event.data), event.message_finished
                ):
                    return
            elif isinstance(event, Ping):
                self._send_control(event.response())
            elif isinstance(event, Pong):
                pass
            elif isinstance(event, CloseConnection):
                self._close_received(event)
                return
            elif isinstance(event, TextMessage):
                self._fail(CLOSE_UNSUPPORTED_DATA, "bitchat speaks binary messages only")
                return
        # Bytes that completed no WebSocket frame start the deadline to complete one
        # (wsproto holds them, so the core cannot see them).
        if not whole and core.frame_started is None:
            core.frame_started = now
            if self.server.settings.frame_timeout > 0:
                session._frame_begun(now)
        elif whole and not core.buffered:
            core.frame_started = None

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self.server.release_slot(self.transport)
        self.server.unsent.remove(self)
        self.session.connection_lost()

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()
        if self._reported:
            size = self.transport.get_write_buffer_size()
            self._reported = size > 0
            self.server.unsent_changed(self, size)

    # -- messages -----------------------------------------------------------------------------

    def _message_part(self, data: bytes, finished: bool) -> bool:
        """Feed one piece of a binary message; False when the session is failing."""
        session = self.session
        core = session.core
        self._message_size += len(data)
        if self._message_size > self._max_message:
            self._fail(CLOSE_MESSAGE_TOO_BIG, f"a message is limited to {self._max_message} bytes")
            return False
        before = core.frames_received
        core.receive_data(data)
        if core.error is not None:  # a bad frame header: the core's failure event closes
            self._close_code = CLOSE_PROTOCOL_ERROR
            self._close_reason = core.error.code
            session.run_events()
            return False
        self._message_frames += core.frames_received - before
        extra = self._message_frames > 1 or (self._message_frames and core.buffered)
        if extra or (finished and not self._message_frames):
            error = ProtocolError(
                BAD_MESSAGE,
                "a WebSocket message must hold exactly one frame "
                f"({HEADER_SIZE}-byte header and its body)",
            )
            self._close_code = CLOSE_PROTOCOL_ERROR
            self._close_reason = error.code
            session._fatal(error)
            return False
        if finished:
            # The message is whole and good: its frame runs now, not before.
            self._message_frames = 0
            self._message_size = 0
            session.run_events()
        return True

    def _fail(self, code: int, reason: str) -> None:
        log.info("closing WebSocket %s (%s): %s", self.session.id, self.remote, reason)
        self._close_code = code
        self._close_reason = reason
        self.session.close()

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

    # -- Link ---------------------------------------------------------------------------------

    def flush(self) -> None:
        frames = self.session.core.frames_to_send()
        if not frames:
            return
        ws = self._ws
        if ws.state is not ConnectionState.OPEN:
            return  # closing: nothing but the close frame may follow it
        send = ws.send
        out = b"".join([send(BytesMessage(data=f)) for f in frames])
        # The core counted the frames; add the WebSocket framing.
        self.session.core.bytes_out += len(out) - sum(map(len, frames))
        self.transport.write(out)
        size = self.transport.get_write_buffer_size()
        if size > self.server.settings.write_hard_limit:
            log.warning(
                "disconnecting %s (connection %s): over %d bytes unread",
                self.remote,
                self.session.id,
                self.server.settings.write_hard_limit,
            )
            self.transport.abort()
        elif size or self._reported:
            self._reported = size > 0
            self.server.unsent_changed(self, size)

    def _send_control(self, event: Ping | Pong | CloseConnection) -> None:
        try:
            out = self._ws.send(event)
        except LocalProtocolError:
            return
        self.session.core.bytes_out += len(out)
        self.transport.write(out)

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    def abort(self) -> None:
        self.transport.abort()

    def close(self) -> None:
        if self.transport.is_closing():
            return
        if self._ws.state is ConnectionState.OPEN:
            if self._close_code == CLOSE_NORMAL and self.server.stopping:
                self._close_code, self._close_reason = CLOSE_GOING_AWAY, "server shutting down"
            self._send_control(CloseConnection(self._close_code, self._close_reason))
            # Wait for the peer's close frame (it ends the connection), but not forever.
            timeout = self.server.settings.ws_close_timeout
            self._close_timer = self.server.loop.call_later(timeout, self.abort)
            if self.session.core.paused:
                self._set_transport_reading(True)  # the answer to the close must be read
        else:
            self.transport.close()

    def set_reading(self, paused: bool) -> None:
        self._set_transport_reading(not paused)

    def _set_transport_reading(self, on: bool) -> None:
        if self.transport.is_closing():
            return
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()
