"""The Client: requests, timeouts, heartbeats, reconnects, pushes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from bitchat import (
    Client,
    ConnectionClosed,
    Error,
    Packet,
    Ping,
    Pong,
    Registry,
    RequestError,
    RequestTimeout,
    Server,
    Session,
    Settings,
    State,
    UsageError,
)
from bitchat.protocol.frame import FLAG_RESPONSE, encode_frame
from conftest import WAIT


class Add(Packet, type=61400, register=False):
    a: int
    b: int


class Sum(Packet, type=61401, register=False):
    total: int


class Ignore(Packet, type=61402, register=False):
    pass


class Hold(Packet, type=61403, register=False):
    pass


class News(Packet, type=61404, register=False):
    text: str


class Alert(Packet, type=61405, register=False):
    level: int


REG = Registry()
for _cls in (Ping, Pong, Error, Add, Sum, Ignore, Hold, News, Alert):
    REG.register(_cls)


def build(settings: Settings, port: int = 0) -> Server:
    server = Server("127.0.0.1", port, settings, registry=REG)
    server.held = asyncio.Event()  # type: ignore[attr-defined]
    server.holding = asyncio.Event()  # type: ignore[attr-defined]

    @server.handler(Add)
    def add(session: Session, p: Add) -> Sum:
        return Sum(p.a + p.b)

    @server.handler(Ignore)
    def ignore(session: Session, p: Ignore) -> None:
        return None

    @server.handler(Hold)
    async def hold(session: Session, p: Hold) -> Sum:
        server.holding.set()  # type: ignore[attr-defined]
        await server.held.wait()  # type: ignore[attr-defined]
        return Sum(0)

    return server


@pytest.fixture
async def servers(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    started: list[Server] = []

    async def start(port: int = 0, **overrides: Any) -> Server:
        server = build(settings.replace(**overrides), port)
        started.append(server)
        await server.start()
        return server

    yield start
    for server in started:
        server.held.set()  # type: ignore[attr-defined]
        await server.stop()


@pytest.fixture
async def clients(settings: Settings) -> AsyncIterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(port: int, **overrides: Any) -> Client:
        kw = {k: overrides.pop(k) for k in ("reconnect", "serializer") if k in overrides}
        client = Client("127.0.0.1", port, settings.replace(**overrides), registry=REG, **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


class States:
    """Records a client's state changes; ``await states.reach(s)`` waits for one."""

    def __init__(self, client: Client) -> None:
        self.seen: list[State] = []
        self._queue: asyncio.Queue[State] = asyncio.Queue()
        client.on_state.append(self._changed)

    def _changed(self, state: State) -> None:
        self.seen.append(state)
        self._queue.put_nowait(state)

    async def reach(self, state: State) -> None:
        async def until() -> None:
            while await self._queue.get() is not state:
                pass

        await asyncio.wait_for(until(), WAIT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
async def test_request(servers: Any, clients: Any, serializer: str) -> None:
    server = await servers()
    async with clients(server.address[1], serializer=serializer) as client:
        assert client.connected and client.state is State.CONNECTED
        assert await client.request(Add(1, 2)) == Sum(3)
        assert isinstance(await client.request(Ping()), Pong)
        results = await asyncio.gather(*(client.request(Add(i, i)) for i in range(100)))
        assert results == [Sum(2 * i) for i in range(100)]


async def test_request_timeout_when_the_server_never_answers(servers: Any, clients: Any) -> None:
    server = await servers()
    async with clients(server.address[1]) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RequestTimeout) as info:
            await client.request(Ignore(), timeout=0.3)
        assert isinstance(info.value, TimeoutError)
        assert 0.25 <= loop.time() - started < WAIT
        assert not client._pending  # nothing is left behind
        assert await client.request(Add(1, 1)) == Sum(2)  # and the connection is fine


