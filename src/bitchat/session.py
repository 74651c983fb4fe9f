"""Sessions: one per client connection, whatever its transport.

A :class:`Session` is what a handler gets as its first argument: who the peer is
(``user_id``, ``user_name``, ``remote``), ``push`` to it, ``data`` for your own
per-connection state, ``server`` to reach the rest (``server.data["im"]``: the
installed services and their centers). It knows nothing of sockets: it drives
the sans-I/O :class:`~bitchat.protocol.connection.Connection` core and hands
bytes to a :class:`Link`, the transport adapter (raw TCP/TLS in
:mod:`bitchat.connection`, WebSocket in :mod:`bitchat.web.ws`).

Writes are coalesced: every frame queued during one loop iteration leaves in one
write. Reading pauses while the peer does not read its answers (the link's write
watermarks) or has ``max_pending_requests`` requests unfinished, so no peer can
grow the server's memory without bound; the link disconnects one that lets
``write_hard_limit`` bytes pile up.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from bitchat.errors import ProtocolError, codes
from bitchat.protocol.connection import Connection, Pause, ProtocolFailure, Role
from bitchat.protocol.packets import Packet

if TYPE_CHECKING:
    from bitchat.server import Server

log = logging.getLogger("bitchat.session")

_ids = itertools.count(1)


class Link(Protocol):
    """What a session needs of its transport adapter."""

    transport_name: str

    def flush(self) -> None:
        """Write what the session's core has queued."""

    def close(self) -> None:
        """Close gracefully (what was written still leaves)."""

    def abort(self) -> None:
        """Drop the connection at once."""

    def set_reading(self, paused: bool) -> None:
        """Stop or resume reading from the peer."""


