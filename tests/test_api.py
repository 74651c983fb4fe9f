"""The public API: what ``import bitchat`` promises (STYLE.md: a test pins ``__all__``)."""

from __future__ import annotations

import importlib.metadata
import types
from typing import Any

import pytest

import bitchat
import bitchat.protocol
from bitchat import Packet, Registry, Server, handler


def test_all_is_pinned() -> None:
    assert sorted(bitchat.__all__) == [
        "BitchatError",
        "Client",
        "ConfigError",
        "ConnectionClosed",
        "Deferred",
        "Error",
        "Limit",
        "Packet",
        "Ping",
        "Pong",
        "ProtocolError",
        "Registry",
        "RequestError",
        "RequestTimeout",
        "Server",
        "ServiceUnavailable",
        "Session",
        "Settings",
        "State",
        "TLSError",
        "UsageError",
        "__version__",
        "codes",
        "handler",
        "registry",
    ]


def test_protocol_all_is_pinned() -> None:
    assert sorted(bitchat.protocol.__all__) == [
        "Error",
        "FLAG_ERROR",
        "FLAG_POOL",
        "FLAG_RESPONSE",
        "Frame",
        "FrameDecoder",
        "HEADER_SIZE",
        "JSON",
        "Limit",
        "Limits",
        "MAGIC",
        "MSGPACK",
        "Packet",
        "Ping",
        "Pong",
        "Registry",
        "SERIALIZERS",
        "Serializer",
        "VERSION",
        "decode_body",
        "encode_body",
        "encode_frame",
        "encode_header",
        "registry",
    ]


@pytest.mark.parametrize("module", [bitchat, bitchat.protocol])
def test_every_name_in_all_exists(module: types.ModuleType) -> None:
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_version_matches_the_package_metadata() -> None:
    assert bitchat.__version__ == importlib.metadata.version("bitchat")


def test_the_exception_tree() -> None:
    e = bitchat
    for exc in (
        e.ProtocolError,
        e.UsageError,
        e.RequestError,
        e.RequestTimeout,
        e.ConnectionClosed,
    ):
        assert issubclass(exc, e.BitchatError)
    assert issubclass(e.ServiceUnavailable, e.RequestError)
    assert issubclass(e.RequestTimeout, TimeoutError)
    assert issubclass(e.ConnectionClosed, ConnectionError)
    assert issubclass(e.TLSError, e.ConnectionClosed)
    assert not issubclass(e.ProtocolError, e.RequestError)
    assert e.ServiceUnavailable().code == e.codes.UNAVAILABLE
    err = e.RequestError("nope", "not now")
    assert (err.code, err.message, str(err)) == ("nope", "not now", "nope: not now")


class Hello(Packet, type=61500, register=False):
    name: str


class Bye(Packet, type=61501, register=False):
    pass


@handler(Hello)
def hello(session: Any, p: Hello) -> Hello:
    return Hello(p.name)


class Handlers:
    @staticmethod
    @handler(Bye, login_required=True)
    async def bye(session: Any, p: Bye) -> None:
        return None

    not_a_handler = 3


def test_handlers_marked_without_a_server_are_included_later() -> None:
    server = Server("127.0.0.1", 0, registry=Registry())
    server.include(hello, Handlers)
    hello_route = server.dispatcher.routes[Hello.TYPE]
    bye_route = server.dispatcher.routes[Bye.TYPE]
    assert hello_route.func is hello and not hello_route.login_required
    assert not hello_route.is_coroutine
    assert bye_route.login_required and bye_route.is_coroutine
    assert server.registry.get(Hello.TYPE) is Hello
    with pytest.raises(bitchat.UsageError):
        server.include(lambda s, p: None)
    with pytest.raises(bitchat.UsageError):  # a type has one handler
        server.include(hello)


class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    @handler(Hello)
    async def greet(self, session: Any, p: Hello) -> Hello:
        return Hello(f"{self.greeting}, {p.name}")


async def test_an_instance_with_marked_methods_serves_them(settings: Any) -> None:
    reg = Registry()
    for cls in (bitchat.Ping, bitchat.Pong, bitchat.Error):
        reg.register(cls)
    server = Server("127.0.0.1", 0, settings, registry=reg)
    server.include(Greeter("hi"))
    async with server:
        client = bitchat.Client("127.0.0.1", server.address[1], settings, registry=reg)
        async with client:
            assert await client.request(Hello("you")) == Hello("hi, you")
