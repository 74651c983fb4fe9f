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
import errno
import logging
import os
import resource
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from bitchat.admission import ConnectionSlots, WriteBudget, release_memory
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
        """Run before the port opens (a hook that raises fails the start)."""
        self.on_started: list[Hook] = []
        """Run once the port listens (a cluster node announces itself here); a hook
        that raises stops the server and fails the start."""
        self.on_stopping: list[Hook] = []
        """Run when a stop begins, once the port stopped accepting and before the
        connections drain (a cluster node leaves the registry here)."""
        self.on_shutdown: list[Hook] = []
        self.on_session_open: list[SessionHook] = []
        self.on_session_close: list[SessionHook] = []
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.slots: ConnectionSlots[Any] = ConnectionSlots(
            self.settings.max_connections, self.settings.max_connections_per_address
        )
        self.unsent: WriteBudget[Any] = WriteBudget(self.settings.max_unsent_bytes)
        """Unsent bytes of every connection's link (see :mod:`bitchat.admission`)."""
        self._slot_of: dict[Any, str] = {}  # transport -> remote address holding a slot
        self._refused = 0
        self._refused_logged_at = -1e9
        self._sweeper: asyncio.Task[None] | None = None
        self._reserve_fd: int | None = None
        self._out_of_files = 0
        self._ran_out_of_files = False
        self._out_of_files_logged_at = -1e9
        self._prev_exception_handler: Any = None
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
        try:
            for hook in self.on_started:
                await hook(self)
        except BaseException:
            await self.stop()
            raise

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
        self.slots.total = self._connection_cap()
        self._watch_accept_errors()
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
        if self.unsent.limit:
            self._sweeper = self._loop.create_task(self._sweep_unsent())
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
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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
        self._unwatch_accept_errors()
        log.info("bitchat %s stopped", self.kind)
        assert self._stopped is not None
        self._stopped.set()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- admission: connection slots, the budget for unsent bytes ---------------------------

    _FD_RESERVE = 64
    """Open files kept for everything but connections (stores, logs, Redis, PostgreSQL)."""

    def _connection_cap(self) -> int:
        cap = self.settings.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft - self._FD_RESERVE < cap:
            cap = max(1, soft - self._FD_RESERVE)
            log.info(
                "at most %d connections: the open-file limit is %d (max_connections %d)",
                cap,
                soft,
                self.settings.max_connections,
            )
        return cap

    def _watch_accept_errors(self) -> None:
        # Out of file descriptors, asyncio's accept loop reports every failed accept
        # (thousands a second, each with a traceback: a log flood that can block the
        # process on its own stderr). uvloop (libuv) drops such connections itself.
        # Here: one line per 10 s, and each pending connection is accepted with a
        # reserved descriptor and closed, so the peer is told at once.
        loop = self.loop
        self._prev_exception_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._exception_handler)
        try:
            self._reserve_fd = os.open(os.devnull, os.O_RDONLY)
        except OSError:
            self._reserve_fd = None

    def _unwatch_accept_errors(self) -> None:
        # After descriptors ran out, asyncio still holds a retry of the accept loop per
        # refused connection; they fail on the closed socket after the stop, and stay
        # quiet only while this handler is in place.
        loop = self._loop
        if (
            loop is not None
            and not self._ran_out_of_files
            and loop.get_exception_handler() == self._exception_handler
        ):
            loop.set_exception_handler(self._prev_exception_handler)
        if self._reserve_fd is not None:
            os.close(self._reserve_fd)
            self._reserve_fd = None

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if (
            self._ran_out_of_files
            and isinstance(exc, ValueError)
            and "_start_serving" in repr(context.get("handle"))
        ):
            return  # a retry of the accept loop, run after the server closed (see above)
        if not (
            isinstance(exc, OSError)
            and exc.errno in (errno.EMFILE, errno.ENFILE)
            and "accept" in str(context.get("message", ""))
        ):
            if self._prev_exception_handler is not None:
                self._prev_exception_handler(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        self._out_of_files += 1
        self._ran_out_of_files = True
        now = loop.time()
        if now - self._out_of_files_logged_at >= 10.0:
            log.error(
                "out of file descriptors: refusing new connections (%d refused since the "
                "last such line; the open-file limit is %d)",
                self._out_of_files,
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
            self._out_of_files, self._out_of_files_logged_at = 0, now
        listener = getattr(context.get("socket"), "_sock", None)
        if listener is None or self._reserve_fd is None:
            return
        os.close(self._reserve_fd)
        try:
            conn, _ = listener.accept()
            conn.close()
        except OSError:
            pass
        finally:
            try:
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._reserve_fd = None

    def _admit(self, transport: asyncio.Transport, address: str) -> bool:
        """Give an accepted connection a slot; False (and it is dropped) if none."""
        why = self.slots.acquire(address, self._evict_one)
        if why is not None:
            self._refused += 1
            now = self.loop.time()
            if now - self._refused_logged_at >= 10.0:  # one line per 10 s, whatever the flood
                log.warning(
                    "refusing connections: %s (%d refused since the last such line)",
                    why,
                    self._refused,
                )
                self._refused, self._refused_logged_at = 0, now
            self.metrics.error("connection_refused")
            transport.abort()
            return False
        self._slot_of[transport] = address
        return True

    def release_slot(self, transport: asyncio.BaseTransport) -> None:
        """A connection closed: its slot is free (called by whichever protocol has it)."""
        address = self._slot_of.pop(transport, None)
        if address is not None:
            self.slots.release(address)

    def _evict_one(self) -> bool:
        # At the cap, the oldest connection that has not logged in makes room: a peer
        # that never logs in holds a slot only until someone needs it.
        if not self.dispatcher.login_gated:
            return False
        for session in self.sessions.values():  # oldest first
            if (
                session.login_at is None
                and session.user_id is None
                and not session.closed
                and not session.evicted  # its close is under way: its slot is counted
            ):
                log.info(
                    "dropping connection %s (%s) to make room: not logged in",
                    session.id,
                    session.remote,
                )
                session.evicted = True
                session.abort()
                return True
        return False

    def unsent_changed(self, link: Any, size: int) -> None:
        """A link's unsent bytes are now ``size``; shed the worst when over budget."""
        if self.unsent.update(link, size):
            self._shed()

    def _shed(self) -> None:
        victims = self.unsent.over()
        total = self.unsent.total
        for link in victims:
            self.unsent.remove(link)
            link.abort()
        if victims:
            log.warning(
                "over the budget of %d unsent bytes (%d): dropped the %d connection(s) "
                "holding the most; what they missed waits in the store",
                self.unsent.limit,
                total,
                len(victims),
            )
            # Their buffers are freed when the aborts complete; then give the pages back.
            self.loop.call_soon(self.loop.call_soon, release_memory)

    async def _sweep_unsent(self) -> None:
        # A transport's buffer drains without telling us (until the low-water mark):
        # refresh the sizes recorded, so the budget does not count bytes already gone.
        while True:
            await asyncio.sleep(1.0)
            for link in list(self.unsent.sizes):
                self.unsent.update(link, link.write_buffer_size())

    # -- sessions -------------------------------------------------------------------------

    def _session_opened(self, session: Session) -> bool:
        """Register a session; False when it is refused (the server is stopping)."""
        if self._stopping:
            # Accepted just before the port closed, first bytes after: refused at once
            # (the peer reconnects elsewhere) rather than served while everything closes.
            session.closed = True
            session.abort()
            return False
        self.sessions[session.id] = session
        if self._no_sessions is not None:
            self._no_sessions.clear()
        self.metrics.connection_opened(session.transport_name)
        for hook in self.on_session_open:
            try:  # a failing hook must not escape the transport's data_received
                hook(session)
            except Exception:
                log.exception("session open hook failed")
        return True

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