async def test_default_request_timeout_comes_from_settings(servers: Any, clients: Any) -> None:
    server = await servers()
    async with clients(server.address[1], request_timeout=0.2) as client:
        with pytest.raises(RequestTimeout):
            await client.request(Ignore())


async def test_error_answer_raises_request_error(servers: Any, clients: Any) -> None:
    server = await servers()
    async with clients(server.address[1]) as client:
        with pytest.raises(RequestError) as info:
            await client.request(News("no handler for this"))
        assert info.value.code == "no_handler"


async def test_send_is_one_way(servers: Any, clients: Any) -> None:
    server = await servers()
    async with clients(server.address[1]) as client:
        await client.send(Add(1, 2))  # the answer is not awaited
        await client.send(Ignore())
        assert await client.request(Add(2, 2)) == Sum(4)


async def test_requests_before_connect_and_after_close(servers: Any, clients: Any) -> None:
    server = await servers()
    client = clients(server.address[1])
    with pytest.raises(ConnectionClosed):
        await client.request(Add(1, 1))
    await client.connect(timeout=WAIT)
    with pytest.raises(UsageError):
        await client.connect()
    await client.close()
    assert client.state is State.CLOSED
    with pytest.raises(ConnectionClosed):
        await client.request(Add(1, 1))
    with pytest.raises(ConnectionClosed):
        await client.send(Add(1, 1))
    await client.close()  # closing twice is harmless


async def test_pending_requests_fail_when_the_connection_drops(servers: Any, clients: Any) -> None:
    server = await servers()
    client = clients(server.address[1], reconnect=False)
    await client.connect(timeout=WAIT)
    held = [asyncio.create_task(client.request(Hold(), timeout=WAIT)) for _ in range(3)]
    await asyncio.wait_for(server.holding.wait(), WAIT)
    (session,) = server.sessions.values()
    session.abort()
    for task in held:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(task, WAIT)
    with pytest.raises(ConnectionClosed):  # no reconnect: fails at once
        await client.request(Add(1, 1))


async def test_pending_requests_fail_on_close(servers: Any, clients: Any) -> None:
    server = await servers()
    client = clients(server.address[1])
    await client.connect(timeout=WAIT)
    held = asyncio.create_task(client.request(Hold()))
    await asyncio.wait_for(server.holding.wait(), WAIT)
    await client.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(held, WAIT)


# -- heartbeats, idle --------------------------------------------------------------------------


async def test_heartbeat_keeps_a_quiet_connection_open(servers: Any, clients: Any) -> None:
    server = await servers(read_idle_timeout=0.3)
    client = clients(server.address[1], heartbeat_interval=0.05, read_idle_timeout=0.3)
    states = States(client)
    pongs: asyncio.Queue[float] = asyncio.Queue()

    def count_pongs(frame: Any) -> None:  # heartbeat Pongs are answers nobody awaits
        if frame.type == Pong.TYPE:
            pongs.put_nowait(asyncio.get_running_loop().time())

    client._stray = count_pongs  # type: ignore[method-assign]
    await client.connect(timeout=WAIT)
    (session,) = server.sessions.values()
    first = await asyncio.wait_for(pongs.get(), WAIT)
    last = first
    while last - first < 1.0:  # more than three idle timeouts, both sides
        last = await asyncio.wait_for(pongs.get(), WAIT)
    assert states.seen == [State.CONNECTING, State.CONNECTED]
    assert list(server.sessions.values()) == [session] and not session.closed
    assert await client.request(Add(1, 1)) == Sum(2)


