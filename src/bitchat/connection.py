"""The raw TCP (or TLS) transport adapter of a server session.

:class:`TcpConnection` is the asyncio protocol of one accepted connection. It
only moves bytes: what they mean is the connection core's business
(:mod:`bitchat.protocol.connection`), what a request does is the dispatcher's
(:mod:`bitchat.dispatch`), and handlers see the :class:`~bitchat.session.Session`.

The first byte picks the protocol: ``0xBC`` is the packet stream; anything else
is offered to the server's HTTP side (which may take the connection over, for
the page, the status endpoints and WebSocket), or closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from bitchat.protocol.frame import MAGIC
from bitchat.session import Session

if TYPE_CHECKING:
    from bitchat.server import Server

log = logging.getLogger("bitchat.connection")


class TcpConnection(asyncio.Protocol):
    """The :class:`~bitchat.session.Link` of a session over a TCP/TLS stream."""

    transport_name = "tcp"

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.remote = "?"
        self._sniff_timer: asyncio.TimerHandle | None = None
        self._sniffed = False  # the first bytes came: a session, the web side, or refused
        self._reported = False  # the server's write budget holds a size for this link

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        t = self.transport = cast(asyncio.Transport, transport)
        peer = t.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if not self.server._admit(t, peer[0] if isinstance(peer, tuple) else str(peer)):
            return
        s = self.server.settings
        t.set_write_buffer_limits(high=s.write_high_water, low=s.write_low_water)
        # Silent before its first byte: held no longer than any deadline it would
        # meet once it spoke (idle, then login, then a frame's).
        deadlines = [d for d in (s.read_idle_timeout, s.login_timeout, s.frame_timeout) if d > 0]
        if deadlines:
            self._sniff_timer = self.server.loop.call_later(min(deadlines), t.abort)

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            session.data_received(data)
            return
        if self._sniffed:
            return  # handed over or refused already
        self._sniffed = True
        if self._sniff_timer is not None:
            self._sniff_timer.cancel()
            self._sniff_timer = None
        transport = self.transport
        assert transport is not None
        if data[0] == MAGIC:
            session = self.session = Session(self.server, self.remote, self)
            session.opened()
            session.data_received(data)
            return
        web = self.server.web
        if web is not None and web.accepts(data):
            web.take_over(transport, data, self.remote)  # the HTTP protocol takes over
            return
        log.info(
            "closing %s: not a bitchat or HTTP client (first byte 0x%02x)", self.remote, data[0]
        )
        transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.server.release_slot(self.transport)
        self.server.unsent.remove(self)
        if self._sniff_timer is not None:
            self._sniff_timer.cancel()
            self._sniff_timer = None
        if self.session is not None:
            self.session.connection_lost()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_writing()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_writing()
        if self.transport is not None and self._reported:
            size = self.transport.get_write_buffer_size()
            self._reported = size > 0
            self.server.unsent_changed(self, size)

    # -- Link ---------------------------------------------------------------------------------

    def flush(self) -> None:
        session, transport = self.session, self.transport
        assert session is not None and transport is not None
        data = session.core.data_to_send()
        if not data:
            return
        transport.write(data)
        size = transport.get_write_buffer_size()
        if size > self.server.settings.write_hard_limit:
            log.warning(
                "disconnecting %s (connection %s): over %d bytes unread",
                self.remote,
                session.id,
                self.server.settings.write_hard_limit,
            )
            transport.abort()
        elif size or self._reported:  # the common case, all taken by the kernel: no work
            self._reported = size > 0
            self.server.unsent_changed(self, size)

    def write_buffer_size(self) -> int:
        """Bytes written and not yet taken by the kernel."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def set_reading(self, paused: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if paused:
            t.pause_reading()
        else:
            t.resume_reading()
