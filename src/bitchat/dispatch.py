"""Dispatch: the table from packet type to handler."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from bitchat.errors import UsageError
from bitchat.protocol.packets import Packet, Registry

H = TypeVar("H", bound=Callable[..., Any])


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


class Dispatcher:
    """Handlers by packet type. A type has at most one handler."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.routes: dict[int, Route] = {}

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
        if cls.TYPE in (1, 2):
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

    def handler(self, cls: type[Packet], *, login_required: bool = False) -> Callable[[H], H]:
        def decorate(func: H) -> H:
            self.add(cls, func, login_required=login_required)
            return func

        return decorate


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
