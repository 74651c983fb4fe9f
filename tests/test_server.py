"""The Server: handlers, the POOL flag, ordering, timeouts, backpressure, stop, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bitchat import (
    Client,
    ConnectionClosed,
    Packet,
    RequestError,
    Server,
    Session,
    Settings,
    UsageError,
)
from bitchat.protocol import Ping, Registry
from conftest import WAIT, make_registry

RESPONSE, ERR = 2, 4


class Add(Packet, type=61300, register=False):
    a: int
    b: int


class Sum(Packet, type=61301, register=False):
    total: int


class Outcome(Packet, type=61302, register=False):
    """Ask a handler to answer, stay silent, refuse, or crash."""

    what: str


class Step(Packet, type=61303, register=False):
    n: int


class Block(Packet, type=61304, register=False, pool=True):
    pass


class Blob(Packet, type=61305, register=False):
    data: str


class Raw(Packet, type=61306, register=False):
    data: bytes


class Weird(Packet, type=61307, register=False):
    what: str


REG = make_registry(Add, Sum, Outcome, Step, Block, Blob, Raw, Weird)


class App:
    """A server with test handlers, and the events they report to."""

    def __init__(self, settings: Settings) -> None:
        self.server = Server("127.0.0.1", 0, settings, registry=REG)
        self.loop = asyncio.get_running_loop()
        self.log: list[tuple[str, int]] = []
        self.gates: dict[int, asyncio.Event] = {}
        self.started: dict[int, asyncio.Event] = {}
        self.block_gate = threading.Event()
        self.block_started: asyncio.Future[str] = self.loop.create_future()
        self.opened: asyncio.Queue[Session] = asyncio.Queue()
        self.closed: asyncio.Queue[Session] = asyncio.Queue()
        self.server.on_session_open.append(self.opened.put_nowait)
        self.server.on_session_close.append(self.closed.put_nowait)
        srv = self.server

        @srv.handler(Add)
        def add(session: Session, p: Add) -> Sum:
            return Sum(p.a + p.b)

        @srv.handler(Outcome)
        def outcome(session: Session, p: Outcome) -> Any:
            return self.outcome(p.what)

        @srv.handler(Step)
        async def step(session: Session, p: Step) -> Sum:
            self.log.append(("start", p.n))
            self.started.setdefault(p.n, asyncio.Event()).set()
            await self.gates.setdefault(p.n, asyncio.Event()).wait()
            self.log.append(("end", p.n))
            return Sum(p.n)

        @srv.handler(Block)
        def block(session: Session, p: Block) -> Sum:
            name = threading.current_thread().name
            self.loop.call_soon_threadsafe(self.block_started.set_result, name)
            assert self.block_gate.wait(WAIT)
            return Sum(-1)

        @srv.handler(Raw)
        def raw(session: Session, p: Raw) -> Raw:
            return Raw(p.data)

        @srv.handler(Weird)
        def weird(session: Session, p: Weird) -> Any:
            if p.what == "dict":
                return {"total": 1}
            if p.what == "bytes":
                return Raw(b"\x00\xff")
            fut = self.loop.create_future()
            self.loop.call_soon(fut.set_result, Sum(99))
            return fut

    @staticmethod
    def outcome(what: str) -> Any:
        if what == "answer":
            return Sum(1)
        if what == "silence":
            return None
        if what == "refuse":
            raise RequestError("nope", "not today")
        raise ValueError("boom")

    def gate(self, n: int) -> asyncio.Event:
        return self.gates.setdefault(n, asyncio.Event())

    def has_started(self, n: int) -> asyncio.Event:
        return self.started.setdefault(n, asyncio.Event())


@pytest.fixture
async def make_app(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[App]]]:
    apps: list[App] = []

    async def make(**overrides: Any) -> App:
        app = App(settings.replace(**overrides))
        await app.server.start()
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.block_gate.set()
        for gate in app.gates.values():
            gate.set()
        await app.server.stop()


@pytest.fixture
async def app(make_app: Callable[..., Awaitable[App]]) -> App:
    return await make_app()


@pytest.fixture
async def connect(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    clients: list[Client] = []

    async def connect(server: Server, **kw: Any) -> Client:
        client = Client("127.0.0.1", server.address[1], settings, registry=REG, **kw)
        clients.append(client)
        await client.connect(timeout=WAIT)
        return client

    yield connect
    for client in clients:
        await client.close()


# -- handler outcomes --------------------------------------------------------------------------


async def test_request_response(app: App, connect: Any) -> None:
    client = await connect(app.server)
    assert await client.request(Add(2, 3)) == Sum(5)
    msgpack_client = await connect(app.server, serializer="msgpack")
    assert await msgpack_client.request(Add(20, 3)) == Sum(23)


@pytest.mark.parametrize("kind", ["def", "async", "def-pool", "async-pool"])
async def test_handler_outcomes(
    settings: Settings, connect: Any, raw_connect: Any, caplog: Any, kind: str
) -> None:
    class Try(Packet, type=61310, register=False):
        what: str

    reg = make_registry(Try, Sum)
    server = Server("127.0.0.1", 0, settings, registry=reg)
    if kind.startswith("async"):

        async def handle(session: Session, p: Try) -> Any:
            await asyncio.sleep(0)
            return App.outcome(p.what)
    else:

        def handle(session: Session, p: Try) -> Any:
            return App.outcome(p.what)

    server.add_handler(Try, handle)
    pool = kind.endswith("pool")
    async with server:
        client = Client("127.0.0.1", server.address[1], settings, registry=reg)
        async with client:
            assert await client.request(Try("answer"), pool=pool) == Sum(1)
            with pytest.raises(RequestError) as info:
                await client.request(Try("refuse"), pool=pool)
            assert (info.value.code, info.value.message) == ("nope", "not today")
            with (
                caplog.at_level(logging.ERROR, "bitchat.dispatch"),
                pytest.raises(RequestError) as info,
            ):
                await client.request(Try("crash"), pool=pool)
            assert info.value.code == "internal_error"
            assert "boom" not in info.value.message  # no internals leak to the peer
            assert any("ValueError: boom" in (r.exc_text or "") for r in caplog.records)
            # The server keeps going, on this connection and others.
            assert await client.request(Try("answer"), pool=pool) == Sum(1)
        peer = await raw_connect(server.address[1])
        peer.send_frame(61310, {"what": "silence"}, rid=5, flags=int(pool))
        # Nothing is sent for None: the next frame is the Pong.
        assert await peer.request(1, rid=6) == (1, RESPONSE, 2, 6, {})


async def test_bad_handler_results_are_internal_errors(app: App, connect: Any) -> None:
    client = await connect(app.server)
    with pytest.raises(RequestError) as info:
        await client.request(Weird("dict"))  # not a Packet
    assert info.value.code == "internal_error"
    with pytest.raises(RequestError) as info:
        await client.request(Weird("bytes"))  # bytes do not fit in JSON
    assert info.value.code == "internal_error"
    msgpack_client = await connect(app.server, serializer="msgpack")
    assert await msgpack_client.request(Weird("bytes")) == Raw(b"\x00\xff")
    assert await msgpack_client.request(Raw(b"\x01")) == Raw(b"\x01")
    assert await client.request(Add(1, 1)) == Sum(2)


async def test_a_plain_handler_may_answer_with_a_future(app: App, connect: Any) -> None:
    client = await connect(app.server)
    assert await client.request(Weird("future")) == Sum(99)


async def test_an_async_callable_object_is_a_coroutine_handler(
    settings: Settings, connect: Any
) -> None:
    class Handler:
        async def __call__(self, session: Session, p: Add) -> Sum:
            return Sum(p.a * p.b)

    server = Server("127.0.0.1", 0, settings, registry=make_registry(Add, Sum))
    server.add_handler(Add, Handler())
    assert server.dispatcher.routes[Add.TYPE].is_coroutine
    async with server:
        client = await connect(server)
        assert await client.request(Add(6, 7)) == Sum(42)


def test_handler_registration_rules(settings: Settings) -> None:
    server = Server("127.0.0.1", 0, settings, registry=make_registry(Add, Sum))
    server.add_handler(Add, lambda s, p: None)
    with pytest.raises(UsageError):
        server.add_handler(Add, lambda s, p: None)
    with pytest.raises(UsageError):
        server.add_handler(Ping, lambda s, p: None)

    class Untyped(Packet):
        pass

    with pytest.raises(UsageError):
        server.add_handler(Untyped, lambda s, p: None)


# -- POOL and ordering -------------------------------------------------------------------------


async def test_pool_runs_a_blocking_handler_off_the_loop(app: App, connect: Any) -> None:
    client = await connect(app.server)
    blocked = asyncio.create_task(client.request(Block()))  # Block defaults to POOL
    thread = await asyncio.wait_for(app.block_started, WAIT)
    assert thread.startswith("bitchat-worker")
    # The loop keeps answering, on this connection and on others.
    for i in range(5):
        assert await client.request(Ping()) is not None
        assert await client.request(Add(i, 1)) == Sum(i + 1)
    other = await connect(app.server)
    assert await other.request(Add(1, 1)) == Sum(2)
    assert not blocked.done()
    app.block_gate.set()
    assert await asyncio.wait_for(blocked, WAIT) == Sum(-1)


async def test_coroutine_handlers_without_pool_run_in_arrival_order(
    app: App, raw_connect: Any
) -> None:
    peer = await raw_connect(app.server.address[1])
    # Three slow requests and a quick one behind them, in one write; then a Ping.
    peer.send(
        b"".join(peer.frame(61303, {"n": n}, rid=n) for n in (1, 2, 3))
        + peer.frame(61300, {"a": 1, "b": 1}, rid=4)
        + peer.frame(1, rid=5)
    )
    assert await peer.read_frame() == (1, RESPONSE, 2, 5, {})  # Ping skips the queue
    assert app.log == [("start", 1)]
    app.gate(3).set()
    app.gate(2).set()
    assert await peer.request(1, rid=6) == (1, RESPONSE, 2, 6, {})
    assert app.log == [("start", 1)]  # 2 and 3 wait for 1, though their gates are open
    app.gate(1).set()
    for rid, total in [(1, 1), (2, 2), (3, 3), (4, 2)]:
        assert await peer.read_frame() == (1, RESPONSE, 61301, rid, {"total": total})
    assert app.log == [("start", 1), ("end", 1), ("start", 2), ("end", 2), ("start", 3), ("end", 3)]


async def test_coroutine_handlers_with_pool_run_concurrently(app: App, connect: Any) -> None:
    client = await connect(app.server)
    first = asyncio.create_task(client.request(Step(1), pool=True))
    second = asyncio.create_task(client.request(Step(2), pool=True))
    await asyncio.wait_for(app.has_started(1).wait(), WAIT)
    await asyncio.wait_for(app.has_started(2).wait(), WAIT)
    app.gate(2).set()
    assert await asyncio.wait_for(second, WAIT) == Sum(2)
    assert not first.done()
    app.gate(1).set()
    assert await asyncio.wait_for(first, WAIT) == Sum(1)


@pytest.mark.parametrize("pool", [0, 1])
async def test_a_tiny_request_queue_pauses_and_resumes_reading(
    make_app: Any, raw_connect: Any, pool: int
) -> None:
    app = await make_app(max_pending_requests=1)
    for n in range(100):
        app.gate(n).set()
    peer = await raw_connect(app.server.address[1])
    peer.send(b"".join(peer.frame(61303, {"n": n}, rid=n + 1, flags=pool) for n in range(100)))
    got = [await peer.read_frame() for _ in range(100)]
    assert sorted(f[3] for f in got) == list(range(1, 101))
    if not pool:
        assert [f[3] for f in got] == list(range(1, 101))


async def test_rate_limit(make_app: Any, raw_connect: Any) -> None:
    app = await make_app(rate_limit=0.001, rate_burst=3)
    peer = await raw_connect(app.server.address[1])
    for rid in (1, 2, 3):
        assert (await peer.request(61300, {"a": rid, "b": 0}, rid=rid))[4] == {"total": rid}
    _, flags, type_, rid, body = await peer.request(61300, {"a": 1, "b": 1}, rid=4)
    assert (flags, type_, rid, body["code"]) == (RESPONSE | ERR, 3, 4, "rate_limited")
    assert await peer.request(1, rid=5) == (1, RESPONSE, 2, 5, {})  # heartbeats are free


# -- timeouts, backpressure --------------------------------------------------------------------


async def test_idle_connection_is_closed(make_app: Any, raw_connect: Any) -> None:
    app = await make_app(read_idle_timeout=0.3)
    peer = await raw_connect(app.server.address[1])
    assert await peer.request(1, rid=1) == (1, RESPONSE, 2, 1, {})
    started = asyncio.get_running_loop().time()
    # The server says why, then closes.
    assert await peer.read_frame() == (
        1,
        RESPONSE | ERR,
        3,
        0,
        {"code": "idle_timeout", "message": "closing the connection: nothing read for 0.3s"},
    )
    assert await peer.read_to_eof() == b""
    assert asyncio.get_running_loop().time() - started >= 0.25
    session = await asyncio.wait_for(app.closed.get(), WAIT)
    assert session.closed and not app.server.sessions


async def test_a_connection_that_never_speaks_is_closed(make_app: Any, raw_connect: Any) -> None:
    app = await make_app(read_idle_timeout=0.3)
    peer = await raw_connect(app.server.address[1])
    with contextlib.suppress(ConnectionResetError):
        assert await peer.read_to_eof() == b""


async def test_activity_keeps_a_connection_open(make_app: Any, raw_connect: Any) -> None:
    app = await make_app(read_idle_timeout=0.3)
    peer = await raw_connect(app.server.address[1])
    loop = asyncio.get_running_loop()
    start = loop.time()
    rid = 0
    while loop.time() - start < 1.0:  # over three idle timeouts of requests
        rid += 1
        peer.send_frame(61303, {"n": rid}, rid=rid)
        # The handler answers after 0.1 s of the server's own clock.
        loop.call_later(0.1, app.gate(rid).set)
        assert (await peer.read_frame())[3] == rid
    assert len(app.server.sessions) == 1


async def test_a_peer_that_does_not_read_is_disconnected(
    make_app: Any, connect: Any, wait: Any
) -> None:
    app = await make_app(
        write_high_water=16 * 1024, write_low_water=4 * 1024, write_hard_limit=256 * 1024
    )
    port = app.server.address[1]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"\xbc\x01\x01\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00")  # a Ping
    session = await wait(app.opened.get())
    other = await connect(app.server)
    blob = Blob("x" * 65536)
    pushes = 0
    try:
        while not session.closed and pushes < 2000:  # at most 128 MiB
            session.push(blob)
            pushes += 1
            await asyncio.sleep(0)  # one loop turn: the push is flushed
            if pushes % 50 == 0:
                assert await other.request(Add(pushes, 0)) == Sum(pushes)
        assert await wait(app.closed.get()) is session
        assert session.closed
        assert pushes < 200  # well before the 128 MiB: the hard limit is 256 KiB
        # The other client was never held up and still is served.
        assert await other.request(Add(1, 2)) == Sum(3)
    finally:
        sock.close()


# -- pushes, hooks, stop -----------------------------------------------------------------------


async def test_server_push(app: App, connect: Any) -> None:
    client = await connect(app.server)
    got: asyncio.Queue[Packet] = asyncio.Queue()
    client.on(Blob, got.put_nowait)
    session = await asyncio.wait_for(app.opened.get(), WAIT)
    assert app.server.push(session.id, Blob("one"))
    session.push(Blob("two"))
    assert await asyncio.wait_for(got.get(), WAIT) == Blob("one")
    assert await asyncio.wait_for(got.get(), WAIT) == Blob("two")
    assert not app.server.push(987654321, Blob("nobody"))


async def test_session_hooks(app: App, connect: Any) -> None:
    client = await connect(app.server)
    opened = await asyncio.wait_for(app.opened.get(), WAIT)
    assert opened.id in app.server.sessions
    info = opened.info()
    assert info["transport"] == "tcp" and info["user_id"] is None
    assert info["remote"].startswith("127.0.0.1:")
    await client.close()
    assert await asyncio.wait_for(app.closed.get(), WAIT) is opened
    assert opened.id not in app.server.sessions


async def test_graceful_stop_drains_in_flight_requests(settings: Settings, connect: Any) -> None:
    app = App(settings)
    calls: list[str] = []

    async def on_startup(server: Server) -> None:
        calls.append("startup")

    async def on_shutdown(server: Server) -> None:
        calls.append(f"shutdown with {len(server.sessions)} sessions")

    app.server.on_startup.append(on_startup)
    app.server.on_shutdown.append(on_shutdown)
    async with app.server as server:
        assert calls == ["startup"]
        forever = asyncio.create_task(server.serve_forever())
        port = server.address[1]
        client = await connect(server, reconnect=False)
        states: list[Any] = []
        client.on_state.append(states.append)
        slow = asyncio.create_task(client.request(Step(1)))
        await asyncio.wait_for(app.has_started(1).wait(), WAIT)
        stopping = asyncio.create_task(server.stop())
        await asyncio.sleep(0)  # one loop turn: stop() closes the listener first
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        assert not stopping.done()
        app.gate(1).set()
        assert await asyncio.wait_for(slow, WAIT) == Sum(1)  # answered before the close
        await asyncio.wait_for(stopping, WAIT)
        await asyncio.wait_for(forever, WAIT)
        assert calls == ["startup", "shutdown with 0 sessions"]
        assert not server.sessions
        with pytest.raises(ConnectionClosed):
            await client.request(Add(1, 1), timeout=0.5)
    await server.stop()  # stopping twice is harmless


async def test_a_peer_that_speaks_first_once_the_stop_began_is_refused(
    settings: Settings, raw_connect: Any
) -> None:
    """Accepted before the port closed, its first bytes after: closed at once, not
    served while the server shuts down (it reconnects elsewhere)."""
    server = Server("127.0.0.1", 0, settings, registry=REG)
    opened: list[Session] = []
    server.on_session_open.append(opened.append)
    stopping_began, go_on = asyncio.Event(), asyncio.Event()

    async def on_stopping(s: Server) -> None:
        stopping_began.set()
        await go_on.wait()

    server.on_stopping.append(on_stopping)
    await server.start()
    port = server.address[1]
    silent = await raw_connect(port)
    speaker = await raw_connect(port)
    # Connections are accepted in order: once the second is answered, the first is in.
    assert (await speaker.request(1, rid=1))[2] == 2  # Pong
    stopping = asyncio.create_task(server.stop())
    try:
        await asyncio.wait_for(stopping_began.wait(), WAIT)
        silent.send_frame(1, rid=1)  # Ping
        assert await silent.read_to_eof() == b""  # no Pong: closed
        assert len(opened) == 1  # the speaker only
    finally:
        go_on.set()
        await asyncio.wait_for(stopping, WAIT)


async def test_stop_gives_up_after_the_grace(settings: Settings, connect: Any) -> None:
    app = App(settings.replace(shutdown_grace=0.2))
    await app.server.start()
    client = await connect(app.server, reconnect=False)
    slow = asyncio.create_task(client.request(Step(1)))
    await asyncio.wait_for(app.has_started(1).wait(), WAIT)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(app.server.stop(), WAIT)
    assert loop.time() - started < 2
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(slow, WAIT)
    app.gate(1).set()


async def test_a_failing_startup_hook_leaves_nothing_running(settings: Settings) -> None:
    server = Server("127.0.0.1", 0, settings, registry=REG)
    shut: list[bool] = []

    async def broken(server: Server) -> None:
        raise RuntimeError("no database")

    async def shutdown(server: Server) -> None:
        shut.append(True)

    server.on_startup.append(broken)
    server.on_shutdown.append(shutdown)
    with pytest.raises(RuntimeError):
        await server.start()
    assert shut == [True]
    assert server.executor is not None and server.executor._shutdown
    server.on_startup.clear()
    async with server:  # and it can be started once the cause is gone
        assert server.address[1] != 0


async def test_restart_on_the_same_port(app: App, connect: Any) -> None:
    port = app.server.address[1]
    await app.server.stop()
    app.server.port = port
    await app.server.start()
    assert app.server.address[1] == port
    client = await connect(app.server)
    assert await client.request(Add(2, 2)) == Sum(4)


async def test_start_and_stop_log_lines(settings: Settings, caplog: Any) -> None:
    caplog.set_level(logging.INFO, "bitchat.server")
    server = Server("127.0.0.1", 0, settings, registry=REG)
    async with server:
        port = server.address[1]
    messages = [r.getMessage() for r in caplog.records if r.name == "bitchat.server"]
    loop_name = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    assert messages[0] == (
        f"bitchat server started on 127.0.0.1:{port} (mode: standalone, tls: off, "
        f"loop: {loop_name})"
    )
    assert messages[-1] == "bitchat server stopped"
    caplog.clear()
    async with Server("127.0.0.1", 0, settings, registry=REG, mode="router") as router:
        port = router.address[1]
    messages = [r.getMessage() for r in caplog.records if r.name == "bitchat.server"]
    assert messages[0].startswith(f"bitchat router started on 127.0.0.1:{port} (mode: router,")
    assert messages[-1] == "bitchat router stopped"


# -- TLS ---------------------------------------------------------------------------------------


def self_signed(tmp: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    crypto = pytest.importorskip("cryptography")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bitchat test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


async def test_tls(settings: Settings, tmp_path: Path, caplog: Any, raw_connect: Any) -> None:
    cert, key = self_signed(tmp_path)
    caplog.set_level(logging.INFO, "bitchat.server")
    tls_settings = settings.replace(tls_cert=cert, tls_key=key, read_idle_timeout=0.5)
    server = Server("127.0.0.1", 0, tls_settings, registry=REG)
    server.add_handler(Add, lambda s, p: Sum(p.a + p.b))
    async with server:
        assert "tls: on" in caplog.records[0].getMessage()
        ctx = ssl.create_default_context(cafile=cert)
        client = Client(
            "127.0.0.1",
            server.address[1],
            tls_settings.replace(heartbeat_interval=0.1),
            registry=REG,
            ssl=ctx,
        )
        async with client:
            assert await client.request(Add(40, 2)) == Sum(42)
            assert await client.request(Ping()) is not None
        # A client that does not trust the certificate cannot connect.
        untrusting = Client(
            "127.0.0.1",
            server.address[1],
            settings,
            registry=REG,
            ssl=ssl.create_default_context(),
            reconnect=False,
        )
        with pytest.raises(ConnectionClosed):
            await untrusting.connect(timeout=WAIT)
        # Nor can one that speaks plain TCP to the TLS port: it is closed (at the latest
        # after the idle timeout, as the handshake cannot complete), not served.
        peer = await raw_connect(server.address[1])
        peer.send_frame(1, rid=1)
        with contextlib.suppress(ConnectionResetError):
            assert b"\xbc" not in await peer.read_to_eof()


async def test_tls_needs_a_key(settings: Settings, tmp_path: Path) -> None:
    server = Server("127.0.0.1", 0, settings.replace(tls_cert=str(tmp_path / "c.pem")))
    with pytest.raises(UsageError):
        await server.start()


def test_registry_is_shared_with_handlers() -> None:
    reg = Registry()
    server = Server("127.0.0.1", 0, registry=reg)
    server.add_handler(Add, lambda s, p: None)
    assert reg.get(Add.TYPE) is Add


async def test_stop_during_start_stops_once_started(settings: Settings) -> None:
    # As when SIGTERM arrives while `bitchat server` is still opening its database.
    server = Server("127.0.0.1", 0, settings, registry=REG)
    opening = asyncio.Event()
    release = asyncio.Event()

    async def slow_startup(server: Server) -> None:
        opening.set()
        await release.wait()

    server.on_startup.append(slow_startup)
    serving = asyncio.create_task(server.serve_forever())
    await asyncio.wait_for(opening.wait(), WAIT)
    stopping = asyncio.create_task(server.stop())
    release.set()
    await asyncio.wait_for(stopping, WAIT)
    await asyncio.wait_for(serving, WAIT)  # serve_forever returns: the server is stopped
    assert server._server is not None and not server._server.is_serving()


async def test_rate_limit_burst_is_not_doubled_after_a_quiet_time(
    make_app: Any, raw_connect: Any
) -> None:
    app = await make_app(rate_limit=0.001, rate_burst=3)
    peer = await raw_connect(app.server.address[1])
    assert await peer.request(1, rid=1) == (1, RESPONSE, 2, 1, {})
    (session,) = app.server.sessions.values()
    session.core._tokens_at -= 1000.0  # as if the connection had been quiet for long
    peer.send(b"".join(peer.frame(61300, {"a": i, "b": 0}, rid=i) for i in range(1, 6)))
    codes = [(await peer.read_frame())[4].get("code") for _ in range(5)]
    assert codes == [None, None, None, "rate_limited", "rate_limited"]


async def test_an_idle_peer_that_reads_nothing_is_not_kept_forever(
    make_app: Any, wait: Any
) -> None:
    # close() waits for the unsent bytes to leave; a peer that never reads would hold
    # its connection (and buffers) forever if the idle close did not end in an abort.
    app = await make_app(read_idle_timeout=0.3, write_hard_limit=64 << 20)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", app.server.address[1]))
    try:
        sock.sendall(b"\xbc\x01\x01\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00")  # a Ping
        session = await wait(app.opened.get())
        blob = Blob("x" * 65536)
        for _ in range(128):  # 8 MiB: more than the kernel buffers hold, under the limit
            session.push(blob)
        assert await wait(app.closed.get()) is session
    finally:
        sock.close()