async def test_client_drops_a_server_that_went_silent(clients: Any) -> None:
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.put_nowait(writer)
        # Answers the opening Ping (so the client counts itself connected), then
        # reads everything and answers nothing.
        header = await reader.readexactly(14)
        body = await reader.readexactly(int.from_bytes(header[10:14], "big"))
        rid = int.from_bytes(header[6:10], "big")
        writer.write(encode_frame(header[2], FLAG_RESPONSE, Pong.TYPE, rid, body))
        await reader.read()

    mute_server = await asyncio.start_server(mute, "127.0.0.1", 0)
    writers: list[asyncio.StreamWriter] = []
    try:
        port = mute_server.sockets[0].getsockname()[1]
        client = clients(port, heartbeat_interval=0.05, read_idle_timeout=0.3)
        states = States(client)
        await client.connect(timeout=WAIT)
        writers.append(await asyncio.wait_for(accepted.get(), WAIT))
        await states.reach(State.DISCONNECTED)  # after 0.3 s without a Pong
        await states.reach(State.CONNECTED)  # and it tries again
        writers.append(await asyncio.wait_for(accepted.get(), WAIT))
        assert writers[0] is not writers[1]
    finally:
        mute_server.close()
        for w in writers:
            w.close()


# -- reconnecting ------------------------------------------------------------------------------


async def test_reconnects_after_a_server_restart(servers: Any, clients: Any) -> None:
    server = await servers()
    port = server.address[1]
    client = clients(port)
    states = States(client)
    connects: asyncio.Queue[int] = asyncio.Queue()

    async def on_connected(c: Client) -> None:
        # Hooks run before other requests go out: a login would go here.
        assert await c.request(Add(40, 2)) == Sum(42)
        connects.put_nowait(1)

    client.on_connected.append(on_connected)
    await client.connect(timeout=WAIT)
    await asyncio.wait_for(connects.get(), WAIT)
    await server.stop()
    await states.reach(State.DISCONNECTED)
    # A request made while disconnected waits for the next connection.
    waiting = asyncio.create_task(client.request(Add(1, 2)))
    again = await servers(port)
    await asyncio.wait_for(connects.get(), WAIT)
    assert client.state is State.CONNECTED
    assert await asyncio.wait_for(waiting, WAIT) == Sum(3)
    assert len(again.sessions) == 1
    assert states.seen[:2] == [State.CONNECTING, State.CONNECTED]
    assert states.seen[-1] is State.CONNECTED
    assert State.DISCONNECTED in states.seen


async def test_a_request_right_after_a_local_abort_waits_for_the_reconnect(
    servers: Any, clients: Any
) -> None:
    """The connection is known lost (aborted here, as the idle check does) before the
    client's loop has seen it end: a request waits for the next connection."""
    server = await servers()
    client = clients(server.address[1])
    states = States(client)
    await client.connect(timeout=WAIT)
    assert client._proto is not None and client._proto.transport is not None
    client._proto.transport.abort()
    assert await client.request(Add(2, 2)) == Sum(4)
    assert states.seen.count(State.CONNECTED) == 2
    client._proto.transport.abort()  # a one-way send waits the same way
    await client.send(Ignore())
    assert states.seen.count(State.CONNECTED) == 3


async def test_without_reconnect_a_request_after_a_loss_fails_at_once(
    servers: Any, clients: Any
) -> None:
    server = await servers()
    client = clients(server.address[1], reconnect=False, request_timeout=60 * WAIT)
    await client.connect(timeout=WAIT)
    assert client._proto is not None and client._proto.transport is not None
    client._proto.transport.abort()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(client.request(Add(1, 1)), WAIT)


async def test_connects_to_a_server_not_up_yet(servers: Any, clients: Any) -> None:
    port = free_port()
    client = clients(port)
    states = States(client)
    connecting = asyncio.create_task(client.connect(timeout=WAIT))
    await states.reach(State.DISCONNECTED)  # the first attempt is refused
    assert not connecting.done()
    server = await servers(port)
    await asyncio.wait_for(connecting, WAIT)
    assert client.connected
    assert await client.request(Add(2, 3)) == Sum(5)
    assert len(server.sessions) == 1


async def test_connect_without_reconnect_fails_at_once(clients: Any) -> None:
    client = clients(free_port(), reconnect=False)
    with pytest.raises(ConnectionClosed):
        await client.connect(timeout=WAIT)
    assert client.state is State.CLOSED