class Session:
    """One client connection, logged in or not, as handlers see it."""

    def __init__(self, server: Server, remote: str, link: Link) -> None:
        self.server = server
        self.id = next(_ids)
        self.remote = remote
        self.link = link
        self.connected_at = time.time()
        self.user_id: int | None = None
        self.user_name: str | None = None
        self.login_at: float | None = None
        self.data: dict[str, Any] = {}
        """Per-connection state of your own (and of the installed services)."""
        self.closed = False
        self.evicted = False
        """Dropped to make room at the connection cap (its close is under way)."""
        loop = self._loop = server.loop
        s = server.settings
        dispatcher = server.dispatcher
        core = self.core = Connection(
            Role.SERVER,
            max_frame_size=s.max_frame_size,
            clock=loop.time,
            rate_limit=s.rate_limit,
            rate_burst=s.rate_burst,
            max_pending_requests=s.max_pending_requests,
            routes=dispatcher.routes,
            known_types=server.registry,
            limits=server.limits,
        )
        core.on_output = self._output_queued
        # The push path of every delivered message: straight to the core's queue.
        self.send_frame = core.send_frame  # type: ignore[method-assign]
        core.on_reading = link.set_reading
        core.on_error = server.metrics.error
        self._dispatch = dispatcher.dispatch
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._frame_timeout = s.frame_timeout > 0
        self._login_deadline: float | None = None
        self._stalled_since: float | None = None  # the peer stopped reading (high water)
        self._writable: asyncio.Event | None = None  # made by drain(), set when writing resumes
        # The dispatcher's per-connection state: requests waiting for an earlier
        # coroutine handler (arrival order), and the tasks running for this peer.
        self.queue: collections.deque[Any] = collections.deque()
        self.draining = False
        self.tasks: set[asyncio.Future[Any]] = set()

    @property
    def transport_name(self) -> str:
        return self.link.transport_name

    @property
    def serializer(self) -> int:
        """The serializer of the peer's last frame; pushes go out in it."""
        return self.core.serializer

    @property
    def bytes_in(self) -> int:
        return self.core.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.core.bytes_out

    # -- what the link calls --------------------------------------------------------------

    def opened(self) -> None:
        """The link is ready: register with the server and start the idle timer."""
        if not self.server._session_opened(self):
            return
        s = self.server.settings
        if s.login_timeout > 0 and self.server.dispatcher.login_gated:
            self._login_deadline = self._loop.time() + s.login_timeout
        self._arm()

    def data_received(self, data: bytes) -> None:
        """Bytes from the peer."""
        if not self.closed:
            core = self.core
            core.receive_data(data)
            if core.frame_started is not None and self._frame_timeout:
                self._frame_begun(core.frame_started)
            self.run_events()

    def run_events(self) -> None:
        """Handle every event the core has, in order (each before the next is made)."""
        next_event = self.core.next_event
        dispatch = self._dispatch
        while (event := next_event()) is not None:
            if type(event) is ProtocolFailure:
                self._fatal(event.error)
                return
            if self.closed:
                return
            dispatch(self, event)  # type: ignore[arg-type]  # a Request on the server side

    def pause_writing(self) -> None:
        self.core.pause_writing()
        if self._stalled_since is None:
            self._stalled_since = self._loop.time()
            if self._timer is not None:
                self._timer.cancel()
            self._arm()

    def resume_writing(self) -> None:
        self._stalled_since = None
        self.core.resume_writing()
        if self._writable is not None:
            self._writable.set()

    def connection_lost(self) -> None:
        """The link is closed."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._writable is not None:
            self._writable.set()
        self.queue.clear()
        del self.send_frame  # the class's method again: it checks ``closed``
        self.core.on_output = None
        self.core.discard_output()
        self.server._session_closed(self)

    # -- deadlines: idle (the seed's IdleStateChecker), frame, login, write stall ------------

    def _arm(self) -> None:
        at = self._next_deadline()
        self._timer_at = at
        self._timer = None if at is None else self._loop.call_at(at, self._check_deadlines)

    def _frame_begun(self, started: float) -> None:
        # Deadlines only move later, except this one: arm it if it comes first.
        at = started + self.server.settings.frame_timeout
        if self._timer_at is None or at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self._loop.call_at(at, self._check_deadlines)

    def _next_deadline(self) -> float | None:
        s = self.server.settings
        core = self.core
        deadlines = []
        if s.read_idle_timeout > 0:
            deadlines.append(core.last_received + s.read_idle_timeout)
        if s.frame_timeout > 0 and core.frame_started is not None:
            deadlines.append(core.frame_started + s.frame_timeout)
        if self._login_deadline is not None and self.login_at is None:
            deadlines.append(self._login_deadline)
        if s.write_stall_timeout > 0 and self._stalled_since is not None:
            deadlines.append(self._stalled_since + s.write_stall_timeout)
        return min(deadlines) if deadlines else None

    def _check_deadlines(self) -> None:
        if self.closed:
            return
        s = self.server.settings
        core = self.core
        now = self._loop.time()
        why = None
        code = ""
        if s.read_idle_timeout > 0 and now - core.last_received >= s.read_idle_timeout:
            code, why = codes.IDLE_TIMEOUT, f"nothing read for {s.read_idle_timeout:.1f}s"
        elif (
            s.frame_timeout > 0
            and core.frame_started is not None
            and now - core.frame_started >= s.frame_timeout
        ):
            code, why = codes.FRAME_TIMEOUT, f"a frame not complete after {s.frame_timeout:.1f}s"
        elif (
            self._login_deadline is not None
            and self.login_at is None
            and now >= self._login_deadline
        ):
            code, why = codes.LOGIN_TIMEOUT, f"not logged in after {s.login_timeout:.1f}s"
        elif (
            s.write_stall_timeout > 0
            and self._stalled_since is not None
            and now - self._stalled_since >= s.write_stall_timeout
        ):
            # A slow consumer: what it did not get stays in the store for its next sync.
            log.warning(
                "disconnecting %s (connection %s): its unread data stayed over %d bytes for %.1fs",
                self.remote,
                self.id,
                s.write_high_water,
                s.write_stall_timeout,
            )
            self.abort()
            return
        if why is None:
            self._arm()
            return
        log.info("closing connection %s (%s): %s", self.id, self.remote, why)
        self.send_error(code, f"closing the connection: {why}")  # the peer learns why
        self.close()
        # close() waits for unsent bytes to leave; a peer that reads nothing either
        # would keep the connection (and its buffer) forever: abort after one more.
        grace = s.read_idle_timeout if s.read_idle_timeout > 0 else s.shutdown_grace
        self._timer = self._loop.call_later(grace, self.abort)

    def _fatal(self, exc: ProtocolError) -> None:
        self.core.fail(exc)
        log.info("protocol error from %s (connection %s): %s", self.remote, self.id, exc)
        self.close()

    # -- output -----------------------------------------------------------------------------

    def _output_queued(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is queued now (normally at the end of the loop iteration)."""
        self._flush_scheduled = False
        if not self.closed:
            self.link.flush()

    def push(self, packet: Packet) -> None:
        """Send a server push (request id 0) to this peer, in its serializer."""
        if not self.closed:
            self.core.send_packet(packet)

    def send_error(self, code: str, message: str, request_id: int = 0) -> None:
        """Send an Error packet to this peer."""
        if not self.closed:
            self.core.send_error(code, message, request_id)

    def send_frame(self, data: bytes) -> None:
        """Queue an already encoded frame (e.g. one encoded once for many peers).

        (Replaced per instance by the core's own method while the session is open.)
        """
        if not self.closed:
            self.core.send_frame(data)

    def close(self) -> None:
        """Flush what is queued and close the connection."""
        if not self.closed:
            self.flush()
            self.link.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        self.link.abort()

    async def drain(self) -> None:
        """Send what is queued, then wait while the peer is behind on reading.

        Returns once the link's buffer is below the low-water mark or the session
        is closed. For a sender of many pushes (offline messages), so it goes at
        the pace of the reader.
        """
        self.flush()
        while self.core.is_paused(Pause.WRITING) and not self.closed:
            if self._writable is None:
                self._writable = asyncio.Event()
            self._writable.clear()
            await self._writable.wait()

    def info(self) -> dict[str, Any]:
        """What ``/status/channels`` shows of this connection."""
        return {
            "id": self.id,
            "remote": self.remote,
            "transport": self.transport_name,
            "user_id": self.user_id,
            "user_name": self.user_name,
            "connected_since": self.connected_at,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
