"""Shared fixtures of the test suite.

Foundation tests (protocol core, Server, Client) run real sockets on 127.0.0.1
with port 0, short timers set through :class:`bitchat.Settings`, and wait on
events with a timeout instead of sleeping. Every wait is ``WAIT`` seconds, scaled
by ``BITCHAT_TEST_TIMEOUT_FACTOR`` for slow machines.

The server and raw-socket tests run on both the default asyncio loop and uvloop
(the loop ``bitchat server`` uses); every other test gets the default loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack
import orjson
import pytest

from bitchat import Error, Packet, Ping, Pong, Registry, Settings

WAIT = 5.0 * float(os.environ.get("BITCHAT_TEST_TIMEOUT_FACTOR", "1"))
"""How long any test waits for an event before failing."""

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
    uvloop = None

_BOTH_LOOPS = {"test_raw_socket.py", "test_server.py"}


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    if uvloop is not None and item.path.name in _BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(autouse=True, scope="session")
def _own_config_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """``bitchat client`` keeps device ids in the user's config folder: the suite's
    clients (in process and child processes, which inherit the environment) keep
    theirs in a folder of the test run, never in the real one."""
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config-home"))


# -- settings and registries ------------------------------------------------------------------


@pytest.fixture
def settings() -> Settings:
    """Settings with short timers, no rate limit and a quick shutdown."""
    return Settings(
        read_idle_timeout=5.0,
        heartbeat_interval=1.0,
        request_timeout=WAIT,
        connect_timeout=WAIT,
        reconnect_initial_delay=0.01,
        reconnect_max_delay=0.05,
        shutdown_grace=2.0,
        rate_limit=0,
        worker_threads=4,
    )


def make_registry(*classes: type[Packet]) -> Registry:
    """A fresh registry with the system packets and ``classes`` in it."""
    reg = Registry()
    for cls in (Ping, Pong, Error, *classes):
        reg.register(cls)
    return reg


@pytest.fixture
def registry_of() -> Callable[..., Registry]:
    return make_registry


async def wait_for(aw: Awaitable[Any], timeout: float = WAIT) -> Any:
    return await asyncio.wait_for(aw, timeout)


@pytest.fixture
def wait() -> Callable[..., Awaitable[Any]]:
    """``await wait(awaitable)``: the awaitable's result, or a failure after ``WAIT``."""
    return wait_for


# -- a raw peer, written from DESIGN.md section 2 only ----------------------------------------

_HEADER = struct.Struct(">BBBBHII")  # magic, version, serializer, flags, type, request id, length


class RawPeer:
    """A bare TCP peer that frames packets by hand (no bitchat code involved)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @staticmethod
    def frame(
        type_: int,
        body: Any = None,
        *,
        rid: int = 0,
        ser: int = 1,
        flags: int = 0,
        magic: int = 0xBC,
        version: int = 1,
        raw: bytes | None = None,
        length: int | None = None,
    ) -> bytes:
        if raw is None:
            fields = {} if body is None else body
            raw = orjson.dumps(fields) if ser != 2 else msgpack.packb(fields, use_bin_type=True)
        n = len(raw) if length is None else length
        return _HEADER.pack(magic, version, ser, flags, type_, rid, n) + raw

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_frame(self, type_: int, body: Any = None, **kw: Any) -> None:
        self.writer.write(self.frame(type_, body, **kw))

    async def read_frame(self) -> tuple[int, int, int, int, Any]:
        """(serializer, flags, type, request id, decoded body) of the next frame."""
        head = await wait_for(self.reader.readexactly(14))
        magic, version, ser, flags, type_, rid, n = _HEADER.unpack(head)
        assert (magic, version) == (0xBC, 1)
        raw = await wait_for(self.reader.readexactly(n))
        body = orjson.loads(raw) if ser == 1 else msgpack.unpackb(raw, raw=False)
        return ser, flags, type_, rid, body

    async def request(self, type_: int, body: Any = None, **kw: Any) -> tuple[Any, ...]:
        self.send_frame(type_, body, **kw)
        return await self.read_frame()

    async def read_to_eof(self) -> bytes:
        """Everything until the server closes the connection."""
        return await wait_for(self.reader.read())

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def raw_connect() -> AsyncIterator[Callable[..., Awaitable[RawPeer]]]:
    """``await raw_connect(port)``: a :class:`RawPeer`, closed after the test."""
    peers: list[RawPeer] = []

    async def connect(port: int, **kw: Any) -> RawPeer:
        reader, writer = await wait_for(asyncio.open_connection("127.0.0.1", port, **kw))
        peer = RawPeer(reader, writer)
        peers.append(peer)
        return peer

    yield connect
    for peer in peers:
        await peer.close()