async def test_connect_times_out_when_the_server_stays_down(clients: Any) -> None:
    client = clients(free_port())
    with pytest.raises(TimeoutError):
        await client.connect(timeout=0.2)
    assert client.state is State.CLOSED


async def test_a_refused_on_connected_hook_fails_connect(servers: Any, clients: Any) -> None:
    server = await servers()
    client = clients(server.address[1])

    async def login(c: Client) -> None:
        await c.request(News("refused: no handler"))

    client.on_connected.append(login)
    with pytest.raises(RequestError) as info:
        await client.connect(timeout=WAIT)
    assert info.value.code == "no_handler"
    assert client.state is State.CLOSED


# -- pushes ------------------------------------------------------------------------------------


async def test_pushes_reach_callbacks(servers: Any, clients: Any) -> None:
    server = await servers()
    client = clients(server.address[1])
    news: asyncio.Queue[News] = asyncio.Queue()
    alerts: asyncio.Queue[Alert] = asyncio.Queue()
    everything: list[Packet] = []

    async def on_alert(p: Alert) -> None:
        await asyncio.sleep(0)
        alerts.put_nowait(p)

    client.on(News, news.put_nowait)
    client.on(Alert, on_alert)
    client.on_any(everything.append)
    await client.connect(timeout=WAIT)
    (session,) = server.sessions.values()
    session.push(News("one"))
    session.push(Alert(3))
    assert server.push(session.id, News("two"))
    assert await asyncio.wait_for(news.get(), WAIT) == News("one")
    assert await asyncio.wait_for(alerts.get(), WAIT) == Alert(3)
    assert await asyncio.wait_for(news.get(), WAIT) == News("two")
    assert everything == [News("one"), Alert(3), News("two")]


async def test_a_failing_callback_does_not_stop_the_others(
    servers: Any, clients: Any, caplog: Any
) -> None:
    server = await servers()
    client = clients(server.address[1])
    got: asyncio.Queue[News] = asyncio.Queue()

    def broken(p: News) -> None:
        raise ValueError("callback bug")

    async def broken_async(p: News) -> None:
        raise ValueError("async callback bug")

    client.on(News, broken)
    client.on(News, broken_async)
    client.on(News, got.put_nowait)
    await client.connect(timeout=WAIT)
    (session,) = server.sessions.values()
    session.push(News("x"))
    assert await asyncio.wait_for(got.get(), WAIT) == News("x")
    assert await client.request(Add(1, 1)) == Sum(2)
    messages = [r.exc_text or "" for r in caplog.records]
    assert any("callback bug" in m for m in messages)


async def test_pushes_as_an_async_iterator(servers: Any, clients: Any) -> None:
    server = await servers()
    client = clients(server.address[1], serializer="msgpack")
    await client.connect(timeout=WAIT)
    stream = client.pushes()  # subscribed from here on, before any iteration
    (session,) = server.sessions.values()
    for i in range(5):
        session.push(News(str(i)))
    session.push(Alert(1))

    got = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(6)]
    assert got == [*(News(str(i)) for i in range(5)), Alert(1)]
    late = client.pushes()  # sees only what arrives after it was asked for
    session.push(News("late"))
    async for p in late:
        assert p == News("late")
        break
    assert await asyncio.wait_for(anext(stream), WAIT) == News("late")
    waiting = asyncio.create_task(anext(stream))
    await client.close()  # ends every iteration
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, WAIT)
    assert [p async for p in late] == []


async def test_pushes_of_unknown_types_are_dropped(servers: Any, clients: Any) -> None:
    class Unknown(Packet, type=61499, register=False):
        pass

    server = await servers()
    client = clients(server.address[1])
    await client.connect(timeout=WAIT)
    stream = client.pushes()
    (session,) = server.sessions.values()
    session.push(Unknown())
    session.push(News("after"))
    assert await asyncio.wait_for(anext(stream), WAIT) == News("after")
