"""The server: listens, accepts connections, dispatches packets to handlers.

::

    server = Server("0.0.0.0", 8864)

    @server.handler(Echo)
    async def echo(session, packet):
        return EchoReply(packet.text)

    async with server:
        await server.serve_forever()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from bitchat.connection import TcpConnection
from bitchat.dispatch import Dispatcher, marked_handlers
from bitchat.errors import UsageError
from bitchat.metrics import Metrics
from bitchat.protocol.packets import Limits, Packet, Registry
from bitchat.protocol.packets import registry as default_registry
from bitchat.session import Session
from bitchat.settings import Settings

log = logging.getLogger("bitchat.server")

H = TypeVar("H", bound=Callable[..., Any])
Hook = Callable[["Server"], Awaitable[None]]
SessionHook = Callable[[Session], None]


class WebHandler(Protocol):
    """What the server needs of the HTTP/WebSocket side of the port."""

    def accepts(self, first_bytes: bytes) -> bool: ...

    def take_over(self, transport: asyncio.Transport, data: bytes, remote: str) -> None: ...


def install_uvloop() -> bool:
    """Use uvloop's event loop policy where it is installed; True if it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def make_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


class Server:
    """A bitchat server on one port (the seed's Server / SimpleServerFactory)."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 8864,
        settings: Settings | None = None,
        *,
        registry: Registry | None = None,
        mode: str = "standalone",
    ) -> None:
        self.host = host
        self.port = port
        self.settings = settings or Settings()
        self.registry = registry or default_registry
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(self.registry, self.metrics)
        self.limits = Limits(self.settings)
        """The length limits requests are decoded with (rebuilt from the settings at start)."""
        self.mode = mode
        self.web: WebHandler | None = None
        self.data: dict[str, Any] = {}
        """Components installed on this server (e.g. ``data["im"]``)."""
        self.sessions: dict[int, Session] = {}
        self.on_startup: list[Hook] = []
        self.on_stopping: list[Hook] = []
        """Run when a stop begins, once the port stopped accepting and before the
        connections drain (a cluster node leaves the registry here)."""
        self.on_shutdown: list[Hook] = []
        self.on_session_open: list[SessionHook] = []
        self.on_session_close: list[SessionHook] = []
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._no_sessions: asyncio.Event | None = None
        self._starting: asyncio.Future[None] | None = None
        self._started = False
        self._stopping = False

    # -- handlers -------------------------------------------------------------------------

    def handler(self, cls: type[Packet], *, login_required: bool = False) -> Callable[[H], H]:
        """Decorator: ``func(session, packet)`` handles packets of ``cls``.

        It returns the response packet (sent with the request's id), returns
        ``None`` (nothing is sent), or raises :class:`~bitchat.RequestError`
        (sent as an Error). A plain ``def`` runs on the loop, or on the worker
        thread pool when the request carries the POOL flag; an ``async def``
        runs in arrival order, or as its own task with POOL. A plain ``def`` may
        also return a :class:`~bitchat.Deferred` (or an ``asyncio.Future``) and
        resolve it later, to answer without holding up the connection's next
        request. How each of these runs is decided in :mod:`bitchat.dispatch`.
        """
        return self.dispatcher.handler(cls, login_required=login_required)

    def add_handler(
        self,
        cls: type[Packet],
        func: Callable[..., Any],
        *,
        login_required: bool = False,
        poolable: bool = True,
    ) -> None:
        """Like :meth:`handler`; ``poolable=False`` makes the handler ignore the POOL
        flag and always run on the loop, in arrival order."""
        self.dispatcher.add(cls, func, login_required=login_required, poolable=poolable)

    def include(self, *handlers: Any) -> None:
        """Add handlers marked with :func:`bitchat.handler`: functions, or the
        marked functions found in modules (or classes, or any object's attributes)."""
        for obj in handlers:
            found = marked_handlers(obj)
            if not found:
                raise UsageError(f"{obj!r} is not, and holds no, function marked @handler")
            for cls, func, login_required in found:
                self.dispatcher.add(cls, func, login_required=login_required)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """What the process is, in its log lines: ``router`` or ``server``."""
        return "router" if self.mode == "router" else "server"

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has begun."""
        return self._stopping

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise UsageError("the server is not started")
        return self._loop

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (the real port when started with port 0)."""
        if self._server is None or not self._server.sockets:
            return (self.host, self.port)
        name = self._server.sockets[0].getsockname()
        return (name[0], name[1])

    async def start(self) -> None:
        if self._started or self._starting is not None:
            raise UsageError("the server is already started")
        self._starting = asyncio.get_running_loop().create_future()
        try:
            await self._start()
        finally:
            # A stop() that came meanwhile goes on now (see stop()).
            starting, self._starting = self._starting, None
            starting.set_result(None)

    async def _start(self) -> None:
        tls = None
        if self.settings.tls_cert:
            if not self.settings.tls_key:
                raise UsageError("a TLS certificate needs its key (tls_key)")
            tls = make_ssl_context(self.settings.tls_cert, self.settings.tls_key)
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.worker_threads, thread_name_prefix="bitchat-worker"
        )
        self.dispatcher.executor = self.executor
        try:
            # Every handled type's decoder now: a Limit that names no setting fails here.
            self.limits = Limits(self.settings)
            self.limits.prepare(route.cls for route in self.dispatcher.routes.values())
            for hook in self.on_startup:
                await hook(self)
            idle = self.settings.read_idle_timeout
            self._server = await self._loop.create_server(
                lambda: TcpConnection(self),
                self.host,
                self.port,
                ssl=tls,
                backlog=4096,
                reuse_address=True,
                # A handshake is not allowed to idle longer than a connection may.
                ssl_handshake_timeout=idle if tls is not None and idle > 0 else None,
            )
        except BaseException:
            for hook in reversed(self.on_shutdown):
                try:
                    await hook(self)
                except Exception:
                    log.exception("shutdown hook failed")
            self.executor.shutdown(wait=False, cancel_futures=True)
            raise
        self._started = True
        host, port = self.address
        log.info(
            "bitchat %s started on %s:%d (mode: %s, tls: %s, loop: %s)",
            self.kind,
            self.host if self.port else host,
            port,
            self.mode,
            "on" if tls else "off",
            type(self._loop).__module__.split(".")[0],
        )

    async def serve_forever(self) -> None:
        """Wait until :meth:`stop` is called (from a signal handler, say)."""
        if not self._started:
            await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace), close all.

        Called while the server is starting, it waits for the start to end first.
        """
        if self._starting is not None:
            await asyncio.shield(self._starting)
        if not self._started:
            return
        self._started = False
        self._stopping = True
        assert self._server is not None
        self._server.close()
        for hook in self.on_stopping:
            try:
                await hook(self)
            except Exception:
                log.exception("stopping hook failed")
        inflight = self.dispatcher.inflight
        if inflight:
            await asyncio.wait(set(inflight), timeout=self.settings.shutdown_grace)
        for session in list(self.sessions.values()):
            session.close()
        # Wait for the peers to get their last bytes (Server.wait_closed() does not
        # wait for connections before Python 3.12).
        assert self._no_sessions is not None
        try:
            await asyncio.wait_for(self._no_sessions.wait(), self.settings.shutdown_grace)
        except TimeoutError:
            log.warning("connections still open after the shutdown grace; aborting them")
        for session in list(self.sessions.values()):
            session.abort()
            session.connection_lost()
        for hook in reversed(self.on_shutdown):
            try:
                await hook(self)
            except Exception:
                log.exception("shutdown hook failed")
        try:  # connections the web side took over close in its shutdown hook
            await asyncio.wait_for(self._server.wait_closed(), self.settings.shutdown_grace)
        except TimeoutError:
            log.warning("web connections still open after the shutdown grace")
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("bitchat %s stopped", self.kind)
        assert self._stopped is not None
        self._stopped.set()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- sessions -------------------------------------------------------------------------

    def _session_opened(self, session: Session) -> None:
        if self._stopping:
            # Accepted just before the port closed, first bytes after: refused at once
            # (the peer reconnects elsewhere) rather than served while everything closes.
            session.closed = True
            session.abort()
            return
        self.sessions[session.id] = session
        if self._no_sessions is not None:
            self._no_sessions.clear()
        self.metrics.connection_opened(session.transport_name)
        for hook in self.on_session_open:
            hook(session)

    def _session_closed(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is None:
            return
        if not self.sessions and self._no_sessions is not None:
            self._no_sessions.set()
        self.metrics.connection_closed(session.transport_name)
        for hook in self.on_session_close:
            try:
                hook(session)
            except Exception:
                log.exception("session close hook failed")

    def push(self, session_id: int, packet: Packet) -> bool:
        """Push a packet to one connection; False if it is gone."""
        session = self.sessions.get(session_id)
        if session is None or session.closed:
            return False
        session.push(packet)
        return True
