"""Server-side connections: one :class:`Session` per client, whatever the transport.

A session owns the protocol state of one peer: its decoder, the requests it has
queued, the user it logged in as, its counters, and its outgoing bytes. Its
transport adapter only moves bytes: :class:`TcpSession` is the asyncio protocol
of a raw TCP (or TLS) connection; the WebSocket adapter lives with the HTTP code.

Writes are coalesced: every frame queued during one loop iteration leaves in one
``write`` call. Reads stop while the peer does not read its answers (write
watermarks) or has too many requests queued, so no peer can grow the server's
memory without bound; one that lets ``write_hard_limit`` bytes pile up is
disconnected.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from bitchat.errors import ProtocolError, RequestError, codes
from bitchat.protocol.frame import (
    FLAG_ERROR,
    FLAG_POOL,
    FLAG_RESPONSE,
    MAGIC,
    Frame,
    FrameDecoder,
    encode_frame,
)
from bitchat.protocol.packets import Error, Packet, decode_body
from bitchat.protocol.serializers import JSON, SERIALIZER_IDS, SERIALIZERS

if TYPE_CHECKING:
    from bitchat.dispatch import Route
    from bitchat.server import Server

log = logging.getLogger("bitchat.connection")

_ids = itertools.count(1)
_PING = 1
_RESP = FLAG_RESPONSE
_RESP_ERR = FLAG_RESPONSE | FLAG_ERROR
_PONG_BODIES = {sid: SERIALIZERS[sid].dumps({}) for sid in SERIALIZER_IDS}
_UNSET: Any = object()


class Answer:
    """What a handler returns to answer later from a callback on the event loop.

    Like a future the handler resolves once, with ``set_result(packet)`` or
    ``set_exception(exc)``, but the answer is queued on the connection at once:
    a future's callbacks run one loop pass later, after the connection's write
    for this pass has left, so the answer would take a write of its own. The IM
    service answers every send this way from its group commit.
    """

    __slots__ = ("_frame", "_route", "_session", "_value")

    def __init__(self) -> None:
        self._session: Session | None = None
        self._route: Route | None = None
        self._frame: Frame | None = None
        self._value: Any = _UNSET

    def done(self) -> bool:
        return self._value is not _UNSET

    def set_result(self, result: Packet) -> None:
        self._give(result)

    def set_exception(self, exc: BaseException) -> None:
        self._give(exc)

    def _give(self, value: Any) -> None:
        if self._value is not _UNSET:
            raise asyncio.InvalidStateError("the answer was already given")
        self._value = value
        if self._session is not None:
            self._deliver()

    def _bind(self, session: Session, route: Route, frame: Frame) -> None:
        self._session, self._route, self._frame = session, route, frame
        if self._value is not _UNSET:
            self._deliver()

    def _deliver(self) -> None:
        session, route, frame = self._session, self._route, self._frame
        assert session is not None and route is not None and frame is not None
        value = self._value
        if isinstance(value, BaseException):
            session._handler_failed(value, route, frame)
        else:
            session._deliver_result(value, route, frame)


class Session:
    """One logged-in-or-not client connection as handlers see it.

    Handlers get the session as their first argument: ``session.user_id`` is
    the logged-in user (or ``None``), ``session.push(packet)`` sends to this
    peer, ``session.server`` reaches the rest, ``session.data`` holds
    per-connection state of your own.
    """

    transport_name = "?"

    def __init__(self, server: Server, remote: str) -> None:
        self.server = server
        self.id = next(_ids)
        self.remote = remote
        self.connected_at = time.time()
        self.user_id: int | None = None
        self.user_name: str | None = None
        self.login_at: float | None = None
        self.serializer = JSON
        self.bytes_in = 0
        self.bytes_out = 0
        self.data: dict[str, Any] = {}
        self.closed = False
        self._loop = server.loop
        self._decoder = FrameDecoder(server.settings.max_frame_size)
        self._out: list[bytes] = []
        self._out_size = 0
        self._flush_scheduled = False
        self._queue: collections.deque[tuple[Route, Frame]] = collections.deque()
        self._draining = False
        self._read_paused = 0  # bit 1: write backpressure, 2: request queue, 4: POOL in flight
        self._writable: asyncio.Event | None = None  # made by drain(), set when bit 1 clears
        self._last_read = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._rate_limited = server.settings.rate_limit > 0
        self._tokens = float(server.settings.rate_burst)
        self._tokens_at = self._last_read

    # -- transport adapter hooks ------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def _write_buffer_size(self) -> int:
        return 0

    def _pause_reading(self) -> None:
        pass

    def _resume_reading(self) -> None:
        pass

    # -- lifecycle ----------------------------------------------------------------------------

    def _opened(self) -> None:
        self.server._session_opened(self)
        self._arm_idle()

    def _arm_idle(self) -> None:
        timeout = self.server.settings.read_idle_timeout
        if timeout > 0:
            self._idle_timer = self._loop.call_at(self._last_read + timeout, self._check_idle)

    def _check_idle(self) -> None:
        if self.closed:
            return
        timeout = self.server.settings.read_idle_timeout
        if self._loop.time() - self._last_read >= timeout:
            log.info(
                "closing idle connection %s (%s): nothing read for %.1fs",
                self.id,
                self.remote,
                timeout,
            )
            self.close()
            # close() waits for unsent bytes to leave; a peer that reads nothing either
            # would keep the connection (and its buffer) forever: abort after one more.
            self._idle_timer = self._loop.call_later(timeout, self._abort)
        else:
            self._arm_idle()

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._writable is not None:
            self._writable.set()
        self._queue.clear()
        self._out.clear()
        self.server._session_closed(self)

    def close(self) -> None:
        """Flush what is queued and close the connection."""
        if not self.closed:
            self._flush()
            self._close_transport()

    def _close_transport(self) -> None:
        raise NotImplementedError

    # -- input ------------------------------------------------------------------------------

    def _bytes_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._last_read = self._loop.time()
        frames, error = self._decoder.receive(data)
        for frame in frames:
            self._frame_received(frame)
        if error is not None:
            self._fatal(error)

    def _frame_received(self, frame: Frame) -> None:
        """Route one complete frame (also called by the WebSocket adapter)."""
        if self.closed:
            return
        self.serializer = frame.serializer
        if frame.type == _PING:
            self._send(
                encode_frame(
                    frame.serializer, _RESP, 2, frame.request_id, _PONG_BODIES[frame.serializer]
                )
            )
            return
        if frame.flags & FLAG_RESPONSE:
            return  # the server makes no requests of its own; stray answers are dropped
        if self._rate_limited and not self._take_token():
            self.send_error(
                codes.RATE_LIMITED,
                "too many requests, slow down",
                frame.request_id,
                frame.serializer,
            )
            return
        route = self.server.dispatcher.routes.get(frame.type)
        if route is None:
            self._unroutable(frame)
            return
        if frame.flags & FLAG_POOL and route.poolable:
            self._run_pooled(route, frame)
        elif self._draining:
            self._queue.append((route, frame))
            if len(self._queue) >= self.server.settings.max_pending_requests:
                self._pause(2)
        elif route.is_coroutine:
            self._draining = True
            self._track(self._loop.create_task(self._drain(route, frame)))
        else:
            self._run_inline(route, frame)

    def _take_token(self) -> bool:
        # Refill on every request: refilling only when empty would count the time the
        # bucket sat full, letting a peer quiet for a while burst twice over.
        now = self._loop.time()
        s = self.server.settings
        tokens = min(float(s.rate_burst), self._tokens + (now - self._tokens_at) * s.rate_limit)
        self._tokens_at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def _unroutable(self, frame: Frame) -> None:
        if frame.type in self.server.registry:
            self.send_error(
                codes.NO_HANDLER,
                f"no handler for packet type {frame.type}",
                frame.request_id,
                frame.serializer,
            )
        else:
            self.send_error(
                codes.UNKNOWN_TYPE,
                f"unknown packet type {frame.type}",
                frame.request_id,
                frame.serializer,
            )

    def _decode(self, route: Route, frame: Frame) -> Packet | None:
        # Login first: an anonymous peer gets no parsing work done and learns no schema.
        if route.login_required and self.user_id is None:
            self.send_error(
                codes.UNAUTHENTICATED, "log in first", frame.request_id, frame.serializer
            )
            return None
        try:
            return decode_body(route.cls, frame.serializer, frame.body, frame.request_id)
        except ProtocolError as exc:
            self.send_error(exc.code, exc.message, frame.request_id, frame.serializer)
            return None

    def _run_inline(self, route: Route, frame: Frame) -> None:
        packet = self._decode(route, frame)
        if packet is None:
            return
        started = time.perf_counter()
        try:
            result = route.func(self, packet)
        except Exception as exc:
            self._handler_failed(exc, route, frame)
            return
        self._observe(route, started)
        self._deliver_result(result, route, frame)

    async def _drain(self, route: Route, frame: Frame) -> None:
        """Run queued requests in arrival order; exits when the queue is empty."""
        try:
            while True:
                packet = self._decode(route, frame)
                if packet is not None:
                    if route.is_coroutine:
                        await self._call_coroutine(route, frame, packet)
                    else:
                        started = time.perf_counter()
                        try:
                            result = route.func(self, packet)
                        except Exception as exc:
                            self._handler_failed(exc, route, frame)
                        else:
                            self._observe(route, started)
                            self._deliver_result(result, route, frame)
                if not self._queue or self.closed:
                    break
                route, frame = self._queue.popleft()
                if self._read_paused & 2 and len(self._queue) <= (
                    self.server.settings.max_pending_requests // 2
                ):
                    self._resume(2)
        finally:
            self._draining = False

    async def _call_coroutine(self, route: Route, frame: Frame, packet: Packet) -> None:
        started = time.perf_counter()
        try:
            result = await route.func(self, packet)
        except Exception as exc:
            self._handler_failed(exc, route, frame)
            return
        self._observe(route, started)
        self._deliver_result(result, route, frame)

    def _run_pooled(self, route: Route, frame: Frame) -> None:
        packet = self._decode(route, frame)
        if packet is None:
            return
        if route.is_coroutine:
            self._track(self._loop.create_task(self._call_coroutine(route, frame, packet)))
            return
        started = time.perf_counter()
        fut = self._loop.run_in_executor(self.server.executor, route.func, self, packet)

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                return  # the pool was shut down with the server
            exc = f.exception()
            if exc is not None:
                self._handler_failed(exc, route, frame)
                return
            self._observe(route, started)
            self._deliver_result(f.result(), route, frame)

        fut.add_done_callback(done)
        self._track(fut)

    def _track(self, fut: asyncio.Future[Any]) -> None:
        self._tasks.add(fut)
        fut.add_done_callback(self._untrack)
        self.server._inflight.add(fut)
        fut.add_done_callback(self.server._inflight.discard)
        # POOL requests run concurrently: bound them per connection as the queue is.
        if len(self._tasks) > self.server.settings.max_pending_requests:
            self._pause(4)

    def _untrack(self, fut: asyncio.Future[Any]) -> None:
        self._tasks.discard(fut)
        if self._read_paused & 4 and len(self._tasks) <= (
            self.server.settings.max_pending_requests // 2
        ):
            self._resume(4)

    def _observe(self, route: Route, started: float) -> None:
        self.server.metrics.handler_seconds.observe(route.name, time.perf_counter() - started)

    def _deliver_result(self, result: Any, route: Route, frame: Frame) -> None:
        if isinstance(result, Packet):
            if frame.request_id:
                try:
                    self.send_packet(result, frame.request_id, _RESP, frame.serializer)
                except Exception as exc:  # e.g. a field the frame's serializer cannot carry
                    self._handler_failed(exc, route, frame)
            return
        if result is None:
            return
        if type(result) is Answer:
            result._bind(self, route, frame)
            return
        # A future first: iscoroutine() of a non-coroutine goes through an ABC check.
        if not isinstance(result, asyncio.Future) and asyncio.iscoroutine(result):
            result = self._loop.create_task(result)
            self._track(result)
        if isinstance(result, asyncio.Future):
            # A handler may answer later without holding up the next request.
            def later(f: asyncio.Future[Any]) -> None:
                if f.cancelled():
                    self._handler_failed(asyncio.CancelledError(), route, frame)
                elif (exc := f.exception()) is not None:
                    self._handler_failed(exc, route, frame)
                else:
                    self._deliver_result(f.result(), route, frame)

            result.add_done_callback(later)
            return
        self._handler_failed(
            TypeError(f"handler {route.name} returned {type(result).__name__}, not a Packet"),
            route,
            frame,
        )

    def _handler_failed(self, exc: BaseException, route: Route, frame: Frame) -> None:
        if isinstance(exc, (RequestError, ProtocolError)):
            self.send_error(exc.code, exc.message, frame.request_id, frame.serializer)
        else:
            log.error(
                "handler %s failed on connection %s",
                route.name,
                self.id,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            self.send_error(
                codes.INTERNAL, "internal server error", frame.request_id, frame.serializer
            )

    def _fatal(self, exc: ProtocolError) -> None:
        log.info("protocol error from %s (connection %s): %s", self.remote, self.id, exc)
        # The header's serializer byte may be the bad part; JSON is always understood.
        self.send_error(exc.code, exc.message, 0, JSON)
        self.close()

    # -- output -----------------------------------------------------------------------------

    def send_packet(
        self, packet: Packet, request_id: int = 0, flags: int = 0, serializer: int | None = None
    ) -> None:
        """Encode and queue one packet for this peer."""
        ser = self.serializer if serializer is None else serializer
        body = SERIALIZERS[ser].dumps(packet.to_dict())
        self._send(encode_frame(ser, flags, packet.TYPE, request_id, body))

    def push(self, packet: Packet) -> None:
        """Send a server push (request id 0) to this peer."""
        self.send_packet(packet)

    def send_error(
        self, code: str, message: str, request_id: int = 0, serializer: int | None = None
    ) -> None:
        self.server.metrics.error(code)
        self.send_packet(Error(code, message), request_id, _RESP_ERR, serializer)

    def send_frame(self, data: bytes) -> None:
        """Queue an already encoded frame (e.g. one encoded once for many peers)."""
        self._send(data)

    def _send(self, data: bytes) -> None:
        if self.closed:
            return
        self._out.append(data)
        self._out_size += len(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self.closed:
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        self.bytes_out += len(data)
        self._write(data)
        if self._write_buffer_size() > self.server.settings.write_hard_limit:
            log.warning(
                "disconnecting %s (connection %s): over %d bytes unread",
                self.remote,
                self.id,
                self.server.settings.write_hard_limit,
            )
            self._abort()

    # -- flow control -------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._read_paused:
            self._pause_reading()
        self._read_paused |= reason

    def _resume(self, reason: int) -> None:
        was = self._read_paused
        self._read_paused &= ~reason
        if was and not self._read_paused:
            self._resume_reading()
        if reason & 1 and self._writable is not None:
            self._writable.set()

    async def drain(self) -> None:
        """Send what is queued, then wait while the peer is behind on reading.

        Returns once the transport's buffer is below the low-water mark (the
        adapter calls ``_resume(1)``) or the session is closed. For a sender of
        many pushes (offline messages), so it goes at the pace of the reader.
        """
        self._flush()
        while self._read_paused & 1 and not self.closed:
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


class TcpSession(Session, asyncio.Protocol):
    """A session over a raw TCP/TLS stream.

    The first byte picks the protocol: ``0xBC`` is the packet stream; anything
    else is offered to the server's HTTP handler (which may take the connection
    over), or closed.
    """

    transport_name = "tcp"

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._sniffed = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        Session.__init__(self, self.server, remote)
        s = self.server.settings
        self.transport.set_write_buffer_limits(high=s.write_high_water, low=s.write_low_water)
        self._sniff_timer = self._loop.call_later(
            max(s.read_idle_timeout, 0.001) if s.read_idle_timeout > 0 else 3600, self._abort
        )

    def data_received(self, data: bytes) -> None:
        if self._sniffed:
            self._bytes_received(data)
            return
        self._sniffed = True
        self._sniff_timer.cancel()
        if data[0] == MAGIC:
            self._opened()
            self._bytes_received(data)
            return
        assert self.transport is not None
        web = self.server.web
        if web is not None and web.accepts(data):
            self.closed = True  # this object is done; the HTTP protocol takes over
            web.take_over(self.transport, data, self.remote)
            return
        log.info(
            "closing %s: not a bitchat or HTTP client (first byte 0x%02x)", self.remote, data[0]
        )
        self.closed = True
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._sniffed:
            self._sniff_timer.cancel()
            self.closed = True
            return
        self._closed()

    def pause_writing(self) -> None:
        self._pause(1)

    def resume_writing(self) -> None:
        self._resume(1)

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _write_buffer_size(self) -> int:
        assert self.transport is not None
        return self.transport.get_write_buffer_size()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close_transport(self) -> None:
        assert self.transport is not None
        self.transport.close()

    def _pause_reading(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def _resume_reading(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.resume_reading()
