"""Dispatch: which handler a request goes to, how it runs, how its answer comes back.

How a request runs, decided here and nowhere else:

- a plain ``def`` runs inline on the loop, in arrival order;
- an ``async def`` runs in arrival order: later requests of the connection
  wait until it returns (they queue on the session);
- with the POOL flag (and a handler that allows it), a ``def`` runs on the
  worker thread pool and an ``async def`` as its own task, concurrently.

How the answer comes back: every way ends in one place, :meth:`Dispatcher.complete`
(or :meth:`Dispatcher.fail`), which hands the outcome to the connection core. A
handler returns the response packet, returns ``None`` (nothing is sent), raises
:class:`~bitchat.RequestError`, or returns a :class:`Deferred` that it resolves
later from any callback on the loop (the IM service answers every send so,
from its store's commit). An ``asyncio.Future`` or a coroutine returned by a
plain ``def`` is awaited the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from bitchat.errors import ProtocolError, RequestError, UsageError, codes
from bitchat.protocol.connection import PING, PONG, Request
from bitchat.protocol.frame import FLAG_POOL
from bitchat.protocol.packets import Packet, Registry

if TYPE_CHECKING:
    import concurrent.futures

    from bitchat.metrics import Metrics
    from bitchat.session import Session

log = logging.getLogger("bitchat.dispatch")

H = TypeVar("H", bound=Callable[..., Any])
_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class Route:
    """How one packet type is handled."""

    cls: type[Packet]
    func: Callable[..., Any]
    is_coroutine: bool
    login_required: bool
    name: str
    poolable: bool = True
    """False: the POOL flag is ignored and the handler always runs on the loop, in
    order (for handlers that touch loop-only state, such as the IM send path)."""


class Deferred:
    """An answer to come: what a handler returns to answer later from a callback.

    Resolved once, with ``set_result(packet)`` or ``set_exception(exc)``, from the
    loop's thread. Unlike a future, whose callbacks run one loop pass later (after
    the connection's write for this pass has left), the answer is queued on the
    connection at once, so it shares that write.
    """

    __slots__ = ("_dispatcher", "_request", "_route", "_session", "_value")

    def __init__(self) -> None:
        self._dispatcher: Dispatcher | None = None
        self._session: Session | None = None
        self._route: Route | None = None
        self._request: Request | None = None
        self._value: Any = _UNSET

    def done(self) -> bool:
        return self._value is not _UNSET

    def set_result(self, result: Packet | None) -> None:
        self._give(result)

    def set_exception(self, exc: BaseException) -> None:
        self._give(exc)

    def _give(self, value: Any) -> None:
        if self._value is not _UNSET:
            raise asyncio.InvalidStateError("the answer was already given")
        self._value = value
        if self._dispatcher is not None:
            self._deliver()

    def _bind(self, dispatcher: Dispatcher, session: Session, route: Route, req: Request) -> None:
        self._dispatcher, self._session, self._route, self._request = (
            dispatcher,
            session,
            route,
            req,
        )
        if self._value is not _UNSET:
            self._deliver()

    def _deliver(self) -> None:
        d, session, route, req = self._dispatcher, self._session, self._route, self._request
        assert d is not None and session is not None and route is not None and req is not None
        value = self._value
        if isinstance(value, BaseException):
            d.fail(session, route, req, value)
        else:
            d.complete(session, route, req, value)


class Dispatcher:
    """Handlers by packet type (a type has at most one), and how requests run."""

    def __init__(self, registry: Registry, metrics: Metrics | None = None) -> None:
        self.registry = registry
        self.routes: dict[int, Route] = {}
        self.login_gated = False
        """True once a handler requires login: connections then have a login deadline."""
        self.metrics = metrics
        self.executor: concurrent.futures.Executor | None = None
        """The worker pool for POOL requests (the server sets it while it runs)."""
        self.inflight: set[asyncio.Future[Any]] = set()
        """Tasks and pool jobs running now, on every connection (for the shutdown grace)."""

    def add(
        self,
        cls: type[Packet],
        func: Callable[..., Any],
        *,
        login_required: bool = False,
        replace: bool = False,
        poolable: bool = True,
    ) -> None:
        if cls.TYPE < 0:
            raise UsageError(f"{cls.__name__} has no packet type; declare it with type=N")
        if cls.TYPE in (PING, PONG):
            raise UsageError("Ping and Pong are answered by the connection itself")
        if not replace and cls.TYPE in self.routes:
            raise UsageError(f"packet type {cls.TYPE} ({cls.__name__}) already has a handler")
        self.registry.register(cls)
        # An object with an ``async def __call__`` counts as a coroutine handler too.
        call = func if inspect.isroutine(func) else type(func).__call__
        is_coroutine = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(call)
        self.routes[cls.TYPE] = Route(
            cls, func, is_coroutine, login_required, cls.__name__, poolable
        )
        self.login_gated = self.login_gated or login_required

    def handler(self, cls: type[Packet], *, login_required: bool = False) -> Callable[[H], H]:
        def decorate(func: H) -> H:
            self.add(cls, func, login_required=login_required)
            return func

        return decorate

    # -- running ----------------------------------------------------------------------------

    def dispatch(self, session: Session, request: Request) -> None:
        """Run one request the session's core handed out (its type has a route)."""
        route = self.routes[request.type]
        if request.flags & FLAG_POOL and route.poolable:
            self._run_pooled(session, route, request)
        elif session.draining:
            session.queue.append((route, request))
        elif route.is_coroutine:
            session.draining = True
            self._track(session, session._loop.create_task(self._drain(session, route, request)))
        else:  # inline, written out: this is every chat message's path
            packet = session.core.admit(request, route, session.user_id is not None)
            if packet is None:
                return
            started = time.perf_counter()
            try:
                result = route.func(session, packet)
            except Exception as exc:
                self.fail(session, route, request, exc)
                return
            if self.metrics is not None:
                self.metrics.handler_seconds.observe(route.name, time.perf_counter() - started)
            self.complete(session, route, request, result)

    async def _drain(self, session: Session, route: Route, request: Request) -> None:
        """Run queued requests in arrival order; exits when the queue is empty."""
        try:
            while True:
                packet = session.core.admit(request, route, session.user_id is not None)
                if packet is not None:
                    if route.is_coroutine:
                        await self._call_coroutine(session, route, request, packet)
                    else:
                        started = time.perf_counter()
                        try:
                            result = route.func(session, packet)
                        except Exception as exc:
                            self.fail(session, route, request, exc)
                        else:
                            self._observe(route, started)
                            self.complete(session, route, request, result)
                if not session.queue or session.closed:
                    break
                route, request = session.queue.popleft()
        finally:
            session.draining = False

    async def _call_coroutine(
        self, session: Session, route: Route, request: Request, packet: Packet
    ) -> None:
        started = time.perf_counter()
        try:
            result = await route.func(session, packet)
        except asyncio.CancelledError:
            # Cancelled (the server stops, or the handler was): the request is still
            # completed, so the connection's count of unfinished ones stays true.
            if not session.closed:
                session.core.complete_error(request, codes.UNAVAILABLE, "the request was cancelled")
            raise
        except Exception as exc:
            self.fail(session, route, request, exc)
            return
        self._observe(route, started)
        self.complete(session, route, request, result)

    def _run_pooled(self, session: Session, route: Route, request: Request) -> None:
        packet = session.core.admit(request, route, session.user_id is not None)
        if packet is None:
            return
        loop = session._loop
        if route.is_coroutine:
            self._track(
                session, loop.create_task(self._call_coroutine(session, route, request, packet))
            )
            return
        started = time.perf_counter()
        fut = loop.run_in_executor(self.executor, route.func, session, packet)

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                return  # the pool was shut down with the server
            exc = f.exception()
            if exc is not None:
                self.fail(session, route, request, exc)
                return
            self._observe(route, started)
            self.complete(session, route, request, f.result())

        fut.add_done_callback(done)
        self._track(session, fut)

    def _track(self, session: Session, fut: asyncio.Future[Any]) -> None:
        session.tasks.add(fut)
        fut.add_done_callback(session.tasks.discard)
        self.inflight.add(fut)
        fut.add_done_callback(self.inflight.discard)

    def _observe(self, route: Route, started: float) -> None:
        if self.metrics is not None:
            self.metrics.handler_seconds.observe(route.name, time.perf_counter() - started)

    def complete(self, session: Session, route: Route, request: Request, result: Any) -> None:
        """The one place a handler's outcome becomes the request's answer."""
        if session.closed:
            return
        if type(result) is Deferred:  # first: every chat message is answered so
            result._bind(self, session, route, request)
            return
        if result is None or isinstance(result, Packet):
            try:
                session.core.complete(request, result)
            except Exception as exc:  # e.g. a field the frame's serializer cannot carry
                self.fail(session, route, request, exc)
            return
        # A future first: iscoroutine() of a non-coroutine goes through an ABC check.
        if not isinstance(result, asyncio.Future) and asyncio.iscoroutine(result):
            result = session._loop.create_task(result)
            self._track(session, result)
        if isinstance(result, asyncio.Future):
            # A handler may answer later without holding up the next request.
            def later(f: asyncio.Future[Any]) -> None:
                if f.cancelled():
                    self.fail(session, route, request, asyncio.CancelledError())
                elif (exc := f.exception()) is not None:
                    self.fail(session, route, request, exc)
                else:
                    self.complete(session, route, request, f.result())

            result.add_done_callback(later)
            return
        self.fail(
            session,
            route,
            request,
            TypeError(f"handler {route.name} returned {type(result).__name__}, not a Packet"),
        )

    def fail(self, session: Session, route: Route, request: Request, exc: BaseException) -> None:
        """The request failed: a typed error goes to the peer as is, anything else is
        logged and answered with ``internal_error``."""
        if session.closed:
            return
        if isinstance(exc, (RequestError, ProtocolError)):
            session.core.complete_error(request, exc.code, exc.message)
            return
        log.error(
            "handler %s failed on connection %s",
            route.name,
            session.id,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        session.core.complete_error(request, codes.INTERNAL, "internal server error")


_MARK = "__bitchat_handler__"


def handler(cls: type[Packet], *, login_required: bool = False) -> Callable[[H], H]:
    """Mark ``func(session, packet)`` as the handler of ``cls``, with no server at hand.

    A module of handlers written this way is added to a server with
    :meth:`bitchat.Server.include`; ``@server.handler(cls)`` does both at once::

        @handler(Echo)
        async def echo(session, packet):
            return EchoReply(packet.text)

        server.include(echo)  # or server.include(the_module)
    """

    def decorate(func: H) -> H:
        setattr(func, _MARK, (cls, login_required))
        return func

    return decorate


def marked_handlers(obj: Any) -> list[tuple[type[Packet], Callable[..., Any], bool]]:
    """``(cls, func, login_required)`` of ``obj`` if marked, else of its marked attributes
    (a module's functions, a class's static methods, an instance's methods)."""
    mark = getattr(obj, _MARK, None)
    if mark is not None:
        return [(mark[0], obj, mark[1])]
    found = []
    names = vars(obj) if inspect.ismodule(obj) else dir(obj)
    for name in names:
        if name.startswith("__"):
            continue
        value = getattr(obj, name)  # resolves staticmethods and binds methods
        mark = getattr(value, _MARK, None)
        if mark is not None and callable(value):
            found.append((mark[0], value, mark[1]))
    return found
