"""The client: one connection to a server, kept alive and re-made when it drops.

::

    async with Client("127.0.0.1", 8864) as client:
        reply = await client.request(Echo("hi"))

``request`` sends a packet and returns the response (an Error comes back as a
raised :class:`~bitchat.RequestError`); ``send`` sends one-way; pushes reach the
callbacks registered with :meth:`Client.on` and the iterator of :meth:`pushes`.
A Ping goes out every ``heartbeat_interval``; a connection silent for
``read_idle_timeout`` is dropped; a dropped connection (or a server not up yet)
is retried with exponential backoff and full jitter (the seed's HealthyChecker).
Hooks in ``on_connected`` run after every (re)connection before other requests
go out, so a higher layer can log in again first.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import random
import ssl
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from bitchat.errors import ConnectionClosed, ProtocolError, RequestError, RequestTimeout, UsageError
from bitchat.protocol.frame import (
    FLAG_ERROR,
    FLAG_POOL,
    FLAG_RESPONSE,
    MAX_REQUEST_ID,
    FrameDecoder,
    encode_frame,
)
from bitchat.protocol.packets import Error, Packet, Ping, Registry, decode_body
from bitchat.protocol.packets import registry as default_registry
from bitchat.protocol.serializers import SERIALIZERS
from bitchat.protocol.serializers import get as get_serializer
from bitchat.settings import Settings

log = logging.getLogger("bitchat.client")

P = TypeVar("P", bound=Packet)
Resolver = Callable[[], Awaitable[tuple[str, int]]]
ConnectedHook = Callable[["Client"], Awaitable[None]]
PushCallback = Callable[[Packet], Any]

_in_hook: contextvars.ContextVar[bool] = contextvars.ContextVar("bitchat_in_hook", default=False)


class State(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client, max_body: int) -> None:
        self.client = client
        self.decoder = FrameDecoder(max_body)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        client._last_read = client._loop.time()  # type: ignore[union-attr]
        frames, error = self.decoder.receive(data)
        for frame in frames:
            client._frame_received(frame)
        if error is not None:
            log.warning("server broke the protocol: %s; reconnecting", error)
            assert self.transport is not None
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class Client:
    """A bitchat client (the seed's Client / SimpleClientFactory / ServerAttr).

    ``resolve`` replaces the fixed address with a coroutine asked before every
    connection attempt (the cluster router uses it).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8864,
        settings: Settings | None = None,
        *,
        serializer: int | str = "json",
        registry: Registry | None = None,
        ssl: ssl.SSLContext | None = None,
        reconnect: bool = True,
        resolve: Resolver | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.settings = settings or Settings()
        self.serializer = get_serializer(serializer).id
        self.registry = registry or default_registry
        self.ssl = ssl
        self.reconnect = reconnect
        self.resolve = resolve
        self.state = State.DISCONNECTED
        self.last_error: BaseException | None = None
        """Why the last connection attempt failed, or the connection ended (set before
        the ``DISCONNECTED`` state callbacks run; None while connected)."""
        self.on_connected: list[ConnectedHook] = []
        self.on_state: list[Callable[[State], None]] = []
        self._callbacks: dict[int, list[PushCallback]] = {}
        self._any_callbacks: list[PushCallback] = []
        self._subscribers: weakref.WeakSet[PushStream] = weakref.WeakSet()
        self._callback_tasks: set[asyncio.Task[Any]] = set()
        self._pending: dict[int, asyncio.Future[Packet]] = {}
        self._next_id = 0
        self._proto: _Protocol | None = None
        self._runner: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._first: asyncio.Future[None] | None = None
        self._closing = False
        self._last_read = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- connection management ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

    async def connect(self, timeout: float | None = None) -> None:
        """Connect, run the ``on_connected`` hooks, and keep the connection up.

        With ``reconnect`` the first attempt is retried until ``timeout``
        (``None``: forever); without it, a failure raises at once.
        """
        if self._runner is not None:
            raise UsageError("the client is already connected or connecting")
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._first = self._loop.create_future()
        self._runner = self._loop.create_task(self._run())
        try:
            await asyncio.wait_for(asyncio.shield(self._first), timeout)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the connection and stop reconnecting."""
        self._closing = True
        runner, self._runner = self._runner, None
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        self._fail_pending(ConnectionClosed("the client was closed"))
        self._set_state(State.CLOSED)
        for stream in list(self._subscribers):
            stream.close()

    async def __aenter__(self) -> Client:
        await self.connect(timeout=self.settings.connect_timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _set_state(self, state: State) -> None:
        if state is self.state:
            return
        self.state = state
        for cb in list(self.on_state):
            try:
                cb(state)
            except Exception:
                log.exception("state callback failed")

    async def _open(self) -> _Protocol:
        if self.resolve is not None:
            self.host, self.port = await self.resolve()
        loop = self._loop
        assert loop is not None
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Protocol(self, self.settings.max_frame_size),
                self.host,
                self.port,
                ssl=self.ssl,
            ),
            self.settings.connect_timeout,
        )
        return proto

    async def _run(self) -> None:
        delay = self.settings.reconnect_initial_delay
        while not self._closing:
            self._set_state(State.CONNECTING)
            try:
                proto = await self._open()
            except (OSError, TimeoutError, RequestError) as exc:
                self.last_error = exc
                if not self.reconnect and self._first is not None and not self._first.done():
                    self._first.set_exception(ConnectionClosed(f"cannot connect: {exc}"))
                    return
                wait = random.uniform(0, delay)  # full jitter
                log.info(
                    "connection to %s:%d failed (%s); retrying in %.2fs",
                    self.host,
                    self.port,
                    exc,
                    wait,
                )
                self._set_state(State.DISCONNECTED)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.settings.reconnect_max_delay)
                continue
            self._proto = proto
            assert self._loop is not None
            self._last_read = connected_at = self._loop.time()
            heartbeat = self._loop.create_task(self._heartbeat(proto))
            try:
                # A Ping at once: the server opens a session at a peer's first bytes (it
                # tells bitchat from HTTP by them), so it can push to us from now on.
                self._write(Ping(), self._new_id(), 0)
                await self._after_connect()
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                await proto.lost
                self.last_error = ConnectionClosed("the connection was lost")
            except Exception as exc:  # from an on_connected hook, or the connection dropped
                self.last_error = exc
                first = self._first is not None and not self._first.done()
                if first and (
                    not self.reconnect
                    or not isinstance(exc, (ConnectionClosed, RequestTimeout, OSError))
                ):
                    # Without reconnecting, or when a hook was refused (say, a wrong
                    # password) or broke: connect() raises it rather than retrying.
                    assert self._first is not None
                    self._first.set_exception(exc)
                    return
                log.warning("setting up the connection failed: %s", exc)
            finally:
                heartbeat.cancel()
                self._ready.clear()
                self._proto = None
                self._fail_pending(ConnectionClosed("the connection was lost"))
                if proto.transport is not None:
                    proto.transport.abort()
            if self._closing:
                break
            self._set_state(State.DISCONNECTED)
            if not self.reconnect:
                break
            if self._loop.time() - connected_at >= self.settings.reconnect_max_delay:
                delay = self.settings.reconnect_initial_delay
                log.info("connection to %s:%d lost; reconnecting", self.host, self.port)
            else:
                # A server that accepts and drops at once is not hammered: back off.
                wait = random.uniform(0, delay)
                log.info(
                    "connection to %s:%d lost; reconnecting in %.2fs", self.host, self.port, wait
                )
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.settings.reconnect_max_delay)

    async def _after_connect(self) -> None:
        self.last_error = None
        self._set_state(State.CONNECTED)
        token = _in_hook.set(True)
        try:
            for hook in list(self.on_connected):
                await hook(self)
        finally:
            _in_hook.reset(token)
        self._ready.set()

    async def _heartbeat(self, proto: _Protocol) -> None:
        s = self.settings
        loop = self._loop
        assert loop is not None
        interval = s.heartbeat_interval
        if interval <= 0 and s.read_idle_timeout <= 0:
            return  # both off: nothing to do
        while True:
            await asyncio.sleep(interval if interval > 0 else s.read_idle_timeout)
            if s.read_idle_timeout > 0 and loop.time() - self._last_read >= s.read_idle_timeout:
                log.warning("no data from the server for %.1fs; reconnecting", s.read_idle_timeout)
                if proto.transport is not None:
                    proto.transport.abort()
                return
            if interval > 0:
                try:
                    self._write(Ping(), self._new_id(), 0)
                except ConnectionClosed:
                    return  # the connection is going; _run sees it end

    # -- sending ------------------------------------------------------------------------------

    def _new_id(self) -> int:
        n = self._next_id + 1
        if n > MAX_REQUEST_ID:
            n = 1
        self._next_id = n
        return n

    def _write(self, packet: Packet, request_id: int, flags: int) -> None:
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            raise ConnectionClosed("not connected")
        body = SERIALIZERS[self.serializer].dumps(packet.to_dict())
        proto.transport.write(encode_frame(self.serializer, flags, packet.TYPE, request_id, body))

    async def _wait_ready(self, timeout: float) -> None:
        if self._ready.is_set() or _in_hook.get():
            if self._proto is None:
                raise ConnectionClosed("not connected")
            return
        if self._runner is None:
            raise ConnectionClosed("the client is not connected; call connect() first")
        if self._runner.done():  # lost, and not reconnecting
            raise ConnectionClosed("the connection was lost")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise RequestTimeout(f"not connected within {timeout:.1f}s") from None

    async def request(
        self, packet: Packet, timeout: float | None = None, pool: bool | None = None
    ) -> Packet:
        """Send ``packet`` and return the server's response packet.

        Raises :class:`RequestError` when the server answers with an Error,
        :class:`RequestTimeout` after ``timeout`` seconds, and
        :class:`ConnectionClosed` if the connection drops meanwhile.
        """
        timeout = self.settings.request_timeout if timeout is None else timeout
        loop = self._loop
        if loop is None:
            raise ConnectionClosed("the client is not connected; call connect() first")
        deadline = loop.time() + timeout
        await self._wait_ready(timeout)
        rid = self._new_id()
        fut: asyncio.Future[Packet] = loop.create_future()
        self._pending[rid] = fut
        flags = FLAG_POOL if (packet.POOL if pool is None else pool) else 0
        try:
            self._write(packet, rid, flags)
            return await asyncio.wait_for(fut, max(deadline - loop.time(), 0))
        except TimeoutError:
            raise RequestTimeout(
                f"no answer to {type(packet).__name__} within {timeout:.1f}s"
            ) from None
        finally:
            self._pending.pop(rid, None)

    async def send(self, packet: Packet, pool: bool | None = None) -> None:
        """Send a one-way packet (no response is awaited)."""
        await self._wait_ready(self.settings.request_timeout)
        flags = FLAG_POOL if (packet.POOL if pool is None else pool) else 0
        self._write(packet, 0, flags)

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    # -- receiving ----------------------------------------------------------------------------

    def on(self, cls: type[P], callback: Callable[[P], Any]) -> None:
        """Call ``callback(packet)`` for every push of ``cls`` (a coroutine is scheduled)."""
        self.registry.register(cls)
        self._callbacks.setdefault(cls.TYPE, []).append(callback)  # type: ignore[arg-type]

    def on_any(self, callback: PushCallback) -> None:
        """Call ``callback(packet)`` for every push."""
        self._any_callbacks.append(callback)

    def pushes(self) -> PushStream:
        """Every push from now on, as an async iterator that ends when the client closes.

        The subscription starts when this is called, not at the first ``__anext__``,
        so no push is missed between asking for the stream and iterating it::

            stream = client.pushes()
            await client.request(Subscribe())
            async for packet in stream:
                ...
        """
        stream = PushStream()
        self._subscribers.add(stream)
        return stream

    def _frame_received(self, frame: Any) -> None:
        if frame.flags & FLAG_RESPONSE:
            fut = self._pending.get(frame.request_id)
            if fut is None or fut.done():
                return  # a late answer to a timed-out request, or a Pong
            try:
                if frame.flags & FLAG_ERROR:
                    err = decode_body(Error, frame.serializer, frame.body)
                    fut.set_exception(RequestError(err.code, err.message))
                    return
                cls = self.registry.get(frame.type)
                if cls is None:
                    fut.set_exception(
                        ProtocolError(
                            "unknown_type", f"unknown response type {frame.type}", fatal=False
                        )
                    )
                    return
                fut.set_result(decode_body(cls, frame.serializer, frame.body))
            except ProtocolError as exc:
                fut.set_exception(exc)
            return
        if frame.type == 2:  # unsolicited Pong
            return
        cls = self.registry.get(frame.type)
        if cls is None:
            log.debug("dropping push of unknown type %d", frame.type)
            return
        try:
            packet = decode_body(cls, frame.serializer, frame.body)
        except ProtocolError as exc:
            log.warning("dropping an invalid push: %s", exc)
            return
        for cb in self._callbacks.get(frame.type, ()):
            self._call(cb, packet)
        for cb in self._any_callbacks:
            self._call(cb, packet)
        for stream in self._subscribers:
            stream._put(packet)

    def _call(self, cb: PushCallback, packet: Packet) -> None:
        try:
            result = cb(packet)
            if asyncio.iscoroutine(result):
                assert self._loop is not None
                task = self._loop.create_task(result)
                # Held until done (the loop keeps only a weak reference), then checked.
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_done)
        except Exception:
            log.exception("push callback failed")

    def _callback_done(self, task: asyncio.Task[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("push callback failed", exc_info=(type(exc), exc, exc.__traceback__))


class PushStream:
    """The pushes a client receives, as an async iterator (see :meth:`Client.pushes`).

    It stops when the client is closed; dropping it (or :meth:`close`) ends the
    subscription.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Packet] = asyncio.Queue()
        self._done = False

    def _put(self, packet: Packet) -> None:
        if not self._done:
            self._queue.put_nowait(packet)

    def close(self) -> None:
        """Stop receiving; iteration ends once what already arrived is read."""
        self._put(_CLOSED)
        self._done = True

    def __aiter__(self) -> PushStream:
        return self

    async def __anext__(self) -> Packet:
        if self._done and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _CLOSED:
            self._done = True
            raise StopAsyncIteration
        return item


class _Closed(Packet):
    pass


_CLOSED: Any = _Closed()
