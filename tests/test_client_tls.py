"""TLS failures are named, not taken for a dead server: ``Client`` raises a
``TLSError`` with the cause and stops reconnecting, where it used to retry for
ever (an untrusted certificate) or count itself connected and time out (a plain
client at a TLS port). Real servers on loopback, certificates made with the
``cryptography`` package (see test_server.self_signed)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bitchat import Client, ConnectionClosed, Ping, Server, Settings, State, TLSError
from conftest import WAIT
from test_server import self_signed

# Timers that make a wrong path show: a client that waited out its connect timeout
# (or retried) would not be done within WAIT.
SLOW_CONNECT = {"connect_timeout": 60 * WAIT, "request_timeout": 60 * WAIT}
FAST_RETRY = {"reconnect_initial_delay": 0.01, "reconnect_max_delay": 0.02}


def _settings(**changes: object) -> Settings:
    return Settings(**(SLOW_CONNECT | FAST_RETRY | changes))  # type: ignore[arg-type]


class _States:
    def __init__(self, client: Client) -> None:
        self.seen: list[State] = []
        client.on_state.append(self.seen.append)


async def _connect_fails(client: Client) -> TLSError:
    states = _States(client)
    try:
        with pytest.raises(TLSError) as info:
            await asyncio.wait_for(client.connect(None), WAIT)  # None: retry for ever
    finally:
        await client.close()
    assert State.CONNECTED not in states.seen  # never "Connected"
    assert states.seen.count(State.CONNECTING) == 1  # one attempt: no retrying
    assert client.last_error is info.value
    return info.value


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[int, str]]:
    cert, key = self_signed(tmp_path)
    server = Server("127.0.0.1", 0, _settings(tls_cert=cert, tls_key=key))
    async with server:
        yield server.address[1], cert


async def test_an_untrusted_certificate_is_final(tls_server: tuple[int, str]) -> None:
    port, _ = tls_server
    client = Client("127.0.0.1", port, _settings(), ssl=ssl.create_default_context())
    error = await _connect_fails(client)
    assert error.reason == TLSError.CERTIFICATE
    assert str(error) == "certificate verify failed: self-signed certificate"
    assert isinstance(error, ConnectionClosed)
    assert isinstance(error.__cause__, ssl.SSLCertVerificationError)


@pytest.mark.parametrize("serializer", ["json", "msgpack"])
async def test_a_plain_client_at_a_tls_port(tls_server: tuple[int, str], serializer: str) -> None:
    """The TLS server closes at the opening Ping (a JSON one would make it wait for
    15 KiB, up to its handshake timeout); a TLS handshake then succeeds."""
    port, _ = tls_server
    client = Client("127.0.0.1", port, _settings(), serializer=serializer)
    error = await _connect_fails(client)
    assert (error.reason, str(error)) == (TLSError.SERVER_SPEAKS_TLS, "the server speaks TLS")


async def test_a_tls_client_at_a_plain_port(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path)
    async with Server("127.0.0.1", 0, _settings()) as server:
        ctx = ssl.create_default_context(cafile=cert)
        client = Client("127.0.0.1", server.address[1], _settings(), ssl=ctx)
        error = await _connect_fails(client)
        assert error.reason == TLSError.SERVER_SPEAKS_PLAIN
        assert str(error) == "the server does not speak TLS"


async def test_a_tls_record_where_a_frame_should_start() -> None:
    """A peer whose first bytes are a TLS alert speaks TLS (no handshake is tried:
    this one would not even complete one)."""

    async def alert(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x15\x03\x03\x00\x02\x02\x28")  # alert: handshake_failure
        await reader.read()
        writer.close()

    server = await asyncio.start_server(alert, "127.0.0.1", 0)
    try:
        client = Client("127.0.0.1", server.sockets[0].getsockname()[1], _settings())
        error = await _connect_fails(client)
        assert error.reason == TLSError.SERVER_SPEAKS_TLS
    finally:
        server.close()


async def test_a_server_that_closes_without_a_word_is_retried() -> None:
    """Not every silent close is TLS: without a TLS handshake to prove it, the client
    goes on retrying, and says why."""
    accepted = 0
    enough = asyncio.Event()

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        if accepted >= 6:  # three attempts, each with its TLS probe
            enough.set()
        writer.transport.abort()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    client = Client("127.0.0.1", server.sockets[0].getsockname()[1], _settings())
    states = _States(client)
    connecting = asyncio.ensure_future(client.connect(None))
    try:
        await asyncio.wait_for(enough.wait(), WAIT)
        assert not connecting.done()
        assert states.seen.count(State.CONNECTING) >= 3
        assert State.CONNECTED not in states.seen
        assert isinstance(client.last_error, ConnectionClosed)
        assert not isinstance(client.last_error, TLSError)
        assert str(client.last_error) == "the server closed the connection without a word"
    finally:
        connecting.cancel()
        await client.close()
        server.close()


async def test_a_reconnect_that_meets_a_new_untrusted_certificate_stops(tmp_path: Path) -> None:
    """Connected, then the server comes back with a certificate the client does not
    trust: the client stops there, and requests fail with the cause."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert_a, key_a = self_signed(tmp_path / "a")
    cert_b, key_b = self_signed(tmp_path / "b")
    first = Server("127.0.0.1", 0, _settings(tls_cert=cert_a, tls_key=key_a))
    await first.start()
    port = first.address[1]
    client = Client("127.0.0.1", port, _settings(), ssl=ssl.create_default_context(cafile=cert_a))
    closed = asyncio.Event()
    client.on_state.append(lambda s: closed.set() if s is State.CLOSED else None)
    try:
        await client.connect(WAIT)
        await first.stop()
        async with Server("127.0.0.1", port, _settings(tls_cert=cert_b, tls_key=key_b)):
            await asyncio.wait_for(closed.wait(), WAIT)
            assert isinstance(client.last_error, TLSError)
            assert client.last_error.reason == TLSError.CERTIFICATE
            with pytest.raises(TLSError, match="certificate verify failed"):
                await asyncio.wait_for(client.request(Ping()), WAIT)
    finally:
        await client.close()
        await first.stop()
