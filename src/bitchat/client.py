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
go out, so a higher layer can log in again first; a request made while the
connection is being re-made waits for it, within its timeout.

A connection counts as made once the server has answered the opening Ping.
What no retry can mend stops the reconnecting with a :class:`~bitchat.TLSError`
naming the cause: a refused certificate, a plain client at a TLS port (the
server answers with a TLS record, or closes without a word and a TLS handshake
then succeeds), a TLS client at a plain port (the handshake fails and a plain
Ping is then answered).
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

from bitchat.errors import (
    ConnectionClosed,
    ProtocolError,
    RequestError,
    RequestTimeout,
    TLSError,
    UsageError,
)
from bitchat.protocol.connection import Connection, ProtocolFailure, Push, Response, Role
from bitchat.protocol.frame import FLAG_ERROR, MAGIC, Frame, encode_frame
from bitchat.protocol.packets import Error, Packet, Ping, Registry, decode_body
from bitchat.protocol.packets import registry as default_registry
from bitchat.protocol.serializers import MSGPACK, SERIALIZERS
from bitchat.protocol.serializers import get as get_serializer
from bitchat.settings import Settings

log = logging.getLogger("bitchat.client")

P = TypeVar("P", bound=Packet)
Resolver = Callable[[], Awaitable[tuple[str, int]]]
ConnectedHook = Callable[["Client"], Awaitable[None]]
PushCallback = Callable[[Packet], Any]

_PING = Ping()
_EMPTY_MSGPACK = SERIALIZERS[MSGPACK].dumps({})
_TLS_RECORD = (0x15, 0x16)  # a TLS alert or handshake record, where 0xBC starts a frame
_in_hook: contextvars.ContextVar[bool] = contextvars.ContextVar("bitchat_in_hook", default=False)


