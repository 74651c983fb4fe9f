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


class Dispatcher:
    """Handlers by packet type. A type has at most one handler."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.routes: dict[int, Route] = {}

    def add(self, cls: type[Packet], func: Callable[..., Any], *,
            login_required: bool = False, replace: bool = False) -> None:
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
        self.routes[cls.TYPE] = Route(cls, func, is_coroutine, login_required, cls.__name__)

    def handler(self, cls: type[Packet], *, login_required: bool = False) -> Callable[[H], H]:
        def decorate(func: H) -> H:
            self.add(cls, func, login_required=login_required)
            return func

        return decorate