class State(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


class _Protocol(asyncio.Protocol):
    """The asyncio side of one connection: bytes in and out of the client's core."""

    def __init__(self, client: Client, core: Connection) -> None:
        self.client = client
        self.core = core
        core.on_output = self.flush  # requests leave at once: a client does not batch
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.answered: asyncio.Future[bool] = loop.create_future()
        """True at the server's first bytes; False if it closed before any."""
        self.tls_record = False  # the first bytes were a TLS record, on a plain connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.answered.done():
            if data[0] in _TLS_RECORD and self.client.ssl is None:
                self.tls_record = True
                self.answered.set_result(False)
                assert self.transport is not None
                self.transport.abort()
                return
            self.answered.set_result(True)
        core = self.core
        core.receive_data(data)
        client = self.client
        while (event := core.next_event()) is not None:
            if type(event) is ProtocolFailure:
                log.warning("server broke the protocol: %s; reconnecting", event.error)
                assert self.transport is not None
                self.transport.abort()
                return
            client._event_received(event)  # type: ignore[arg-type]
        if core.pending_output:  # a Pong to a server's Ping
            self.flush()

    def flush(self) -> None:
        data = self.core.data_to_send()
        t = self.transport
        if data and t is not None and not t.is_closing():
            t.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.core.forget_all()
        if not self.answered.done():
            self.answered.set_result(False)
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
        self.close_reason: RequestError | None = None
        """The reason the server gave for closing the current connection (an Error
        push, e.g. ``login_timeout``), or None."""
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
        self._proto: _Protocol | None = None
        self._runner: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._first: asyncio.Future[None] | None = None
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- connection management ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

    async def connect(self, timeout: float | None = None) -> None:
        """Connect, run the ``on_connected`` hooks, and keep the connection up.

        With ``reconnect`` the first attempt is retried until ``timeout``
        (``None``: forever); without it, a failure raises at once. A
        :class:`~bitchat.TLSError` raises at once either way.
        """
        if self._runner is not None and not self._runner.done():
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
        """A connection the server has answered on, within ``connect_timeout``."""
        if self.resolve is not None:
            self.host, self.port = await self.resolve()
        loop = self._loop
        assert loop is not None
        timeout = self.settings.connect_timeout
        deadline = loop.time() + timeout
        core = Connection(Role.CLIENT, max_frame_size=self.settings.max_frame_size, clock=loop.time)
        core.serializer = self.serializer
        core.on_stray = self._stray
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(self, core),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                ),
                timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            why = exc.verify_message or exc.reason or str(exc)
            raise TLSError(TLSError.CERTIFICATE, f"certificate verify failed: {why}") from exc
        except (ssl.SSLError, ConnectionError) as exc:
            # Refused is a server not up; a handshake cut off may be a plain port.
            if (
                self.ssl is not None
                and not isinstance(exc, ConnectionRefusedError)
                and await _speaks_bitchat(self.host, self.port, timeout)
            ):
                raise TLSError(
                    TLSError.SERVER_SPEAKS_PLAIN, "the server does not speak TLS"
                ) from exc
            raise
        assert proto.transport is not None
        # A Ping at once: the server opens a session at a peer's first bytes (it
        # tells bitchat from HTTP by them), so it can push to us from now on; its
        # Pong says a bitchat server is there.
        if self.ssl is None:
            core.send_frame(_opening_ping(core.next_request_id()))
        else:
            core.send_request(_PING, expect=False)
        try:
            answered = await asyncio.wait_for(proto.answered, max(deadline - loop.time(), 0.0))
        except TimeoutError:
            answered = None
        except BaseException:  # cancelled: closed meanwhile
            proto.transport.abort()
            raise
        if answered:
            return proto
        proto.transport.abort()
        if self.ssl is None and (
            proto.tls_record or await _speaks_tls(self.host, self.port, timeout)
        ):
            raise TLSError(TLSError.SERVER_SPEAKS_TLS, "the server speaks TLS")
        if answered is None:
            raise TimeoutError(f"no answer from the server within {timeout:.1f}s")
        raise ConnectionClosed("the server closed the connection without a word")

    async def _run(self) -> None:
        delay = self.settings.reconnect_initial_delay
        while not self._closing:
            self._set_state(State.CONNECTING)
            try:
                proto = await self._open()
            except TLSError as exc:
                self._give_up(exc)
                return
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
            connected_at = self._loop.time()
            heartbeat = self._loop.create_task(self._heartbeat(proto))
            try:
                await self._after_connect()
                if self._first is not None and not self._first.done():
                    self._first.set_result(None)
                self.close_reason = None
                await proto.lost
                self.last_error = ConnectionClosed(
                    "the connection was lost"
                    if self.close_reason is None
                    else f"the server closed the connection: {self.close_reason.message}"
                )
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

    def _give_up(self, exc: TLSError) -> None:
        """Stop for good: ``connect()`` and every request raise ``exc`` from now on."""
        log.warning("not connecting to %s:%d again: %s", self.host, self.port, exc)
        self.last_error = exc
        if self._first is not None and not self._first.done():
            self._first.set_exception(exc)
        self._fail_pending(exc)
        self._set_state(State.CLOSED)

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
            if s.read_idle_timeout > 0 and proto.core.idle_for() >= s.read_idle_timeout:
                log.warning("no data from the server for %.1fs; reconnecting", s.read_idle_timeout)
                if proto.transport is not None:
                    proto.transport.abort()
                return
            if interval > 0:
                try:
                    self._ping(proto)
                except ConnectionClosed:
                    return  # the connection is going; _run sees it end

    # -- sending ------------------------------------------------------------------------------

    def _ping(self, proto: _Protocol) -> None:
        if proto.transport is None or proto.transport.is_closing():
            raise ConnectionClosed("not connected")
        proto.core.send_request(_PING, expect=False)  # its Pong is not awaited

    def _usable(self) -> bool:
        proto = self._proto
        t = proto.transport if proto is not None else None
        return t is not None and not t.is_closing()

    def _core(self) -> Connection:
        if not self._usable():
            raise ConnectionClosed("not connected")
        assert self._proto is not None
        return self._proto.core

    async def _wait_ready(self, timeout: float) -> None:
        """Return once a connection is up and set up (its hooks ran), waiting up to
        ``timeout`` for a reconnect; raise at once when none will come."""
        if _in_hook.get():  # a hook's own request: the connection is being set up
            if not self._usable():
                raise ConnectionClosed("not connected")
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ready = self._ready
        while True:
            if ready.is_set():
                if self._usable():
                    return
                # Lost just now (a local abort, the server's close being read): _run
                # has not seen it yet. Wait for the next connection rather than fail.
                ready.clear()
            runner = self._runner
            if runner is None:
                raise ConnectionClosed("the client is not connected; call connect() first")
            if runner.done():  # lost, and not reconnecting (or a final error)
                raise self._no_connection()
            left = deadline - loop.time()
            if left <= 0:
                raise RequestTimeout(f"not connected within {timeout:.1f}s")
            waiter = loop.create_task(ready.wait())
            try:
                await asyncio.wait((waiter, runner), timeout=left, return_when="FIRST_COMPLETED")
            finally:
                waiter.cancel()

    def _no_connection(self) -> ConnectionClosed:
        """Why no connection will come: the final error, or the loss without reconnect."""
        error = self.last_error
        if isinstance(error, TLSError):
            return TLSError(error.reason, error.message)  # a fresh one: its own traceback
        return ConnectionClosed("the connection was lost")

    async def request(
        self, packet: Packet, timeout: float | None = None, pool: bool | None = None
    ) -> Packet:
        """Send ``packet`` and return the server's response packet.

        While the connection is being re-made (it dropped, and ``reconnect`` is
        on), the request waits for it, within the same ``timeout``. Raises
        :class:`RequestError` when the server answers with an Error,
        :class:`RequestTimeout` after ``timeout`` seconds, and
        :class:`ConnectionClosed` if the connection drops after the request was
        sent (it is not resent: only the caller knows whether that is safe) or
        when no connection will come (not connected, closed, no reconnect).
        """
        timeout = self.settings.request_timeout if timeout is None else timeout
        loop = self._loop
        if loop is None:
            raise ConnectionClosed("the client is not connected; call connect() first")
        deadline = loop.time() + timeout
        await self._wait_ready(timeout)  # a connection being re-made is waited for
        core = self._core()
        rid = core.send_request(packet, pool=packet.POOL if pool is None else pool)
        fut: asyncio.Future[Packet] = loop.create_future()
        self._pending[rid] = fut
        try:
            return await asyncio.wait_for(fut, max(deadline - loop.time(), 0))
        except TimeoutError:
            raise RequestTimeout(
                f"no answer to {type(packet).__name__} within {timeout:.1f}s"
            ) from None
        finally:
            self._pending.pop(rid, None)
            core.forget(rid)  # a late answer is dropped by the core

    async def send(self, packet: Packet, pool: bool | None = None) -> None:
        """Send a one-way packet (no response is awaited)."""
        await self._wait_ready(self.settings.request_timeout)
        core = self._core()
        core.send_one_way(packet, pool=packet.POOL if pool is None else pool)

    def send_nowait(self, packet: Packet, pool: bool | None = None) -> None:
        """Send a one-way packet now, on the current connection; raises
        :class:`ConnectionClosed` when there is none (nothing waits for it)."""
        self._core().send_one_way(packet, pool=packet.POOL if pool is None else pool)

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

    def _stray(self, frame: Frame) -> None:
        """A response nobody awaits: a heartbeat's Pong, a late answer, or an Error
        with no request id, which the server sends to say why it closes."""
        if frame.type == Error.TYPE and frame.request_id == 0 and frame.flags & FLAG_ERROR:
            try:
                err = decode_body(Error, frame.serializer, frame.body)
            except ProtocolError:
                return
            self.close_reason = RequestError(err.code, err.message)

    def _event_received(self, event: Response | Push) -> None:
        if type(event) is Response:
            fut = self._pending.get(event.request_id)
            if fut is None or fut.done():
                return  # its request was given up just now
            try:
                if event.flags & FLAG_ERROR:
                    err = decode_body(Error, event.serializer, event.body)
                    fut.set_exception(RequestError(err.code, err.message))
                    return
                cls = self.registry.get(event.type)
                if cls is None:
                    fut.set_exception(
                        ProtocolError(
                            "unknown_type", f"unknown response type {event.type}", fatal=False
                        )
                    )
                    return
                fut.set_result(decode_body(cls, event.serializer, event.body))
            except ProtocolError as exc:
                fut.set_exception(exc)
            return
        cls = self.registry.get(event.type)
        if cls is None:
            log.debug("dropping push of unknown type %d", event.type)
            return
        try:
            packet = decode_body(cls, event.serializer, event.body)
        except ProtocolError as exc:
            log.warning("dropping an invalid push: %s", exc)
            return
        for cb in self._callbacks.get(event.type, ()):
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


def _opening_ping(request_id: int) -> bytes:
    """The opening Ping of a plain connection, in MessagePack whatever the client's
    serializer: a TLS server reads a record of type 0xBC and closes at once, where
    a JSON frame's third byte (1) makes an SSLv2-compatible one wait for 15 KiB.
    (The server answers it in MessagePack; the client's next frame sets the
    serializer of its pushes again.)"""
    return encode_frame(MSGPACK, 0, Ping.TYPE, request_id, _EMPTY_MSGPACK)


async def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether a TLS handshake with ``host:port`` succeeds (nothing is verified or
    sent: this only tells a TLS port from a dead one)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, ssl_handshake_timeout=timeout), timeout
        )
    except (OSError, TimeoutError):
        return False
    writer.transport.abort()
    return True


async def _speaks_bitchat(host: str, port: int, timeout: float) -> bool:
    """Whether ``host:port`` answers a plain Ping with a frame."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(_opening_ping(1))
        first = await asyncio.wait_for(reader.read(1), timeout)
    except (OSError, TimeoutError):
        return False
    finally:
        writer.transport.abort()
    return first == bytes([MAGIC])


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
